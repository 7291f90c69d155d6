"""Interval bound propagation (IBP) of the input box through the audited nodes, folding
constants on the way (docs/method.md §5.1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np

from robaudit.errors import ModelStructureError
from robaudit.graph.folding import fold_node
from robaudit.graph.onnx_graph import Graph, Node
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.affine import (
    weight_extremes,
)
from robaudit.graph.ops.base import unsupported
from robaudit.graph.ops.restriction import REFUSED_GUARD
from robaudit.graph.ops.rounding import REFUSED, Rounding


def _check_finite(node: Node, args: list, graph: Graph, extremes: dict[str, tuple[float, float]]) -> None:
    """Refuse NaN/Inf constants; remember each one's (min, max) so layers need not read it again."""
    if node.op_type == "Clip":
        return
    for name, arg in zip(node.inputs, args, strict=False):
        if not (isinstance(arg, np.ndarray) and arg.dtype.kind == "f" and arg.size):
            continue
        if name not in extremes:
            extremes[name] = weight_extremes(arg)  # block by block, fast on unaligned views of the file too
        low, high = extremes[name]
        if not (np.isfinite(low) and np.isfinite(high)):  # min/max propagate NaN and Inf
            raise ModelStructureError(f"constant '{name}' used by node {node.describe()} contains NaN or Inf values")


#: A flipped or stuck bit of a stored float, as the interval pass widens its site (docs/method.md §2.3): (c, t) of
#: |ỹ' − ỹ| ≤ c·|ỹ| + t, whether the bit is stuck at 0 (toward 0 only), whether it is the sign (a mirror only).
FlipTerms = tuple[float, float, bool, bool]

#: What a failure site's failed neurons may send, [a, b]: floats, or arrays shaped like the value (a guard's ends
#: per neuron, docs/method.md §2.3).
SiteRange = tuple[float | np.ndarray, float | np.ndarray]


def evaluate(
    graph: Graph,
    nodes: list[Node],
    input_name: str | Mapping[str, Interval],
    input_box: Interval | None,
    opset: int,
    constants: dict[str, np.ndarray] | None = None,
    widen: Mapping[str, SiteRange] | None = None,
    radius: dict[str, float] | None = None,
    extremes: dict[str, tuple[float, float]] | None = None,
    relative: dict[str, FlipTerms] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Interval]]:
    """Fold constants and propagate the input box through ``nodes`` (IBP).

    ``input_name``/``input_box`` name the one input and its box, or ``input_name`` maps
    every variable input to its box (``input_box`` None; docs/method.md §12.1).
    ``widen`` joins the given [a, b] into a value's interval (failed neurons) and
    ``radius`` widens it by ±r (failed synapses), ``relative`` (c, t, z, s) each element by ±(c·|v|max + t) of its own
    interval (a flipped bit of a stored float, docs/method.md §2.3), and where z (a bit stuck at 0) no further than
    [min(lo, 0), max(hi, −lo, 0)], the hull of 0, v and |v|: the faulty network's intervals.
    """
    constants = dict(graph.initializers) if constants is None else constants
    widen, radius, relative = widen or {}, radius or {}, relative or {}
    if isinstance(input_name, str):
        if input_box is None:
            raise ValueError("evaluate: a single input needs its box")
        clean: dict[str, Interval] = {input_name: input_box}
    else:
        clean = dict(input_name)
    for node in nodes:
        node.opset = opset or node.opset
        args = [clean.get(v, constants.get(v)) if v else None for v in node.inputs]
        variable = any(isinstance(a, Interval) for a in args)
        if not variable:
            if all(out in constants for out in node.outputs if out):
                continue
            if any(a is None and v for a, v in zip(args, node.inputs, strict=True)):
                raise ModelStructureError(f"node {node.describe()} reads a value that is not available")
            folded = _fold(node, cast(list[np.ndarray | None], args), opset)
            for out, constant in zip(node.outputs, folded, strict=False):
                constants[out] = constant
            continue
        if node.op_type == "Shape":
            constants[node.outputs[0]] = _shape_of(node, cast(Interval, args[0]))  # its one input is variable
            continue
        rule = lookup(node)
        if rule is None:
            reason = (REFUSED | REFUSED_GUARD).get(node.op_type, "robaudit has no rule to bound its error propagation")
            raise unsupported(node, reason)
        _check_finite(node, args, graph, extremes if extremes is not None else {})
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite box is refused just below, in one line
                results = rule.interval(node, args)
        except (ValueError, IndexError, ZeroDivisionError) as exc:  # shapes or attributes do not fit together
            shapes = [list(a.shape if isinstance(a, Interval) else np.shape(a)) for a in args if a is not None]
            message = f"node {node.describe()} has incompatible input shapes {shapes} or attributes{_reason(exc)}"
            raise ModelStructureError(message + _fixed_batch_hint(graph)) from None
        for out, value in zip(node.outputs, results, strict=False):
            if out:
                if value.lo.size == 0:
                    raise ModelStructureError(f"node {node.describe()} produces an empty tensor")
                if not (np.all(np.isfinite(value.lo)) and np.all(np.isfinite(value.hi))):
                    raise ModelStructureError(
                        f"node {node.describe()} produces NaN or infinite values "
                        "(check its constants and --input-range)"
                    )
                if out in radius:
                    value = Interval(value.lo - radius[out], value.hi + radius[out])
                if out in relative:
                    value = _flipped_hull(value, *relative[out])
                if out in widen:
                    a, b = widen[out]
                    value = Interval(np.minimum(value.lo, a), np.maximum(value.hi, b))
                clean[out] = value
    return constants, clean


def _flipped_hull(value: Interval, c: float, t: float, toward_zero: bool, sign: bool = False) -> Interval:
    """The values a stored float v ∈ ``value`` may hold with one bit flipped or stuck (docs/method.md §2.3): within
    c·|v|max + t of v; a bit stuck at 0 only lowers |v| (a mantissa or exponent bit) or makes v |v| (the sign), so
    ``toward_zero`` also keeps them in the hull of 0, v and |v|; the sign bit (flipped or stuck) leaves v, −v, |v|
    or −|v|, so ``sign`` keeps them in the hull of the box and its mirror −box. The interval holds v itself too."""
    r = c * np.maximum(np.abs(value.lo), np.abs(value.hi)) + t
    lo, hi = value.lo - r, value.hi + r
    if toward_zero:
        lo = np.maximum(lo, np.minimum(value.lo, 0.0))
        hi = np.minimum(hi, np.maximum(np.maximum(value.hi, -value.lo), 0.0))
    if sign:
        lo = np.maximum(lo, np.minimum(value.lo, -value.hi))
        hi = np.minimum(hi, np.maximum(value.hi, -value.lo))
    return Interval(lo, hi)


def _fixed_batch_hint(graph: Graph) -> str:
    """Where a graph input declares a fixed batch above 1 (torch's dynamo exporter given an example batch of 2 and
    no dynamic shapes): that robaudit reads one sample and how to export for it; else ''."""
    fixed = [
        (info.name, info.dims[0])
        for info in graph.inputs
        if info.dims and isinstance(info.dims[0], int) and info.dims[0] > 1 and info.name not in graph.initializers
    ]
    if not fixed:
        return ""
    name, batch = fixed[0]
    return (f"; input '{name}' is declared with a fixed batch of {batch}, which the graph's shapes may hold, and "
            "robaudit reads one sample (batch 1): export with a symbolic batch (torch.onnx.export(..., "
            f"dynamic_shapes=...) or dynamic_axes={{'{name}': {{0: 'batch'}}}})")


def _reason(exc: Exception) -> str:
    """`` (numpy's message)`` of a ValueError (it names shapes or values); nothing for other errors."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f" ({text})" if text and isinstance(exc, ValueError) else " (shape mismatch)"


def _shape_of(node: Node, x: Interval) -> np.ndarray:
    shape = np.array(x.shape, dtype=np.int64)
    start, end = node.attr("start", 0), node.attr("end")
    return shape[start:end]


def _fold(node: Node, args: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """``node`` on constant ``args``: by onnx's reference evaluator, or, for a node robaudit fused (no proto of its
    own), by its rule when it is a rounding op (a float16 model's rounded ``W·0.5``)."""
    if node.proto is not None:
        return fold_node(node, args, node.proto, opset)
    rule = lookup(node)
    folded = rule.fold(node, args[0]) if isinstance(rule, Rounding) and args and args[0] is not None else None
    if folded is None:  # a dynamic quantization of a constant, say: one line, not an internal error
        raise unsupported(node, "its inputs are constant and robaudit cannot evaluate it")
    return [folded]

