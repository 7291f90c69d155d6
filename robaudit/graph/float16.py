"""float16 arithmetic as float32 arithmetic rounded to float16 after every op (docs/method.md §1.2).

A model that computes in float16 (a float16 graph input, float16 weights read by arithmetic, a
``Cast`` to float16 that is not cast straight back) is rewritten into the float32 model that
rounds each op's result to float16 — a ``Cast`` to float16 and back after every op whose result
is float16 and may not be representable (a product, a sum, an activation). Ops that only move,
select or compare float16 values (Relu, MaxPool, Reshape, Concat, ...) give float16 values
exactly and get no rounding. The pairs become the rounding ops of §1.2, so the bounds include
every rounding; onnxruntime's CPU kernels compute each float16 op in float32 and round its
result once (measured per op in ``tests/test_float16.py``), which is this model — where they skip a
rounding between two ops, the unrounded value is one the rounding op allows.

Weights convert to float32 exactly; graph inputs, outputs and value names stay as they were
(the inputs become float32 and are rounded to float16 first, as the model would see them).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from robaudit.errors import UnsupportedModelError
from robaudit.graph.onnx_graph import Graph, Node, ValueInfo, decode_node, readers_of

FLOAT16 = TensorProto.FLOAT16

#: Ops whose float16 results are float16 inputs moved, selected or compared: exact, no rounding.
EXACT_OPS = frozenset({
    "Relu", "MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
    "Slice", "Gather", "GatherElements", "GatherND", "Identity", "Split", "Pad", "Max", "Min", "Abs", "Neg",
    "Clip", "Dropout", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "ReduceMax", "ReduceMin", "Where",
    "Sign", "Floor", "Ceil", "Round", "Constant", "ConstantOfShape",
})

#: Ops whose outputs are never float (shapes, indices, codes, booleans).
_NON_FLOAT_OPS = frozenset({
    "Shape", "Size", "ArgMax", "ArgMin", "NonZero", "QuantizeLinear", "DynamicQuantizeLinear", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "IsNaN", "IsInf", "Not", "And", "Or", "Xor",
})

#: Recurrent cells: unrolled from their float32 form only (docs/method.md §14.4).
_RECURRENT_OPS = frozenset({"GRU", "LSTM", "RNN"})

#: Ops whose outputs after the first are indices (MaxPool's, TopK's).
_FIRST_OUTPUT_ONLY = frozenset({"MaxPool", "TopK", "Dropout"})


def float16_values(graph: Graph) -> set[str]:
    """Names of the float16 values of ``graph`` (inputs, initializers, node outputs), by the ONNX type rules."""
    narrow = {info.name for info in graph.inputs if info.elem_type == FLOAT16}
    narrow |= {name for name, value in graph.initializers.items() if np.asarray(value).dtype == np.float16}
    for node in graph.nodes:
        if _produces_float16(node, narrow):
            outputs = node.outputs[:1] if node.op_type in _FIRST_OUTPUT_ONLY else node.outputs
            narrow.update(v for v in outputs if v)
    return narrow


def _produces_float16(node: Node, narrow: set[str]) -> bool:
    if node.op_type == "Cast":
        return node.attr("to") == FLOAT16
    if node.op_type == "CastLike":
        return len(node.inputs) > 1 and node.inputs[1] in narrow
    if node.op_type == "Constant":
        return isinstance(node.attr("value"), np.ndarray) and node.attr("value").dtype == np.float16
    if node.op_type == "ConstantOfShape":
        return isinstance(node.attr("value"), np.ndarray) and node.attr("value").dtype == np.float16
    if node.op_type == "DequantizeLinear":
        return len(node.inputs) > 1 and node.inputs[1] in narrow
    if node.op_type in _NON_FLOAT_OPS or node.domain not in ("", "ai.onnx"):
        return False
    return any(v in narrow for v in node.inputs if v)


def computes_in_float16(graph: Graph) -> bool:
    """Whether some op of ``graph`` reads or gives a float16 value other than a ``Cast`` to float16 cast
    straight back to float32/float64 (a rounding op of docs/method.md §1.2 already)."""
    narrow = float16_values(graph)
    if any(info.name in narrow for info in graph.outputs):
        return True
    readers = readers_of(graph.nodes)
    for node in graph.nodes:
        reads = [v for v in node.inputs if v in narrow]
        if not reads:
            continue
        produced_by_cast = all(graph.producer.get(v) is not None and graph.producer[v].op_type == "Cast" for v in reads)
        casts_back = node.op_type == "Cast" and node.attr("to") in (TensorProto.FLOAT, TensorProto.DOUBLE)
        if not (produced_by_cast and casts_back and all(len(readers[v]) == 1 for v in reads)):
            return True
    return False


def widen_float16(graph: Graph) -> Graph:
    """The float32 graph that rounds every inexact float16 result to float16 (docs/method.md §1.2);
    ``graph`` itself when it does not compute in float16.

    Values keep their names (a rounded result is the last ``Cast``'s output), so layers, failure
    sites and reports name what the model names; float16 weights and constants become float32
    (exactly), float16 graph inputs and outputs float32.
    """
    if not computes_in_float16(graph):
        return graph
    narrow = float16_values(graph)
    names = _Names(graph)
    nodes: list[Node] = []
    inputs = []
    for info in graph.inputs:
        if info.name in narrow:
            inputs.append(ValueInfo(info.name, TensorProto.FLOAT, info.dims, info.is_tensor))
        else:
            inputs.append(info)
    renamed = {info.name: names.fresh(f"{info.name}/float16") for info in graph.inputs if info.name in narrow}
    for name, rounded in renamed.items():
        nodes += _rounding_pair(names, f"{name}/input", name, rounded)
    for node in graph.nodes:
        if node.op_type in _RECURRENT_OPS and any(v in narrow for v in node.inputs):
            raise UnsupportedModelError(
                f"node {node.describe()} computes in float16: a recurrent cell rounds inside every step, which "
                "robaudit does not bound (docs/method.md §14.4); audit the float32 model", op_type=node.op_type,
                node=node.name)
        if node.domain not in ("", "ai.onnx") and any(v in narrow for v in node.inputs):
            raise UnsupportedModelError(
                f"node {node.describe()} of domain '{node.domain}' computes in float16, whose rounding robaudit "
                "cannot place inside a custom op; audit the float32 model", op_type=node.op_type, node=node.name)
        proto = _widened_proto(node, renamed)
        if node.op_type == "Cast" and node.attr("to") == FLOAT16:  # itself the first half of a rounding pair
            proto.output[0] = names.fresh(f"{node.outputs[0]}/half")
            widened = decode_node(proto)
            widened.name, widened.opset, widened.own_opset = node.name, node.opset, node.own_opset
            back = helper.make_node("Cast", [proto.output[0]], [node.outputs[0]],
                                    name=names.fresh(f"{node.name}/to_float32"), to=TensorProto.FLOAT)
            nodes += [widened, decode_node(back)]
            continue
        outputs = node.outputs[:1] if node.op_type in _FIRST_OUTPUT_ONLY else node.outputs
        inexact = {v: names.fresh(f"{v}/float32") for v in outputs if v in narrow and node.op_type not in EXACT_OPS}
        proto.output[:] = [inexact.get(v, v) for v in proto.output]
        widened = decode_node(proto)
        widened.name, widened.opset, widened.own_opset = node.name, node.opset, node.own_opset
        nodes.append(widened)
        for value, result in inexact.items():
            nodes += _rounding_pair(names, f"{node.name}/{value}", result, value)
    initializers = {
        name: np.asarray(value, np.float32) if np.asarray(value).dtype == np.float16 else value
        for name, value in graph.initializers.items()
    }
    graph_outputs = [ValueInfo(o.name, TensorProto.FLOAT, o.dims, o.is_tensor) if o.name in narrow else o
                     for o in graph.outputs]
    producer = {out: node for node in nodes for out in node.outputs if out}
    return Graph(nodes, initializers, inputs, graph_outputs, producer)


class _Names:
    """Names for the inserted values and nodes that no value or node of the model has (a model may hold a
    value ``h/half`` already): the wanted name, else with ``#2``, ``#3``, … appended."""

    def __init__(self, graph: Graph) -> None:
        self.taken = {info.name for info in (*graph.inputs, *graph.outputs)} | set(graph.initializers)
        self.taken |= {v for node in graph.nodes for v in (*node.inputs, *node.outputs)}
        self.taken |= {node.name for node in graph.nodes}

    def fresh(self, wanted: str) -> str:
        name, count = wanted, 1
        while name in self.taken:
            count += 1
            name = f"{wanted}#{count}"
        self.taken.add(name)
        return name


def _widened_proto(node: Node, renamed: dict[str, str]):
    """A copy of ``node``'s proto computing in float32: float16 type attributes and constants widened,
    graph inputs read rounded."""
    proto = helper.make_node(node.op_type, list(node.inputs), list(node.outputs), name=node.name,
                             domain=node.domain or None)
    if node.proto is not None:
        proto.CopyFrom(node.proto)
        proto.name = node.name
    proto.input[:] = [renamed.get(v, v) for v in proto.input]
    for attr in proto.attribute:
        if node.op_type == "Cast":
            continue  # a Cast to float16 stays one: the first half of its rounding pair
        if attr.name in ("to", "dtype") and attr.type == attr.INT and attr.i == FLOAT16:
            attr.i = TensorProto.FLOAT
        if attr.type == attr.TENSOR and attr.t.data_type == FLOAT16:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
    return proto


def _rounding_pair(names: _Names, stem: str, source: str, target: str) -> list[Node]:
    """``Cast`` to float16 and back: ``target`` = ``source`` rounded to float16 (a rounding op of §1.2)."""
    half = names.fresh(f"{target}/half")
    down = helper.make_node("Cast", [source], [half], name=names.fresh(f"{stem}/to_float16"), to=FLOAT16)
    up = helper.make_node("Cast", [half], [target], name=names.fresh(f"{stem}/to_float32"), to=TensorProto.FLOAT)
    return [decode_node(down), decode_node(up)]
