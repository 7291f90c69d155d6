"""AveragePool and MaxPool with ``ceil_mode`` (docs/method.md §3.2): the last window is dropped when it would start
in the end pad, and with ``count_include_pad`` a window that hangs past the pads counts only its elements inside
the input and its pads. The rule's output at points (shape and values) against onnxruntime over kernels,
strides, pads, dilations and 1-D/2-D/3-D; the tight bound against onnxruntime's errors on a model with such a
pool; dividing by the whole kernel and keeping the last window are caught."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import failure_rows, fault_errors, make_model, ort_session
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import decode_node
from robaudit.graph.ops import Interval, lookup, pooling


def _pool_node(op: str, spatial: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int, include: int):
    attrs = {"kernel_shape": [kernel] * spatial, "strides": [stride] * spatial, "ceil_mode": 1,
             "pads": [pad[0]] * spatial + [pad[1]] * spatial}
    if dilation > 1:
        attrs["dilations"] = [dilation] * spatial
    if op == "AveragePool":
        attrs["count_include_pad"] = include
    return helper.make_node(op, ["x"], ["y"], name="pool", **attrs)


def _ort_output(node, x: np.ndarray) -> np.ndarray | None:
    """onnxruntime's output of the single pool (None where onnxruntime refuses the attributes)."""
    dims = [f"d{i}" for i in range(x.ndim)]
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    model = make_model(graph, 19)
    try:
        session = ort_session(model)
        return session.run(["y"], {"x": x})[0].astype(np.float64)
    except (Fail, InvalidArgument, RuntimeException):  # onnxruntime's own refusal of the attributes
        return None


def _rule_output(proto, box: Interval) -> Interval:
    node = decode_node(proto)
    node.opset = 19
    (out,) = lookup(node).interval(node, [box])
    return out


CASES = st.tuples(
    st.sampled_from(["AveragePool", "MaxPool"]), st.sampled_from([1, 2, 3]), st.integers(1, 4), st.integers(1, 3),
    st.tuples(st.integers(0, 2), st.integers(0, 2)), st.integers(1, 2), st.integers(0, 1), st.integers(3, 8),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(case=CASES, seed=st.integers(0, 2**16))
def test_points_and_boxes_match_onnxruntime(case, seed):
    """At a point the rule gives onnxruntime's shape and values; on a box, onnxruntime's outputs at its points lie in
    the rule's interval."""
    op, spatial, kernel, stride, pad, dilation, include, size = case
    # cases onnxruntime refuses are filtered out: were most of them, hypothesis would fail its health check
    assume(max(pad) < kernel and (dilation - 1) * (kernel - 1) + kernel <= size + sum(pad))
    proto = _pool_node(op, spatial, kernel, stride, pad, dilation, include)
    rng = np.random.default_rng(seed)
    shape = (1, 2) + (size,) * spatial
    x = rng.normal(size=shape).astype(np.float32)
    expected = _ort_output(proto, x)
    assume(expected is not None)
    got = _rule_output(proto, Interval.point(x))
    assert got.lo.shape == expected.shape
    np.testing.assert_allclose(got.lo, expected, rtol=1e-6, atol=1e-6)
    centre = rng.normal(size=shape)
    box = Interval(centre - 0.5, centre + 0.5)
    out = _rule_output(proto, box)
    for _ in range(5):
        point = (box.lo + rng.random(shape) * (box.hi - box.lo)).astype(np.float32)
        seen = _ort_output(proto, point)
        assert np.all(seen >= out.lo - 1e-5) and np.all(seen <= out.hi + 1e-5)


def test_whole_kernel_divisors_are_caught(monkeypatch):
    """Weakened: count_include_pad dividing every window by the whole kernel (what robaudit did): the windows ceil_mode
    adds past the pads come out too small (onnxruntime: 1 for ones, the copy 1/4 in the last row and column)."""
    proto = _pool_node("AveragePool", 2, 2, 2, (0, 0), 1, 1)
    x = np.ones((1, 1, 5, 5), np.float32)
    assert np.allclose(_rule_output(proto, Interval.point(x)).lo, _ort_output(proto, x))

    def whole(self, node, shape, geom, kernel):
        ho, wo = geom.output_hw(shape[-2], shape[-1], kernel)
        return np.full((ho, wo), float(kernel[0] * kernel[1]))

    monkeypatch.setattr(pooling.WindowPool, "_divisors", whole)
    assert not np.allclose(_rule_output(proto, Interval.point(x)).lo, _ort_output(proto, x))


def test_keeping_a_last_window_that_starts_in_the_pad_is_caught(monkeypatch):
    """Weakened: the last window kept although it starts in the end pad (5 + 2 pads, kernel 2, stride 2: onnxruntime
    gives 3 windows per axis, the copy 4)."""
    proto = _pool_node("MaxPool", 2, 2, 2, (1, 1), 1, 0)
    x = np.random.default_rng(0).normal(size=(1, 1, 5, 5)).astype(np.float32)
    assert _rule_output(proto, Interval.point(x)).lo.shape == _ort_output(proto, x).shape == (1, 1, 3, 3)

    def kept(size, kernel, stride, dilation, begin, end):
        span, padded = dilation * (kernel - 1) + 1, size + begin + end
        rest = (padded - span) % stride
        return stride - rest if rest else 0

    monkeypatch.setattr(pooling, "_ceil_extension", kept)
    out = _rule_output(proto, Interval.point(x))  # a fourth window per axis, wholly in the pad: −inf
    assert out.lo.shape != (1, 1, 3, 3) or not np.all(np.isfinite(out.lo))


def _pooled_model(seed: int) -> onnx.ModelProto:
    """x [N, 8] → MatMul → Relu 'h' [N, 25] → Reshape [N, 1, 5, 5] → AveragePool (2×2, stride 2, ceil_mode,
    count_include_pad) → Flatten → MatMul → y [N, 2]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.uniform(0, 1, (8, 25)).astype(np.float32), "W1"),
             numpy_helper.from_array(np.array([-1, 1, 5, 5], np.int64), "grid"),
             numpy_helper.from_array(rng.normal(size=(9, 2)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
             helper.make_node("Relu", ["m"], ["h"], name="relu1"),
             helper.make_node("Reshape", ["h", "grid"], ["g"], name="grid"),
             helper.make_node("AveragePool", ["g"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2],
                              ceil_mode=1, count_include_pad=1),
             helper.make_node("Flatten", ["p"], ["pf"], name="flat"),
             helper.make_node("MatMul", ["pf", "W2"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return make_model(graph, 19)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16))
def test_the_tight_bound_holds_through_a_ceil_mode_pool(tmp_path, seed):
    """Crashes in 'h' (the corner windows ceil_mode adds read one element each): every error onnxruntime measures is
    within the tight bound (robaudit gave 1.16 against a measured 3.57 before the fix)."""
    model = _pooled_model(seed)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    tight = TightBound(Analysis(network, FailureModel.crash()))
    rng = np.random.default_rng(seed)
    inputs = np.concatenate([np.ones((1, 8)), rng.random((3, 8))]).astype(np.float32)
    for count in (1, 2):
        rows = failure_rows([25], [count], (0.0, 0.0), inputs, rng)
        measured = fault_errors(model, ["h"], [25], rows).max()
        assert measured <= tight.fep([count]) * (1 + 1e-5) + 1e-6
