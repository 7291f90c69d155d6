"""An independent fault injector for tests: rewrites a model so that chosen values pass
through ``value * keep + replacement`` with keep/replacement as extra batched inputs,
then runs onnxruntime. It shares no code with robaudit's own instrumentation.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def instrument(model: onnx.ModelProto, values: list[str], elem: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """Copy of ``model`` where each of ``values`` becomes ``v*keep_v + repl_v`` (inputs [N, ...] of type ``elem``,
    the values' own: FLOAT16 for a model that computes in float16)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for index, value in enumerate(values):
        clean = f"{value}__clean{index}"
        for node in graph.node:
            node.output[:] = [clean if o == value else o for o in node.output]
        keep, repl, kept = f"keep{index}", f"repl{index}", f"kept{index}"
        graph.node.extend(
            [
                helper.make_node("Mul", [clean, keep], [kept]),
                helper.make_node("Add", [kept, repl], [value]),
            ]
        )
        graph.input.extend(
            [
                helper.make_tensor_value_info(keep, elem, None),
                helper.make_tensor_value_info(repl, elem, None),
            ]
        )
    return _toposort(model)


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        progress = False
        for node in list(pending):
            if all(not v or v in available for v in node.input):
                ordered.append(node)
                available.update(node.output)
                pending.remove(node)
                progress = True
        assert progress, "cycle while re-sorting the instrumented graph"
    del graph.node[:]
    graph.node.extend(ordered)
    return model


class FaultRunner:
    """Runs ``model`` with faults at ``values`` (shapes per sample, batch excluded)."""

    def __init__(self, model: onnx.ModelProto, values: list[str], shapes: list[tuple[int, ...]],
                 dtype: type = np.float32):
        self.values, self.shapes, self.dtype = values, shapes, dtype
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            instrument(model, values, elem).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = model.graph.input[0].name
        self.output_name = None

    def run(self, x: np.ndarray, keeps: list[np.ndarray], repls: list[np.ndarray], output: str | None = None):
        """Outputs for a batch: x [B, ...], keeps/repls per value [B, *shape]."""
        feed = {self.input_name: x.astype(self.dtype)}
        for index, (keep, repl) in enumerate(zip(keeps, repls, strict=True)):
            feed[f"keep{index}"] = keep.astype(self.dtype)
            feed[f"repl{index}"] = repl.astype(self.dtype)
        names = None if output is None else [output]
        return self.session.run(names, feed)[0]

    def clean(self, x: np.ndarray, output: str | None = None) -> np.ndarray:
        """Outputs without faults."""
        batch = x.shape[0]
        keeps = [np.ones((batch,) + s) for s in self.shapes]
        repls = [np.zeros((batch,) + s) for s in self.shapes]
        return self.run(x, keeps, repls, output)
