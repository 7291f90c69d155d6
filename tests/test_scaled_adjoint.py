"""The convolution adjoint of a scaled sensitivity, the product taken only where the
sensitivity is not zero (docs/method.md §4.4), against the loop scatter of
``tests/test_conv_adjoint.py``.

* ``conv2d_adjoint_scaled(g, s)`` equals ``conv2d_adjoint(g·s)`` bit for bit and the loop
  scatter of g·s to 1e-12, for random geometries and groupings, sensitivities that vanish
  outside a rectangle, scales with zeros (which shrink the rectangle, down to nothing) and
  scalar scales (the number 1 passes the sensitivity on without a copy, ``scaled_by``).
* A copy whose rectangle loses its last row is caught by the loop comparison, and so is a
  ``scaled_by`` that skips the product for every scalar instead of 1 alone.
* ``conv2d_nonzero_rows`` (the adjoint of a ConvTranspose: only the output rows reached by
  the band of non-zero input rows) equals the loop convolution to 1e-12 and the whole
  ``conv2d`` to a few ulps (another BLAS grouping); a copy that loses the band's last
  output row is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conv_adjoint import conv_cases, loop_adjoint, loop_conv

import robaudit.graph.conv as conv_module
from robaudit.graph.conv import ConvGeometry, conv2d, conv2d_adjoint, conv2d_adjoint_scaled, conv2d_nonzero_rows


def _scale(draw_kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | float:
    if draw_kind == "scalar":
        return float(rng.exponential())
    if draw_kind == "one":  # passed on without a copy (x·1 = x)
        return 1.0
    scale = rng.exponential(size=shape)
    if draw_kind == "zeros":
        scale[rng.uniform(size=shape) < 0.4] = 0.0
    elif draw_kind == "border":  # zero on the first and last output rows: the rectangle shrinks
        scale[:, :1] = 0.0
        scale[:, -1:] = 0.0
    elif draw_kind == "none":
        scale[:] = 0.0
    return scale


@pytest.mark.parametrize("edge_area", [1, conv_module._EDGE_CHECK_AREA], ids=["every-plane", "default"])
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    case=conv_cases(),
    kind=st.sampled_from(["scalar", "one", "dense", "zeros", "border", "none"]),
    seed=st.integers(0, 2**31),
)
def test_scaled_adjoint_equals_the_adjoint_of_the_product(case, kind, seed, edge_area):
    grad, weight, geom, in_hw = case
    grad = np.abs(grad)
    scale = _scale(kind, grad.shape[1:], np.random.default_rng(seed))
    default = conv_module._EDGE_CHECK_AREA
    conv_module._EDGE_CHECK_AREA = edge_area  # 1: the rectangle search and the edge test on every plane size
    try:
        result = conv2d_adjoint_scaled(grad, scale, np.abs(weight), geom, in_hw)
    finally:
        conv_module._EDGE_CHECK_AREA = default
    np.testing.assert_array_equal(result, conv2d_adjoint(grad * scale, np.abs(weight), geom, in_hw))
    expected = loop_adjoint(grad * scale, np.abs(weight), geom, in_hw)
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


def _cases() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, ConvGeometry, tuple[int, int]]]:
    rng = np.random.default_rng(5)
    cases = []
    for _ in range(10):
        geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 1)
        grad = np.zeros((2, 3, 8, 8))
        grad[:, :, 2:5, 3:6] = rng.exponential(size=(2, 3, 3, 3))  # a small rectangle: the cropped path
        scale = rng.exponential(size=(3, 8, 8))
        cases.append((grad, scale, rng.exponential(size=(3, 2, 3, 3)), geom, (8, 8)))
    return cases


def test_a_rectangle_missing_a_row_is_caught(monkeypatch):
    for grad, scale, weight, geom, in_hw in _cases():  # the comparison passes on the real code
        got = conv2d_adjoint_scaled(grad, scale, weight, geom, in_hw)
        np.testing.assert_allclose(got, loop_adjoint(grad * scale, weight, geom, in_hw), rtol=1e-12, atol=1e-12)
    block = conv_module._nonzero_block

    def short(grad, whole=None):
        r0, c0, part = block(grad, whole)
        return r0, c0, (part[:, :, :-1] if part.shape[2] > 1 else part)

    monkeypatch.setattr(conv_module, "_nonzero_block", short)
    caught = 0
    for grad, scale, weight, geom, in_hw in _cases():
        got = conv2d_adjoint_scaled(grad, scale, weight, geom, in_hw)
        caught += not np.allclose(got, loop_adjoint(grad * scale, weight, geom, in_hw), rtol=1e-12, atol=1e-12)
    assert caught == len(_cases())


# --------------------------------------------------------------------------- ConvTranspose adjoint: band of rows


@st.composite
def banded_inputs(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    height, width = draw(st.integers(8, 24)), draw(st.integers(1, 9))
    geom = ConvGeometry(strides, dilations, pads, 1)
    ho, wo = geom.output_hw(height, width, kernel)
    if ho <= 0 or wo <= 0:
        geom = ConvGeometry(strides, dilations, (kernel[0] * 2, kernel[1] * 2, kernel[0] * 2, kernel[1] * 2), 1)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    first = draw(st.integers(0, height - 1))
    last = draw(st.integers(first, min(height - 1, first + 4)))
    x = np.zeros((draw(st.integers(1, 3)), draw(st.integers(1, 3)), height, width))
    x[:, :, first : last + 1] = rng.exponential(size=x.shape[:2] + (last - first + 1, width))
    if draw(st.booleans()):
        x[:, :, first] = 0.0  # a zero row inside the band's hull
    weight = rng.exponential(size=(draw(st.integers(1, 3)), x.shape[1]) + kernel)
    return x, weight, geom


@settings(max_examples=120, deadline=None, derandomize=True)
@given(banded_inputs())
def test_convolution_of_a_band_equals_the_loop_convolution(case):
    x, weight, geom = case
    result = conv2d_nonzero_rows(x, weight, geom)
    np.testing.assert_allclose(result, loop_conv(x, weight, geom), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(result, conv2d(x, weight, geom), rtol=1e-14, atol=0)  # a few ulps at most


def test_a_band_missing_its_last_row_is_caught(monkeypatch):
    rng = np.random.default_rng(2)
    geom = ConvGeometry((2, 2), (1, 1), (1, 1, 1, 1), 1)
    x = np.zeros((2, 3, 16, 6))
    x[:, :, 6:9] = rng.exponential(size=(2, 3, 3, 6))
    weight = rng.exponential(size=(4, 3, 3, 3))
    expected = loop_conv(x, weight, geom)
    np.testing.assert_allclose(conv2d_nonzero_rows(x, weight, geom), expected, rtol=1e-12)
    original = conv_module._conv2d_columns

    def one_row_short(xp, w, g, out_hw):
        out = original(xp, w, g, out_hw)
        out[:, :, -1] = 0.0
        return out

    monkeypatch.setattr(conv_module, "_conv2d_columns", one_row_short)
    assert not np.allclose(conv2d_nonzero_rows(x, weight, geom), expected, rtol=1e-12)


def test_a_product_skipped_for_any_scalar_is_caught(monkeypatch):
    """``scaled_by`` passes the sensitivity on unchanged for the number 1 only; a copy that also skips
    other scalars (a halved slope, say) no longer equals the loop scatter of the product."""
    rng = np.random.default_rng(8)
    geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 1)
    grad, weight = rng.exponential(size=(2, 3, 8, 8)), rng.exponential(size=(3, 2, 3, 3))
    assert conv_module.scaled_by(grad, 1.0) is grad
    for scale in (1.0, 0.5):
        expected = loop_adjoint(grad * scale, weight, geom, (8, 8))
        np.testing.assert_allclose(conv2d_adjoint_scaled(grad, scale, weight, geom, (8, 8)), expected, rtol=1e-12)
    monkeypatch.setattr(conv_module, "scaled_by", lambda g, s: g if np.ndim(s) == 0 else g * s)
    expected = loop_adjoint(grad * 0.5, weight, geom, (8, 8))
    assert not np.allclose(conv2d_adjoint_scaled(grad, 0.5, weight, geom, (8, 8)), expected)


def test_only_slopes_that_are_one_everywhere_become_the_number_one():
    from robaudit.bounds.tight import _one_if_all_ones

    assert _one_if_all_ones(np.ones((1, 4, 3, 3))) == 1.0 and np.ndim(_one_if_all_ones(np.ones(5))) == 0
    for kept in (np.array([1.0, 0.5]), np.array([1.0, np.nan]), np.array([1.0, 0.0]), 0.5):
        assert _one_if_all_ones(kept) is kept
