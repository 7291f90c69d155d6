"""The model in the form robaudit reads it: what ``harden``, ``design --write`` and ``check``'s remedy edit.

Two forms differ from the file: a QOperator model is read in its QDQ form (docs/method.md §11) and a
model that computes in float16 as float32 arithmetic rounded to float16 after every op
(docs/method.md §1.2). The layer values a report names exist only in that form; onnxruntime computes
the same outputs for both (for float16, up to an ulp or two: onnxruntime may skip a rounding between two
ops, which the bounds allow).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from robaudit.graph.float16 import widen_float16
from robaudit.graph.onnx_graph import build_graph
from robaudit.graph.ops.qoperator import qoperator_to_qdq


def analysed_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself, or a copy in the form robaudit reads it (QDQ of a QOperator model, float16 widened)."""
    if not _may_differ(model):
        return model
    graph = build_graph(model)
    form = qoperator_to_qdq(widen_float16(graph))
    if form is graph:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(node.proto for node in form.nodes)
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name)
                                  for name, value in form.initializers.items())
    types = {info.name: info.elem_type for info in (*form.inputs, *form.outputs)}
    for info in (*copy.graph.input, *copy.graph.output):
        if info.name in types and info.type.HasField("tensor_type"):
            info.type.tensor_type.elem_type = types[info.name]
    del copy.graph.value_info[:]
    return copy


def _may_differ(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds an integer op of a QOperator model or a float16 value (cheap: no tensor decoded)."""
    from robaudit.graph.ops.qoperator import INTEGER_OPS

    half = onnx.TensorProto.FLOAT16
    graph = model.graph
    return (
        any(node.op_type in INTEGER_OPS or any((a.name in ('to', 'dtype') and a.i == half) or a.t.data_type == half
                                                     for a in node.attribute)
            for node in graph.node)
        or any(t.data_type == half for t in graph.initializer)
        or any(i.type.tensor_type.elem_type == half for i in (*graph.input, *graph.output))
    )
