"""Element-wise ops between layers whose slope depends on the range of their input.

``Sum`` (n-ary addition), ``Pow`` by a constant exponent, ``Reciprocal`` and a division
whose divisor is variable (``Div`` itself is ruled in ``affine``, which calls the helpers
here). The nonlinear ones are bounded by the mean value theorem over the *faulty* range of
their input (the clean range joined with every value failures can cause, docs/method.md
§3.2): both the clean and the faulty value lie in that interval, so
|f(x̃) − f(x)| ≤ sup |f'| over it · |x̃ − x|.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from robaudit.graph.ops.base import (
    INT,
    INTS,
    Interval,
    OpRule,
    PropagationContext,
    broadcast_scalar,
    reduce_to_shape,
    register,
    replication,
    unsupported,
)

if TYPE_CHECKING:
    from robaudit.graph.onnx_graph import Node


def _as_interval(arg: object) -> Interval:
    return arg if isinstance(arg, Interval) else Interval.point(np.asarray(arg, np.float64))


@register
class SumRule(OpRule):
    """``Sum`` of n inputs (broadcasting): |Δ Σ x_i| ≤ Σ |Δx_i|."""

    op_types = ("Sum",)
    attributes = {"Sum": {"consumed_inputs": INTS}}

    def interval(self, node, args):
        parts = [_as_interval(a) for a in args if a is not None]
        return [Interval(sum(p.lo for p in parts), sum(p.hi for p in parts))]

    def backward(self, node, cot, ctx):
        return [reduce_to_shape(cot[0], ctx.shape(v)) if v and ctx.is_variable(v) else None for v in node.inputs]

    def paper(self, node, errs, ctx):
        out = ctx.shape(node.outputs[0])
        return [sum(e * replication(ctx.shape(v), out) for v, e in zip(node.inputs, errs, strict=True) if e)]


# --------------------------------------------------------------------------- Pow


def pow_exponent(node: Node, exponent: Any) -> float:
    """The scalar constant exponent of ``Pow``; refuse a variable or non-scalar one."""
    found = None if isinstance(exponent, Interval) else broadcast_scalar(exponent)
    if found is None:
        raise unsupported(node, "Pow is supported only by a constant scalar exponent (one element, at most one axis)")
    return found


def _is_integer(p: float) -> bool:
    return float(p).is_integer()


def check_pow_domain(node: Node, p: float, lo: np.ndarray, hi: np.ndarray, where: str) -> None:
    """x^p is real and finite on [lo, hi]: x ≥ 0 for a fractional p, x ≠ 0 for p < 0."""
    if not _is_integer(p) and np.any(lo < 0):
        raise unsupported(node, f"Pow by {p:g} of a value whose range{where} reaches below 0")
    if p < 0 and np.any((lo <= 0) & (hi >= 0)):
        raise unsupported(node, f"Pow by {p:g} of a value whose range{where} contains 0")


def pow_interval(p: float, lo: np.ndarray, hi: np.ndarray) -> Interval:
    """Elementwise range of x^p over [lo, hi] (domain already checked)."""
    a, b = np.power(lo, p), np.power(hi, p)
    low, high = np.minimum(a, b), np.maximum(a, b)
    if _is_integer(p) and p > 0 and int(p) % 2 == 0:  # even power: 0 inside the interval is the minimum
        low = np.where((lo < 0) & (hi > 0), 0.0, low)
    return Interval(low, high)


def pow_slope(p: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """sup |d/dx x^p| = |p|·sup |x|^(p−1) over [lo, hi], elementwise (domain already checked)."""
    if p == 0:
        return np.zeros_like(lo)
    if p >= 1:
        return abs(p) * np.power(np.maximum(np.abs(lo), np.abs(hi)), p - 1)
    nearest = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    with np.errstate(divide="ignore"):
        return abs(p) * np.power(nearest, p - 1)  # p − 1 < 0: largest nearest to 0


@register
class PowRule(OpRule):
    """``Pow(x, p)`` with a constant scalar p: slope |p|·|x|^(p−1) over x's faulty range."""

    op_types = ("Pow",)
    attributes = {"Pow": {"axis": INT, "broadcast": INT}}
    range_dependent = True

    def interval(self, node, args):
        x, p = args[0], pow_exponent(node, args[1])
        if not isinstance(x, Interval):
            raise unsupported(node, "Pow of a constant should have been folded")
        check_pow_domain(node, p, x.lo, x.hi, "")
        return [pow_interval(p, x.lo, x.hi)]

    def _slope(self, node, ctx: PropagationContext) -> np.ndarray:
        p = pow_exponent(node, ctx.constants.get(node.inputs[1]))
        box = ctx.faulty[node.inputs[0]]
        check_pow_domain(node, p, box.lo, box.hi, " under failures")
        slope = pow_slope(p, box.lo, box.hi)
        if not np.all(np.isfinite(slope)):
            raise unsupported(node, f"Pow by {p:g} has an unbounded slope on its input's faulty range")
        return slope

    def backward(self, node, cot, ctx):
        return [cot[0] * self._slope(node, ctx), None]

    def paper(self, node, errs, ctx):
        return [errs[0] * float(np.max(self._slope(node, ctx), initial=0.0))]


# --------------------------------------------------------------------------- 1/y and x/y


def divisor_bound(node: Node, box: Interval, where: str) -> np.ndarray:
    """Elementwise min |y| over a divisor's range; refuse a range that contains 0 (``where`` names it)."""
    if np.any((box.lo <= 0) & (box.hi >= 0)):
        raise unsupported(node, f"the divisor's range{where} contains 0")
    return np.minimum(np.abs(box.lo), np.abs(box.hi))


def reciprocal_interval(node: Node, y: Interval) -> Interval:
    """[1/hi, 1/lo] of a divisor range that excludes 0."""
    divisor_bound(node, y, "")
    return Interval(1.0 / y.hi, 1.0 / y.lo)


def product_planes(x: Interval, y: Interval):
    """McCormick planes of u = x·y over the box x ∈ [xl, xh], y ∈ [yl, yh], broadcast to u's shape
    (docs/method.md §4.2): ((x coefficient of the upper plane, of the lower), (the same for y),
    (upper constant, lower constant)), with

        u ≤ yh·x + xl·y − xl·yh     since (x − xl)·(yh − y) ≥ 0,
        u ≥ yl·x + xl·y − xl·yl     since (x − xl)·(y − yl) ≥ 0.
    """
    shape = np.broadcast_shapes(x.shape, y.shape)
    xl = np.broadcast_to(x.lo, shape)
    yl, yh = np.broadcast_to(y.lo, shape), np.broadcast_to(y.hi, shape)
    return (yh, yl), (xl, xl), (-xl * yh, -xl * yl)


#: Elements of one block of rows in :func:`plane_coefficients` (256 KiB of float64: every step stays in cache).
PLANE_BLOCK_ELEMENTS = 2**15


def plane_coefficients(
    grad: np.ndarray, planes, x_shape: tuple[int, ...], y_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An upper bound of grad·(x·y) through the McCormick ``planes`` of :func:`product_planes`, per row of
    ``grad`` [K, *shape] (docs/method.md §4.2): (coefficients on x [K, *x_shape], on y [K, *y_shape],
    constant [K], magnitude [K] = Σ of the constant's terms' |·|), with grad⁺ = max(grad, 0), grad⁻ = grad − grad⁺:

        x: grad⁺·upper_x + grad⁻·lower_x, y: the same summed down to ``y_shape`` (adjoint of broadcasting),
        constant: Σ grad⁺·upper_const + Σ grad⁻·lower_const.

    A cache-sized block of rows at a time (docs/method.md §4.4): every row's numbers are the same
    operations on the same elements as on the whole array at once (each element and each row's sum
    on its own), without a pass over memory per step.
    """
    (x_up, x_low), (y_up, y_low), (c_up, c_low) = planes
    k = grad.shape[0]
    x_coef = np.empty((k,) + tuple(x_shape), dtype=np.result_type(grad, x_up, x_low))
    y_coef = np.empty((k,) + tuple(y_shape), dtype=np.result_type(grad, y_up, y_low))
    constant, magnitude = np.empty(k), np.empty(k)
    size = max(1, grad[0].size) if k else 1
    step = max(1, PLANE_BLOCK_ELEMENTS // size)
    for b0 in range(0, k, step):
        b1 = min(k, b0 + step)
        part = grad[b0:b1]
        pos = np.maximum(part, 0.0)
        neg = part - pos
        for out, shape, upper, lower in ((x_coef, x_shape, x_up, x_low), (y_coef, y_shape, y_up, y_low)):
            out[b0:b1] = reduce_to_shape(pos * upper + neg * lower, tuple(shape))
        terms = (pos * c_up).reshape(b1 - b0, -1), (neg * c_low).reshape(b1 - b0, -1)
        magnitude[b0:b1] = np.abs(terms[0]).sum(axis=1) + np.abs(terms[1]).sum(axis=1)
        constant[b0:b1] = terms[0].sum(axis=1) + terms[1].sum(axis=1)
    return x_coef, y_coef, constant, magnitude


def product_interval(x: Interval, y: Interval) -> Interval:
    """The interval product (four corners)."""
    corners = [x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi]
    return Interval(np.minimum.reduce(corners), np.maximum.reduce(corners))


def division_slopes(node: Node, ctx: PropagationContext) -> tuple[np.ndarray, np.ndarray]:
    """(c_x, c_y) with |x̃/ỹ − x/y| ≤ c_x·|Δx| + c_y·|Δy|.

    x̃/ỹ − x/y = Δx/ỹ − x·Δy/(y·ỹ), y clean and ỹ faulty, both away from 0: c_x = 1/min|ỹ|,
    c_y = max|x|/(min|y|·min|ỹ|) with x's clean range (a constant numerator: itself).
    """
    x_name, y_name = node.inputs[:2]
    faulty_min = divisor_bound(node, ctx.faulty[y_name], " under failures")
    clean_min = divisor_bound(node, ctx.clean[y_name], "")
    numerator = ctx.clean[x_name].abs_max() if ctx.is_variable(x_name) else np.abs(ctx.constants[x_name])
    return 1.0 / faulty_min, numerator / (clean_min * faulty_min)


@register
class ReciprocalRule(OpRule):
    """``Reciprocal(y)``: |1/ỹ − 1/y| = |Δy|/(|y|·|ỹ|), y's ranges away from 0."""

    op_types = ("Reciprocal",)
    attributes = {"Reciprocal": {"consumed_inputs": INTS}}
    range_dependent = True

    def interval(self, node, args):
        return [reciprocal_interval(node, _as_interval(args[0]))]

    def _slope(self, node, ctx):
        name = node.inputs[0]
        clean, faulty = ctx.clean[name], ctx.faulty[name]
        return 1.0 / (divisor_bound(node, clean, "") * divisor_bound(node, faulty, " under failures"))

    def backward(self, node, cot, ctx):
        return [cot[0] * self._slope(node, ctx)]

    def paper(self, node, errs, ctx):
        return [errs[0] * float(np.max(self._slope(node, ctx), initial=0.0))]


def variable_division_interval(node: Node, args: list) -> Interval:
    """x / y with a variable divisor y (x variable or constant)."""
    return product_interval(_as_interval(args[0]), reciprocal_interval(node, _as_interval(args[1])))


def variable_division_backward(node: Node, cot: list[np.ndarray], ctx: PropagationContext) -> list:
    """Adjoint of x / y with a variable divisor (see :func:`division_slopes`)."""
    c_x, c_y = division_slopes(node, ctx)
    x_name, y_name = node.inputs[:2]
    grads: list = [None, reduce_to_shape(cot[0] * c_y, ctx.shape(y_name))]
    if ctx.is_variable(x_name):
        grads[0] = reduce_to_shape(cot[0] * c_x, ctx.shape(x_name))
    return grads


def variable_division_paper(node: Node, errs: list, ctx: PropagationContext) -> list[float]:
    """Sum-of-deviations scale of x / y with a variable divisor."""
    c_x, c_y = division_slopes(node, ctx)
    x_name, y_name = node.inputs[:2]
    out = ctx.shape(node.outputs[0])
    total = float(np.max(c_y, initial=0.0)) * (errs[1] or 0.0) * replication(ctx.shape(y_name), out)
    if ctx.is_variable(x_name):
        total += float(np.max(c_x, initial=0.0)) * (errs[0] or 0.0) * replication(ctx.shape(x_name), out)
    return [total]
