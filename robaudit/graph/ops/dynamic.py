"""Dynamically quantized models (docs/method.md §11): ``DynamicQuantizeLinear`` as a rounding op.

onnxruntime's ``quantize_dynamic`` writes, for each quantized ``MatMul``/``Conv`` with input x,

    DynamicQuantizeLinear(x) → (codes, s, zp)
    MatMulInteger(codes, W_codes, zp, W_zp)   (or ConvInteger)  → int32
    Cast(int32 → float) → Mul(·, Mul(s, W_scale))

where s = (max(0, max x) − min(0, min x))/255 is computed from the whole tensor at run time
and zp = round(−min(0, min x)/s). Exactly, the result is MatMul(r(x), W) with
W = (W_codes − W_zp)·W_scale and r(x) = (clip(round(x/s) + zp, 0, 255) − zp)·s, so the pattern
is fused into one element-wise rounding op ``DynamicRound`` (domain ``robaudit``) followed by
the float ``MatMul``/``Conv`` with the dequantized constant weight.

|r(x) − x| ≤ s·(½ + η) (η = 10⁻⁴ covers float32's division, the rounded scale and the
zero point's rounding; the clip never moves a value further: docs/method.md §11), and the
step s of any tensor whose elements lie in [lo, hi] is at most s̄ = (max(0, hi) − min(0, lo))/255.
So |r(ỹ) − r(y)| ≤ |ỹ − y| + ρ with ρ = s̄·(1 + 2η) when [lo, hi] holds both the clean and the
faulty tensor: the radius must be computed from the faulty network's range (§5.3), which
:func:`faulty_radii` does once the failure model is known.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper

from robaudit.errors import UnsupportedModelError
from robaudit.graph.onnx_graph import Node, decode_node, readers_of
from robaudit.graph.ops.base import Interval, register
from robaudit.graph.ops.rounding import Rounding

#: Relative allowance on half a step: float32's x/s, the rounded scale and zero point (docs/method.md §11).
STEP_SLACK = 1e-4
#: uint8 codes: (qmax − qmin).
CODE_SPAN = 255
#: Largest int32 accumulator.
_INT32_MAX = 2**31 - 1

#: The integer op → the float op it stands for, and the output-channel axis of its weight.
_INTEGER_OPS = {"MatMulInteger": ("MatMul", 1), "ConvInteger": ("Conv", 0)}


# --------------------------------------------------------------------------- pure math


def largest_step(lo: np.ndarray, hi: np.ndarray) -> float:
    """s̄ = (max(0, max hi) − min(0, min lo))/255: the largest step DynamicQuantizeLinear takes for
    a tensor whose every element lies in [lo, hi] (docs/method.md §11). ∞ for an unbounded box."""
    top = max(0.0, float(np.max(hi))) if np.size(hi) else 0.0
    bottom = min(0.0, float(np.min(lo))) if np.size(lo) else 0.0
    return (top - bottom) / CODE_SPAN


def dynamic_reference(x: np.ndarray) -> np.ndarray:
    """r(x): DequantizeLinear of DynamicQuantizeLinear(x) as the ONNX reference computes it (float32
    scale, round half to even, saturation), over the whole array."""
    x = np.asarray(x, np.float32)
    low, high = np.float32(min(0.0, float(x.min()))), np.float32(max(0.0, float(x.max())))
    scale = np.float32((high - low) / np.float32(CODE_SPAN)) if high != low else np.float32(1.0)
    zp = np.clip(np.rint(np.float32(0.0) - low / scale), 0, CODE_SPAN)
    codes = np.clip(np.rint(x / scale) + zp, 0, CODE_SPAN)
    return ((codes - zp) * scale).astype(np.float64)


# --------------------------------------------------------------------------- rule


@register
class DynamicRound(Rounding):
    """``DynamicQuantizeLinear`` followed by the dequantization its integer op and scale ``Mul`` do."""

    op_types = ("DynamicRound",)
    domain = "robaudit"

    def shown(self, node):
        return "DynamicQuantizeLinear (dynamic quantization)"

    def interval(self, node, args):
        x = args[0]
        half = largest_step(x.lo, x.hi) * (0.5 + STEP_SLACK)
        return [Interval(x.lo - half, x.hi + half)]

    def radius(self, node, x):
        """ρ = s̄·(1 + 2η) per element, ``x`` the box of the input under failures (both ends in it)."""
        rho = largest_step(x.lo, x.hi) * (1.0 + 2.0 * STEP_SLACK)
        return np.full(x.shape, rho, np.float64)


def is_dynamic_rounding(node: Node | None) -> bool:
    """Whether ``node`` is a fused ``DynamicRound``."""
    return node is not None and node.domain == "robaudit" and node.op_type == "DynamicRound"


def quantizes_dynamically(nodes: list[Node]) -> bool:
    """Whether the model computes a quantization step at run time (then one sample per run: §11)."""
    return any(node.op_type == "DynamicQuantizeLinear" for node in nodes)


def faulty_radii(steps: list, faulty: dict[str, Interval]) -> dict[str, np.ndarray]:
    """ρ (flat) of every ``DynamicRound`` output from the faulty network's box of its input (§11)."""
    return {
        step.outputs[0]: DynamicRound().radius(step, faulty[step.inputs[0]]).reshape(-1)
        for step in steps
        if isinstance(step, Node) and is_dynamic_rounding(step) and step.inputs[0] in faulty
    }


# --------------------------------------------------------------------------- recognition


class _Fuser:
    """Finds quantize_dynamic's pattern around each DynamicQuantizeLinear and rewrites it."""

    def __init__(self, nodes: list[Node], constants: dict) -> None:
        self.nodes = nodes
        self.constants = constants
        self.readers = readers_of(nodes)

    def only(self, value: str) -> Node | None:
        users = self.readers.get(value, [])
        return users[0] if len(users) == 1 else None

    def fuse(self, quant: Node) -> tuple[list[Node], set[int]] | None:
        """(new nodes, ids of the nodes they replace) for one DynamicQuantizeLinear, or None."""
        if len(quant.outputs) != 3 or not quant.inputs:
            return None
        codes, scale, zp = quant.outputs
        rounded = f"{codes}/ra_dynamic"
        new = [Node(quant.name, "DynamicRound", "robaudit", [quant.inputs[0]], [rounded], {})]
        removed = {id(quant)}
        for integer in self.readers.get(codes, []):
            found = self._one(integer, rounded, scale, zp)
            if found is None:
                return None
            new.extend(found[0])
            removed |= found[1]
        scale_users = {id(n) for n in self.readers.get(scale, [])}
        zp_users = {id(n) for n in self.readers.get(zp, [])}
        if not self.readers.get(codes) or not scale_users <= removed or not zp_users <= removed:
            return None
        return new, removed

    def _one(self, integer: Node, rounded: str, scale: str, zp: str) -> tuple[list[Node], set[int]] | None:
        """Integer op → Cast → Mul(·, Mul(s, W_scale)) into the float op on ``rounded``."""
        if integer.op_type not in _INTEGER_OPS or len(integer.inputs) < 3 or integer.inputs[2] != zp:
            return None
        weight_codes = self.constants.get(integer.inputs[1])
        w_zp_name = integer.inputs[3] if len(integer.inputs) > 3 else ""
        cast = self.only(integer.outputs[0])
        if weight_codes is None or (w_zp_name and w_zp_name not in self.constants):
            return None
        if cast is None or cast.op_type != "Cast" or cast.attr("to") != 1:
            return None
        mul = self.only(cast.outputs[0])
        if mul is None or mul.op_type != "Mul":
            return None
        factor = next((v for v in mul.inputs if v != cast.outputs[0]), None)
        scales = next((n for n in self.nodes if factor in n.outputs), None) if factor else None
        if factor is None or scales is None or scales.op_type != "Mul" or scale not in scales.inputs:
            return None
        w_scale_name = next((v for v in scales.inputs if v != scale), scale)
        w_scale = self.constants.get(w_scale_name)
        if w_scale is None or any(u is not mul for u in self.readers.get(factor, [])):
            return None
        float_op, axis = _INTEGER_OPS[integer.op_type]
        if np.size(w_scale) > 1 and (float_op == "Conv" or np.size(w_scale) != np.shape(weight_codes)[axis]):
            return None  # per-channel scales of ConvInteger: the Mul's broadcast is not the channel's
        w_zp = np.asarray(self.constants[w_zp_name]) if w_zp_name else np.zeros((), np.asarray(weight_codes).dtype)
        _check_accumulator(integer, np.asarray(weight_codes), w_zp, axis)
        weight = f"{integer.inputs[1]}/ra_dequantized"
        zero = [w_zp_name] if w_zp_name else []
        extra: dict[str, Any] = {"axis": axis} if np.size(w_scale) > 1 else {}
        name = integer.name[: -len("_quant")] if integer.name.endswith("_quant") else f"{integer.name}/ra_float"
        name = name[: -len("_MatMul")] if name.endswith("/Gemm_MatMul") else name  # a Gemm split in two: its name
        attrs = {k: v for k, v in integer.attrs.items()}
        nodes = [
            decode_node(helper.make_node("DequantizeLinear", [integer.inputs[1], w_scale_name, *zero], [weight],
                                         name=f"{integer.name}/ra_dequantize", **extra)),
            decode_node(helper.make_node(float_op, [rounded, weight], [mul.outputs[0]], name=name, **attrs)),
        ]
        return nodes, {id(integer), id(cast), id(mul), id(scales)}


def _check_accumulator(node: Node, codes: np.ndarray, zp: np.ndarray, axis: int) -> None:
    """Refuse an integer op whose int32 sum could overflow: 255·Σ|W_codes − W_zp| per output ≥ 2³¹."""
    centred = np.abs(codes.astype(np.int64) - zp.astype(np.int64).reshape(
        [-1 if i == axis else 1 for i in range(codes.ndim)] if zp.size > 1 else ()))
    reduced = tuple(i for i in range(codes.ndim) if i != axis)
    largest = int(np.max(centred.sum(axis=reduced))) * CODE_SPAN if centred.size else 0
    if largest > _INT32_MAX:
        raise UnsupportedModelError(
            f"node {node.describe()}: its int32 accumulator may overflow (255·Σ|codes| = {largest} > 2³¹ − 1)",
            node.op_type, node.name)


def fuse_dynamic(nodes: list[Node], constants: dict) -> list[Node]:
    """Replace quantize_dynamic's pattern around each ``DynamicQuantizeLinear`` by ``DynamicRound`` and
    the float ``MatMul``/``Conv`` with the dequantized weight (docs/method.md §11).

    A pattern that differs (a reader of the codes that is not an integer op, scales that are
    not constants) is left as it is and refused by name later. Raises UnsupportedModelError
    when the integer op's int32 accumulator could overflow.
    """
    fuser = _Fuser(nodes, constants)
    replaced: dict[int, list[Node]] = {}
    removed: set[int] = set()
    for node in nodes:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        found = fuser.fuse(node)
        if found is not None:
            replaced[id(node)] = found[0]
            removed |= found[1]
    if not replaced:
        return nodes
    out: list[Node] = []
    for node in nodes:
        if id(node) in replaced:
            out.extend(replaced[id(node)])
        elif id(node) not in removed:
            out.append(node)
    return out
