"""Range restriction (docs/method.md §1.3): ``Where(IsNaN(y), c, y)`` — the NaN guard that
``harden`` writes before its ``Clip`` (onnxruntime's Clip lets NaN through) — fused into one
node, the identity on every finite value, and the ranges that protect layers.

A layer is **protected** when its output's only reader is a ``Clip`` with constant finite
bounds, directly or through a NaN guard: what downstream sees from a failed neuron lies in
the Clip's range. Against a bit flip of a stored float (which may give NaN) only the guarded
form protects. ONNX's ``Clip`` takes scalar bounds only; a per-channel range is written
``Min(Max(y, low), high)`` with constant tensors ``low``/``high`` (what ``harden --per-channel``
writes), fused into one ``ChannelClip`` node (docs/method.md §9.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robaudit.graph.onnx_graph import Node, readers_of
from robaudit.graph.ops.activations import Activation, Clip
from robaudit.graph.ops.base import Interval, OpRule, broadcast_scalar, register


@register
class NanGuard(OpRule):
    """``Where(IsNaN(y), c, y)``: y itself wherever y is a number."""

    op_types = ("NanGuard",)
    domain = "robaudit"

    def shown(self, node):
        return "Where(IsNaN) (NaN guard)"

    def interval(self, node, args):
        x = args[0]
        return [Interval(x.lo, x.hi)]

    def backward(self, node, cot, ctx):
        return [cot[0]]

    def paper(self, node, errs, ctx):
        return [errs[0]]


#: Why an op of a NaN guard is refused when it is not one (``unsupported``'s reason).
REFUSED_GUARD = {
    "IsNaN": "robaudit reads IsNaN only in a NaN guard Where(IsNaN(y), c, y) with a scalar constant c that is not "
    "NaN (a NaN c lets NaN through)",
}


def fuse_nan_guards(nodes: list[Node], constants: dict) -> list[Node]:
    """Replace each ``IsNaN(y) → Where(·, c, y)`` (c a scalar constant other than NaN, IsNaN read only there) by a
    NanGuard (docs/method.md §1.3)."""
    readers = readers_of(nodes)
    fused: dict[str, Node] = {}
    removed: set[str] = set()
    for node in nodes:
        if node.op_type != "IsNaN" or len(readers.get(node.outputs[0], [])) != 1:
            continue
        where = readers[node.outputs[0]][0]
        if where.op_type != "Where" or where.inputs[0] != node.outputs[0] or where.inputs[2] != node.inputs[0]:
            continue
        if broadcast_scalar(constants.get(where.inputs[1])) is None:
            continue
        if np.isnan(np.asarray(constants[where.inputs[1]], np.float64)).any():  # NaN for NaN guards nothing
            continue
        fused[where.name] = Node(where.name, "NanGuard", "robaudit", [node.inputs[0]], list(where.outputs))
        removed.add(node.name)
    return [fused.get(n.name, n) for n in nodes if n.name not in removed]


@register
class ChannelClip(Activation):
    """``Min(Max(y, low), high)`` with constant tensors broadcast against y: a Clip per element
    (per channel as ``harden --per-channel`` writes it). Monotone, 1-Lipschitz."""

    op_types = ("ChannelClip",)
    domain = "robaudit"

    def shown(self, node):
        return "Max→Min (per-channel clip)"

    def function(self, node, x):
        return np.minimum(np.maximum(x, node.attr("low")), node.attr("high"))


def fuse_channel_clips(nodes: list[Node], constants: dict) -> list[Node]:
    """Replace each ``Max(y, low) → Min(·, high)`` (constant low ≤ high, the Max read only by the Min)
    by one ChannelClip node, and each other ``Max(y, c)`` / ``Min(y, c)`` with a constant scalar c (PyTorch's
    one-sided ``clamp``) by a ChannelClip open on one side."""
    readers = readers_of(nodes)
    fused: dict[str, Node] = {}
    removed: set[str] = set()
    for node in nodes:
        if node.name in fused:  # the Min of a pair
            continue
        pair = _max_then_min(node, readers, constants)
        if pair is None:
            one_sided = _one_sided(node, constants)
            if one_sided is not None:
                fused[node.name] = one_sided
            continue
        low, high, minimum = pair
        variable = next(v for v in node.inputs if v not in constants)
        attrs = {"low": low, "high": high}
        fused[minimum.name] = Node(minimum.name, "ChannelClip", "robaudit", [variable], list(minimum.outputs), attrs)
        removed.add(node.name)
    return [fused.get(n.name, n) for n in nodes if n.name not in removed]


def _one_sided(node: Node, constants: dict) -> Node | None:
    """``Max(y, c)`` as ChannelClip(y, c, +∞), ``Min(y, c)`` as ChannelClip(y, −∞, c), for one constant finite
    scalar c that broadcasting never widens (:func:`~robaudit.graph.ops.base.broadcast_scalar`), else None."""
    if node.op_type not in ("Max", "Min") or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    consts = [v for v in node.inputs if v in constants]
    c = broadcast_scalar(constants[consts[0]]) if len(consts) == 1 else None
    if c is None or not np.isfinite(c):
        return None
    variable = next(v for v in node.inputs if v not in constants)
    attrs = {"low": np.array(c), "high": np.array(np.inf)} if node.op_type == "Max" else {
        "low": np.array(-np.inf), "high": np.array(c)}
    return Node(node.name, "ChannelClip", "robaudit", [variable], list(node.outputs), attrs)


def _max_then_min(node: Node, readers: dict, constants: dict) -> tuple[np.ndarray, np.ndarray, Node] | None:
    """(low, high, the Min node) when ``node`` is Max(y, low) read only by Min(·, high), else None."""
    if node.op_type != "Max" or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    consts = [v for v in node.inputs if v in constants]
    users = readers.get(node.outputs[0], [])
    if len(consts) != 1 or len(users) != 1 or users[0].op_type != "Min" or len(users[0].inputs) != 2:
        return None
    minimum = users[0]
    other = [v for v in minimum.inputs if v != node.outputs[0]]
    if len(other) != 1 or other[0] not in constants:
        return None
    low = np.asarray(constants[consts[0]], np.float64)
    high = np.asarray(constants[other[0]], np.float64)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low <= high)):
        return None
    return low, high, minimum


@dataclass(frozen=True)
class Protection:
    """The Clip that a failed neuron's value passes through."""

    #: The Clip's [lo, hi]: floats, or one value per neuron (flat, N_l) for a per-channel range.
    low: float | np.ndarray
    high: float | np.ndarray
    #: Whether a NaN guard precedes the Clip (then a NaN is mapped into the range too).
    nan_safe: bool


def protection_of(
    value: str, nodes: list[Node], constants: dict, shape: tuple[int, ...] | None = None
) -> Protection | None:
    """The protection of a layer output ``value`` (of ``shape``, batch 1 included), or None
    (docs/method.md §1.3); a per-channel range comes back per neuron."""
    readers = [n for n in nodes if value in n.inputs]
    nan_safe = False
    if len(readers) == 1 and readers[0].op_type == "NanGuard":
        nan_safe, value = True, readers[0].outputs[0]
        readers = [n for n in nodes if value in n.inputs]
    if len(readers) != 1 or readers[0].inputs[0] != value:
        return None
    if readers[0].op_type == "ChannelClip" and shape is not None:
        low, high = (np.broadcast_to(readers[0].attr(key), shape).reshape(-1).astype(np.float64)
                     for key in ("low", "high"))
        return Protection(low, high, nan_safe)
    if readers[0].op_type != "Clip":
        return None
    bounds = Clip().clip_range(readers[0], constants)
    return None if bounds is None else Protection(bounds[0], bounds[1], nan_safe)
