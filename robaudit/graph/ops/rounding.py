"""Rounding inside the model (docs/method.md §1.2): a ``QuantizeLinear → DequantizeLinear``
pair and a ``Cast`` to float16/bfloat16 and back.

Both are monotone element-wise maps r with, for the clean value y and the faulty one ỹ,

    |r(ỹ) − r(y)| ≤ L·|ỹ − y| + ρ        (and r(ỹ) = r(y) when ỹ = y)

QDQ: L = 1 and ρ = s, one quantization step (half a step each side), after which the
value is clipped to the code range [(qmin − zp)·s, (qmax − zp)·s] (1-Lipschitz, bounded).
Float16/bfloat16: with u = 2⁻¹¹ / 2⁻⁸ the unit roundoff and t half the smallest subnormal,
|r(x) − x| ≤ u·|x| + t, so L = 1 + u and ρ = 2u·|y| + 2t (|y| from the clean interval).

Both patterns are fused into one node of domain ``robaudit`` before the first interval pass
(:func:`fuse_rounding`); the radius ρ is what the bounds add (``Network.rounding``).
"""

from __future__ import annotations

import numpy as np

from robaudit.errors import RoundingOverflowError, UnsupportedModelError
from robaudit.graph.onnx_graph import Node, readers_of
from robaudit.graph.ops.activations import Activation
from robaudit.graph.ops.base import Interval, register

#: ONNX element type → (name, unit roundoff u, half the smallest subnormal t, largest finite value).
FLOAT_TYPES: dict[int, tuple[str, float, float, float]] = {
    10: ("float16", 2.0**-11, 2.0**-25, 65504.0),
    16: ("bfloat16", 2.0**-8, 2.0**-134, 3.3895313892515355e38),
}

#: ONNX integer element type → (qmin, qmax) of QuantizeLinear's saturation.
INTEGER_TYPES: dict[int, tuple[int, int]] = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767)}

#: Slack on x/s, in steps: 10⁻⁶ plus 2⁻¹³·|x/s|. onnxruntime computes x (the float32 output of
#: the op before) and x/s in float32, so a value the float64 analysis puts just below a tie may
#: be rounded across it: the division alone errs by ~2⁻²⁴·|x/s|, the op before by its own
#: accumulated rounding (docs/method.md §1.2).
_TIE_SLACK = 1e-6
_TIE_SLACK_RELATIVE = 2.0**-13


# --------------------------------------------------------------------------- pure math


def qdq_codes_interval(lo: np.ndarray, hi: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int):
    """Codes (q − zp) that QuantizeLinear may give for x ∈ [lo, hi]: ([k_lo], [k_hi]), clipped.

    round(x/s) for x ≥ lo is at least ⌈lo/s − ½⌉ (ties either way), and at most ⌊hi/s + ½⌋;
    a slack of 10⁻⁶ + 2⁻¹³·|x/s| steps covers float32's rounding of x and of the division
    (docs/method.md §1.2).
    """
    slack = _TIE_SLACK + _TIE_SLACK_RELATIVE * np.maximum(np.abs(lo), np.abs(hi)) / scale
    k_lo = np.ceil(lo / scale - 0.5 - slack)
    k_hi = np.floor(hi / scale + 0.5 + slack)
    return np.clip(k_lo, qmin - zp, qmax - zp), np.clip(k_hi, qmin - zp, qmax - zp)


def qdq_reference(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) as ONNX defines it (round half to even, saturate)."""
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def float_round_radius(abs_max: np.ndarray, unit: float, tiny: float) -> np.ndarray:
    """ρ = 2u·|y| + 2t: what rounding adds to a deviation on top of (1 + u)·|Δ| (docs/method.md §1.2)."""
    return 2.0 * unit * np.asarray(abs_max, np.float64) + 2.0 * tiny


# --------------------------------------------------------------------------- rules


class Rounding(Activation):
    """A rounding op: monotone, Lipschitz L, and a per-element radius ρ (docs/method.md §1.2)."""

    def radius(self, node: Node, x: Interval) -> np.ndarray:
        """ρ per element of the output (shape of ``x``), given the clean interval of the input."""
        raise NotImplementedError

    def deviations(self, node: Node, x: Interval) -> tuple[np.ndarray, np.ndarray]:
        """(down, up) per element: bounds of y − r(y) and r(y) − y for y in ``x`` (each ≥ 0; docs/method.md §7.4,
        "Rounded outputs"): ρ both ways, which holds where the op only rounds (|r(y) − y| ≤ ρ)."""
        rho = np.broadcast_to(self.radius(node, x), x.lo.shape).astype(np.float64)
        return rho, rho

    def saturation(self, node: Node, shape: tuple[int, ...]) -> tuple[float, float] | None:
        """(bottom, top) when the op is one function r = q∘clip for every element, clipping to [bottom, top] and
        then rounding within ρ; None otherwise (docs/method.md §7.4, "Rounded outputs")."""
        return None

    def fold(self, node: Node, x: np.ndarray) -> np.ndarray | None:
        """The op on a constant ``x``, as onnxruntime computes it (a rounded constant: a float16 model's
        ``W·0.5``, a QDQ pair on a computed weight); None for a rounding robaudit does not evaluate."""
        return None


@register
class QuantizeDequantize(Rounding):
    """``DequantizeLinear(QuantizeLinear(x))`` with constant scale and zero point."""

    op_types = ("QuantizeDequantize",)
    domain = "robaudit"

    def shown(self, node):
        return "QuantizeLinear→DequantizeLinear"

    @staticmethod
    def parameters(node: Node, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(scale, zero point) broadcast to ``shape``'s rank, and (qmin, qmax)."""
        scale = np.asarray(node.attr("scale"), np.float64)
        zp = np.asarray(node.attr("zero_point"), np.float64)
        if scale.ndim == 1 and len(shape) > 0:
            axis = int(node.attr("axis", 1)) % len(shape)
            view = [1] * len(shape)
            view[axis] = scale.size
            scale, zp = scale.reshape(view), np.broadcast_to(zp, scale.shape).reshape(view)
        return scale, zp, int(node.attr("qmin")), int(node.attr("qmax"))

    def output_range(self, node):
        scale = np.asarray(node.attr("scale"), np.float64)
        zp = np.asarray(node.attr("zero_point"), np.float64)
        lows = (node.attr("qmin") - zp) * scale
        highs = (node.attr("qmax") - zp) * scale
        return float(np.min(lows)), float(np.max(highs))

    def interval(self, node, args):
        x = args[0]
        scale, zp, qmin, qmax = self.parameters(node, x.shape)
        k_lo, k_hi = qdq_codes_interval(x.lo, x.hi, scale, zp, qmin, qmax)
        return [Interval(k_lo * scale, k_hi * scale)]

    def radius(self, node, x):
        scale, _, _, _ = self.parameters(node, x.shape)
        return np.broadcast_to(scale, x.shape).astype(np.float64)

    def deviations(self, node, x):
        """ρ = s inside the codes' range; past its ends the code saturates: a value above the top code is
        lowered by up to its distance to it (x.hi − top), one below the bottom code raised likewise."""
        scale, zp, qmin, qmax = self.parameters(node, x.shape)
        rho = np.broadcast_to(np.abs(scale), x.shape).astype(np.float64)
        top, bottom = (qmax - zp) * scale, (qmin - zp) * scale
        with np.errstate(invalid="ignore"):
            down = rho + np.maximum(x.hi - np.maximum(top, bottom), 0.0)
            up = rho + np.maximum(np.minimum(top, bottom) - x.lo, 0.0)
        return np.where(np.isnan(down), np.inf, down), np.where(np.isnan(up), np.inf, up)

    def saturation(self, node, shape):
        scale, zp, qmin, qmax = self.parameters(node, shape)
        if scale.size != 1 or zp.size != 1:
            return None
        ends = sorted(float(((q - zp) * scale).reshape(-1)[0]) for q in (qmin, qmax))
        return ends[0], ends[1]

    def fold(self, node, x):
        scale, zp, qmin, qmax = self.parameters(node, np.shape(x))
        single = np.float32  # onnxruntime's QuantizeLinear/DequantizeLinear arithmetic
        codes = np.clip(np.rint(np.asarray(x, single) / scale.astype(single)) + zp.astype(single), qmin, qmax)
        return ((codes - zp.astype(single)) * scale.astype(single)).astype(np.asarray(x).dtype)


@register
class FloatRound(Rounding):
    """``Cast`` to float16/bfloat16 followed by a ``Cast`` back to float32/float64."""

    op_types = ("FloatRound",)
    domain = "robaudit"

    def shown(self, node):
        return f"Cast to {self._type(node)[0]} and back"

    def _type(self, node: Node) -> tuple[str, float, float, float]:
        return FLOAT_TYPES[int(node.attr("to"))]

    def lipschitz(self, node):
        return 1.0 + self._type(node)[1]

    def interval(self, node, args):
        x = args[0]
        _, unit, tiny, largest = self._type(node)
        if np.max(x.abs_max()) > largest:
            name = self._type(node)[0]
            raise RoundingOverflowError(
                f"'{node.outputs[0]}' is rounded to {name} and may exceed the largest {name} "
                f"value ({largest:g}) on the input range or under failures, where it overflows to ±inf: a narrower "
                "--input-range, a smaller --capacity, or a Clip (robaudit harden) keeps it finite",
                op_type="Cast", node=node.name)
        # r(x) ∈ [x − u|x| − t, x + u|x| + t], and r is monotone
        lo = x.lo - unit * np.abs(x.lo) - tiny
        hi = x.hi + unit * np.abs(x.hi) + tiny
        return [Interval(lo, hi)]

    def radius(self, node, x):
        _, unit, tiny, _ = self._type(node)
        return float_round_radius(x.abs_max(), unit, tiny)

    def deviations(self, node, x):
        """ρ while the value stays finite in the narrow type; past its largest value it becomes ±inf."""
        rho = np.broadcast_to(self.radius(node, x), x.lo.shape).astype(np.float64)
        rho = np.where(x.abs_max() > self._type(node)[3], np.inf, rho)
        return rho, rho

    def saturation(self, node, shape):
        largest = self._type(node)[3]  # past it: ±inf, which orders as a clip to ±largest does
        return -largest, largest

    def fold(self, node, x):
        value = np.asarray(x)
        if int(node.attr("to")) == 10:
            return value.astype(np.float16).astype(value.dtype)
        return bfloat16_round(value.astype(np.float32)).astype(value.dtype)


def bfloat16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (the upper 16 bits, round half to even; NaN kept), as float32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out)


#: Why quantized forms robaudit does not bound are refused (docs/method.md §11).
_DYNAMIC = ("this dynamic quantization is not in the form onnxruntime's quantize_dynamic writes "
            "(DynamicQuantizeLinear → MatMulInteger/ConvInteger with constant int8/uint8 weights → Cast → Mul by "
            "the product of the scales), which is the form robaudit bounds")
REFUSED: dict[str, str] = {
    "QuantizeLinear": "a QuantizeLinear must be followed by a DequantizeLinear with the same constant scale and "
    "zero point (QDQ format), or be read by the integer ops of a QOperator model (QLinearConv, QLinearMatMul, "
    "QGemm, ...) or by shape-only ops and MaxPool leading to them",
    "DynamicQuantizeLinear": _DYNAMIC,
    "MatMulInteger": _DYNAMIC,
    "ConvInteger": _DYNAMIC,
}


# --------------------------------------------------------------------------- recognition


def _literal(values: dict, name: str) -> np.ndarray | None:
    return np.asarray(values[name]) if name in values else None


def _qdq_node(quant: Node, dequant: Node, constants: dict) -> Node | None:
    """The fused node for Q → DQ with the same constant scale and zero point, or None."""
    if quant.attr("block_size") or dequant.attr("block_size") or len(quant.inputs) < 2:
        return None
    scale = _literal(constants, quant.inputs[1])
    zp = _literal(constants, quant.inputs[2]) if len(quant.inputs) > 2 and quant.inputs[2] else _zero_of(quant)
    if scale is None or zp is None or zp.dtype not in (np.uint8, np.int8, np.uint16, np.int16):
        return None
    d_scale = _literal(constants, dequant.inputs[1]) if len(dequant.inputs) > 1 else None
    d_zp = _literal(constants, dequant.inputs[2]) if len(dequant.inputs) > 2 and dequant.inputs[2] else np.uint8(0)
    if d_scale is None or d_zp is None or not (np.array_equal(scale, d_scale) and np.array_equal(zp, d_zp)):
        return None
    if quant.attr("axis", 1) != dequant.attr("axis", 1) or not np.all(scale > 0):
        return None
    info = np.iinfo(zp.dtype)
    attrs = {
        "scale": scale.astype(np.float64),
        "zero_point": zp.astype(np.float64),
        "qmin": int(info.min),
        "qmax": int(info.max),
        "axis": int(quant.attr("axis", 1)),
    }
    return Node(quant.name, "QuantizeDequantize", "robaudit", [quant.inputs[0]], list(dequant.outputs), attrs)


#: ONNX element types of QuantizeLinear's ``output_dtype`` (opset 21) robaudit reads: their zero, which is the zero
#: point when no zero-point input gives it (0: the attribute unset, uint8).
_CODE_ZEROS = {0: np.uint8(0), 2: np.uint8(0), 3: np.int8(0), 4: np.uint16(0), 5: np.int16(0)}


def _zero_of(quant: Node) -> np.ndarray | None:
    """The zero point of a QuantizeLinear without a zero-point input, typed as its codes: uint8 unless its
    ``output_dtype`` says otherwise (int8 codes span −128..127, not 0..255); None for other code types
    (int4, float8: not fused, so refused by name)."""
    zero = _CODE_ZEROS.get(int(quant.attr("output_dtype", 0) or 0))
    return None if zero is None else np.asarray(zero)


def fuse_rounding(nodes: list[Node], constants: dict) -> list[Node]:
    """Replace each Q → DQ pair and each Cast to float16/bfloat16 → Cast back by one rounding node.

    Only pairs whose intermediate value has no other reader are fused; a ``Cast`` to a
    narrow float type that is not immediately cast back stays, and is refused by name.
    """
    readers = readers_of(nodes)
    fused: dict[str, Node] = {}
    removed: set[str] = set()
    for node in nodes:
        if node.name in removed or len(node.outputs) != 1:
            continue
        users = readers.get(node.outputs[0], [])
        if len(users) != 1 or (node.inputs and node.inputs[0] in constants):
            continue  # a rounded constant (a quantizer's Q → DQ on GELU's 1/√2) is folded as the two ops it is
        nxt = users[0]
        replacement = None
        if node.op_type == "QuantizeLinear" and nxt.op_type == "DequantizeLinear" and nxt.inputs[0] == node.outputs[0]:
            replacement = _qdq_node(node, nxt, constants)
        elif node.op_type == "Cast" and node.attr("to") in FLOAT_TYPES and nxt.op_type == "Cast":
            if nxt.attr("to") in (1, 11):
                replacement = Node(node.name, "FloatRound", "robaudit", [node.inputs[0]], list(nxt.outputs),
                                   {"to": int(node.attr("to"))}, None, dict(node.metadata))
        if replacement is not None:
            fused[node.name] = replacement
            removed.add(nxt.name)
    result = [fused.get(n.name, n) for n in nodes if n.name not in removed]
    _refuse_requantization(result)
    return result


def _refuse_requantization(nodes: list[Node]) -> None:
    """A QDQ pair read straight into another with other parameters (Q1 → DQ1 → Q2 → DQ2): onnxruntime's default
    session fuses the two into one rounding (DoubleQDQPairsRemover) whose result differs from the graph's two
    roundings (an independent attack measured different outputs on most inputs and a certificate broken by it), so
    neither reading is the one that runs. Raises :class:`UnsupportedModelError` naming both; the same parameters
    twice are the identity on the first pair's codes, and stay."""
    producers = {n.outputs[0]: n for n in nodes if n.op_type == "QuantizeDequantize" and n.outputs}
    for node in nodes:
        first = producers.get(node.inputs[0]) if node.op_type == "QuantizeDequantize" and node.inputs else None
        if first is None or _same_codes(first, node):
            continue
        raise UnsupportedModelError(
            f"QuantizeLinear/DequantizeLinear '{first.name}' is read straight into another pair '{node.name}' with "
            "other scale or zero point: onnxruntime runs the two as one rounding of its own (it removes the middle "
            "pair), which is not the graph's two roundings, so robaudit cannot bound what runs",
            op_type="QuantizeLinear", node=node.name)


def _same_codes(first: Node, second: Node) -> bool:
    """Whether two fused QDQ nodes round to the same codes (scale, zero point, code range and axis)."""
    return all(
        np.array_equal(np.asarray(first.attr(key)), np.asarray(second.attr(key)))
        for key in ("scale", "zero_point", "qmin", "qmax", "axis")
    )


def is_rounding(node: Node | None) -> bool:
    """Whether ``node`` is a fused rounding node."""
    return node is not None and node.domain == "robaudit" and node.op_type in ("QuantizeDequantize", "FloatRound")
