"""The GRU state update y = (1 − z)·n + z·h as one op (docs/method.md §14.3).

Unrolled, a GRU step ends with ``Add(Mul(Sub(1, z), n), Mul(z, h))``. Bounded op by op, interval
arithmetic forgets that it is a convex combination of n and h when z ∈ [0, 1]: |h| grows by
|n| at every step. :func:`fuse_state_updates` replaces the four nodes by one ``GruUpdate`` node
on the bounding side only (injection runs the unrolled ops themselves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from robaudit.graph.ops.base import Interval, OpRule, PropagationContext, reduce_to_shape, register, replication

if TYPE_CHECKING:
    from robaudit.graph.onnx_graph import Node

#: Node metadata on the final Add of an unrolled GRU step (set by :mod:`robaudit.graph.recurrent`).
UPDATE_KEY = "robaudit.recurrent.update"


def update_interval(z: Interval, n: Interval, h: Interval) -> Interval:
    """Exact elementwise range of (1 − z)·n + z·h over a box: the function is multilinear in
    (z, n, h), so its extremes lie at the box's corners (docs/method.md §14.3)."""
    corners = [(1 - zc) * nc + zc * hc for zc in (z.lo, z.hi) for nc in (n.lo, n.hi) for hc in (h.lo, h.hi)]
    return Interval(np.minimum.reduce(corners), np.maximum.reduce(corners))


def update_coefficients(z_faulty: Interval, n: Interval, h: Interval) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c_n, c_h, c_z) with |Δy| ≤ c_n·|Δn| + c_h·|Δh| + c_z·|Δz| elementwise (docs/method.md §14.3).

    ỹ − y = (1 − z̃)·Δn + z̃·Δh + Δz·(h − n) exactly, with z̃ the faulty z and n, h clean: so
    c_n = max |1 − z̃|, c_h = max |z̃| over z's faulty box and c_z = max |h − n| over the clean boxes.
    """
    c_n = np.maximum(np.abs(1 - z_faulty.lo), np.abs(1 - z_faulty.hi))
    c_h = z_faulty.abs_max()
    c_z = np.maximum(np.abs(h.hi - n.lo), np.abs(n.hi - h.lo))
    return c_n, c_h, c_z


def _box(arg) -> Interval:
    return arg if isinstance(arg, Interval) else Interval.point(np.asarray(arg))


@register
class GruUpdate(OpRule):
    """y = (1 − z)·n + z·h, inputs (z, n, h); h may be a constant (the initial state)."""

    op_types = ("GruUpdate",)
    domain = "robaudit"

    def shown(self, node):
        return "GRU state update"
    range_dependent = True

    def interval(self, node: Node, args: list) -> list[Interval]:
        z, n, h = (_box(a) for a in args[:3])
        return [update_interval(z, n, h)]

    def _coefficients(self, node: Node, ctx: PropagationContext):
        z_name, n_name, h_name = node.inputs[:3]
        h = ctx.clean[h_name] if ctx.is_variable(h_name) else Interval.point(ctx.constants[h_name])
        return update_coefficients(ctx.faulty.get(z_name, ctx.clean[z_name]), ctx.clean[n_name], h)

    def backward(self, node: Node, cot: list, ctx: PropagationContext) -> list:
        c_n, c_h, c_z = self._coefficients(node, ctx)
        grads = []
        for value, coefficient in zip(node.inputs[:3], (c_z, c_n, c_h), strict=True):
            grads.append(reduce_to_shape(cot[0] * coefficient, ctx.shape(value)) if ctx.is_variable(value) else None)
        return grads

    def paper(self, node: Node, errs: list, ctx: PropagationContext) -> list[float]:
        out_shape = ctx.shape(node.outputs[0])
        total = 0.0
        for value, err, coefficient in zip(node.inputs[:3], errs[:3], self._coefficients(node, ctx), strict=True):
            if err:
                total += float(np.max(coefficient)) * replication(ctx.shape(value), out_shape) * err
        return [total]


def fuse_state_updates(nodes: list[Node]) -> list[Node]:
    """Replace each marked ``Add(Mul(Sub(1, z), n), Mul(z, h))`` by one ``GruUpdate(z, n, h)`` node."""
    from robaudit.graph.onnx_graph import Node as NodeClass

    producer = {out: node for node in nodes for out in node.outputs if out}
    removed: set[str] = set()
    fused: dict[str, Node] = {}
    for node in nodes:
        if UPDATE_KEY not in node.metadata:
            continue
        new_part, old_part = (producer[v] for v in node.inputs[:2])
        keep_new = producer[new_part.inputs[0]]
        z, h = old_part.inputs[:2]
        n = new_part.inputs[1]
        fused[node.name] = NodeClass(
            node.name, "GruUpdate", "robaudit", [z, n, h], list(node.outputs), {}, None, dict(node.metadata)
        )
        removed.update({new_part.name, old_part.name, keep_new.name})
    return [fused.get(node.name, node) for node in nodes if node.name not in removed]
