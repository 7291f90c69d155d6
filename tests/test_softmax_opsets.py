"""Softmax and LogSoftmax before opset 13 normalize over every element from ``axis`` on (the input coerced to
2-D), from opset 13 on along ``axis`` alone; a QLinearSoftmax follows its own ``opset`` attribute
(docs/method.md §13.2). The ranges and the tight bound are checked against onnxruntime for both readings, and
the reading along ``axis`` alone — what robaudit did before — is caught on an opset-11 model and on a
QLinearSoftmax of opset 12: its box leaves out values onnxruntime computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import failure_rows, fault_errors, make_model, ort_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import pooling

HIDDEN = 6


def _inner_softmax(op: str, axis: int, opset: int, scale: float, seed: int) -> onnx.ModelProto:
    """x [N, 4] → MatMul + Add → Relu (the hidden layer 'h', 6 neurons) → Reshape [N, 2, 3] → ``op`` (``axis``)
    → Reshape [N, 6] → MatMul → y [N, 3]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((scale * rng.normal(size=(4, HIDDEN))).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(size=HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(HIDDEN, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "grid"),
        numpy_helper.from_array(np.array([-1, HIDDEN], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
        helper.make_node("Add", ["m", "b1"], ["pre"], name="add1"),
        helper.make_node("Relu", ["pre"], ["h"], name="relu1"),
        helper.make_node("Reshape", ["h", "grid"], ["g"], name="to_grid"),
        helper.make_node(op, ["g"], ["p"], name="norm", axis=axis),
        helper.make_node("Reshape", ["p", "flat"], ["pf"], name="to_flat"),
        helper.make_node("MatMul", ["pf", "W2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "inner_softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits,
    )
    return make_model(graph, opset)


def _inputs(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random points and corners of the input box [0, 1]^4."""
    corners = rng.integers(0, 2, (count // 2, 4)).astype(np.float32)
    return np.concatenate([corners, rng.random((count - count // 2, 4)).astype(np.float32)])


def _outside(model: onnx.ModelProto, tmp_path, value: str, inputs: np.ndarray) -> int:
    """How many of onnxruntime's values of ``value`` at ``inputs`` lie outside robaudit's clean box of it."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    box = network.clean[value]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name=value))
    seen = ort_session(probe).run([value], {"x": inputs})[0].astype(np.float64)
    slack = 1e-6 * (1.0 + np.abs(seen))
    return int(np.sum((seen < box.lo - slack) | (seen > box.hi + slack)))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["Softmax", "LogSoftmax"]),
    axis=st.sampled_from([1, 2, -1]),
    opset=st.sampled_from([11, 12, 13, 17]),
    scale=st.sampled_from([0.5, 2.0, 6.0]),
    seed=st.integers(0, 2**16),
)
def test_ranges_and_bound_hold_against_onnxruntime(tmp_path, op, axis, opset, scale, seed):
    """The clean box of the normalized value holds every value onnxruntime computes, and the tight bound of one
    or two crashed neurons every error it measures, whichever reading the opset asks for."""
    model = _inner_softmax(op, axis, opset, scale, seed)
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng, 64)
    assert _outside(model, tmp_path, "p", inputs) == 0
    _, network = load_network(tmp_path / "model.onnx", NetworkOptions(input_range=(0.0, 1.0)))
    tight = TightBound(Analysis(network, FailureModel.crash()))
    for count in (1, 2):
        rows = failure_rows([HIDDEN], [count], (0.0, 0.0), inputs[:8], rng)
        measured = fault_errors(model, ["h"], [HIDDEN], rows).max()
        assert measured <= tight.fep([count]) * (1 + 1e-5) + 1e-6


def test_reading_along_the_axis_alone_is_caught_before_opset_13(tmp_path, monkeypatch):
    """Weakened: an opset-11 Softmax(axis=1) read as a normalization along axis 1 alone (over 2 elements, not
    6): onnxruntime's probabilities fall below the box."""
    model = _inner_softmax("Softmax", 1, 11, 2.0, 3)
    inputs = _inputs(np.random.default_rng(0), 200)
    assert _outside(model, tmp_path, "p", inputs) == 0
    monkeypatch.setattr(pooling, "softmax_view", lambda node, shape: (tuple(shape), node.attr("axis", -1) % len(shape)))
    assert _outside(model, tmp_path, "p", inputs) > 0


def _qlinear_softmax(opset_attr: int, axis: int, model_opset: int = 17) -> onnx.ModelProto:
    """x [N, 2, 3] → ×2 → QuantizeLinear → QLinearSoftmax (``opset_attr``, ``axis``) → DequantizeLinear 'p' → MatMul,
    in a model of default opset ``model_opset``."""
    consts = {
        "k": np.array(2.0, np.float32), "xs": np.array(0.05, np.float32), "xz": np.array(0, np.uint8),
        "ys": np.array(1 / 256, np.float32), "yz": np.array(0, np.uint8),
        "W": np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xk"], name="scale"),
        helper.make_node("QuantizeLinear", ["xk", "xs", "xz"], ["q"], name="quant"),
        helper.make_node("QLinearSoftmax", ["q", "xs", "xz", "ys", "yz"], ["qp"], name="qsoftmax",
                         domain="com.microsoft", axis=axis, opset=opset_attr),
        helper.make_node("DequantizeLinear", ["qp", "ys", "yz"], ["p"], name="dequant"),
        helper.make_node("MatMul", ["p", "W"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "qlinear_softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 2])],
        [numpy_helper.from_array(v, name) for name, v in consts.items()],
    )
    opsets = [helper.make_opsetid("", model_opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 7
    return model


@pytest.mark.parametrize(("opset_attr", "model_opset"), [(12, 17), (13, 17), (13, 12), (12, 12)])
def test_qlinear_softmax_follows_its_opset_attribute(tmp_path, monkeypatch, opset_attr, model_opset):
    """onnxruntime's QLinearSoftmax of ``opset`` 12 normalizes over both trailing axes, of 13 along axis 1, whatever
    the model's own opset: the box of the dequantized probabilities holds onnxruntime's values in each pairing;
    where the two opsets disagree, reading the model's opset instead (an attack helper's finding for 13 in a model
    of 12) is caught."""
    model = _qlinear_softmax(opset_attr, 1, model_opset)
    inputs = np.random.default_rng(1).random((300, 2, 3)).astype(np.float32)
    assert _outside(model, tmp_path, "p", inputs) == 0
    if (opset_attr < 13) != (model_opset < 13):
        monkeypatch.setattr(Node, "semantics_opset", lambda node: node.opset)
        assert _outside(model, tmp_path, "p", inputs) > 0
