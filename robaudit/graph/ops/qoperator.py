"""QOperator models (docs/method.md §11): integer ops rewritten into their QDQ form.

onnxruntime's ``quantize_static(quant_format=QOperator)`` writes each quantized op as one
integer op — ``QLinearConv``, ``QLinearMatMul``, ``QGemm``, ``QLinearAdd``, ``QLinearMul``,
``QLinearAveragePool``, ``QLinearGlobalAveragePool``, ``QLinearSigmoid``,
``QLinearLeakyRelu``, ``QLinearSoftmax``, ``QLinearConcat`` — that reads uint8/int8 codes with
their scale s and zero point zp and writes codes. Each computes, in exact arithmetic,

    codes_out = saturate(round(f(DQ(codes_in)) / s_out) + zp_out)

with DQ(q) = (q − zp)·s and f the float op (a convolution's int32 accumulator times s_x·s_w
is the float convolution of the dequantized operands, its int32 bias dequantized with scale
s_x·s_w). So every integer op is replaced by ``DequantizeLinear`` of its operands, the float
op, and ``QuantizeLinear → DequantizeLinear`` of its result: the QDQ form the rest of
robaudit bounds (§1.2: one rounding op per Q → DQ pair) and injects. Ops that only move codes
(``MaxPool``, ``Reshape``, ``Flatten``, ...) commute with the per-tensor dequantization
(positive scale: monotone and affine), so they run on the dequantized values; the model's
final ``DequantizeLinear`` becomes an ``Identity``.

Dynamically quantized models (``DynamicQuantizeLinear``) are not rewritten: their scale is
computed from the tensor itself — over the whole batch — and stays refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from robaudit.errors import UnsupportedModelError
from robaudit.graph.onnx_graph import Graph, Node, decode_node

#: op type → (index of the float operands' (codes, scale, zero point) triples, output (scale, zp) index).
_FORMS: dict[str, tuple[tuple[int, ...], int]] = {
    "QLinearConv": ((0, 3), 6),
    "QLinearMatMul": ((0, 3), 6),
    "QGemm": ((0, 3), 7),
    "QLinearAdd": ((0, 3), 6),
    "QLinearMul": ((0, 3), 6),
    "QLinearAveragePool": ((0,), 3),
    "QLinearGlobalAveragePool": ((0,), 3),
    "QLinearSigmoid": ((0,), 3),
    "QLinearLeakyRelu": ((0,), 3),
    "QLinearSoftmax": ((0,), 3),
}

#: integer op → the float op it stands for.
_FLOAT_OP = {
    "QLinearConv": "Conv",
    "QLinearMatMul": "MatMul",
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearMul": "Mul",
    "QLinearAveragePool": "AveragePool",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearSigmoid": "Sigmoid",
    "QLinearLeakyRelu": "LeakyRelu",
    "QLinearSoftmax": "Softmax",
    "QLinearConcat": "Concat",
}

#: The integer ops of a QOperator model.
INTEGER_OPS = frozenset(_FLOAT_OP)

#: Fewest inputs of each integer op: every operand's (codes, scale, zero point) and the output's scale.
_MIN_INPUTS = {"QLinearConv": 8, "QLinearMatMul": 8, "QGemm": 6, "QLinearAdd": 7, "QLinearMul": 7}

#: Attributes of the integer op that belong to onnxruntime's kernel, not to the float op.
_KERNEL_ATTRS = {"channels_last", "opset", "alpha_gemm"}

#: Ops that move codes without computing on them: they commute with a per-tensor DequantizeLinear.
_MOVING = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}

_DQ_SUFFIX = "/ra_dq"


def has_integer_ops(graph: Graph) -> bool:
    """Whether ``graph`` holds an integer op of a QOperator model."""
    return any(node.op_type in _FLOAT_OP for node in graph.nodes)


def _weight_axis(node: Node) -> int:
    """The output-channel axis of a per-channel weight: 0 for Conv (and Gemm with transB), else 1."""
    if node.op_type == "QLinearConv" or (node.op_type == "QGemm" and node.attr("transB", 0)):
        return 0
    return 1


class _Rewriter:
    """Builds the QDQ form of a QOperator graph, node by node in topological order."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.initializers = dict(graph.initializers)
        self.nodes: list[Node] = []
        #: code tensor → (its dequantized twin, scale name, zero-point name)
        self.twin: dict[str, tuple[str, str, str]] = {}
        self.readers: dict[str, int] = {}
        for node in graph.nodes:
            for value in node.inputs:
                self.readers[value] = self.readers.get(value, 0) + 1

    def emit(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        """Append a default-domain node."""
        proto = helper.make_node(op, inputs, outputs, name=name, **attrs)
        self.nodes.append(decode_node(proto))

    def constant(self, name: str, value: Any) -> str:
        self.initializers[name] = value
        return name

    def dequantized(self, node: Node, operand: list[str], axis: int | None = None) -> str:
        """The float value of an operand (codes, scale[, zero point]): the codes' twin, or
        ``DequantizeLinear`` of constant codes."""
        codes, scale = operand[0], operand[1]
        zp = operand[2] if len(operand) > 2 and operand[2] else self.zero(node)
        if codes in self.twin:
            return self.twin[codes][0]
        if codes not in self.initializers:
            raise UnsupportedModelError(
                f"node {node.describe()} reads '{codes}', integer codes that no QuantizeLinear or integer op "
                "of this QOperator model produced", node.op_type, node.name)
        out = f"{codes}{_DQ_SUFFIX}"
        if not any(out in n.outputs for n in self.nodes):
            extra = {"axis": axis} if axis is not None and np.size(self.initializers.get(scale, 1.0)) > 1 else {}
            self.emit("DequantizeLinear", [codes, scale, zp], [out], f"{codes}/ra_dequantize", **extra)
        return out

    def quantize_result(self, node: Node, value: str, codes: str, scale: str, zp: str) -> None:
        """``QuantizeLinear`` of the float result into the op's own output codes, and their twin."""
        self.emit("QuantizeLinear", [value, scale, zp], [codes], f"{node.name}/ra_quantize")
        twin = f"{codes}{_DQ_SUFFIX}"
        self.emit("DequantizeLinear", [codes, scale, zp], [twin], f"{node.name}/ra_dequantize")
        self.twin[codes] = (twin, scale, zp)

    def rewrite(self, node: Node) -> None:
        op = node.op_type
        if op in _FORMS or op == "QLinearConcat":
            self.integer_op(node)
        elif op == "QuantizeLinear" and len(node.inputs) >= 2 and node.inputs[0] not in self.twin:
            self.nodes.append(node)
            zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else self.zero(node)
            if self.readers.get(node.outputs[0], 0) > 0:
                twin = f"{node.outputs[0]}{_DQ_SUFFIX}"
                self.emit("DequantizeLinear", [node.outputs[0], node.inputs[1], zp], [twin],
                          f"{node.name}/ra_dequantize", **({"axis": node.attr("axis")} if "axis" in node.attrs else {}))
                self.twin[node.outputs[0]] = (twin, node.inputs[1], zp)
        elif op == "DequantizeLinear" and node.inputs[0] in self.twin and self._same_params(node):
            self.emit("Identity", [self.twin[node.inputs[0]][0]], [node.outputs[0]], node.name)
        elif op in _MOVING and node.inputs and node.inputs[0] in self.twin and self._per_tensor(node.inputs[0]):
            twin, scale, zp = self.twin[node.inputs[0]]
            outputs = [f"{node.outputs[0]}{_DQ_SUFFIX}"]
            proto = onnx.NodeProto()
            proto.CopyFrom(node.proto)
            del proto.input[:]
            proto.input.extend([twin, *node.inputs[1:]])
            del proto.output[:]
            proto.output.extend(outputs)
            self.nodes.append(decode_node(proto))
            self.twin[node.outputs[0]] = (outputs[0], scale, zp)
        else:
            self.nodes.append(node)

    def _per_tensor(self, codes: str) -> bool:
        """Whether the codes have one constant scale (moving them then commutes with dequantizing)."""
        scale = self.initializers.get(self.twin[codes][1])
        return scale is not None and np.size(scale) == 1

    def _same_params(self, node: Node) -> bool:
        _, scale, zp = self.twin[node.inputs[0]]
        if len(node.inputs) < 3:
            return False
        return all(
            name_a == name_b or (name_a in self.initializers and name_b in self.initializers
                                 and np.array_equal(self.initializers[name_a], self.initializers[name_b]))
            for name_a, name_b in ((scale, node.inputs[1]), (zp, node.inputs[2]))
        )

    def integer_op(self, node: Node) -> None:
        op = node.op_type
        needed = _MIN_INPUTS.get(op, 5)
        if len(node.inputs) < needed or (op == "QLinearConcat" and (len(node.inputs) - 2) % 3):
            raise UnsupportedModelError(
                f"node {node.describe()} has {len(node.inputs)} inputs; this form of the op is not supported "
                f"(at least {needed}: codes, scale and zero point of each operand, and the output's scale)",
                op, node.name)
        attrs = {k: v for k, v in node.attrs.items() if k not in _KERNEL_ATTRS}
        if node.attr("channels_last", 0):
            raise UnsupportedModelError(f"node {node.describe()}: channels_last layout is not supported",
                                        op, node.name)
        if op == "QGemm" and float(node.attr("alpha", 1.0)) != 1.0:
            raise UnsupportedModelError(f"node {node.describe()}: alpha other than 1 is not supported", op, node.name)
        if op == "QLinearConcat":
            out_scale, out_zp = node.inputs[0], node.inputs[1]
            floats = [self.dequantized(node, node.inputs[i : i + 3]) for i in range(2, len(node.inputs), 3)]
        else:
            operand_at, out_at = _FORMS[op]
            floats = [self.dequantized(node, node.inputs[i : i + 3], axis=_weight_axis(node)) for i in operand_at]
            if op in ("QLinearConv", "QGemm") and len(node.inputs) > (8 if op == "QLinearConv" else 6):
                bias = node.inputs[8] if op == "QLinearConv" else node.inputs[6]
                if bias:
                    floats.append(self.bias(node, bias))
            out_scale = node.inputs[out_at] if len(node.inputs) > out_at else ""
            out_zp = node.inputs[out_at + 1] if out_scale and len(node.inputs) > out_at + 1 else ""
        if op == "QLinearSoftmax":
            attrs.setdefault("axis", -1)
        float_name = node.name[: -len("_quant")] if node.name.endswith("_quant") else f"{node.name}/ra_float"
        result = f"{node.outputs[0]}/ra_result"
        if not out_scale:  # QGemm without y_scale writes float32 itself
            self.emit(_FLOAT_OP[op], floats, [node.outputs[0]], float_name, **attrs)
            return
        self.emit(_FLOAT_OP[op], floats, [result], float_name, **attrs)
        if op == "QLinearSoftmax":  # onnxruntime follows its own opset attribute, not the model's (measured)
            self.nodes[-1].own_opset = int(node.attr("opset", 13))
        self.quantize_result(node, result, node.outputs[0], out_scale, out_zp or self.zero(node))

    def bias(self, node: Node, bias: str) -> str:
        """The int32 bias dequantized with scale s_x·s_w (zero point 0)."""
        if bias not in self.initializers:
            raise UnsupportedModelError(f"node {node.describe()}: its bias '{bias}' is not a constant",
                                        node.op_type, node.name)
        x_scale, w_scale = (self.initializers.get(node.inputs[i]) for i in (1, 4))
        if x_scale is None or w_scale is None:
            raise UnsupportedModelError(f"node {node.describe()}: its scales are not constants",
                                        node.op_type, node.name)
        scale = (np.asarray(x_scale, np.float32) * np.asarray(w_scale, np.float32)).astype(np.float32)
        values = np.asarray(self.initializers[bias])
        if values.dtype != np.int32:
            return bias  # a float bias (QGemm's unquantized C) is used as it is
        scale_name = self.constant(f"{bias}/ra_scale", scale.reshape(-1) if scale.size > 1 else scale.reshape(()))
        zero = self.constant(f"{bias}/ra_zero", np.zeros(scale.shape, np.int32).reshape(-1)
                             if scale.size > 1 else np.int32(0))
        out = f"{bias}{_DQ_SUFFIX}"
        self.emit("DequantizeLinear", [bias, scale_name, zero], [out], f"{bias}/ra_dequantize",
                  **({"axis": 0} if scale.size > 1 else {}))
        return out

    def zero(self, node: Node) -> str:
        """A uint8 zero point 0 (the default of an absent one)."""
        return self.constant(f"{node.name}/ra_zero_point", np.uint8(0))


def qoperator_to_qdq(graph: Graph) -> Graph:
    """The QDQ form of a QOperator graph (docs/method.md §11); ``graph`` itself when it has no integer op.

    Raises UnsupportedModelError naming the node when an integer op reads codes whose
    scale is not known (no QuantizeLinear or integer op produced them) or uses a layout
    (channels_last, QGemm's alpha ≠ 1) the float form does not express.
    """
    if not has_integer_ops(graph):
        return graph
    rewriter = _Rewriter(graph)
    for node in graph.nodes:
        rewriter.rewrite(node)
    nodes = rewriter.nodes
    producer = {out: node for node in nodes for out in node.outputs if out}
    return Graph(nodes, rewriter.initializers, graph.inputs, graph.outputs, producer)
