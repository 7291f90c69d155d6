"""The McCormick coefficients of a product taken a block of rows at a time, and the median of the hints
(docs/method.md §4.4, §4.2).

* ``plane_coefficients`` equals, bit for bit, the whole-array formula written here (grad⁺ = max(grad, 0),
  grad⁻ = grad − grad⁺, grad⁺·upper + grad⁻·lower summed down to each factor's shape, the constant's
  two sums and their magnitude) for random shapes, broadcasts and block sizes (one row, a few rows,
  every row at once), with infinite and zero coefficients;
* its bound holds: grad·(x·y) ≤ x_coef·x + y_coef·y + constant at the corners and inside random boxes
  (an independent check of the planes), and a copy whose constant is lowered by 10 % of its
  magnitude is caught; a copy that skips the last block of rows is caught by the equality;
* the CROWN ranges of the SE model ``sample_models/mobilenet_se.onnx`` are the same numbers with
  blocks of one row, of seven rows, and with the whole-array formula;
* ``middle_value`` is ``np.median`` (odd and even sizes, ±∞, NaN); a copy taking the lower middle
  value is caught.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import robaudit.bounds.ranges as ranges
import robaudit.graph.ops.elementwise as elementwise
from robaudit.bounds.audit import load_network, middle_value
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import Interval
from robaudit.graph.ops.base import reduce_to_shape
from robaudit.graph.ops.elementwise import plane_coefficients, product_planes

SE_MODEL = Path(__file__).resolve().parent.parent / "sample_models" / "mobilenet_se.onnx"


def whole_array(grad, planes, x_shape, y_shape):
    """The coefficients as one pass over the whole array per step (the formula of docs/method.md §4.2)."""
    pos = np.maximum(grad, 0.0)
    neg = grad - pos
    k = grad.shape[0]
    coefs = [
        reduce_to_shape(pos * upper + neg * lower, tuple(shape))
        for shape, (upper, lower) in ((x_shape, planes[0]), (y_shape, planes[1]))
    ]
    up_const, low_const = planes[2]
    terms = (pos * up_const).reshape(k, -1), (neg * low_const).reshape(k, -1)
    magnitude = np.abs(terms[0]).sum(axis=1) + np.abs(terms[1]).sum(axis=1)
    return coefs[0], coefs[1], terms[0].sum(axis=1) + terms[1].sum(axis=1), magnitude


def _case(rows: int, channels: int, side: int, seed: int, special: bool):
    rng = np.random.default_rng(seed)
    x_lo = rng.normal(0, 2, (1, channels, side, side))
    x = Interval(x_lo, x_lo + rng.uniform(0, 3, x_lo.shape))
    y_lo = rng.normal(0, 1, (1, channels, 1, 1))
    y = Interval(y_lo, y_lo + rng.uniform(0, 2, y_lo.shape))
    grad = rng.normal(0, 1, (rows, 1, channels, side, side)) * rng.uniform(0, 1e3, (rows, 1, 1, 1, 1))
    if special:  # exact zeros, negative zeros and infinite coefficients
        grad[rng.uniform(size=grad.shape) < 0.2] = 0.0
        grad[rng.uniform(size=grad.shape) < 0.05] = -0.0
        grad.reshape(-1)[rng.integers(0, grad.size)] = np.inf
        grad.reshape(-1)[rng.integers(0, grad.size)] = -np.inf
    return grad, x, y


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (NaN where NaN), same shape."""
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.integers(1, 23),
    st.integers(1, 5),
    st.integers(1, 4),
    st.sampled_from([1, 7, 40, 2**15, 2**30]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_blocks_equal_the_whole_array(rows, channels, side, block, special, seed):
    grad, x, y = _case(rows, channels, side, seed, special)
    planes = product_planes(x, y)
    saved = elementwise.PLANE_BLOCK_ELEMENTS
    with np.errstate(invalid="ignore"):
        expected = whole_array(grad, planes, x.shape, y.shape)
        try:
            elementwise.PLANE_BLOCK_ELEMENTS = block
            found = plane_coefficients(grad, planes, x.shape, y.shape)
        finally:
            elementwise.PLANE_BLOCK_ELEMENTS = saved
    for a, b in zip(expected, found, strict=True):
        assert _same(a, b)


def test_a_copy_that_drops_the_last_block_is_caught(monkeypatch):
    grad, x, y = _case(9, 3, 2, seed=1, special=False)
    planes = product_planes(x, y)
    expected = whole_array(grad, planes, x.shape, y.shape)

    def dropped(grad, planes, x_shape, y_shape):
        found = plane_coefficients(grad[:-1], planes, x_shape, y_shape)
        return tuple(np.concatenate([f, np.zeros_like(f[:1])]) for f in found)

    monkeypatch.setattr(elementwise, "PLANE_BLOCK_ELEMENTS", 12)
    assert not all(_same(a, b) for a, b in zip(expected, dropped(grad, planes, x.shape, y.shape), strict=True))


def _violations(coefficients, grad, x: Interval, y: Interval, seed: int) -> int:
    """Rows and points where grad·(x·y) exceeds the linear bound (corners and random points of the boxes)."""
    x_coef, y_coef, constant, magnitude = coefficients
    rng = np.random.default_rng(seed)
    rows = grad.shape[0]
    points = [(x.lo, y.lo), (x.lo, y.hi), (x.hi, y.lo), (x.hi, y.hi)]
    points += [(rng.uniform(x.lo, x.hi), rng.uniform(y.lo, y.hi)) for _ in range(100)]
    count = 0
    for px, py in points:
        value = (grad * (px * py)).reshape(rows, -1).sum(axis=1)
        bound = (x_coef * px).reshape(rows, -1).sum(axis=1) + (y_coef * py).reshape(rows, -1).sum(axis=1) + constant
        slack = 1e-9 * (1.0 + magnitude + np.abs(value) + np.abs(bound))
        count += int(np.sum(value > bound + slack))
    return count


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31))
def test_the_linear_bound_holds_on_the_boxes(rows, channels, side, seed):
    grad, x, y = _case(rows, channels, side, seed, special=False)
    found = plane_coefficients(grad, product_planes(x, y), x.shape, y.shape)
    assert _violations(found, grad, x, y, seed) == 0


def test_a_lowered_constant_is_caught():
    caught = 0
    for seed in range(5):
        grad, x, y = _case(6, 3, 2, seed, special=False)
        x_coef, y_coef, constant, magnitude = plane_coefficients(grad, product_planes(x, y), x.shape, y.shape)
        caught += _violations((x_coef, y_coef, constant - 0.1 * magnitude, magnitude), grad, x, y, seed) > 0
    assert caught == 5


def _se_ranges() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _, network = load_network(SE_MODEL, NetworkOptions())
    return {name: (box.lo.copy(), box.hi.copy()) for name, box in network.clean.items()}


def test_se_model_ranges_do_not_depend_on_the_blocks(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(ranges, "plane_coefficients", whole_array)
        expected = _se_ranges()
    for block in (1, 7 * 16):
        with monkeypatch.context() as patch:
            patch.setattr(elementwise, "PLANE_BLOCK_ELEMENTS", block)
            found = _se_ranges()
        assert found.keys() == expected.keys()
        for name, (lo, hi) in expected.items():
            assert _same(found[name][0], lo) and _same(found[name][1], hi), name


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.one_of(st.floats(-1e6, 1e6), st.sampled_from([np.inf, -np.inf, 0.0, -0.0])),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_middle_value_is_the_median(values, with_nan):
    array = np.array(values + ([np.nan] if with_nan else []), dtype=np.float64)
    expected = float(np.median(array))
    found = middle_value(array)
    assert (np.isnan(expected) and np.isnan(found)) or expected == found


def test_lower_middle_value_is_caught():
    def lower(values: np.ndarray) -> float:
        ordered = np.sort(values)
        return float(ordered[(ordered.size - 1) // 2])

    array = np.array([1.0, 2.0, 4.0, 8.0])
    assert middle_value(array) == float(np.median(array)) != lower(array)


@pytest.mark.parametrize("values", [[3.0], [1.0, np.inf], [-np.inf, np.inf], [5.0, 1.0, 3.0]])
def test_middle_value_edges(values):
    with np.errstate(invalid="ignore"):
        expected = float(np.median(np.array(values)))
    found = middle_value(np.array(values))
    assert (np.isnan(expected) and np.isnan(found)) or expected == found
