"""The first layer's signed term over one shared input (docs/method.md §5.9).

* the pieces of one origin bound its largest corner κ·(v − φ(z)) ∨ 0 at every z of a dense grid, for κ and v
  anywhere in their intervals (hypothesis); without the constant piece they do not (the check can fail);
* the set search equals a brute-force maximum over every set and every vertex of the input box where every
  piece is convex (crash), is never below sampled values otherwise, never below them with a small pool or a
  budget that stops it early; shrunk by 10 %, or without the stand-ins for origins outside the pool, it falls
  below the brute force in some draw (the checks can fail);
* on small random residual networks, the vector's signed bound with the rule stays above every fault the
  independent injector of ``tests/ort_faults.py`` produces, is never above the bound without it
  (``ROBAUDIT_SHARED_BUDGET=0``) and is below it in some draws.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_signed_residual import rule_lowers_soundly

from robaudit.bounds import shared_input
from robaudit.bounds.shared_input import origin_pieces, shared_top_sum


def _corner(kappa_lo: float, kappa_hi: float, a: float, b: float, y: np.ndarray) -> np.ndarray:
    """max(0, max over κ ∈ [κlo, κhi], v ∈ [a, b] of κ·(v − y)), elementwise: bilinear, so at the ends."""
    found = np.zeros_like(y)
    for kappa in np.linspace(kappa_lo, kappa_hi, 5):
        for v in np.linspace(a, b, 5):
            found = np.maximum(found, kappa * (v - y))
    return found


def _piece_max(slopes: np.ndarray, intercepts: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.max(slopes[None, :] * z[:, None] + intercepts[None, :], axis=1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.floats(-3.0, 3.0), st.floats(0.0, 4.0), st.floats(-2.0, 0.0), st.floats(0.0, 2.0), st.booleans(),
    st.floats(-3.0, 1.0), st.floats(0.0, 5.0),
)
def test_pieces_bound_every_corner(k_lo, k_width, a, b, relu, z_lo, z_width):
    k_hi = k_lo + k_width
    z = np.linspace(z_lo, z_lo + z_width, 401)
    y = np.maximum(z, 0.0) if relu else z
    slopes, intercepts = origin_pieces(k_lo, k_hi, float(y.min()), a, b, relu)
    assert len(slopes) <= 3
    assert np.all(_piece_max(slopes, intercepts, z) >= _corner(k_lo, k_hi, a, b, y) - 1e-9)


def test_pieces_without_the_constant_are_caught():
    # κhi > 0 on a ReLU origin: only the constant piece holds κhi·(v − relu(z)); without it the pieces fall short
    slopes, intercepts = origin_pieces(-0.5, 2.0, 0.0, -1.0, 1.0, True)
    z = np.linspace(-2.0, 2.0, 101)
    y = np.maximum(z, 0.0)
    assert np.all(_piece_max(slopes, intercepts, z) >= _corner(-0.5, 2.0, -1.0, 1.0, y) - 1e-9)
    assert np.any(_piece_max(slopes[1:], intercepts[1:], z) < _corner(-0.5, 2.0, -1.0, 1.0, y) - 1e-3)


def _problem(rng: np.random.Generator, crash: bool, n: int = 7, inputs: int = 5):
    """A random first layer z = A·x + c on [0, 1]^inputs with sparse rows, coefficient intervals and failed values."""
    matrix = rng.normal(0.0, 1.0, (n, inputs)) * (rng.uniform(size=(n, inputs)) < 0.6)
    offset = rng.normal(0.0, 0.5, n)
    if crash:
        k_lo, k_hi, a, b = -rng.uniform(0.2, 2.0, n), rng.uniform(0.0, 2.0, n), 0.0, 0.0
    else:
        k_lo = rng.normal(0.0, 1.0, n)
        k_hi, a, b = k_lo + rng.uniform(0.0, 1.5, n), -1.0, 1.0
    return matrix, offset, k_lo, k_hi, a, b


def _search(matrix, offset, k_lo, k_hi, a, b, count, pool, budget=1e12):
    lo, hi = np.zeros(matrix.shape[1]), np.ones(matrix.shape[1])
    z_lo = offset + np.minimum(matrix * lo, matrix * hi).sum(axis=1)
    z_hi = offset + np.maximum(matrix * lo, matrix * hi).sum(axis=1)
    y_lo, y_hi = np.maximum(z_lo, 0.0), np.maximum(z_hi, 0.0)
    corners = np.maximum.reduce([np.zeros_like(k_lo)] + [k * (v - y) for k in (k_lo, k_hi) for v in (a, b)
                                                          for y in (y_lo, y_hi)])
    order = np.argsort(-corners, kind="stable")[:pool]
    pieces = {int(i): origin_pieces(float(k_lo[i]), float(k_hi[i]), float(y_lo[i]), a, b, True) for i in order}
    return shared_top_sum(matrix, offset, lo, hi, pieces, corners, count, budget)[0]


def _brute(matrix, offset, k_lo, k_hi, a, b, count, x):
    """max over the inputs ``x`` [samples, inputs] and every set of ``count`` origins of the summed corners."""
    y = np.maximum(x @ matrix.T + offset, 0.0)  # [samples, n]
    each = np.stack([_corner(k_lo[i], k_hi[i], a, b, y[:, i]) for i in range(matrix.shape[0])], axis=1)
    top = -np.sort(-each, axis=1)
    return float(top[:, :count].sum(axis=1).max())


def _vertices(inputs: int) -> np.ndarray:
    return np.asarray(list(itertools.product([0.0, 1.0], repeat=inputs)))


def test_search_is_exact_on_crash_and_a_weakened_copy_is_caught():
    rng = np.random.default_rng(11)
    shrunk_caught, lowered = False, False
    for _ in range(12):
        matrix, offset, k_lo, k_hi, a, b = _problem(rng, True)
        for count in (2, 3):
            exact = _brute(matrix, offset, k_lo, k_hi, a, b, count, _vertices(matrix.shape[1]))
            found = _search(matrix, offset, k_lo, k_hi, a, b, count, pool=matrix.shape[0])
            # every piece convex: the maximum of a convex sum over a box is at a vertex, so they agree
            assert exact <= found <= exact * (1 + 1e-8) + 1e-8
            separate = -np.sort(-np.maximum(-k_lo, 0.0) * np.maximum(offset + np.maximum(matrix, 0).sum(1), 0))
            lowered = lowered or found < separate[:count].sum() * (1 - 1e-6)
            shrunk_caught = shrunk_caught or 0.9 * found < exact
    assert lowered and shrunk_caught


def test_search_holds_sampled_values_with_a_small_pool_or_budget_and_without_stand_ins_it_does_not():
    rng = np.random.default_rng(12)
    caught = False
    for draw in range(16):
        crash = draw % 2 == 0
        matrix, offset, k_lo, k_hi, a, b = _problem(rng, crash)
        x = np.concatenate([_vertices(matrix.shape[1]), rng.uniform(0.0, 1.0, (3000, matrix.shape[1]))])
        for count in (2, 3):
            seen = _brute(matrix, offset, k_lo, k_hi, a, b, count, x)
            for pool, budget in ((7, 1e12), (3, 1e12), (2, 1e12), (7, 400.0)):
                found = _search(matrix, offset, k_lo, k_hi, a, b, count, pool, budget)
                assert found >= seen - 1e-9, (draw, count, pool, budget, found, seen)
            # the stand-ins dropped: a set with origins outside a pool of 2 is never charged
            weakened = _search_without_stand_ins(matrix, offset, k_lo, k_hi, a, b, count)
            caught = caught or weakened < seen - 1e-6
    assert caught


def _search_without_stand_ins(matrix, offset, k_lo, k_hi, a, b, count):
    original = shared_input._left_out
    try:
        shared_input._left_out = lambda corners, pool: 0.0  # origins outside the pool never charged
        return _search(matrix, offset, k_lo, k_hi, a, b, count, pool=2)
    finally:
        shared_input._left_out = original


def _vectors_hold(tmp_path, mode: str, seeds, vectors, monkeypatch) -> list[bool]:
    """:func:`test_signed_residual.rule_lowers_soundly` for this rule's budget."""
    return rule_lowers_soundly(tmp_path, mode, seeds, vectors, monkeypatch, "ROBAUDIT_SHARED_BUDGET")


def test_bound_with_shared_input_is_sound(tmp_path, monkeypatch):
    lowered = _vectors_hold(tmp_path, "crash", [700, 701], ([2, 1, 1, 1], [3, 0, 1, 0]), monkeypatch)
    assert any(lowered), lowered


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_bound_with_shared_input_campaign(tmp_path, mode, monkeypatch):
    vectors = ([2, 1, 1, 1], [3, 0, 1, 0], [2, 0, 0, 1], [3, 1, 1, 1])
    lowered = _vectors_hold(tmp_path, mode, range(710, 716), vectors, monkeypatch)
    assert any(lowered), lowered


def test_origins_outside_the_pool_are_reached_when_a_pool_origin_tops_below_them():
    """A pool origin whose corner is looser than its pieces (top 1, corner 10) sorts below the stand-ins for the
    origins outside the pool (corner 5 each): the best set is two of those, sum 10, not the pool origin plus one."""
    from robaudit.bounds.shared_input import shared_top_sum

    matrix, offset, lo, hi = np.ones((3, 1)), np.zeros(3), np.zeros(1), np.ones(1)
    pieces = {0: (np.array([0.0]), np.array([1.0]))}  # h_0(x) = 1 on the whole box
    bound, _, _ = shared_top_sum(matrix, offset, lo, hi, pieces, np.array([10.0, 5.0, 5.0]), 2, 1e9)
    assert bound >= 10.0
