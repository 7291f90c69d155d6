"""A model whose only layer is its output layer: every command refuses it alike (nothing can fail)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run_in_process
from onnx import TensorProto, helper, numpy_helper


def test_a_model_without_a_hidden_layer_is_refused_alike_by_every_command(tmp_path) -> None:
    """Nothing can fail in a lone MatMul: bound, inject, certify, design and harden refuse it in the same line,
    which names --include-output-layer (certify said 'certified' for every input with an empty layer table,
    harden stopped with an internal error)."""
    weight = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [weight])
    path = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.save(tmp_path / "x.npy", np.full((3, 4), 0.5, np.float32))
    lines = set()
    for args in (["bound", path], ["inject", path, "--crash", "1", "--inputs", tmp_path / "x.npy"],
                 ["certify", path, "--inputs", tmp_path / "x.npy"], ["design", path, "--tolerate", "1"],
                 ["harden", path, "--inputs", tmp_path / "x.npy", "-o", tmp_path / "h.onnx"]):
        proc = run_in_process(*args, "-q", expect=2)
        assert "nothing can fail" in proc.stderr and "--include-output-layer" in proc.stderr, (args, proc.stderr)
        lines.add(proc.stderr)
    assert len(lines) == 1, lines
