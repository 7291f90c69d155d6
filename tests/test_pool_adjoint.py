"""The max-pool candidate adjoint (docs/method.md §4.3, §4.4) against an implementation with
explicit loops.

* ``max_candidates_adjoint`` (taps added in place into their unpadded input windows, the
  product skipped where every position of a tap is a candidate) equals, bit for bit, a
  scatter written here with loops over taps, windows and channels, whose candidates are
  found by scanning each window — random strides, dilations, pads, ceil_mode, boxes where
  all, some or few elements are candidates, cotangents with zeros and infinities.
* A copy that treats a partly-candidate tap as all-candidate, and one that drops a tap, are
  caught by the same comparison.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import robaudit.graph.ops.pooling as pooling
from robaudit.graph.conv import ConvGeometry
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval
from robaudit.graph.ops.pooling import max_candidates_adjoint


def _node(kernel, strides, dilations, pads, ceil) -> Node:
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations),
             "pads": list(pads), "ceil_mode": ceil}
    return Node("pool", "MaxPool", "", ["x"], ["y"], attrs, None, {})


def _out_len(size: int, k: int, s: int, d: int, p0: int, p1: int, ceil: int) -> int:
    span = d * (k - 1) + 1
    free = size + p0 + p1 - span
    return (-(-free // s) if ceil else free // s) + 1


def loop_candidate_adjoint(cot: np.ndarray, lo: np.ndarray, hi: np.ndarray, kernel, strides, dilations, pads,
                           ceil: int) -> np.ndarray:
    """[K, C, H, W] from cot [K, C, Ho, Wo]: per tap (kernel order), window and channel, the
    cotangent added into the input element when it lies inside the input and its hi reaches
    the largest lo of the window (the window's elements outside the input count as −∞)."""
    k_rows, channels, height, width = cot.shape[0], lo.shape[0], lo.shape[1], lo.shape[2]
    ho = _out_len(height, kernel[0], strides[0], dilations[0], pads[0], pads[2], ceil)
    wo = _out_len(width, kernel[1], strides[1], dilations[1], pads[1], pads[3], ceil)
    assert cot.shape[2:] == (ho, wo)

    def position(r: int, s: int, i: int, j: int) -> tuple[int, int]:
        return r * strides[0] + i * dilations[0] - pads[0], s * strides[1] + j * dilations[1] - pads[1]

    def inside(y: int, x: int) -> bool:
        return 0 <= y < height and 0 <= x < width

    best = np.full((channels, ho, wo), -np.inf)
    for c in range(channels):
        for r in range(ho):
            for s in range(wo):
                for i in range(kernel[0]):
                    for j in range(kernel[1]):
                        y, x = position(r, s, i, j)
                        if inside(y, x):
                            best[c, r, s] = max(best[c, r, s], lo[c, y, x])
    out = np.zeros((k_rows, channels, height, width))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            for c in range(channels):
                for r in range(ho):
                    for s in range(wo):
                        y, x = position(r, s, i, j)
                        if inside(y, x):
                            weight = 1.0 if hi[c, y, x] >= best[c, r, s] else 0.0
                            out[:, c, y, x] += cot[:, c, r, s] * weight
    return out


@st.composite
def pools(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, kernel[a % 2] - 1)) for a in range(4))
    ceil = draw(st.integers(0, 1))
    height = draw(st.integers(dilations[0] * (kernel[0] - 1) + 1, 7))
    width = draw(st.integers(dilations[1] * (kernel[1] - 1) + 1, 7))
    spread = draw(st.sampled_from([0.05, 1.0, 100.0]))  # few, some, all elements candidates
    seed = draw(st.integers(0, 2**31))
    return kernel, strides, dilations, pads, ceil, (height, width), spread, seed


def _case(params):
    kernel, strides, dilations, pads, ceil, (height, width), spread, seed = params
    rng = np.random.default_rng(seed)
    channels, rows = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    lo = rng.normal(size=(channels, height, width))
    hi = lo + rng.exponential(spread, size=lo.shape)
    ho = _out_len(height, kernel[0], strides[0], dilations[0], pads[0], pads[2], ceil)
    wo = _out_len(width, kernel[1], strides[1], dilations[1], pads[1], pads[3], ceil)
    cot = rng.exponential(size=(rows, channels, ho, wo)) * (rng.uniform(size=(rows, channels, ho, wo)) < 0.7)
    if rng.uniform() < 0.3:
        cot[0, 0, 0, 0] = np.inf
    node = _node(kernel, strides, dilations, pads, ceil)
    box = Interval(lo[None], hi[None])
    with np.errstate(invalid="ignore"):  # ∞ times a non-candidate (0) is NaN, in both implementations
        expected = loop_candidate_adjoint(cot, lo, hi, kernel, strides, dilations, pads, ceil)
    return node, cot, box, expected


@settings(max_examples=80, deadline=None, derandomize=True)
@given(pools())
def test_candidate_adjoint_equals_loops_bit_for_bit(params):
    node, cot, box, expected = _case(params)
    with np.errstate(invalid="ignore"):
        got = max_candidates_adjoint(node, cot[:, None], box)
    assert got.shape == (cot.shape[0],) + box.shape
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got[:, 0], expected)  # same sums in the same (kernel) order


def _caught(weakened, monkeypatch) -> bool:
    """Whether some drawn case tells ``weakened`` (a replacement of masked_window_adjoint) apart."""
    monkeypatch.setattr(pooling, "masked_window_adjoint", weakened)
    rng = np.random.default_rng(3)
    for _ in range(40):
        params = ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 0, (6, 6), 1.0, int(rng.integers(0, 2**31)))
        node, cot, box, expected = _case(params)
        with np.errstate(invalid="ignore"):
            got = max_candidates_adjoint(node, cot[:, None], box)[:, 0]
        if not np.array_equal(got, expected):
            return True
    return False


def test_all_candidate_shortcut_taken_too_often_is_caught(monkeypatch):
    original = pooling.masked_window_adjoint

    def every_tap_counts(grad, candidate, geom: ConvGeometry, in_hw):
        return original(grad, np.ones_like(candidate), geom, in_hw)

    assert _caught(every_tap_counts, monkeypatch)


def test_dropped_tap_is_caught(monkeypatch):
    original = pooling.masked_window_adjoint

    def without_centre(grad, candidate, geom: ConvGeometry, in_hw):
        mask = candidate.copy()
        mask[..., 1, 1] = False
        return original(grad, mask, geom, in_hw)

    assert _caught(without_centre, monkeypatch)
