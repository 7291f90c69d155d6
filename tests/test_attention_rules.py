"""Normalization, Softmax, products of two variables and embedding lookups (docs/method.md §12.2, §13):
each rule against an independent numpy computation on points of its box, and a weakened copy
of each rule (range shrunk 10 %, slope halved) caught by the same check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robaudit.graph.ops.affine import matmul_interval
from robaudit.graph.ops.base import Interval
from robaudit.graph.ops.normalization import (
    deviation_interval,
    max_mean_square,
    max_variance,
    min_mean_square,
    min_variance,
    normalization_adjoint,
    normalized_from_deviations,
    normalized_interval,
    sigma_floor,
    variance_from_lines,
)
from robaudit.graph.ops.pooling import softmax_adjoint, softmax_interval

SEEDS = st.integers(0, 2**31 - 1)


def layer_norm(x: np.ndarray, eps: float, rms: bool) -> np.ndarray:
    """Independent reference: ONNX LayerNormalization / RMSNormalization over the last axis, float64."""
    if rms:
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_box(rng: np.random.Generator, shape, spread: float = 2.0) -> Interval:
    centre = rng.normal(0.0, spread, shape)
    radius = rng.uniform(0.0, 1.0, shape) * rng.choice([0.01, 0.3, 2.0])
    return Interval(centre - radius, centre + radius)


def points(rng: np.random.Generator, box: Interval, count: int) -> np.ndarray:
    """Points of the box: corners-heavy (where the extremes sit) and interior."""
    u = rng.uniform(0, 1, (count,) + box.shape)
    corners = rng.integers(0, 2, (count // 2,) + box.shape).astype(float)
    u[: count // 2] = corners
    return box.lo + u * (box.hi - box.lo)


def min_var_grid(box: Interval) -> np.ndarray:
    """min over the box of the variance, independently: the clipped constant vector on a fine grid of c."""
    grid = np.linspace(box.lo.min(), box.hi.max(), 20001)
    clipped = np.clip(grid[:, None, None], box.lo[None], box.hi[None])  # [C, G, n]
    return clipped.var(axis=-1).min(axis=0)


# --------------------------------------------------------------------------- minimum variance


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 12))
def test_min_variance_is_a_tight_lower_bound(seed, n):
    rng = np.random.default_rng(seed)
    box = random_box(rng, (3, n))
    bound = min_variance(box.lo, box.hi)
    grid = min_var_grid(box)  # ≥ the true minimum (a point of the box attains it)
    assert np.all(bound <= grid + 1e-12)
    assert np.all(bound >= grid - 1e-6 * (1 + grid) - 1e-9)  # and close to it
    assert np.all(points(rng, box, 200).var(axis=-1) >= bound - 1e-12)


def test_min_variance_raised_by_ten_percent_is_caught():
    box = Interval(np.array([[0.0, 1.0, 2.0, 3.0]]), np.array([[0.5, 1.2, 2.1, 5.0]]))
    weakened = 1.1 * min_variance(box.lo, box.hi)
    assert np.any(weakened > min_var_grid(box) + 1e-12)


# --------------------------------------------------------------------------- normalization ranges


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 10), st.sampled_from([1e-5, 1e-2, 1.0]), st.booleans())
def test_normalized_interval_holds_every_point(seed, n, eps, rms):
    rng = np.random.default_rng(seed)
    box = random_box(rng, (2, n))
    z = normalized_interval(box.lo, box.hi, eps, rms)
    values = layer_norm(points(rng, box, 300), eps, rms)
    assert np.all(values >= z.lo - 1e-9) and np.all(values <= z.hi + 1e-9)


@pytest.mark.parametrize("rms", [False, True])
def test_normalized_interval_shrunk_ten_percent_is_caught(rms):
    # a small box: the range is nearly a point, so a range scaled by 0.9 (σ 10 % too large) misses it
    rng = np.random.default_rng(3)
    centre = np.array([[0.0, 0.9, 2.0, 2.9]])
    box = Interval(centre - 1e-3, centre + 1e-3)
    z = normalized_interval(box.lo, box.hi, 1e-5, rms)
    values = layer_norm(points(rng, box, 400), 1e-5, rms)
    assert np.all((values >= z.lo - 1e-9) & (values <= z.hi + 1e-9))
    assert np.any((values < 0.9 * z.lo) | (values > 0.9 * z.hi))


def test_normalization_refuses_without_a_positive_deviation_bound():
    box = Interval(np.zeros((1, 4)), np.ones((1, 4)))  # all elements may be equal
    with pytest.raises(ZeroDivisionError):
        normalized_interval(box.lo, box.hi, 0.0, False)


# --------------------------------------------------------------------------- normalization adjoint


def adjoint_matrix(box: Interval, gamma: np.ndarray, eps: float, rms: bool, weaken: float = 1.0) -> np.ndarray:
    """A[i, j]: the rule's bound on |Δz_i| per unit |Δx_j| (its adjoint applied to each e_i)."""
    n = box.shape[-1]
    cot = np.eye(n)[:, None, :]  # K = n outputs, G = 1
    return normalization_adjoint(cot, box.lo, box.hi, gamma, eps, rms)[:, 0, :] * weaken


def adjoint_violation(box, gamma, eps, rms, rng, weaken: float = 1.0, pairs: int = 300) -> float:
    """Largest (measured |Δy| − bound) over pairs of points of the box."""
    matrix = adjoint_matrix(box, gamma, eps, rms, weaken)
    x, y = points(rng, box, pairs)[:, 0], points(rng, box, pairs)[:, 0]
    # pairs of nearby points too: the Jacobian bound is tightest there
    near = x + (y - x) * 1e-3
    worst = -np.inf
    for a, b in ((x, y), (x, near)):
        delta = np.abs(gamma * layer_norm(a, eps, rms) - gamma * layer_norm(b, eps, rms))
        bound = np.abs(a - b) @ matrix.T
        worst = max(worst, float((delta - bound).max()))
    return worst


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 8), st.sampled_from([1e-5, 1e-2, 1.0]), st.booleans())
def test_normalization_adjoint_bounds_every_deviation(seed, n, eps, rms):
    rng = np.random.default_rng(seed)
    box = random_box(rng, (1, n))
    gamma = rng.normal(0, 1.5, n)
    assert adjoint_violation(box, gamma, eps, rms, rng) <= 1e-9


@pytest.mark.parametrize("rms", [False, True])
def test_normalization_adjoint_halved_is_caught(rms):
    # a small box far from equal elements: σ hardly moves, the Jacobian bound is nearly attained
    rng = np.random.default_rng(0)
    centre = np.array([[-1.0, 0.02, 1.0, 2.5]])
    box = Interval(centre - 1e-3, centre + 1e-3)
    gamma = np.ones(4)
    assert adjoint_violation(box, gamma, 1e-5, rms, rng, weaken=0.5) > 0
    assert adjoint_violation(box, gamma, 1e-5, rms, rng) <= 1e-9


# --------------------------------------------------------------------------- σ at the clean input


def widened(rng: np.random.Generator, box: Interval, scale: float) -> Interval:
    """A faulty box holding the clean one: each side pushed out by a random amount."""
    return Interval(box.lo - rng.uniform(0, scale, box.shape), box.hi + rng.uniform(0, scale, box.shape))


def clean_sigma_violation(clean, faulty, gamma, eps, rms, rng, weaken: float = 1.0, pairs: int = 400) -> float:
    """Largest (measured |Δy| − bound) with the clean point in ``clean`` and the faulty one in ``faulty``."""
    n = clean.shape[-1]
    floor = sigma_floor(clean.lo, clean.hi, eps, rms)
    matrix = normalization_adjoint(np.eye(n)[:, None, :], faulty.lo, faulty.hi, gamma, eps, rms, floor)[:, 0, :]
    x = points(rng, clean, pairs)[:, 0]
    worst = -np.inf
    for y in (points(rng, faulty, pairs)[:, 0], x + rng.normal(0, 0.05, x.shape) * (faulty.hi - faulty.lo)):
        y = np.clip(y, faulty.lo[0], faulty.hi[0])
        delta = np.abs(gamma * layer_norm(x, eps, rms) - gamma * layer_norm(y, eps, rms))
        worst = max(worst, float((delta - np.abs(x - y) @ (matrix * weaken).T).max()))
    return worst


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.integers(2, 8), st.sampled_from([0.0, 1e-5, 1e-2]), st.booleans(), st.sampled_from([0.1, 1.0, 5.0]))
def test_clean_sigma_adjoint_bounds_every_deviation(seed, n, eps, rms, scale):
    """The faulty input anywhere in a wider box (σ there may reach 0), the clean one in its own box."""
    rng = np.random.default_rng(seed)
    clean = random_box(rng, (1, n))
    if not np.all(sigma_floor(clean.lo, clean.hi, eps, rms) > 0):
        return  # no positive σ at the clean input: the rule does not apply (refused)
    faulty = widened(rng, clean, scale)
    gamma = rng.normal(0, 1.5, n)
    assert clean_sigma_violation(clean, faulty, gamma, eps, rms, rng) <= 1e-9


@pytest.mark.parametrize("rms", [False, True])
def test_clean_sigma_adjoint_halved_is_caught(rms):
    # σ small at the clean point, the faulty box wide: a faulty point that turns the normalized vector round
    rng = np.random.default_rng(4)
    centre = np.array([[0.0, 0.05, -0.05, 0.02]]) if not rms else np.array([[0.05, -0.05, 0.02, 0.0]])
    clean = Interval(centre - 1e-4, centre + 1e-4)
    faulty = Interval(clean.lo - 0.3, clean.hi + 0.3)
    gamma = np.ones(4)
    assert clean_sigma_violation(clean, faulty, gamma, 1e-5, rms, rng, pairs=3000) <= 1e-9
    assert clean_sigma_violation(clean, faulty, gamma, 1e-5, rms, rng, weaken=0.5, pairs=3000) > 0


# --------------------------------------------------------------------------- variance floor from lines


def lines_case(rng: np.random.Generator, groups: int, n: int, free: int, gap: float):
    a = rng.normal(0, 1, (groups, n, free))
    c = rng.normal(0, 1.5, (groups, n))
    r = rng.uniform(0, gap, (groups, n))
    box = Interval(rng.uniform(-1, 0, free), rng.uniform(0, 1, free))
    return (a, c - r), (a, c + r), box


def smallest_by_scipy(lower, upper, box) -> np.ndarray:
    """min over the box of (1/n)·Σ dist(0, [L_i(u), U_i(u)])², per group, by L-BFGS-B from many starts
    (an independent solver: its value is attained at a point of the box, so it is ≥ the true minimum)."""
    from scipy.optimize import minimize

    (a_lo, c_lo), (a_hi, c_hi) = lower, upper
    found = []
    for g in range(a_lo.shape[0]):

        def g_value(u, g=g):
            low, high = a_lo[g] @ u + c_lo[g], -(a_hi[g] @ u + c_hi[g])
            return float(np.mean(np.maximum(np.maximum(low, high), 0.0) ** 2))

        starts = [box.lo, box.hi, (box.lo + box.hi) / 2] + [
            np.random.default_rng(k).uniform(box.lo, box.hi) for k in range(6)
        ]
        bounds = list(zip(box.lo, box.hi, strict=True))
        found.append(min(minimize(g_value, s, method="L-BFGS-B", bounds=bounds).fun for s in starts))
    return np.array(found)


@settings(max_examples=30, deadline=None)
@given(SEEDS, st.integers(2, 6), st.integers(1, 5), st.sampled_from([0.0, 0.3]))
def test_variance_from_lines_is_a_tight_lower_bound(seed, n, free, gap):
    rng = np.random.default_rng(seed)
    lower, upper, box = lines_case(rng, 2, n, free, gap)
    bound = variance_from_lines(lower, upper, box)
    reference = smallest_by_scipy(lower, upper, box)
    assert np.all(bound <= reference + 1e-9)
    if gap == 0.0:  # exact lines (smooth g): the certificate reaches the minimum; with gaps g has kinks
        assert np.all(bound >= reference - 1e-3 * (1 + reference))


def test_variance_from_lines_raised_by_ten_percent_is_caught():
    rng = np.random.default_rng(5)
    lower, upper, box = lines_case(rng, 3, 6, 2, 0.0)  # 6 lines in 2 unknowns: the minimum is well above 0
    reference = smallest_by_scipy(lower, upper, box)
    assert np.all(reference > 0.05)
    assert np.any(1.1 * variance_from_lines(lower, upper, box) > reference + 1e-9)


# --------------------------------------------------------------------------- z from the deviations


def deviation_case(box: Interval, rms: bool):
    if rms:
        return box.lo, box.hi, min_mean_square(box.lo, box.hi), max_mean_square(box.lo, box.hi)
    return (*deviation_interval(box.lo, box.hi), min_variance(box.lo, box.hi), max_variance(box.lo, box.hi))


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 10), st.sampled_from([0.0, 1e-5, 1e-2, 1.0]), st.booleans())
def test_normalized_from_deviations_holds_every_point(seed, n, eps, rms):
    rng = np.random.default_rng(seed)
    box = random_box(rng, (2, n))
    z = normalized_from_deviations(*deviation_case(box, rms), eps, rms)
    values = layer_norm(points(rng, box, 300), eps, rms)
    assert np.all(values >= z.lo - 1e-9) and np.all(values <= z.hi + 1e-9)


@pytest.mark.parametrize("rms", [False, True])
def test_normalized_from_deviations_shrunk_ten_percent_is_caught(rms):
    rng = np.random.default_rng(3)
    centre = np.array([[0.0, 0.9, 2.0, 2.9]])
    box = Interval(centre - 1e-3, centre + 1e-3)
    z = normalized_from_deviations(*deviation_case(box, rms), 1e-5, rms)
    values = layer_norm(points(rng, box, 2000), 1e-5, rms)
    assert np.all((values >= z.lo - 1e-9) & (values <= z.hi + 1e-9))
    assert np.any((values < 0.9 * z.lo) | (values > 0.9 * z.hi))


@pytest.mark.parametrize("rms", [False, True])
def test_normalized_from_deviations_beats_dividing_by_the_extremes_of_sigma(rms):
    box = Interval(np.array([[-1.0, -0.2, 0.5, 3.0]]), np.array([[1.0, 0.3, 0.6, 4.0]]))
    z = normalized_from_deviations(*deviation_case(box, rms), 1e-5, rms)
    plain = normalized_interval(box.lo, box.hi, 1e-5, rms)
    assert np.all(z.hi - z.lo <= plain.hi - plain.lo + 1e-12) and np.any(z.hi - z.lo < plain.hi - plain.lo - 1e-3)


# --------------------------------------------------------------------------- softmax


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(1, 9), st.sampled_from([1.0, 10.0, 400.0]))
def test_softmax_interval_holds_every_point(seed, n, spread):
    rng = np.random.default_rng(seed)
    box = random_box(rng, (3, n), spread)
    s = softmax_interval(box, -1)
    values = softmax(points(rng, box, 300))
    assert np.all(values >= s.lo - 1e-12) and np.all(values <= s.hi + 1e-12)


def test_softmax_interval_of_rows_far_below_the_others_stays_sound():
    # rows whose inputs lie hundreds below other rows: a global shift would underflow them to 0
    box = Interval(np.array([[-1000.0, -1000.0], [0.0, 0.0]]), np.array([[-800.0, -1000.0], [0.0, 0.0]]))
    s = softmax_interval(box, -1)
    assert s.hi[0, 0] == pytest.approx(1.0) and s.lo[1, 0] == pytest.approx(0.5)


def softmax_violation(box, rng, log: bool, weaken: float = 1.0, pairs: int = 300) -> float:
    n = box.shape[-1]
    probs = softmax_interval(box, -1)
    cot = np.eye(n)[:, None, :]
    matrix = softmax_adjoint(cot, probs.lo, probs.hi, 2, log)[:, 0, :] * weaken
    f = (lambda v: np.log(softmax(v))) if log else softmax
    x, y = points(rng, box, pairs)[:, 0], points(rng, box, pairs)[:, 0]
    worst = -np.inf
    for a, b in ((x, y), (x, x + (y - x) * 1e-3)):
        worst = max(worst, float((np.abs(f(a) - f(b)) - np.abs(a - b) @ matrix.T).max()))
    return worst


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 8), st.booleans())
def test_softmax_adjoint_bounds_every_deviation(seed, n, log):
    rng = np.random.default_rng(seed)
    assert softmax_violation(random_box(rng, (1, n)), rng, log) <= 1e-9


@pytest.mark.parametrize("log", [False, True])
def test_softmax_adjoint_halved_is_caught(log):
    rng = np.random.default_rng(1)
    centre = np.array([[0.3, -0.2, 0.1]])
    box = Interval(centre - 1e-3, centre + 1e-3)
    assert softmax_violation(box, rng, log, weaken=0.5) > 0
    assert softmax_violation(box, rng, log) <= 1e-9


# --------------------------------------------------------------------------- products of two variables


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_matmul_interval_holds_every_product(seed, m, k, p):
    rng = np.random.default_rng(seed)
    a, b = random_box(rng, (2, m, k)), random_box(rng, (2, k, p))
    box = matmul_interval(a, b)
    products = points(rng, a, 200) @ points(rng, b, 200)
    assert np.all(products >= box.lo - 1e-9) and np.all(products <= box.hi + 1e-9)


def test_matmul_interval_shrunk_ten_percent_is_caught():
    rng = np.random.default_rng(2)
    a, b = random_box(rng, (1, 2, 3)), random_box(rng, (1, 3, 2))
    box = matmul_interval(a, b)
    centre, radius = (box.lo + box.hi) / 2, (box.hi - box.lo) / 2 * 0.9
    # the interval of one product is attained at a corner: try every corner pair
    corners_a = [np.where(np.array(mask).reshape(a.shape), a.hi, a.lo) for mask in np.ndindex(*(2,) * 6)]
    corners_b = [np.where(np.array(mask).reshape(b.shape), b.hi, b.lo) for mask in np.ndindex(*(2,) * 6)]
    products = np.array([x @ y for x in corners_a[::3] for y in corners_b[::3]])
    assert np.any((products < centre - radius) | (products > centre + radius))
