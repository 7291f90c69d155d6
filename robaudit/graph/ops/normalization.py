"""LayerNormalization and RMSNormalization bounded from the ranges of their input (docs/method.md §13.1).

Over one normalized group of n elements, z = (x − μ)/σ with σ = √(var + ε) (RMSNorm:
z = x/r with r = √(mean x² + ε)), then y = γ·z + β. Everything rests on a positive lower
bound σ_lo of σ over a box of x: min var over the box is min over c of
(1/n)·Σ dist(c, [lo_i, hi_i])² (a convex function of c, minimised by bisection with a
certified lower bound), min mean x² is (1/n)·Σ dist(0, [lo_i, hi_i])².

The Jacobian is ∂z_i/∂x_j = (δ_ij − 1/n − z_i·z_j/n)/σ (RMSNorm: (δ_ij − z_i·z_j/n)/r) and
|z_i| ≤ √(n−1) (RMSNorm √n), so over the faulty box of x (which holds the segment between
the clean and the faulty input) |Δz_i| ≤ Σ_j (|δ_ij − 1/n| + Z_i·Z_j/n)/σ_lo · |Δx_j|.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops.base import FLOAT, INT, INTS, Interval, NormalizedRows, OpRule, register, unsupported
from robaudit.graph.ops.gated import _removable, _scalar, literal_constants

#: Bisection steps for the variance minimiser (the bracket shrinks to 2⁻⁶⁰ of the input span).
BISECTION_STEPS = 60


def _dist_sq(c: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """dist(c, [lo, hi])² elementwise (c broadcast over the last axis)."""
    return np.maximum(lo - c, 0.0) ** 2 + np.maximum(c - hi, 0.0) ** 2


def min_variance(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A lower bound on min over the box of the population variance, per group.

    Shapes: lo, hi [G, n] → [G]. f(c) = (1/n)·Σ dist(c, [lo_i, hi_i])² is convex with
    min f = min var; bisection on f′ brackets its minimiser in [a, b] and
    f(a) + f′(a)·(b − a) ≤ min f (convexity, f′(a) ≤ 0).
    """
    n = lo.shape[-1]
    a, b = lo.min(axis=-1, keepdims=True), hi.max(axis=-1, keepdims=True)

    def slope(c: np.ndarray) -> np.ndarray:
        above = np.maximum(c - hi, 0.0).sum(-1, keepdims=True)
        return (2.0 / n) * (above - np.maximum(lo - c, 0.0).sum(-1, keepdims=True))

    for _ in range(BISECTION_STEPS):
        mid = (a + b) / 2.0
        right = slope(mid) >= 0.0
        b, a = np.where(right, mid, b), np.where(right, a, mid)
    value = _dist_sq(a, lo, hi).mean(axis=-1, keepdims=True) + np.minimum(slope(a), 0.0) * (b - a)
    return np.maximum(value, 0.0)[..., 0]


def max_variance(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """An upper bound on the variance over the box, per group: (1/n)·Σ max (x_i − c)², c the mean of midpoints."""
    c = ((lo + hi) / 2.0).mean(axis=-1, keepdims=True)
    return np.maximum((lo - c) ** 2, (hi - c) ** 2).mean(axis=-1)


def min_mean_square(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min over the box of (1/n)·Σ x_i², per group (exact): [G, n] → [G]."""
    return _dist_sq(np.zeros(lo.shape[:-1] + (1,)), lo, hi).mean(axis=-1)


def max_mean_square(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max over the box of (1/n)·Σ x_i², per group (exact)."""
    return np.maximum(lo**2, hi**2).mean(axis=-1)


def deviation_interval(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Range of x_i − μ over the box (exact): x_i·(1 − 1/n) − Σ_{j≠i} x_j/n."""
    n = lo.shape[-1]
    s_lo, s_hi = lo.sum(-1, keepdims=True), hi.sum(-1, keepdims=True)
    return lo - (s_hi - hi + lo) / n, hi - (s_lo - lo + hi) / n


def variance_from_deviations(d_lo: np.ndarray, d_hi: np.ndarray) -> np.ndarray:
    """min over a box of the centred deviations d of (1/n)·Σ d_i², per group (exact): [G, n] → [G]."""
    return min_mean_square(d_lo, d_hi)


def variance_from_lines(
    lower: tuple[np.ndarray, np.ndarray],
    upper: tuple[np.ndarray, np.ndarray],
    box: Interval,
    steps: int = 1000,
) -> np.ndarray:
    """A certified lower bound on min over u ∈ box of (1/n)·Σ_i d_i(u)², per group, from lines
    L_i(u) ≤ d_i(u) ≤ U_i(u) (docs/method.md §13.1).

    Shapes: ``lower`` = (coefficients [G, n, U], constants [G, n]), ``upper`` alike, ``box`` [U] → [G].
    g(u) = (1/n)·Σ_i max(L_i(u), −U_i(u), 0)² ≤ (1/n)·Σ d_i(u)² is convex; projected gradient
    steps find a point u₀, and g(u) ≥ g(u₀) + s·(u − u₀) for a subgradient s at u₀, minimised
    over the box, is the certified value (any u₀ gives a valid one). Each group's problem is
    solved over the coordinates its lines use (a token's lines often read its own patch only).
    """
    (a_lo, c_lo), (a_hi, c_hi) = lower, upper
    used = (np.abs(a_lo).sum(axis=1) + np.abs(a_hi).sum(axis=1)) > 0  # [G, U]
    width = max(int(used.sum(axis=1).max()), 1)
    columns = np.argsort(~used, axis=1, kind="stable")[:, :width]  # the used columns first, then padding
    present = np.take_along_axis(used, columns, axis=1)[:, None, :]
    a_lo = np.where(present, np.take_along_axis(a_lo, columns[:, None, :], axis=2), 0.0)
    a_hi = np.where(present, np.take_along_axis(a_hi, columns[:, None, :], axis=2), 0.0)
    lo, hi = box.lo.reshape(-1)[columns], box.hi.reshape(-1)[columns]  # [G, k]
    return _certified_minimum((a_lo, c_lo), (a_hi, c_hi), lo, hi, steps)


def _certified_minimum(lower, upper, lo: np.ndarray, hi: np.ndarray, steps: int) -> np.ndarray:
    """:func:`variance_from_lines` on per-group coordinates: lines [G, n, k], box lo/hi [G, k]."""
    (a_lo, c_lo), (a_hi, c_hi) = lower, upper
    n = a_lo.shape[1]

    def value_and_slope(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        low = (a_lo @ u[:, :, None])[:, :, 0] + c_lo
        high = -((a_hi @ u[:, :, None])[:, :, 0] + c_hi)
        h = np.maximum(np.maximum(low, high), 0.0)
        weight_lo = np.where((low >= high) & (low > 0), 2.0 * h / n, 0.0)
        weight_hi = np.where((high > low) & (high > 0), -2.0 * h / n, 0.0)
        slope = (weight_lo[:, None, :] @ a_lo)[:, 0] + (weight_hi[:, None, :] @ a_hi)[:, 0]
        return (h * h).mean(axis=1), slope

    def certified(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(certified lower bound of min g, g(u)) per group."""
        value, slope = value_and_slope(u)
        drop = np.minimum(slope * (lo - u), slope * (hi - u)).sum(axis=1)
        return np.maximum(value + drop - 1e-9 * (value + np.abs(drop)) - 1e-300, 0.0), value

    stacked = np.abs(np.concatenate([a_lo, a_hi], axis=1))  # [G, 2n, k]: ‖A‖₂² ≤ ‖A‖₁·‖A‖∞
    lipschitz = (2.0 / n) * stacked.sum(axis=1).max(axis=1) * stacked.sum(axis=2).max(axis=1)
    step = (1.0 / np.maximum(lipschitz, 1e-300))[:, None]
    u = (lo + hi) / 2.0
    previous, momentum = u.copy(), 1.0
    best = certified(previous)[0]
    for done in range(1, steps + 1):
        _, slope = value_and_slope(u)
        nxt = np.clip(u - step * slope, lo, hi)
        following = (1.0 + np.sqrt(1.0 + 4.0 * momentum**2)) / 2.0
        u = np.clip(nxt + ((momentum - 1.0) / following) * (nxt - previous), lo, hi)
        previous, momentum = nxt, following
        if done % 25 == 0 or done == steps:
            bound, value = certified(previous)
            best = np.maximum(best, bound)
            if np.all(value - best <= 1e-3 * value + 1e-12):
                break
    return best


def normalized_from_deviations(
    d_lo: np.ndarray, d_hi: np.ndarray, var_lo: np.ndarray, var_hi: np.ndarray, epsilon: float, rms: bool
) -> Interval:
    """Range of z = d/√(Σd²/n + ε) when each d_i lies in [d_lo_i, d_hi_i] and the variance (RMSNorm: mean
    square) in [var_lo, var_hi]: [G, n] with [G] → [G, n] (docs/method.md §13.1).

    For t = d_i > 0, z_i = t/√((t² + R)/n + ε) with R = Σ_{j≠i} d_j² ≥ max(S_i, n·var_lo − t²),
    S_i = Σ_{j≠i} dist(0, [d_lo_j, d_hi_j])²; that is increasing in t, so its largest value is
    at t = d_hi_i. A non-positive end is divided by the largest σ instead.
    """
    n = d_lo.shape[-1]
    near = np.maximum(d_lo, 0.0) ** 2 + np.minimum(d_hi, 0.0) ** 2
    others = near.sum(-1, keepdims=True) - near
    floor, top = (n * var_lo)[:, None], np.sqrt(var_hi + epsilon)[:, None]

    def extreme(t: np.ndarray) -> np.ndarray:
        moved = np.sqrt(np.maximum(t * t + others, floor) / n + epsilon)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(t * t > 0, t / np.where(moved > 0, moved, 1.0), 0.0)

    z_hi = np.where(d_hi > 0, extreme(d_hi), d_hi / top)
    z_lo = np.where(d_lo < 0, extreme(d_lo), d_lo / top)
    cap = np.sqrt(n) if rms else np.sqrt(max(n - 1, 0))
    return Interval(np.clip(z_lo, -cap, cap), np.clip(z_hi, -cap, cap))


def _divide(num_lo, num_hi, den_lo, den_hi) -> tuple[np.ndarray, np.ndarray]:
    """[num] / [den] with 0 < den_lo ≤ den_hi."""
    quotients = [num_lo / den_lo, num_lo / den_hi, num_hi / den_lo, num_hi / den_hi]
    return np.minimum.reduce(quotients), np.maximum.reduce(quotients)


def normalized_interval(
    lo: np.ndarray, hi: np.ndarray, epsilon: float, rms: bool, allow_zero: bool = False
) -> Interval:
    """Range of z over the box, [G, n] → [G, n] (before γ, β).

    ``allow_zero``: a group without a positive lower bound on σ gets |z| ≤ √(n − 1) (RMSNorm √n) alone.

    Raises:
        ZeroDivisionError: no positive lower bound on σ (ε = 0 and the box allows equal elements).
    """
    n = lo.shape[-1]
    if rms:
        low, high = min_mean_square(lo, hi), max_mean_square(lo, hi)
        num_lo, num_hi, cap = lo, hi, np.sqrt(n)
    else:
        low, high = min_variance(lo, hi), max_variance(lo, hi)
        (num_lo, num_hi), cap = deviation_interval(lo, hi), np.sqrt(max(n - 1, 0))
    sigma_lo, sigma_hi = np.sqrt(low + epsilon)[:, None], np.sqrt(high + epsilon)[:, None]
    if not np.all(sigma_lo > 0):
        if not allow_zero:
            raise ZeroDivisionError("no positive lower bound on the standard deviation")
        positive = sigma_lo > 0
        z_lo, z_hi = _divide(num_lo, num_hi, np.where(positive, sigma_lo, 1.0), np.where(positive, sigma_hi, 1.0))
        z_lo, z_hi = np.where(positive, z_lo, -cap), np.where(positive, z_hi, cap)
        return Interval(np.clip(z_lo, -cap, cap), np.clip(z_hi, -cap, cap))
    z_lo, z_hi = _divide(num_lo, num_hi, sigma_lo, sigma_hi)
    return Interval(np.clip(z_lo, -cap, cap), np.clip(z_hi, -cap, cap))


def sigma_floor(lo: np.ndarray, hi: np.ndarray, epsilon: float, rms: bool) -> np.ndarray:
    """A lower bound on σ (RMSNorm: r) over the box, per group: [G, n] → [G] (docs/method.md §13.1)."""
    return np.sqrt((min_mean_square(lo, hi) if rms else min_variance(lo, hi)) + epsilon)


def normalization_adjoint(
    cot: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    gamma: np.ndarray,
    epsilon: float,
    rms: bool,
    clean_sigma: np.ndarray | None = None,
) -> np.ndarray:
    """Absolute adjoint of x ↦ γ·z(x) over the box [lo, hi]: [K, G, n] → [K, G, n].

    ``gamma`` [n]; the box is the faulty one of the input (docs/method.md §13.1).
    ``clean_sigma`` [G], a lower bound on σ at the *clean* input of each group, adds
    the rule that divides by it instead of the faulty box's σ: each output element
    keeps the one of the two rows with the smaller sum (both bound |Δz_i|).

    Raises:
        ZeroDivisionError: no positive lower bound on σ in the faulty box and none given for the clean input.
    """
    n = lo.shape[-1]
    z = normalized_interval(lo, hi, epsilon, rms, allow_zero=clean_sigma is not None).abs_max()
    c = cot * np.abs(gamma)
    sigma = sigma_floor(lo, hi, epsilon, rms)[:, None]
    if clean_sigma is None:
        if not np.all(sigma > 0):
            raise ZeroDivisionError("no positive lower bound on the standard deviation")
        return (_centring(c, rms) + (z / n) * (c * z).sum(-1, keepdims=True)) / sigma
    floor = np.asarray(clean_sigma, np.float64)[:, None]
    if not np.all(floor > 0):
        raise ZeroDivisionError("no positive lower bound on the standard deviation")
    spread = 1.0 if rms else 2.0 * (n - 1) / n  # Σ_j |δ_ij − 1/n| (RMSNorm: Σ_j δ_ij)
    safe = np.where(sigma > 0, sigma, 1.0)
    faulty_rows = np.where(sigma > 0, (spread + z * z.sum(-1, keepdims=True) / n) / safe, np.inf)
    use_clean = (spread + np.sqrt(n) * z) / floor < faulty_rows  # [G, n], per output element
    c_clean, c_faulty = np.where(use_clean, c, 0.0), np.where(use_clean, 0.0, c)
    result = (_centring(c_clean, rms) + (c_clean * z).sum(-1, keepdims=True) / np.sqrt(n)) / floor
    faulty = (_centring(c_faulty, rms) + (z / n) * (c_faulty * z).sum(-1, keepdims=True)) / safe
    return result + np.where(sigma > 0, faulty, 0.0)


def _centring(c: np.ndarray, rms: bool) -> np.ndarray:
    """Σ_i c_i·|δ_ij − 1/n| over the last axis (RMSNorm: c itself): the adjoint of |I − 11ᵀ/n|."""
    if rms:
        return c
    n = c.shape[-1]
    return c * abs(1.0 - 2.0 / n) + c.sum(-1, keepdims=True) / n


@register
class Normalization(OpRule):
    """ONNX LayerNormalization and RMSNormalization with constant scale and bias."""

    op_types: ClassVar[tuple[str, ...]] = ("LayerNormalization", "RMSNormalization")
    attributes = {
        "LayerNormalization": {"axis": INT, "epsilon": FLOAT, "stash_type": INT},
        "RMSNormalization": {"axis": INT, "epsilon": FLOAT, "stash_type": INT},
    }
    #: Its deviation bound reads the faulty ranges of its input.
    range_dependent = True

    def _axis(self, node, shape) -> int:
        axes = node.attr("axes")
        if axes is None:
            return node.attr("axis", -1) % len(shape)
        rank = len(shape)
        normalized = sorted(a % rank for a in axes)
        if normalized != list(range(rank - len(normalized), rank)):
            raise unsupported(node, f"normalizing over axes {list(axes)} that are not the trailing ones")
        return normalized[0]

    def _groups(self, node, shape) -> tuple[int, int]:
        axis = self._axis(node, shape)
        if axis == 0:
            raise unsupported(node, "normalizing over the batch axis is not supported")
        return int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))

    def _affine(self, node, args, shape) -> tuple[np.ndarray, np.ndarray]:
        if any(isinstance(a, Interval) for a in args[1:]):
            raise unsupported(node, "the scale and bias must be constants")
        tail = tuple(shape[self._axis(node, shape) :])
        scale = args[1] if len(args) > 1 and args[1] is not None else np.ones(tail)
        beta = args[2] if len(args) > 2 and args[2] is not None else np.zeros(tail)
        return _over_tail(scale, tail), _over_tail(beta, tail)

    def _rms(self, node) -> bool:
        return node.op_type in ("RMSNormalization", "RMSNormPattern")

    def interval(self, node, args):
        x = args[0]
        if not isinstance(x, Interval):
            raise unsupported(node, "the normalized input must be the variable operand")
        if len(node.outputs) > 1 and any(node.outputs[1:]):
            raise unsupported(node, "the Mean/InvStdDev outputs are not supported")
        groups, n = self._groups(node, x.shape)
        gamma, beta = self._affine(node, args, x.shape)
        if float(node.attr("epsilon", 1e-5)) < 0:  # var + ε < var: |z| past √n, what every rule here assumes
            raise unsupported(node, f"a negative epsilon ({node.attr('epsilon'):g}) is not supported")
        try:
            z = normalized_interval(
                x.lo.reshape(groups, n), x.hi.reshape(groups, n), node.attr("epsilon", 1e-5), self._rms(node)
            )
        except ZeroDivisionError:
            raise unsupported(node, _NO_SIGMA) from None
        a, b = z.lo * gamma + beta, z.hi * gamma + beta
        lo, hi = np.minimum(a, b).reshape(x.shape), np.maximum(a, b).reshape(x.shape)
        if node.op_type != "InstanceNormalization" and self._axis(node, x.shape) == len(x.shape) - 1:
            return [NormalizedRows(lo, hi, gamma=gamma, beta=beta, centred=not self._rms(node))]
        return [Interval(lo, hi)]

    def float32_mean_error(self, node, x: Interval) -> float:
        """An estimate of how far onnxruntime's float32 kernel may put an output element from the exact one: the mean
        rounded to float32 (about u·|μ|) over the smallest σ of the box, u·max|x|/σ_floor (docs/method.md §13.1).
        The rules here hold in exact arithmetic; where this reaches 10⁻² they may not cover what onnxruntime
        computes (an attack helper measured 2.0 where the exact |z| is at most √3, with |μ| ≈ 2·10⁶)."""
        groups, n = self._groups(node, x.shape)
        lo, hi = x.lo.reshape(groups, n), x.hi.reshape(groups, n)
        floor = sigma_floor(lo, hi, float(node.attr("epsilon", 1e-5)), self._rms(node))
        largest = np.maximum(np.abs(lo), np.abs(hi)).max(axis=1)
        return float(np.max(2.0**-24 * largest / floor)) if floor.size else 0.0

    def backward(self, node, cot, ctx):
        name = node.inputs[0]
        shape = ctx.shape(name)
        box = ctx.faulty[name]
        groups, n = self._groups(node, shape)
        args = [None] + [ctx.constants.get(v) if v else None for v in node.inputs[1:]]
        gamma, _ = self._affine(node, args, shape)
        k = cot[0].shape[0]
        epsilon, rms = node.attr("epsilon", 1e-5), self._rms(node)
        clean = ctx.clean[name]
        floor = sigma_floor(clean.lo.reshape(groups, n), clean.hi.reshape(groups, n), epsilon, rms)
        found = ctx.floors.get(node.name)
        if found is not None and found[0] is clean:  # ranges computed again (scaled weights) drop it
            floor = np.maximum(floor, found[1])
        try:
            grad = normalization_adjoint(
                cot[0].reshape(k, groups, n),
                box.lo.reshape(groups, n),
                box.hi.reshape(groups, n),
                gamma,
                epsilon,
                rms,
                floor,
            )
        except ZeroDivisionError:
            raise unsupported(node, _NO_SIGMA + " in the faulty network") from None
        return [grad.reshape((k,) + tuple(shape))] + [None] * (len(node.inputs) - 1)

    def output_groups(self, node, shape, constants: dict) -> tuple[int, np.ndarray]:
        """(G, |γ| broadcast to [G, n]): the output of shape ``shape`` is G groups of n normalized elements, and
        for *any* two inputs the change of a group is |γ|⊙|z̃ − z| elementwise with ‖z̃ − z‖₂ ≤ 2√n, since
        ‖z‖₂² = n·var/(var + ε) ≤ n (RMSNorm: n·mean(x²)/(mean(x²) + ε)) (docs/method.md §4.1, "Cuts
        at a normalization's output"). Only for a node whose ranges were computed (its scale is a constant)."""
        groups, _ = self._groups(node, shape)
        args = [None] + [constants.get(v) if v else None for v in node.inputs[1:]]
        gamma, _ = self._affine(node, args, shape)
        return groups, np.abs(gamma)

    def paper(self, node, errs, ctx):
        ones = np.ones((1,) + tuple(ctx.shape(node.outputs[0])))
        return [errs[0] * float(self.backward(node, [ones], ctx)[0].max())]


def _over_tail(constant, tail: tuple[int, ...]) -> np.ndarray:
    """A scale or bias as one number per normalized element, flat: broadcast to the normalized shape ``tail`` after
    its leading axes of length 1 are dropped (onnxruntime takes γ [1, n] for an input [N, n] as γ [n]).

    Raises:
        ValueError: it does not broadcast to ``tail`` (reported as incompatible input shapes)."""
    array = np.asarray(constant, np.float64)
    while array.ndim > len(tail) and array.shape[0] == 1:
        array = array[0]
    return np.broadcast_to(array, tail).reshape(-1)


@register
class NormalizationPattern(Normalization):
    """The synthetic ops for a decomposed LayerNorm / RMSNorm (γ = 1, β = 0; attributes axes, epsilon)."""

    op_types = ("LayerNormPattern", "RMSNormPattern")
    domain = "robaudit"
    attributes = {}

    def shown(self, node):
        return f"{node.op_type.removesuffix('Pattern')}alization (written out op by op)"


@register
class InstanceNormalization(Normalization):
    """ONNX InstanceNormalization: each channel of each sample normalized over its spatial positions, with a
    constant scale and bias per channel. The groups of §13.1 are then the channels (contiguous in the
    value's C-order), and γ, β are constant within a group instead of across groups (docs/method.md §13.1).
    PyTorch's ``GroupNorm`` exports as this op between two reshapes (one group per channel group)."""

    op_types = ("InstanceNormalization",)
    attributes = {"InstanceNormalization": {"consumed_inputs": INTS, "epsilon": FLOAT}}

    def _axis(self, node, shape) -> int:
        if len(shape) < 3:
            raise unsupported(node, f"an input of rank {len(shape)} (it needs [N, C, spatial…])")
        return 2

    def _affine(self, node, args, shape) -> tuple[np.ndarray, np.ndarray]:
        """γ, β per group ([N·C, 1], broadcast over the group's elements)."""
        if any(isinstance(a, Interval) for a in args[1:3]) or any(a is None for a in args[1:3]):
            raise unsupported(node, "the scale and bias must be constants")
        batch, channels = int(shape[0]), int(shape[1])
        per_group = [np.broadcast_to(np.asarray(a, np.float64).reshape(-1), (channels,)) for a in args[1:3]]
        gamma, beta = (np.tile(a, batch).reshape(-1, 1) for a in per_group)
        return gamma, beta

    def _rms(self, node) -> bool:
        return False


#: Every op type the rules of this module bound (normalizations read a σ floor at the clean input, §13.1).
NORMALIZATION_OPS = Normalization.op_types + NormalizationPattern.op_types + InstanceNormalization.op_types


def recognize_normalizations(nodes: list[Node], initializers: dict) -> list[Node]:
    """Fuse decomposed normalizations (exporters before opset 17) into one node each (docs/method.md §13.1).

    LayerNorm: d = x − ReduceMean(x); d / Sqrt(ReduceMean(d²) + ε). RMSNorm: x / Sqrt(ReduceMean(x²) + ε),
    or x · (1 / Sqrt(…)). d² is ``Pow(d, 2)`` or ``Mul(d, d)``; the reductions keep their axes.
    """
    constants = literal_constants(nodes, initializers)
    producer = {out: n for n in nodes for out in n.outputs}
    fused: dict[str, Node] = {}
    members: dict[str, set[str]] = {}
    for node in nodes:
        if node.op_type in ("Div", "Mul") and len(node.inputs) == 2:
            found = _match_normalization(node, producer, constants)
            if found is not None:
                fused[node.name], pattern = found
                members[node.name] = {n.name for n in pattern}
    removed = _removable(nodes, fused, members)
    return [fused.get(n.name, n) for n in nodes if n.name not in removed]


def _match_normalization(node: Node, producer: dict, constants: dict) -> tuple[Node, list[Node]] | None:
    for x, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        if node.op_type == "Div" and x != node.inputs[0]:
            continue
        scale = other if node.op_type == "Div" else _reciprocal_of(other, producer, constants)
        stat = _root_mean_square(scale, producer, constants) if scale else None
        if stat is None:
            continue
        squared, axes, epsilon, inner = stat
        if squared != x:
            continue
        if node.op_type == "Mul":
            inner = inner + [producer[other]]
        centred = _centred(x, axes, producer, constants)
        if centred is not None:
            source, pattern = centred
            attrs = {"axes": axes, "epsilon": epsilon}
            op = "LayerNormPattern"
        else:
            source, pattern, attrs, op = x, [], {"axes": axes, "epsilon": epsilon}, "RMSNormPattern"
        made = Node(node.name, op, "robaudit", [source], list(node.outputs), attrs, None, dict(node.metadata))
        return made, inner + pattern
    return None


def _reciprocal_of(value: str, producer: dict, constants: dict) -> str | None:
    """s when ``value`` is 1 / s (``Div(1, s)`` or ``Reciprocal(s)``)."""
    node = producer.get(value)
    if node is not None and node.op_type == "Reciprocal":
        return node.inputs[0]
    if node is not None and node.op_type == "Div" and _scalar(constants, node.inputs[0]) == 1.0:
        return node.inputs[1]
    return None


def _reduce_axes(node: Node | None, constants: dict) -> list[int] | None:
    """The axes of a ReduceMean that keeps its dimensions, or None."""
    if node is None or node.op_type != "ReduceMean" or not node.attr("keepdims", 1):
        return None
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] in constants:
        axes = [int(a) for a in np.asarray(constants[node.inputs[1]]).reshape(-1)]
    return list(axes) if axes else None


def _root_mean_square(value: str, producer: dict, constants: dict) -> tuple[str, list[int], float, list[Node]] | None:
    """(v, axes, ε, nodes) when ``value`` is Sqrt(ReduceMean(v², axes) + ε) with ε ≥ 0."""
    root = producer.get(value)
    if root is None or root.op_type != "Sqrt":
        return None
    add = producer.get(root.inputs[0])
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    eps_name = next((v for v in add.inputs if _scalar(constants, v) is not None), None)
    if eps_name is None:
        return None
    epsilon = _scalar(constants, eps_name)
    mean = producer.get(next(v for v in add.inputs if v != eps_name))
    axes = _reduce_axes(mean, constants)
    if mean is None or axes is None or epsilon is None or not epsilon >= 0:
        return None
    square = producer.get(mean.inputs[0])
    if square is None:
        return None
    if square.op_type == "Pow" and _scalar(constants, square.inputs[1]) == 2.0:
        squared = square.inputs[0]
    elif square.op_type == "Mul" and square.inputs[0] == square.inputs[1]:
        squared = square.inputs[0]
    else:
        return None
    return squared, axes, float(epsilon), [root, add, mean, square]


def _centred(value: str, axes: list[int], producer: dict, constants: dict) -> tuple[str, list[Node]] | None:
    """(x, nodes) when ``value`` is x − ReduceMean(x, axes)."""
    sub = producer.get(value)
    if sub is None or sub.op_type != "Sub":
        return None
    mean = producer.get(sub.inputs[1])
    if mean is None or mean.inputs[0] != sub.inputs[0] or _reduce_axes(mean, constants) != axes:
        return None
    return sub.inputs[0], [sub, mean]


_NO_SIGMA = "no positive lower bound on the standard deviation can be shown from the input ranges and ε"
