"""The convolution adjoint and the sorted-prefix helpers of the tight bound (docs/method.md §4.4)
against independent implementations.

* ``conv2d_adjoint`` (one BLAS product for all taps, channels first or last, or taps gathered
  first for few output channels, a whole 1×1 tap written straight out; depthwise
  per-channel matrices or shifted adds; any grouping) equals the textbook scatter written here with explicit loops,
  for random strides, dilations, pads, groups and gradients that vanish outside a
  rectangle (the receptive-field crop); it also satisfies ⟨conv(x), g⟩ = ⟨x, convᵀ(g)⟩ with
  the forward convolution written with loops, which the forward ``conv2d`` (im2col and one
  BLAS product) also equals. A copy of the adjoint that drops one kernel tap is caught.
* ``_largest_sorted`` equals a full sort; ``TightBound.total_curve`` equals the merge of
  every layer's full kept list; the prefix sums formed as far as asked (``LazyPrefix``)
  equal the running sums one addition at a time, bit for bit.
* the strided depthwise adjoint taken one residue class of input positions at a time equals,
  bit for bit, one in-place multiply-add per tap on the strided windows; a copy that files
  every tap under one class is caught.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import dense_chain
from hypothesis import given, settings
from hypothesis import strategies as st

import robaudit.graph.conv as conv_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel, top_prefix_sums
from robaudit.bounds.tight import LazyPrefix, TightBound, _largest_sorted, _row_tops
from robaudit.graph.conv import ConvGeometry, conv2d, conv2d_adjoint, pad_planes
from robaudit.graph.network import NetworkOptions


def loop_adjoint(grad: np.ndarray, weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]) -> np.ndarray:
    """Wᵀ of an ONNX Conv by explicit loops: each output element sends w·g to its input element."""
    batch, c_out, ho, wo = grad.shape
    _, c_per_group, kh, kw = weight.shape
    per_group = c_out // geom.groups
    out = np.zeros((batch, geom.groups * c_per_group) + tuple(in_hw))
    for b in range(batch):
        for o in range(c_out):
            group = o // per_group
            for r in range(ho):
                for c in range(wo):
                    for i in range(kh):
                        row = r * geom.strides[0] + i * geom.dilations[0] - geom.pads[0]
                        if not 0 <= row < in_hw[0]:
                            continue
                        for j in range(kw):
                            col = c * geom.strides[1] + j * geom.dilations[1] - geom.pads[1]
                            if not 0 <= col < in_hw[1]:
                                continue
                            for k in range(c_per_group):
                                out[b, group * c_per_group + k, row, col] += weight[o, k, i, j] * grad[b, o, r, c]
    return out


def loop_conv(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """ONNX Conv (no bias) by explicit loops."""
    batch, _, height, width = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    per_group = c_out // geom.groups
    ho, wo = geom.output_hw(height, width, (kh, kw))
    out = np.zeros((batch, c_out, ho, wo))
    for b, o, r, c, i, j, k in np.ndindex(batch, c_out, ho, wo, kh, kw, c_per_group):
        row = r * geom.strides[0] + i * geom.dilations[0] - geom.pads[0]
        col = c * geom.strides[1] + j * geom.dilations[1] - geom.pads[1]
        if 0 <= row < height and 0 <= col < width:
            out[b, o, r, c] += weight[o, k, i, j] * x[b, (o // per_group) * c_per_group + k, row, col]
    return out


@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    groups = {"dense": 1, "depthwise": draw(st.integers(1, 4)), "grouped": draw(st.integers(2, 3))}[kind]
    c_per_group = 1 if kind == "depthwise" else draw(st.integers(1, 3))
    per_group = 1 if kind == "depthwise" else draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "depthwise" and draw(st.booleans()):
        strides = (1, 1)  # the shifted-add form
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    geom = ConvGeometry(strides, dilations, pads, groups)
    ho, wo = geom.output_hw(height, width, kernel)
    if ho <= 0 or wo <= 0:
        geom = ConvGeometry(strides, dilations, (kernel[0] * 2, kernel[1] * 2, kernel[0] * 2, kernel[1] * 2), groups)
        ho, wo = geom.output_hw(height, width, kernel)
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    batch = draw(st.integers(1, 3))
    grad = rng.standard_normal((batch, groups * per_group, ho, wo))
    r0, c0 = draw(st.integers(0, ho - 1)), draw(st.integers(0, wo - 1))
    mask = np.zeros((ho, wo), dtype=bool)
    mask[r0 : r0 + draw(st.integers(1, ho)), c0 : c0 + draw(st.integers(1, wo))] = True
    if draw(st.booleans()):
        grad = grad * mask  # only a rectangle is non-zero: the receptive-field crop
    weight = rng.standard_normal((groups * per_group, c_per_group) + kernel)
    return grad, weight, geom, (height, width)


@pytest.mark.parametrize("matrix", [True, False], ids=["depthwise-matrix", "depthwise-taps"])
@settings(max_examples=100, deadline=None)
@given(case=conv_cases())
def test_conv_adjoint_equals_the_loop_scatter(case, matrix):
    grad, weight, geom, in_hw = case
    expected = loop_adjoint(grad, weight, geom, in_hw)
    gain = conv_module._MATRIX_GAIN
    conv_module._MATRIX_GAIN = gain if matrix else 0  # small planes take the matrix form by default
    try:
        result = conv2d_adjoint(grad, weight, geom, in_hw)
    finally:
        conv_module._MATRIX_GAIN = gain
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(conv_cases())
def test_conv_forward_equals_the_loop_convolution(case):
    """The forward convolution (im2col and one BLAS product for groups of one, einsum otherwise)."""
    grad, weight, geom, in_hw = case
    x = np.random.default_rng(11).standard_normal((grad.shape[0], weight.shape[1] * geom.groups) + in_hw)
    np.testing.assert_allclose(conv2d(x, weight, geom), loop_conv(x, weight, geom), rtol=1e-12, atol=1e-12)


def test_depthwise_matrix_keeps_infinite_sensitivities():
    """An infinite sensitivity meets zero entries of the per-channel matrix (∞·0 = NaN): the tap
    form is used instead, which sends ∞ only where the kernel reaches."""
    geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 2)
    grad = np.zeros((1, 2, 4, 4))
    grad[0, 0, 0, 0] = np.inf
    weight = np.ones((2, 1, 3, 3))
    result = conv2d_adjoint(grad, weight, geom, (4, 4))
    assert not np.isnan(result).any()
    assert np.isinf(result[0, 0, :2, :2]).all() and (result[0, 0, 2:] == 0).all() and (result[0, 1] == 0).all()


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_conv_adjoint_is_the_transpose_of_the_loop_convolution(case):
    grad, weight, geom, in_hw = case
    x = np.random.default_rng(7).standard_normal((grad.shape[0], weight.shape[1] * geom.groups) + in_hw)
    left = float(np.sum(loop_conv(x, weight, geom) * grad))
    right = float(np.sum(x * conv2d_adjoint(grad, weight, geom, in_hw)))
    assert abs(left - right) <= 1e-9 * (1 + abs(left))


@pytest.mark.parametrize("gain", [40, 0], ids=["depthwise-matrix", "depthwise-taps"])
def test_a_dropped_tap_is_caught(monkeypatch, gain):
    """The comparison above fails for an adjoint that forgets the last kernel tap (dense, depthwise
    shifted, depthwise strided: the forms that skip taps; other groupings scatter every tap)."""
    real_taps = conv_module._taps
    monkeypatch.setattr(conv_module, "_taps", lambda *a: real_taps(*a)[:-1])
    monkeypatch.setattr(conv_module, "_MATRIX_GAIN", gain)
    rng = np.random.default_rng(3)
    caught = 0
    for groups, c_per_group, strides in ((1, 3, (1, 1)), (1, 2, (2, 1)), (4, 1, (1, 1)), (4, 1, (2, 2))):
        geom = ConvGeometry(strides, (1, 1), (1, 1, 1, 1), groups)
        grad = rng.random((2, groups * 2 if c_per_group > 1 else groups, 4, 4))
        weight = rng.random((grad.shape[1], c_per_group, 3, 3)) + 0.1
        in_hw = (4 * strides[0], 4 * strides[1])
        if not np.allclose(conv2d_adjoint(grad, weight, geom, in_hw), loop_adjoint(grad, weight, geom, in_hw)):
            caught += 1
    assert caught == 4


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31))
def test_largest_sorted_equals_a_full_sort(rows, columns, seed):
    rng = np.random.default_rng(seed)
    values = rng.random((rows, columns)).round(1)  # ties included
    width = int(rng.integers(1, columns + 1))
    expected = np.sort(values, axis=1)[:, ::-1][:, :width]
    np.testing.assert_array_equal(_largest_sorted(values.copy(), width), expected)


@pytest.mark.parametrize("memory_bytes", [None, 1024])
def test_total_curve_equals_the_merge_of_full_lists(tmp_path, memory_bytes, monkeypatch):
    """Truncating each layer's sorted list to the budget before merging changes nothing (with every
    value kept, and with two kept per layer and output, padded by copies of the smallest). The
    cuts and the output cut (docs/method.md §4.1) may only lower the merged curve; the equality is
    checked without them."""
    path = dense_chain([6, 12, 10, 4], ["relu", "tanh"], seed=5, weight_scale=1.0).save(tmp_path)
    _, network = load_network(path, NetworkOptions())
    bound = TightBound(Analysis(network, FailureModel(mode="crash")), memory_bytes=memory_bytes)
    with_cuts = {budget: bound.total_curve(budget) for budget in (1, 3, 8, 20, 64)}
    monkeypatch.setattr(TightBound, "_cut_curves", lambda self, budget, width, largest: np.inf)
    monkeypatch.setattr(bound, "output_cut", None)  # the output cut (§4.1) too
    assert bound.top[0].shape[1] == (12 if memory_bytes is None else 2)
    for budget in (1, 3, 8, 20, 64):
        assert np.all(with_cuts[budget] <= bound.total_curve(budget))
        pieces = []
        for i, top in enumerate(bound.top):
            pieces.append(top)
            missing = min(budget, bound.analysis.hidden[i].neurons) - top.shape[1]
            if missing > 0:
                pieces.append(np.repeat(top[:, -1:], missing, axis=1))
        merged = np.concatenate(pieces, axis=1)
        width = min(budget, merged.shape[1])
        expected = top_prefix_sums(merged, width).max(axis=0) * bound.analysis.carry_factor([budget] * 2)
        curve = bound.total_curve(budget)
        np.testing.assert_array_equal(curve[: width + 1], expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31))
def test_row_tops_skipping_zero_columns_equal_a_full_sort(rows, columns, seed):
    rng = np.random.default_rng(seed)
    values = rng.random((rows, columns)).round(1)
    values[:, rng.random(columns) < 0.7] = 0.0  # most columns unreached by the chunk
    width = int(rng.integers(1, columns + 1))
    expected = np.sort(values, axis=1)[:, ::-1][:, :width]
    np.testing.assert_array_equal(_row_tops(values.copy(), values.max(axis=0), width), expected)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 4),
    st.sampled_from([(1, 1), (1, 3), (3, 3), (2, 4)]),
    st.integers(5, 11),
    st.integers(5, 11),
    st.integers(0, 2),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_gathered_and_one_tap_forms_equal_the_loop_scatter(batch, c_out, c_in, kernel, height, width, pad, crop, seed):
    """Stride 1 with few output channels (taps gathered first, one BLAS product over taps and channels)
    and a 1×1 kernel without padding (the product written straight out, channels first or last) equal
    the loop scatter; the forms are checked to be the ones taken."""
    geom = ConvGeometry((1, 1), (1, 1), (pad,) * 4 if kernel != (1, 1) else (0, 0, 0, 0), 1)
    rng = np.random.default_rng(seed)
    ho, wo = geom.output_hw(height, width, kernel)
    grad = rng.random((batch, c_out, ho, wo))
    if crop:  # only a rectangle is non-zero: the block and its origin are passed on
        grad[:, :, : ho // 3] = 0.0
        grad[:, :, :, wo - wo // 3 :] = 0.0
    weight = rng.standard_normal((c_out, c_in) + kernel)
    taken = []
    real = {name: getattr(conv_module, name) for name in ("_gathered_adjoint", "_one_tap_adjoint")}
    for name, function in real.items():
        setattr(conv_module, name, lambda *a, _n=name, _f=function: taken.append(_n) or _f(*a))
    try:
        result = conv2d_adjoint(grad, weight, geom, (height, width))
    finally:
        for name, function in real.items():
            setattr(conv_module, name, function)
    np.testing.assert_allclose(result, loop_adjoint(grad, weight, geom, (height, width)), rtol=1e-12, atol=1e-12)
    if kernel == (1, 1) and not crop:
        assert taken == ["_one_tap_adjoint"]
    elif kernel != (1, 1) and (ho - (ho // 3 if crop else 0)) * (wo - (wo // 3 if crop else 0)) >= 32:
        assert taken == ["_gathered_adjoint"]


def test_a_dropped_tap_is_caught_in_the_gathered_form(monkeypatch):
    """The same comparison fails for a gathered adjoint that forgets the last kernel tap, and for one
    whose first output channel is left out of the gathered block."""
    geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 1)
    rng = np.random.default_rng(4)
    grad, weight = rng.random((2, 4, 8, 8)), rng.random((4, 3, 3, 3)) + 0.1
    expected = loop_adjoint(grad, weight, geom, (8, 8))
    np.testing.assert_allclose(conv2d_adjoint(grad, weight, geom, (8, 8)), expected, rtol=1e-12)
    real = conv_module._gathered_adjoint
    monkeypatch.setattr(conv_module, "_gathered_adjoint", lambda g, w, taps, hw: real(g, w, taps[:-1], hw))
    assert not np.allclose(conv2d_adjoint(grad, weight, geom, (8, 8)), expected)
    keep = np.array([0.0, 1.0, 1.0, 1.0]).reshape(1, 4, 1, 1)
    monkeypatch.setattr(conv_module, "_gathered_adjoint", lambda g, w, taps, hw: real(g * keep, w, taps, hw))
    assert not np.allclose(conv2d_adjoint(grad, weight, geom, (8, 8)), expected)


def _running_sums(row: np.ndarray) -> list[float]:
    """0 and the running sums of ``row``, one float addition at a time (the independent reference)."""
    return [0.0, *itertools.accumulate(float(v) for v in row)]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 300), st.lists(st.integers(0, 300), min_size=1, max_size=6), st.integers(0, 2**31)
)
def test_lazy_prefix_sums_equal_the_running_sums_bit_for_bit(rows, columns, asked, seed):
    """The prefix sums formed as far as asked, in any order of requests, are the one-addition-at-a-time
    running sums of each row, bit for bit (and so the full ``np.cumsum``)."""
    rng = np.random.default_rng(seed)
    top = -np.sort(-(rng.random((rows, columns)) * 10.0 ** rng.integers(-3, 4, size=(rows, columns))), axis=1)
    prefix = LazyPrefix([top])
    for f in asked:
        f = min(f, columns)
        assert [float(v) for v in prefix.column(0, f)] == [_running_sums(row)[f] for row in top]
    assert all(list(map(float, got)) == _running_sums(row) for got, row in zip(prefix[0], top, strict=True))


def test_an_unseeded_continuation_of_the_prefix_sums_is_caught(monkeypatch):
    """A continuation that sums the new columns on their own and then adds the last sum formed (another
    rounding) differs from the running sums: the comparison above catches it."""

    def unseeded(self, i, f):
        top, done = self.tops[i], self._done[i]
        if f < done:
            return
        stop = min(top.shape[1] + 1, max(f + 1, 2 * done, self.FIRST))
        sums = np.empty((top.shape[0], stop))
        sums[:, 0] = 0.0
        if done:
            sums[:, :done] = self._sums[i][:, :done]
        first = max(done, 1)
        sums[:, first:stop] = sums[:, first - 1 : first] + np.cumsum(top[:, first - 1 : stop - 1], axis=1)
        self._sums[i], self._done[i] = sums, stop

    monkeypatch.setattr(LazyPrefix, "FIRST", 8)
    monkeypatch.setattr(LazyPrefix, "_extend", unseeded)
    rng = np.random.default_rng(1)
    top = -np.sort(-rng.random((4, 200)), axis=1)
    prefix = LazyPrefix([top])
    prefix.column(0, 3)  # the first 8 columns, then continued
    assert any(list(map(float, got)) != _running_sums(row) for got, row in zip(prefix[0], top, strict=True))


def _taken_forms(names: tuple[str, ...]):
    """Wrap the named adjoint forms of ``robaudit.graph.conv`` so that each call is recorded; returns
    (the list of calls, a function that restores them)."""
    taken: list[str] = []
    real = {name: getattr(conv_module, name) for name in names}
    for name, function in real.items():
        setattr(conv_module, name, lambda *a, _n=name, _f=function: taken.append(_n) or _f(*a))

    def restore() -> None:
        for name, function in real.items():
            setattr(conv_module, name, function)

    return taken, restore


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 4),
    st.sampled_from([(2, 2), (3, 3), (2, 3), (3, 1)]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(0, 2),
    st.integers(0, 2**31),
)
def test_small_plane_matrix_equals_the_loop_scatter(batch, c_out, c_in, kernel, height, width, stride, pad, seed):
    """Groups of one on planes of at most as many positions as reaching taps (ResNet-18's 2×2 stage): the
    adjoint as one matrix [C_out·Ho·Wo, C_in·H·W] equals the loop scatter, and is the form taken."""
    geom = ConvGeometry((stride, stride), (1, 1), (pad,) * 4, 1)
    ho, wo = geom.output_hw(height, width, kernel)
    if ho <= 0 or wo <= 0:
        return
    rng = np.random.default_rng(seed)
    grad = rng.random((batch, c_out, ho, wo))
    weight = rng.standard_normal((c_out, c_in) + kernel)
    taken, restore = _taken_forms(("_plane_matrix_adjoint", "_gathered_adjoint", "_one_tap_adjoint"))
    try:
        result = conv2d_adjoint(grad, weight, geom, (height, width))
    finally:
        restore()
    np.testing.assert_allclose(result, loop_adjoint(grad, weight, geom, (height, width)), rtol=1e-12, atol=1e-12)
    taps = conv_module._taps((ho, wo), kernel, geom, (height, width), (0, 0))
    if 1 < len(taps) and height * width <= len(taps) and "_one_tap_adjoint" not in taken:
        assert taken == ["_plane_matrix_adjoint"]


def test_small_plane_matrix_keeps_infinite_sensitivities():
    """An infinite sensitivity meets the matrix's structural zeros (∞·0 = NaN): the tap form is used
    instead, which sends ∞ only where the kernel reaches (a 2×2 kernel without padding on a 2×2 plane
    joins output (0, 0) to input (0, 0) only through one tap)."""
    geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 1)
    grad = np.zeros((1, 2, 3, 3))
    grad[0, 0, 0, 0] = np.inf
    weight = np.ones((2, 3, 2, 2))
    result = conv2d_adjoint(grad, weight, geom, (2, 2))
    expected = loop_adjoint(np.where(np.isinf(grad), 1.0, grad), weight, geom, (2, 2))
    assert not np.isnan(result).any()
    np.testing.assert_array_equal(np.isinf(result), expected > 0)


def tap_scatter(grad: np.ndarray, weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]) -> np.ndarray:
    """Wᵀ of an ONNX Conv with groups of one, output position by output position and tap by tap (a
    product over the channels each): the loop scatter with its innermost loops as one small product,
    for channel counts where :func:`loop_adjoint` is too slow."""
    batch, _, ho, wo = grad.shape
    _, c_in, kh, kw = weight.shape
    out = np.zeros((batch, c_in) + tuple(in_hw))
    for r, c, i, j in np.ndindex(ho, wo, kh, kw):
        row = r * geom.strides[0] + i * geom.dilations[0] - geom.pads[0]
        col = c * geom.strides[1] + j * geom.dilations[1] - geom.pads[1]
        if 0 <= row < in_hw[0] and 0 <= col < in_hw[1]:
            out[:, :, row, col] += grad[:, :, r, c] @ weight[:, :, i, j]
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 9),
    st.sampled_from([64, 72]),
    st.integers(1, 3),
    st.sampled_from([(3, 3), (2, 4)]),
    st.integers(8, 9),
    st.integers(1, 2),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_gathered_across_the_batch_equals_the_loop_scatter(batch, c_out, c_in, kernel, size, pad, crop, seed):
    """Stride 1 with at least 64 output channels: the taps of a slice of the batch are gathered side by
    side and take one BLAS product together; equal to the scatter (several slices of the batch when it
    holds more samples than one slice)."""
    geom = ConvGeometry((1, 1), (1, 1), (pad,) * 4, 1)
    rng = np.random.default_rng(seed)
    ho, wo = geom.output_hw(size, size, kernel)
    grad = rng.random((batch, c_out, ho, wo))
    if crop:
        grad[:, :, : ho // 3] = 0.0
    weight = rng.standard_normal((c_out, c_in) + kernel)
    taken, restore = _taken_forms(("_gathered_across_batch",))
    elements = conv_module._ACROSS_ELEMENTS
    conv_module._ACROSS_ELEMENTS = 4 * kernel[0] * kernel[1] * c_out * size * size  # slices of up to 4 samples
    try:
        result = conv2d_adjoint(grad, weight, geom, (size, size))
    finally:
        conv_module._ACROSS_ELEMENTS = elements
        restore()
    np.testing.assert_allclose(result, tap_scatter(grad, weight, geom, (size, size)), rtol=1e-12, atol=1e-12)
    assert taken == ["_gathered_across_batch"]


def test_weakened_small_plane_and_across_batch_forms_are_caught(monkeypatch):
    """The comparisons above fail for a matrix form that forgets the last kernel tap, and for an
    across-the-batch form that forgets it or reuses the first slice's gathered block for the next."""
    rng = np.random.default_rng(5)
    geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 1)
    grad, weight = rng.random((3, 4, 2, 2)), rng.random((4, 3, 3, 3)) + 0.1
    expected = loop_adjoint(grad, weight, geom, (2, 2))
    np.testing.assert_allclose(conv2d_adjoint(grad, weight, geom, (2, 2)), expected, rtol=1e-12)
    real_matrix = conv_module._plane_matrix_adjoint
    monkeypatch.setattr(conv_module, "_plane_matrix_adjoint", lambda g, w, taps, hw: real_matrix(g, w, taps[:-1], hw))
    assert not np.allclose(conv2d_adjoint(grad, weight, geom, (2, 2)), expected)
    monkeypatch.undo()

    grad, weight = rng.random((5, 64, 6, 6)), rng.random((64, 2, 3, 3)) + 0.1
    expected = tap_scatter(grad, weight, geom, (6, 6))
    np.testing.assert_allclose(expected[:1], loop_adjoint(grad[:1], weight, geom, (6, 6)), rtol=1e-12)
    monkeypatch.setattr(conv_module, "_ACROSS_ELEMENTS", 2 * 9 * 64 * 36)  # slices of 2 samples
    np.testing.assert_allclose(conv2d_adjoint(grad, weight, geom, (6, 6)), expected, rtol=1e-12)
    real_across = conv_module._gathered_across_batch

    def dropped(g, m, taps, hw, out):  # the last tap's block of the matrix [C_in, taps·C_out] left out
        m = m.copy()
        m[:, -g.shape[1] :] = 0.0
        return real_across(g, m, taps, hw, out)

    monkeypatch.setattr(conv_module, "_gathered_across_batch", dropped)
    assert not np.allclose(conv2d_adjoint(grad, weight, geom, (6, 6)), expected)
    monkeypatch.setattr(conv_module, "_gathered_across_batch", real_across)

    def stale(g, m, taps, hw, out):  # every slice multiplies the first slice's samples
        first = g[:2]
        repeated = np.concatenate([first] * ((g.shape[0] + 1) // 2))[: g.shape[0]]
        return real_across(repeated, m, taps, hw, out)

    monkeypatch.setattr(conv_module, "_gathered_across_batch", stale)
    assert not np.allclose(conv2d_adjoint(grad, weight, geom, (6, 6)), expected)


@pytest.mark.parametrize("c_out", [3, 64], ids=["per-sample", "across-batch"])
def test_gathered_blocks_are_written_everywhere(monkeypatch, c_out):
    """The gathered forms start from uninitialised buffers: filled with NaN first, the result still equals
    the scatter (every entry outside a tap's rectangle is zeroed); a copy that skips that zeroing is caught."""
    geom = ConvGeometry((1, 1), (1, 1), (2, 1, 0, 2), 1)
    rng = np.random.default_rng(8)
    grad, weight = rng.random((5, c_out, 7, 9)), rng.random((c_out, 2, 3, 4))
    ho, wo = geom.output_hw(7, 9, (3, 4))
    grad = grad[:, :, :ho, :wo]
    expected = tap_scatter(grad, weight, geom, (7, 9))
    monkeypatch.setattr(conv_module, "_empty", lambda shape, dtype=float: np.full(shape, np.nan, dtype))
    monkeypatch.setattr(conv_module, "_ACROSS_ELEMENTS", 2 * 12 * 64 * 63)  # slices of 2 samples and a last one
    np.testing.assert_allclose(conv2d_adjoint(grad, weight, geom, (7, 9)), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(conv_module, "_zero_outside", lambda planes, rows, cols: None)
    assert np.isnan(conv2d_adjoint(grad, weight, geom, (7, 9))).any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.floats(0.0, 0.95), st.integers(0, 2**31))
def test_row_tops_written_into_the_kept_rows_equal_a_full_sort(rows, columns, unreached, seed):
    """The kept values written straight into the rows of the kept array (every entry of those rows,
    garbage before) equal a full sort, with few or most columns unreached by the chunk."""
    rng = np.random.default_rng(seed)
    values = rng.random((rows, columns)).round(1)
    values[:, rng.random(columns) < unreached] = 0.0
    width = int(rng.integers(1, columns + 1))
    expected = np.sort(values, axis=1)[:, ::-1][:, :width]
    kept = np.full((rows + 2, width), np.nan)
    returned = _row_tops(-values, -(-values).min(axis=0), width, negated=True, out=kept[1 : rows + 1])
    np.testing.assert_array_equal(kept[1 : rows + 1], expected)
    assert returned.base is kept or returned is kept[1 : rows + 1] or np.shares_memory(returned, kept)
    assert np.isnan(kept[0]).all() and np.isnan(kept[-1]).all()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
    pads=st.tuples(*[st.integers(0, 3)] * 4),
    fill=st.sampled_from([0.0, -np.inf, 2.5]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_pad_planes_is_numpys_constant_pad(shape, pads, fill, dtype):
    """The one-allocation padding of the conv and pool windows gives np.pad's array (values and dtype)."""
    x = np.random.default_rng(sum(shape)).normal(size=shape).astype(dtype)
    top, left, bottom, right = pads
    want = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    got = pad_planes(x, pads, fill)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- strided depthwise, by residue class


def _per_tap_strided(grad, weight, geom, in_hw):
    """The strided depthwise adjoint as one in-place multiply-add per tap on the strided input windows
    (the form the residue classes replace): each element the same sum in the same order."""
    taps = conv_module._taps(grad.shape[2:], weight.shape[2:], geom, in_hw, (0, 0))
    out = np.zeros((grad.shape[0], grad.shape[1]) + tuple(in_hw))
    for i, j, (o_rows, o_cols), (i_rows, i_cols) in taps:
        out[:, :, i_rows, i_cols] += grad[:, :, o_rows, o_cols] * weight[:, 0, i, j].reshape(1, -1, 1, 1)
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.tuples(st.integers(1, 5), st.integers(1, 5)),
    st.tuples(st.integers(2, 3), st.integers(1, 3)),
    st.tuples(st.integers(1, 2), st.integers(1, 2)),
    st.tuples(*[st.integers(0, 2)] * 4),
    st.integers(0, 2**31),
)
def test_strided_depthwise_by_residue_class_is_the_tap_form(batch, channels, kernel, strides, dilations, pads, seed):
    """Bit for bit the per-tap form, and the loop scatter to rounding (docs/method.md §4.4)."""
    rng = np.random.default_rng(seed)
    geom = ConvGeometry(strides, dilations, pads, channels)
    in_hw = (int(rng.integers(kernel[0] * dilations[0], 12)), int(rng.integers(kernel[1] * dilations[1], 12)))
    ho, wo = geom.output_hw(*in_hw, kernel)
    grad = rng.standard_normal((batch, channels, ho, wo))
    weight = rng.standard_normal((channels, 1) + kernel)
    taps = conv_module._taps((ho, wo), kernel, geom, in_hw, (0, 0))
    result = conv_module._depthwise_strided(grad, weight, taps, strides, in_hw)
    np.testing.assert_array_equal(result, _per_tap_strided(grad, weight, geom, in_hw))
    np.testing.assert_allclose(result, loop_adjoint(grad, weight, geom, in_hw), rtol=1e-12, atol=1e-12)


def test_taps_put_in_the_wrong_residue_class_are_caught(monkeypatch):
    """A copy that files every tap under the first residue class (so the other classes' positions stay 0
    and the first class's get their sums) fails the comparison above."""
    monkeypatch.setattr(conv_module, "_residue", lambda window, stride: 0)
    geom = ConvGeometry((2, 2), (1, 1), (1, 1, 1, 1), 3)
    rng = np.random.default_rng(2)
    grad, weight = rng.random((2, 3, 4, 4)) + 0.1, rng.random((3, 1, 3, 3)) + 0.1
    taps = conv_module._taps((4, 4), (3, 3), geom, (8, 8), (0, 0))
    result = conv_module._depthwise_strided(grad, weight, taps, (2, 2), (8, 8))
    assert not np.allclose(result, loop_adjoint(grad, weight, geom, (8, 8)))
