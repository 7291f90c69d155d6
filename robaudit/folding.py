"""Constant folding of subexpressions that do not depend on the network input.

Weights may sit behind ``Constant`` nodes, ``Cast``+``Mul`` dequantization or
``DequantizeLinear``; ``Shape`` of a variable is known once its shape is. Folding uses
onnx's reference evaluator one node at a time, after checking that the node cannot
allocate a huge tensor (``ConstantOfShape``/``Expand``/``Tile``/``Range`` to 2^44
elements are refused before they run).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from robaudit.errors import ModelStructureError
from robaudit.onnx_graph import MAX_TENSOR_ELEMENTS, Node
from robaudit.ops.base import unsupported

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


def _planned_elements(node: Node, args: list[np.ndarray | None]) -> float:
    """Upper estimate of the output size of shape-creating ops, before running them."""
    op = node.op_type
    if op == "ConstantOfShape" and args and args[0] is not None:
        return float(np.prod(np.asarray(args[0], dtype=np.float64)))
    if op == "Expand" and len(args) > 1 and args[1] is not None:
        dims = np.maximum(np.asarray(args[1], dtype=np.float64).reshape(-1), 1.0)
        return float(np.prod(dims)) * max(1.0, float(np.size(args[0])))
    if op == "Tile" and len(args) > 1 and args[1] is not None:
        return float(np.size(args[0])) * float(np.prod(np.asarray(args[1], dtype=np.float64)))
    if op == "Range" and len(args) == 3 and all(a is not None for a in args):
        start, limit, delta = (float(np.asarray(a).reshape(-1)[0]) for a in args)
        return abs((limit - start) / delta) if delta else float("inf")
    return float(sum(np.size(a) for a in args if a is not None))


def fold_node(node: Node, args: list[np.ndarray | None], proto: onnx.NodeProto, opset: int) -> list[np.ndarray]:
    """Evaluate ``node`` on constant ``args``; raise a clear error if it cannot be folded."""
    if node.op_type in _NO_FOLD or any(v == "<subgraph>" for v in node.attrs.values()):
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, args, strict=True) if n})
    except Exception as exc:  # the evaluator raises many types on bad constants
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise unsupported(node, f"cannot evaluate its constant inputs ({reason})") from None
    for result in results:
        if np.size(result) > MAX_TENSOR_ELEMENTS:
            raise ModelStructureError(f"node {node.describe()} folds to a constant over the size limit")
    return [np.asarray(r) for r in results]
