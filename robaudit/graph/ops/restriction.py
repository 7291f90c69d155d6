"""Range restriction (docs/method.md §1.3): ``Where(IsNaN(y), c, y)`` — the NaN guard that
``harden`` writes before its ``Clip`` (onnxruntime's Clip lets NaN through) — fused into one
node, the identity on every finite value, and the ranges that protect layers.

A layer is **protected** when its output's only reader is a ``Clip`` with constant finite
bounds, directly or through a NaN guard: what downstream sees from a failed neuron lies in
the Clip's range. Against a bit flip of a stored float (which may give NaN) only the guarded
form protects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops.activations import Clip
from robaudit.graph.ops.base import Interval, OpRule, register


@register
class NanGuard(OpRule):
    """``Where(IsNaN(y), c, y)``: y itself wherever y is a number."""

    op_types = ("NanGuard",)
    domain = "robaudit"

    def interval(self, node, args):
        x = args[0]
        return [Interval(x.lo, x.hi)]

    def backward(self, node, cot, ctx):
        return [cot[0]]

    def paper(self, node, errs, ctx):
        return [errs[0]]


def fuse_nan_guards(nodes: list[Node], constants: dict) -> list[Node]:
    """Replace each ``IsNaN(y) → Where(·, c, y)`` (c a scalar constant, IsNaN read only there) by a NanGuard."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            readers.setdefault(value, []).append(node)
    fused: dict[str, Node] = {}
    removed: set[str] = set()
    for node in nodes:
        if node.op_type != "IsNaN" or len(readers.get(node.outputs[0], [])) != 1:
            continue
        where = readers[node.outputs[0]][0]
        if where.op_type != "Where" or where.inputs[0] != node.outputs[0] or where.inputs[2] != node.inputs[0]:
            continue
        if where.inputs[1] not in constants or np.size(constants[where.inputs[1]]) != 1:
            continue
        fused[where.name] = Node(where.name, "NanGuard", "robaudit", [node.inputs[0]], list(where.outputs))
        removed.add(node.name)
    return [fused.get(n.name, n) for n in nodes if n.name not in removed]


@dataclass(frozen=True)
class Protection:
    """The Clip that a failed neuron's value passes through."""

    #: The Clip's [lo, hi].
    low: float
    high: float
    #: Whether a NaN guard precedes the Clip (then a NaN is mapped into the range too).
    nan_safe: bool


def protection_of(value: str, nodes: list[Node], constants: dict) -> Protection | None:
    """The protection of a layer output ``value``, or None (docs/method.md §1.3)."""
    readers = [n for n in nodes if value in n.inputs]
    nan_safe = False
    if len(readers) == 1 and readers[0].op_type == "NanGuard":
        nan_safe, value = True, readers[0].outputs[0]
        readers = [n for n in nodes if value in n.inputs]
    if len(readers) != 1 or readers[0].op_type != "Clip" or readers[0].inputs[0] != value:
        return None
    bounds = Clip().clip_range(readers[0], constants)
    return None if bounds is None else Protection(bounds[0], bounds[1], nan_safe)
