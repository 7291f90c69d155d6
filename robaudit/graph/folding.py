"""Constant folding of subexpressions that do not depend on the network input.

Weights may sit behind ``Constant`` nodes, ``Cast``+``Mul`` dequantization or
``DequantizeLinear``; ``Shape`` of a variable is known once its shape is. Folding uses
onnx's reference evaluator one node at a time, after checking that the node cannot
allocate a huge tensor (``ConstantOfShape``/``Expand``/``Tile``/``Range``/``Pad`` to
2^44 elements, or an outer product of two small constants, are refused before they run).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from robaudit.errors import ModelStructureError
from robaudit.graph.onnx_graph import MAX_TENSOR_ELEMENTS, Node
from robaudit.graph.ops.base import unsupported

_NO_FOLD = {
    "If",
    "Loop",
    "Scan",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def _size(array: np.ndarray | None) -> float:
    return 0.0 if array is None else float(np.size(array))


def _product(values) -> float:
    return float(np.prod(np.abs(np.asarray(values, dtype=np.float64)).reshape(-1)))


def _broadcast_size(args: list[np.ndarray | None]) -> float:
    """Elements of the broadcast of all present inputs (the sum of sizes if they do not broadcast)."""
    shapes = [np.shape(a) for a in args if a is not None]
    try:
        return _product(np.broadcast_shapes(*shapes)) if shapes else 0.0
    except ValueError:
        return sum(_product(shape) for shape in shapes)


def _matmul_size(a: np.ndarray, b: np.ndarray) -> float:
    a_shape, b_shape = np.shape(a), np.shape(b)
    rows = a_shape[-2] if len(a_shape) > 1 else 1
    cols = b_shape[-1] if len(b_shape) > 1 else 1
    try:
        batch = _product(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    except ValueError:
        batch = 1.0
    return batch * rows * cols


def _pad_size(node: Node, args: list[np.ndarray | None]) -> float:
    pads = args[1] if len(args) > 1 and args[1] is not None else node.attr("pads", [])
    pads = np.abs(np.asarray(pads, dtype=np.float64)).reshape(-1)
    dims = np.asarray(np.shape(np.asarray(args[0])), dtype=np.float64)
    if pads.size == 2 * dims.size:
        return _product(dims + pads[: dims.size] + pads[dims.size :])
    return _product(dims + pads.sum())  # pads for some axes only: bound every axis by all of them


def _resize_size(node: Node, args: list[np.ndarray | None]) -> float:
    sizes = args[3] if len(args) > 3 and args[3] is not None and np.size(args[3]) else None
    if sizes is not None:
        return _product(sizes)
    scales = next((a for a in reversed(args[1:3]) if a is not None and np.size(a)), None)
    scales = node.attr("scales") if scales is None else scales
    return _size(args[0]) * (_product(scales) if scales is not None else 1.0)


def _gather_size(node: Node, args: list[np.ndarray | None]) -> float:
    data, indices = args[0], args[1]
    shape = np.shape(np.asarray(data))
    axis = int(node.attr("axis", 0))
    along = shape[axis] if shape and -len(shape) <= axis < len(shape) else 1
    return _size(indices) * _size(data) / max(float(along), 1.0)


def _planned_elements(node: Node, args: list[np.ndarray | None]) -> float:
    """Upper estimate of a node's output size from its constant inputs, before running it.

    Ops that create shapes (ConstantOfShape, Expand, Tile, Range, Pad, Resize, OneHot)
    and ops whose output is an outer product of small inputs (broadcasting arithmetic,
    MatMul/Gemm, Gather) are estimated from their arguments; every other op from the
    broadcast of its inputs.
    """
    op, present = node.op_type, [a is not None for a in args]
    if op == "ConstantOfShape" and args and present[0]:
        return _product(args[0])
    if op == "Expand" and len(args) > 1 and present[1]:
        return _product(np.maximum(np.abs(np.asarray(args[1], dtype=np.float64)), 1.0)) * max(1.0, _size(args[0]))
    if op == "Tile" and len(args) > 1 and present[1]:
        return _size(args[0]) * _product(args[1])
    if op == "Range" and len(args) == 3 and all(present):
        start, limit, delta = (float(np.asarray(a, dtype=np.float64).reshape(-1)[0]) for a in args)
        return abs((limit - start) / delta) if delta else float("inf")
    if op == "Pad" and args and present[0]:
        return _pad_size(node, args)
    if op in ("Resize", "Upsample") and args and present[0]:
        return _resize_size(node, args)
    if op == "OneHot" and len(args) > 1 and all(present[:2]):
        return _size(args[0]) * abs(float(np.asarray(args[1], dtype=np.float64).reshape(-1)[0]))
    if op in ("MatMul", "MatMulInteger", "Gemm") and len(args) > 1 and all(present[:2]):
        a, b = np.asarray(args[0]), np.asarray(args[1])
        if op == "Gemm":
            a = np.swapaxes(a, -1, -2) if node.attr("transA", 0) and np.ndim(a) == 2 else a
            b = np.swapaxes(b, -1, -2) if node.attr("transB", 0) and np.ndim(b) == 2 else b
        return max(_matmul_size(a, b), _broadcast_size(args[2:]))
    if op == "Gather" and len(args) > 1 and all(present[:2]):
        return _gather_size(node, args)
    return max(_broadcast_size(args), sum(_size(a) for a in args))


#: Ops whose older versions onnx's reference evaluator does not implement, and the
#: version to evaluate them with instead; it must compute the same function on every
#: input the older version accepts (DequantizeLinear-19 only adds float8 input types
#: to versions 10/13: y = (x − zero_point)·scale, per tensor or along ``axis``).
_NEWER_EQUIVALENT = {"DequantizeLinear": 19}


def _evaluator_opset(node: Node, opset: int) -> int:
    """The opset to fold ``node`` with (see ``_NEWER_EQUIVALENT``)."""
    if node.domain in ("", "ai.onnx") and node.op_type in _NEWER_EQUIVALENT:
        return max(opset, _NEWER_EQUIVALENT[node.op_type])
    return opset


def fold_node(node: Node, args: list[np.ndarray | None], proto: onnx.NodeProto, opset: int) -> list[np.ndarray]:
    """Evaluate ``node`` on constant ``args``; raise a clear error if it cannot be folded."""
    if node.op_type in _NO_FOLD or any(isinstance(v, str) and v == "<subgraph>" for v in node.attrs.values()):
        raise unsupported(node, "control flow and random ops are not supported")
    planned = _planned_elements(node, args)
    if not np.isfinite(planned) or planned > MAX_TENSOR_ELEMENTS:
        raise ModelStructureError(
            f"node {node.describe()} would create a constant of about {planned:.3g} elements, over the size limit"
        )
    from onnx.reference import ReferenceEvaluator  # imported lazily: slow to import

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(args)]
    single = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.outputs))], domain=proto.domain)
    single.attribute.extend(proto.attribute)
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names if n]
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in single.output]
    graph = helper.make_graph([single], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _evaluator_opset(node, opset))])
    try:
        results = ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, args, strict=True) if n})
    except Exception as exc:  # the evaluator raises many types on bad constants
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise unsupported(node, f"cannot evaluate its constant inputs ({reason})") from None
    for result in results:
        if np.size(result) > MAX_TENSOR_ELEMENTS:
            raise ModelStructureError(f"node {node.describe()} folds to a constant over the size limit")
    return [np.asarray(r) for r in results]
