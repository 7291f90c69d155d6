"""Ops whose meaning changed between opsets, read as the model's opset defines them (docs/method.md §3.2): Split-18's
``num_outputs`` on a length it does not divide (parts of ⌈d/n⌉, the last smaller) against onnxruntime, with the
old reading (⌊d/n⌋, the rest to the last part) caught; and the legacy forms robaudit does not model refused in one
line — broadcasting from an ``axis`` (opset < 7), BatchNormalization/Dropout whose ``is_test`` defaults to the
training form (opset < 7), a Concat without its axis (opset < 4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_model, ort_session
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.errors import UnsupportedModelError
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import decode_node
from robaudit.graph.ops import Interval, lookup, shape_ops


def _split_parts(length: int, parts: int, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(onnxruntime's parts, the rule's parts at the point x) of Split-18(axis 1, num_outputs ``parts``)."""
    outputs = [f"y{i}" for i in range(parts)]
    proto = helper.make_node("Split", ["x"], outputs, name="split", axis=1, num_outputs=parts)
    graph = helper.make_graph([proto], "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, length])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, f"d{i}"])
                               for i, o in enumerate(outputs)])
    expected = ort_session(make_model(graph, 18)).run(outputs, {"x": x})
    node = decode_node(proto)
    node.opset = 18
    got = [box.lo for box in lookup(node).interval(node, [Interval.point(x)])]
    return expected, got


@pytest.mark.parametrize(("length", "parts"), [(7, 3), (9, 4), (10, 3), (6, 3), (5, 2), (8, 3)])
def test_split_num_outputs_cuts_as_onnxruntime(length, parts):
    x = np.arange(length, dtype=np.float32)[None, :]
    expected, got = _split_parts(length, parts, x)
    assert [e.shape for e in expected] == [g.shape for g in got]
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(e, g)


def test_the_old_split_reading_is_caught(monkeypatch):
    """Weakened: ⌊7/3⌋ = 2 per part and the rest to the last ([2, 2, 3]); onnxruntime cuts [3, 3, 1]."""

    def floor_parts(self, node, shape, consts):
        n = len(node.outputs)
        return [shape[node.attr("axis", 0) % len(shape)] // n] * n

    monkeypatch.setattr(shape_ops.Split, "_sizes", floor_parts)
    expected, got = _split_parts(7, 3, np.arange(7, dtype=np.float32)[None, :])
    assert [e.shape for e in expected] != [g.shape for g in got]


def _legacy_model(tmp_path, nodes, inits, opset: int, in_shape=(1, 4)):
    """x → MatMul → Relu 'h' → ``nodes`` (reading 'h', writing 'y') at ``opset``, saved; the path."""
    rng = np.random.default_rng(0)
    head = [helper.make_node("MatMul", ["x", "W1"], ["m"], name="mm1"),
            helper.make_node("Relu", ["m"], ["h"], name="r")]
    inits = [numpy_helper.from_array(rng.normal(size=(in_shape[1], 12)).astype(np.float32), "W1"), *inits]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(head + nodes, "legacy", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    path = tmp_path / "legacy.onnx"
    onnx.save(model, path)
    return path


def _refusal(path) -> str:
    with pytest.raises(UnsupportedModelError) as caught:
        load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    return str(caught.value)


def test_legacy_broadcast_from_an_axis_is_refused_and_the_trailing_one_kept(tmp_path):
    """Mul-6 of [1, 2, 3, 2] by c [2] from axis 1 scales along axis 1 (not the last): refused in one line naming
    op and node; the same c from axis 3 (its trailing place) is numpy's broadcasting and is bounded."""
    shape = numpy_helper.from_array(np.array([1, 2, 3, 2], np.int64), "grid")
    c = numpy_helper.from_array(np.array([10.0, 0.0], np.float32), "c")
    for axis, refused in ((1, True), (3, False)):
        nodes = [helper.make_node("Reshape", ["h", "grid"], ["g"], name="grid"),
                 helper.make_node("Mul", ["g", "c"], ["y"], name="scale", broadcast=1, axis=axis)]
        path = _legacy_model(tmp_path, nodes, [shape, c], 6)
        if refused:
            message = _refusal(path)
            assert "'Mul'" in message and "'scale'" in message and "axis 1" in message
        else:
            _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
            assert network.clean["y"].shape == (1, 2, 3, 2)


@pytest.mark.parametrize("op", ["BatchNormalization", "Dropout"])
def test_is_test_defaults_to_the_training_form_before_opset_7(tmp_path, op):
    """Opset 6: no is_test means is_test = 0, the training form — refused; is_test = 1 is bounded."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("s", rng.uniform(0.5, 1, 12)), ("b", rng.normal(size=12)), ("mean", rng.normal(size=12)),
              ("var", rng.uniform(0.5, 1, 12)))] if op == "BatchNormalization" else []
    inputs = ["h", "s", "b", "mean", "var"] if op == "BatchNormalization" else ["h"]
    for flag, refused in ((None, True), (1, False)):
        attrs = {} if flag is None else {"is_test": flag}
        path = _legacy_model(tmp_path, [helper.make_node(op, inputs, ["y"], name="norm", **attrs)], inits, 6)
        if refused:
            assert "is_test=0" in _refusal(path)
        else:
            load_network(path, NetworkOptions(input_range=(0.0, 1.0)))


def test_a_concat_without_its_axis_is_refused(tmp_path):
    nodes = [helper.make_node("Concat", ["h", "h"], ["y"], name="join")]
    assert "'join'" in _refusal(_legacy_model(tmp_path, nodes, [], 3))
