"""Constants read as numbers must not change a value's shape (an attack helper's finding): a one-element constant
on several axes, ``c`` [1, 1, 1], broadcasts ``Max(h, c)`` with h [1, 2] to [1, 1, 2]; the one-sided clamp, the
written-out LayerNorm's ε and Pow exponent, and the NaN guard read it as a number and kept [1, 2], so a later
``ReduceSum(axes=[1])`` summed the two neurons where onnxruntime sums an axis of length 1 — a bound of 0 against
a measured error of 1.5. Such constants are now not read as numbers (the ops are refused in one line, or bounded
by their own broadcasting rules)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model, ort_session, run_in_process
from onnx import TensorProto, helper, numpy_helper

import robaudit.graph.ops.restriction as restriction
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops.base import broadcast_scalar


@pytest.mark.parametrize(
    ("value", "number"),
    [(2.5, 2.5), (np.float32(2.5), 2.5), (np.array([2.5]), 2.5), (np.full((1, 1), 2.5), None),
     (np.full((1, 1, 1), 2.5), None), (np.array([1.0, 2.0]), None), (None, None)],
)
def test_broadcast_scalar_reads_one_element_on_at_most_one_axis(value, number):
    assert broadcast_scalar(value) == number


def _clamp_then_reduce(c_shape: tuple[int, ...]):
    """l0 = relu(x + 0.5) (the failure site); h = l0·[[1, −1], [1, −1]] + [0, −10]; Max(h, c); ReduceSum over axis 1;
    relu(· − 0.5). With c [1, 1, 1] the Max is [1, 1, 2] and the sum runs over an axis of length 1."""
    const = numpy_helper.from_array
    inits = [
        const(np.eye(2, dtype=np.float32), "w0"), const(np.full(2, 0.5, np.float32), "b0"),
        const(np.array([[1.0, -1.0], [1.0, -1.0]], np.float32), "w1"), const(np.array([0.0, -10.0], np.float32), "b1"),
        const(np.full(c_shape, -100.0, np.float32), "c"), const(np.array([1], np.int64), "axes"),
        const(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["p"], name="fc0"),
        helper.make_node("Relu", ["p"], ["l0"]),
        helper.make_node("Gemm", ["l0", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Max", ["h", "c"], ["clamped"], name="clamp"),
        helper.make_node("ReduceSum", ["clamped", "axes"], ["s"], keepdims=1),
        helper.make_node("Sub", ["s", "half"], ["u"]),
        helper.make_node("Relu", ["u"], ["y"]),
    ]
    out_shape = [1, 1, 2] if len(c_shape) == 3 else [1, 1]
    graph = helper.make_graph(
        nodes, "broadcast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits,
    )
    return make_model(graph, opset=18)


def _measured(model) -> float:
    """|ΔF| when the second neuron of l0 crashes at x = (0.0428, 1), by onnxruntime."""
    session = ort_session(model)
    crashed = type(model).FromString(model.SerializeToString())
    for node in crashed.graph.node:
        if node.name == "fc1":
            node.input[0] = "l0_crashed"
    crashed.graph.initializer.append(numpy_helper.from_array(np.array([[1.0, 0.0]], np.float32), "keep"))
    crashed.graph.node.insert(2, helper.make_node("Mul", ["l0", "keep"], ["l0_crashed"]))
    x = {"x": np.array([[0.0428, 1.0]], np.float32)}
    clean, faulty = session.run(None, x)[0], ort_session(crashed).run(None, x)[0]
    return float(np.abs(faulty.astype(np.float64) - clean).max())


def test_a_clamp_by_a_constant_on_several_axes_is_refused_and_the_old_reading_is_caught(tmp_path, monkeypatch):
    model = _clamp_then_reduce((1, 1, 1))
    path = tmp_path / "clamp_rank.onnx"
    path.write_bytes(model.SerializeToString())
    measured = _measured(model)
    assert measured == pytest.approx(1.5, rel=1e-5)
    proc = run_in_process("bound", path, "--crash", "1,0", expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'Max'" in lines[0], proc.stderr
    # the reading before: any one-element constant as a number
    monkeypatch.setattr(restriction, "broadcast_scalar",
                        lambda v: None if v is None or np.size(v) != 1 else float(np.asarray(v).reshape(-1)[0]))
    _, net = load_network(path, NetworkOptions())
    assert TightBound(Analysis(net, FailureModel.crash())).fep([1, 0]) < 0.9 * measured  # below the error: unsound


def test_a_clamp_by_a_one_axis_constant_is_still_bounded(tmp_path):
    model = _clamp_then_reduce((1,))
    path = tmp_path / "clamp_one_axis.onnx"
    path.write_bytes(model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    assert TightBound(Analysis(net, FailureModel.crash())).fep([1, 0]) >= _measured(model) * (1 - 1e-6)


@pytest.mark.parametrize("widening", ["eps", "pow"])
def test_a_written_out_layernorm_with_a_constant_on_several_axes_is_not_fused(tmp_path, widening):
    """d / Sqrt(ReduceMean(d^2) + ε) with ε (or the exponent 2) of shape [1, 1, 1]: z is [1, 1, 2] in onnxruntime;
    fused into one LayerNorm it kept [1, 2] and a ReduceSum over axis 1 gave a bound of 0 against an error of 1."""
    const = numpy_helper.from_array
    wide = np.full((1, 1, 1), 1.0, np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["p"], name="fc0"),
        helper.make_node("Relu", ["p"], ["l0"]),
        helper.make_node("Gemm", ["l0", "w1", "zero2"], ["h"], name="fc1"),
        helper.make_node("ReduceMean", ["h", "last"], ["m"], keepdims=1),
        helper.make_node("Sub", ["h", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "last"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["z"]),
        helper.make_node("Add", ["z", "bias"], ["u"]),
        helper.make_node("ReduceSum", ["u", "axis1"], ["r"], keepdims=1),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [
        const(np.array([[1.0], [0.0]], np.float32), "w0"), const(np.array([0.5], np.float32), "b0"),
        const(np.array([[10.0, 0.0]], np.float32), "w1"), const(np.zeros(2, np.float32), "zero2"),
        const(np.array([-1], np.int64), "last"), const(np.array([1], np.int64), "axis1"),
        const(2.0 * wide if widening == "pow" else np.array(2.0, np.float32), "two"),
        const(1e-5 * wide if widening == "eps" else np.array(1e-5, np.float32), "eps"),
        const(np.array([0.0, -100.0], np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes, "ln_rank", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2])], inits,
    )
    path = tmp_path / f"ln_{widening}.onnx"
    path.write_bytes(make_model(graph, opset=18).SerializeToString())
    proc = run_in_process("bound", path, "--crash", "1,0", expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ("'Sqrt'" in lines[0] or "'Pow'" in lines[0]), proc.stderr
