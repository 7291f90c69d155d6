"""The faster forms of the tight pass (docs/method.md §4.4) against independent computations.

* ``conv2d_adjoint_window`` (the adjoint of a block of sensitivities, returned as the block
  of the input plane its taps reach) placed into the plane equals the textbook scatter
  written with loops (``loop_adjoint``), for random strides, dilations, pads and blocks;
  a copy that drops a kernel tap is caught.
* The tight pass on an image output, taken a square tile of outputs at a time with the
  sensitivities of each convolution carried as rectangles (``_Window``), gives the same
  kept values, totals, per-neuron maxima and cut costs as P built here from dense
  matrices of |W| (each column a loop scatter of a unit vector) chained by hand through a
  residual graph; a copy whose sum of two rectangles drops a row, and one whose tiles
  miss an output, are caught.
* The same pass on a U-Net-like model (MaxPool, ConvTranspose, channel Concat) equals the
  pass over whole planes, and its bound holds at every output pixel against faults
  injected with onnxruntime (``ort_faults``); a ConvTranspose rectangle missing a row, and
  the block forms of the max-pool and ConvTranspose adjoints against loops (a tap left
  out is caught).
* ``_merged_prefix`` (kept values of several layers merged, each list first cut to the
  columns that may hold one of the F largest) equals a full sort of the concatenation,
  ties and NaN included; a cut one column too short is caught.
* The whole-plane edge test and the binary search of the inverse problems (one failure
  tried first) against direct computations, each with a weakened copy caught.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from ort_faults import FaultRunner
from test_conv_adjoint import loop_adjoint, loop_conv
from test_graph_ops import GraphBuilder
from test_pool_adjoint import _case, loop_candidate_adjoint, pools

import robaudit.bounds.fep as fep_module
import robaudit.bounds.tight as tight_module
import robaudit.graph.conv as conv_module
import robaudit.graph.ops.pooling as pooling
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound, _merged_prefix, dense_sensitivities, layer_slopes, output_chunks
from robaudit.graph.conv import ConvGeometry, conv2d_adjoint_window, conv2d_window
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops.pooling import max_candidates_block_adjoint

# --------------------------------------------------------------------------- the block adjoint


@st.composite
def block_cases(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    geom = ConvGeometry(
        (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        tuple(draw(st.integers(0, 3)) for _ in range(4)),
        1,
    )
    height, width = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    ho, wo = geom.output_hw(height, width, kernel)
    if ho <= 0 or wo <= 0:
        pads = (kernel[0] * 2, kernel[1] * 2, kernel[0] * 2, kernel[1] * 2)
        geom = ConvGeometry(geom.strides, geom.dilations, pads, 1)
        ho, wo = geom.output_hw(height, width, kernel)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    r0, c0 = draw(st.integers(0, ho - 1)), draw(st.integers(0, wo - 1))
    h, w = draw(st.integers(1, ho - r0)), draw(st.integers(1, wo - c0))
    c_out, c_in, batch = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    block = rng.random((batch, c_out, h, w))
    weight = rng.random((c_out, c_in) + kernel)
    return block, (r0, c0), weight, geom, (height, width), (ho, wo)


def _placed(block: np.ndarray, origin: tuple[int, int], plane: tuple[int, int]) -> np.ndarray:
    out = np.zeros(block.shape[:2] + tuple(plane))
    out[:, :, origin[0] : origin[0] + block.shape[2], origin[1] : origin[1] + block.shape[3]] = block
    return out


def _window_equals_scatter(case) -> bool:
    block, origin, weight, geom, in_hw, out_hw = case
    expected = loop_adjoint(_placed(block, origin, out_hw), weight, geom, in_hw)
    result, start = conv2d_adjoint_window(block, origin, weight, geom, in_hw)
    assert start[0] >= 0 and start[1] >= 0
    assert start[0] + result.shape[2] <= in_hw[0] and start[1] + result.shape[3] <= in_hw[1]
    return bool(np.allclose(_placed(result, start, in_hw), expected, rtol=1e-12, atol=1e-12))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(block_cases())
def test_block_adjoint_equals_the_loop_scatter(case):
    assert _window_equals_scatter(case)


def test_a_block_adjoint_without_its_last_tap_is_caught(monkeypatch):
    real_taps = conv_module._taps
    monkeypatch.setattr(conv_module, "_taps", lambda *a: real_taps(*a)[:-1])
    rng = np.random.default_rng(4)
    geom = ConvGeometry((1, 1), (1, 1), (1, 1, 1, 1), 1)
    case = (rng.random((2, 2, 3, 3)), (2, 1), rng.random((2, 3, 3, 3)) + 0.1, geom, (8, 8), (8, 8))
    assert not _window_equals_scatter(case)


# --------------------------------------------------------------------------- the windowed pass on an image output


def _image_net(tmp_path, seed: int = 3):
    """x [1, 9, 9] → c1 (1→2) ReLU → c2 (2→2) ReLU → + c1 → c3 (2→1, 3×3): an image output [1, 9, 9]."""
    b = GraphBuilder(seed, [1, 9, 9])
    h1 = b.op("Relu", [b.conv("x", 1, 2, name="c1")])
    h2 = b.op("Relu", [b.conv(h1, 2, 2, name="c2")])
    out = b.conv(b.op("Add", [h2, h1]), 2, 1, name="c3")
    path = tmp_path / "image.onnx"
    path.write_bytes(b.model(out).SerializeToString())
    return path


def _dense_abs(layer) -> np.ndarray:
    """|W| of a convolution layer as a matrix [N_out, N_in], each row the loop scatter of a unit vector."""
    out_shape, in_shape = layer.out_shape[1:], layer.in_shape[1:]
    size = int(np.prod(out_shape))
    units = np.eye(size).reshape((size,) + tuple(out_shape))
    geom = layer.geometry
    return loop_adjoint(units, np.abs(layer.weight), geom, tuple(in_shape[1:])).reshape(size, -1)


def _reference_sensitivities(analysis) -> list[np.ndarray]:
    """P of the two hidden layers of :func:`_image_net`, chained by hand from dense matrices."""
    net = analysis.network
    ctx = analysis.context(True)
    nodes = {n.outputs[0]: n for n in net.nodes if n.outputs}
    c1, c2, c3 = net.layers
    p_add = np.eye(81) @ _dense_abs(c3)  # the output is c3's pre-activation (no activation)
    p_c2 = p_add  # c2's output enters the Add
    s2 = np.broadcast_to(layer_slopes(c2, ctx, nodes), c2.out_shape).reshape(-1)
    p_c1 = (p_c2 * s2[None, :]) @ _dense_abs(c2) + p_add  # through c2, and the Add's skip
    return [p_c1, p_c2]


def _check_against_reference(bound: TightBound, sens: list[np.ndarray]) -> None:
    for i, p in enumerate(sens):
        weighted = p * bound.deltas[i][None, :]
        ordered = -np.sort(-weighted, axis=1)[:, : bound.top[i].shape[1]]
        np.testing.assert_allclose(bound.top[i], ordered, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bound.total[i], weighted.sum(axis=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bound.neuron_max[i], weighted.max(axis=0), rtol=1e-12, atol=1e-12)
        if bound.cut_widths is not None:
            np.testing.assert_allclose(bound.cut_cost[i], p @ bound.cut_widths[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_bytes", [None, 40_000], ids=["one-tile", "tiles"])
@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_windowed_pass_equals_dense_matrices(tmp_path, memory_bytes, mode):
    _, network = load_network(_image_net(tmp_path), NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    analysis = Analysis(network, failure)
    bound = TightBound(analysis, memory_bytes=memory_bytes)
    chunks = output_chunks(
        network.clean[network.tail_start].shape,
        tight_module.chunk_rows(analysis, memory_bytes or tight_module.tight_memory_bytes()),
        tiles=True,
    )
    if memory_bytes is not None:
        assert len(chunks) > 1 and all(isinstance(c, np.ndarray) for c in chunks)  # several square tiles
    _check_against_reference(bound, _reference_sensitivities(analysis))


def test_windows_are_used_and_a_sum_missing_a_row_is_caught(tmp_path, monkeypatch):
    _, network = load_network(_image_net(tmp_path), NetworkOptions())
    analysis = Analysis(network, FailureModel.crash())
    reference = _reference_sensitivities(analysis)
    seen = []
    real_plus = tight_module._Window.plus
    monkeypatch.setattr(tight_module._Window, "plus", lambda self, other: seen.append(1) or real_plus(self, other))
    _check_against_reference(TightBound(analysis, memory_bytes=40_000), reference)
    assert seen  # the residual Add met two rectangles

    def short_plus(self, other):
        dropped = tight_module._Window(other.block[:, :, :-1], other.origin, other.shape)
        return real_plus(self, dropped)

    monkeypatch.setattr(tight_module._Window, "plus", short_plus)
    with pytest.raises(AssertionError):
        _check_against_reference(TightBound(analysis, memory_bytes=40_000), reference)


def test_tiles_cover_every_output_once_and_a_missing_one_is_caught(tmp_path, monkeypatch):
    for shape, rows in (((1, 1, 9, 9), 10), ((1, 3, 16, 8), 50), ((1, 2, 8, 8), 1), ((1, 4, 2, 2), 3)):
        chunks = output_chunks(shape, rows, tiles=True)
        flat = np.concatenate([np.arange(c.start, c.stop) if isinstance(c, slice) else c for c in chunks])
        np.testing.assert_array_equal(np.sort(flat), np.arange(int(np.prod(shape))))
        assert all(len(c) <= rows if isinstance(c, np.ndarray) else c.stop - c.start <= rows for c in chunks)
    _, network = load_network(_image_net(tmp_path), NetworkOptions())
    analysis = Analysis(network, FailureModel.crash())
    reference = _reference_sensitivities(analysis)
    real = tight_module.output_chunks
    monkeypatch.setattr(tight_module, "output_chunks", lambda *a, **k: real(*a, **k)[:-1])
    with pytest.raises(AssertionError):
        _check_against_reference(TightBound(analysis, memory_bytes=40_000), reference)


# --------------------------------------------------------------------------- merged kept values


def _expected_prefix(pieces: list[np.ndarray], width: int) -> np.ndarray:
    merged = np.concatenate(pieces, axis=1)
    ordered = -np.sort(-merged, axis=1)[:, :width]
    return np.concatenate([np.zeros((merged.shape[0], 1)), np.cumsum(ordered, axis=1)], axis=1)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 30), st.booleans(), st.integers(0, 2**31))
def test_merged_prefix_equals_a_full_sort(rows, width, with_nan, seed):
    rng = np.random.default_rng(seed)
    scales = rng.choice([1.0, 10.0, 100.0], 3)  # one list may hold every selected value, or none
    pieces = [-np.sort(-(rng.random((rows, int(rng.integers(1, 12)))).round(1)), axis=1) * s for s in scales]
    if with_nan:
        pieces[0][0, -1] = np.nan  # sorted down, NaN where the selection leaves it: last
    width = min(width, sum(p.shape[1] for p in pieces))
    np.testing.assert_array_equal(_merged_prefix(pieces, width), _expected_prefix(pieces, width))


def test_a_trim_one_column_short_is_caught(monkeypatch):
    real = tight_module._trimmed_pieces
    monkeypatch.setattr(tight_module, "_trimmed_pieces", lambda pieces, width: [p[:, :-1] for p in real(pieces, width)])
    rng = np.random.default_rng(0)
    caught = 0
    for _ in range(20):
        pieces = [-np.sort(-rng.random((3, 8)), axis=1) * rng.choice([1.0, 10.0, 100.0]) for _ in range(3)]
        got = _merged_prefix(pieces, 6)
        if got.shape != (3, 7) or not np.array_equal(got, _expected_prefix(pieces, 6)):
            caught += 1
    assert caught >= 10  # every draw where one list holds larger values than another


# --------------------------------------------------------------------------- max-pool and ConvTranspose blocks


@settings(max_examples=80, deadline=None, derandomize=True)
@given(pools(), st.integers(0, 2**31))
def test_block_maxpool_adjoint_equals_the_loops(params, seed):
    """A rectangle of the pooled sensitivities through the candidate adjoint, placed back into the
    plane, equals the loop scatter of the whole (zero outside the rectangle) bit for bit."""
    node, cot, box, _ = _case(params)
    rng = np.random.default_rng(seed)
    ho, wo = cot.shape[2:]
    r0, c0 = int(rng.integers(0, ho)), int(rng.integers(0, wo))
    h, w = int(rng.integers(1, ho - r0 + 1)), int(rng.integers(1, wo - c0 + 1))
    whole = np.zeros_like(cot)
    whole[:, :, r0 : r0 + h, c0 : c0 + w] = cot[:, :, r0 : r0 + h, c0 : c0 + w]
    kernel, strides, dilations, pads, ceil = (params[0], params[1], params[2], params[3], params[4])
    with np.errstate(invalid="ignore"):
        expected = loop_candidate_adjoint(whole, box.lo[0], box.hi[0], kernel, strides, dilations, pads, ceil)
        block, start = max_candidates_block_adjoint(node, whole[:, :, r0 : r0 + h, c0 : c0 + w], (r0, c0), box)
    np.testing.assert_array_equal(_placed(block, start, box.shape[2:]), expected)


def test_a_block_maxpool_adjoint_without_its_last_tap_is_caught(monkeypatch):
    real = pooling.window_taps
    monkeypatch.setattr(pooling, "window_taps", lambda *a: real(*a)[:-1])
    params = ((2, 2), (2, 2), (1, 1), (0, 0, 0, 0), 0, (6, 6), 100.0, 5)
    node, cot, box, expected = _case(params)
    block, start = max_candidates_block_adjoint(node, cot, (0, 0), box)
    assert not np.array_equal(_placed(block, start, box.shape[2:]), expected)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(block_cases(), st.integers(0, 3), st.integers(0, 3))
def test_convolution_of_a_block_equals_the_loop_convolution(case, crop_rows, crop_cols):
    """conv2d_window of a block (a ConvTranspose's adjoint), placed back, equals the loop
    convolution of the whole plane, cropped to the requested output size."""
    block, origin, weight, geom, _, plane = case
    assume(min(geom.output_hw(plane[0], plane[1], weight.shape[2:])) > 0)
    weight = np.ascontiguousarray(weight.transpose(1, 0, 2, 3))  # C_in of the convolution = the block's channels
    full = loop_conv(_placed(block, origin, plane), weight, geom)
    out_hw = (max(1, full.shape[2] - crop_rows), max(1, full.shape[3] - crop_cols))
    found = conv2d_window(block, origin, weight, geom, out_hw)
    assert found is not None
    result, start = found
    assert start[0] + result.shape[2] <= out_hw[0] and start[1] + result.shape[3] <= out_hw[1]
    np.testing.assert_allclose(
        _placed(result, start, out_hw), full[:, :, : out_hw[0], : out_hw[1]], rtol=1e-12, atol=1e-12
    )


def _unet_like(tmp_path, seed: int = 2):
    """x [1, 16, 16] → c1 ReLU → MaxPool 2 → c2 ReLU → ConvTranspose ReLU → Concat with c1 → c3: [1, 16, 16]."""
    b = GraphBuilder(seed, [1, 16, 16])
    h1 = b.op("Relu", [b.conv("x", 1, 2, name="c1")])
    h2 = b.op("Relu", [b.conv(b.op("MaxPool", [h1], kernel_shape=[2, 2], strides=[2, 2]), 2, 3, name="c2")])
    up = b.op("ConvTranspose", [h2, b.const(b.weights(3, 2, 2, 2))], "up", kernel_shape=[2, 2], strides=[2, 2])
    out = b.conv(b.op("Concat", [b.op("Relu", [up]), h1], axis=1), 4, 1, name="c3")
    path = tmp_path / "unet.onnx"
    path.write_bytes(b.model(out).SerializeToString())
    return path


def _equals_the_whole_plane_pass(analysis, memory_bytes) -> bool:
    """The windowed pass against the pass over whole planes (``windows=False``, tested against loops and
    the reference elsewhere)."""
    bound = TightBound(analysis, memory_bytes=memory_bytes)
    sens = dense_sensitivities(analysis)
    try:
        _check_against_reference(bound, sens)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("memory_bytes", [None, 2_500_000], ids=["one-tile", "tiles"])
def test_windowed_pass_equals_the_whole_planes_on_a_unet(tmp_path, memory_bytes, monkeypatch):
    _, network = load_network(_unet_like(tmp_path), NetworkOptions())
    analysis = Analysis(network, FailureModel.byzantine(0.5))
    kinds = []
    real_step = tight_module._window_step
    monkeypatch.setattr(tight_module, "_window_step", lambda s, w, c: kinds.append(s.op_type) or real_step(s, w, c))
    assert _equals_the_whole_plane_pass(analysis, memory_bytes)
    if memory_bytes is not None:  # one tile is the whole plane: nothing to cut
        assert {"MaxPool", "Concat"} <= set(kinds)  # the rectangles went through both


def test_a_windowed_transpose_missing_a_row_is_caught(tmp_path, monkeypatch):
    _, network = load_network(_unet_like(tmp_path), NetworkOptions())
    analysis = Analysis(network, FailureModel.crash())
    real = tight_module.conv2d_window

    def short(*args):
        block, origin = real(*args)
        return block[:, :, :-1], origin

    monkeypatch.setattr(tight_module, "conv2d_window", short)
    assert not _equals_the_whole_plane_pass(analysis, 2_500_000)


# --------------------------------------------------------------------------- whole planes


def _whole_by_loops(grad: np.ndarray) -> bool:
    rows = [r for r in range(grad.shape[2]) if np.any(grad[:, :, r, :] != 0)]
    cols = [c for c in range(grad.shape[3]) if np.any(grad[:, :, :, c] != 0)]
    return (
        bool(rows) and rows[0] == 0 and rows[-1] == grad.shape[2] - 1 and cols[0] == 0 and cols[-1] == grad.shape[3] - 1
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 6),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31),
)
def test_whole_plane_check_equals_the_rectangle_by_loops(batch, channels, height, width, density, seed):
    """The edge test (first sample, then the whole batch) says "whole" exactly when the rectangle of
    non-zeros over every sample and channel is the plane."""
    grad = np.random.default_rng(seed).random((batch, channels, height, width))
    grad[np.random.default_rng(seed + 1).random(grad.shape) > density] = 0.0
    assert conv_module._reaches_every_edge(grad) == _whole_by_loops(grad)


def test_a_whole_plane_check_on_the_first_sample_only_is_caught():
    """Neither sample alone spans the plane, both together do: the check says "whole", and a copy
    that looks at the first sample only would not."""
    grad = np.zeros((2, 1, 4, 4))
    grad[0, 0, 0, 0] = grad[1, 0, 3, 3] = 1.0
    assert conv_module._reaches_every_edge(grad) and _whole_by_loops(grad)
    assert not conv_module._reaches_every_edge(grad[:1])


# --------------------------------------------------------------------------- the inverse problems' search


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(0, 5000), st.data())
def test_largest_true_equals_a_scan(limit, data):
    """The binary search (1 tried first) returns the largest x ≤ limit with x ≤ answer, as a scan does,
    and takes two evaluations when nothing past 0 holds."""
    answer = data.draw(st.integers(-1, limit))
    calls = []

    def ok(x: int) -> bool:
        calls.append(x)
        return x <= answer

    assert fep_module._largest_true(ok, limit) == max(x for x in range(-1, limit + 1) if x <= answer)
    if answer == 0:
        assert len(calls) <= 2
    assert max(calls) <= max(1, 2 * answer)  # no count past twice the answer (docs/method.md §4.4)


def test_a_search_that_bisects_the_whole_range_asks_past_twice_the_answer():
    def bisection(ok, limit):  # the search without the doubling: its first probe is half the limit
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo

    calls: list[int] = []
    assert bisection(lambda x: calls.append(x) or x <= 3, 5000) == 3
    assert max(calls) > 2 * 3


def test_a_search_that_trusts_one_too_far_is_caught():
    def weakened(ok, limit):  # returns 1 as soon as ok(1) holds, without searching further
        return -1 if not ok(0) else (1 if limit >= 1 and ok(1) else 0)

    assert weakened(lambda x: x <= 7, 10) != fep_module._largest_true(lambda x: x <= 7, 10)


# --------------------------------------------------------------------------- soundness on an image output


def test_windowed_bound_holds_against_onnxruntime_faults(tmp_path):
    """On the U-Net-like image model, taken in tiles with rectangles, the per-output bound of every
    failure vector tried is at least the change onnxruntime measures at every output pixel, for
    failed neurons chosen at random and among the most sensitive, sending the ends of the
    byzantine range, on random inputs and the corners of the domain."""
    path = _unet_like(tmp_path)
    _, network = load_network(path, NetworkOptions())
    analysis = Analysis(network, FailureModel.byzantine(0.5))
    bound = TightBound(analysis, memory_bytes=2_500_000)
    hidden = analysis.hidden
    runner = FaultRunner(onnx.load(str(path)), [la.output_value for la in hidden], [la.out_shape[1:] for la in hidden])
    rng = np.random.default_rng(0)
    batch = 64
    x = np.concatenate([rng.random((batch - 2, 1, 16, 16)), np.zeros((1, 1, 16, 16)), np.ones((1, 1, 16, 16))])
    clean = runner.clean(x).reshape(batch, -1)
    worst = 0.0
    for trial in range(12):
        counts = [int(rng.integers(0, 3)) for _ in hidden]
        keeps, repls = [], []
        for i, la in enumerate(hidden):
            keep = np.ones((batch, la.neurons))
            repl = np.zeros((batch, la.neurons))
            order = np.argsort(-bound.neuron_max[i]) if trial % 2 else rng.permutation(la.neurons)
            for b in range(batch):
                chosen = order[: counts[i]] if trial % 2 else rng.choice(la.neurons, counts[i], replace=False)
                keep[b, chosen] = 0.0
                repl[b, chosen] = rng.choice([-0.5, 0.5], counts[i])
            keeps.append(keep.reshape((batch,) + la.out_shape[1:]))
            repls.append(repl.reshape((batch,) + la.out_shape[1:]))
        change = np.abs(runner.run(x, keeps, repls).reshape(batch, -1) - clean).max(axis=0)
        limit = bound.per_output(counts)
        assert np.all(change <= limit * (1 + 1e-4) + 1e-5), (counts, float((change - limit).max()))
        worst = max(worst, float((change / np.maximum(limit, 1e-12)).max()))
    assert worst > 0.01  # the faults did move the output: the check is not vacuous
