"""Local response normalization (``LRN``, AlexNet / ZFNet / Inception v1).

y_c = x_c / D_c^β with D_c = bias + (α/size)·Σ_{j ∈ W(c)} x_j², W(c) the ``size`` channels
around c. Its Jacobian is ∂y_i/∂x_j = [i = j]·D_i^(−β) − (2αβ/size)·x_i·x_j·D_i^(−β−1) for
j ∈ W(i), so over a box where |x| ≤ M and D ≥ D⁻ > 0 (docs/method.md §3.2):

    |∂y_i/∂x_j| ≤ [i = j]·(D⁻_i)^(−β) + (2αβ/size)·M_i·M_j·(D⁻_i)^(−β−1)

and the mean value theorem over the faulty box bounds |Δy_i| by that matrix times |Δx|.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from robaudit.graph.ops.base import FLOAT, INT, Interval, OpRule, PropagationContext, register, unsupported

if TYPE_CHECKING:
    from robaudit.graph.onnx_graph import Node


def lrn_parameters(node: Node) -> tuple[float, float, float, int]:
    """(alpha, beta, bias, size); refuse forms whose Jacobian bound does not hold (α, β < 0, bias ≤ 0)."""
    alpha, beta = float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75))
    bias, size = float(node.attr("bias", 1.0)), node.attr("size")
    if size is None or int(size) < 1:
        raise unsupported(node, "LRN needs a positive 'size' attribute")
    if alpha < 0 or beta < 0 or bias <= 0:
        raise unsupported(node, f"LRN with alpha={alpha:g}, beta={beta:g}, bias={bias:g} (needs α, β ≥ 0, bias > 0)")
    return alpha, beta, bias, int(size)


def window_sum(values: np.ndarray, axis: int, before: int, after: int) -> np.ndarray:
    """out[c] = Σ values[c − before .. c + after] along ``axis`` (clipped to the axis)."""
    moved = np.moveaxis(values, axis, 0)
    padded = np.concatenate([np.zeros((1,) + moved.shape[1:]), np.cumsum(moved, axis=0)])
    count = moved.shape[0]
    index = np.arange(count)
    upper = np.minimum(index + after + 1, count)
    lower = np.maximum(index - before, 0)
    return np.moveaxis(padded[upper] - padded[lower], 0, axis)


def _offsets(size: int) -> tuple[int, int]:
    """Channels before and after c in W(c): ⌊(size−1)/2⌋ and ⌈(size−1)/2⌉ (the ONNX definition)."""
    return (size - 1) // 2, size // 2


def square_range(box: Interval) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise [min x², max x²] over a box."""
    low = np.where((box.lo <= 0) & (box.hi >= 0), 0.0, np.minimum(box.lo**2, box.hi**2))
    return low, np.maximum(box.lo**2, box.hi**2)


def denominator_range(node: Node, box: Interval) -> tuple[np.ndarray, np.ndarray]:
    """[D⁻, D⁺] per element: bias + α/size times the window sums of min/max x²."""
    alpha, _, bias, size = lrn_parameters(node)
    before, after = _offsets(size)
    low, high = square_range(box)
    return (
        bias + alpha / size * window_sum(low, 1, before, after),
        bias + alpha / size * window_sum(high, 1, before, after),
    )


def lrn(node: Node, x: np.ndarray) -> np.ndarray:
    """LRN on a numpy array (for tests and the point interval)."""
    alpha, beta, bias, size = lrn_parameters(node)
    before, after = _offsets(size)
    return x / (bias + alpha / size * window_sum(x**2, 1, before, after)) ** beta


def lrn_adjoint(node: Node, cot: np.ndarray, box: Interval) -> np.ndarray:
    """Σ_i cot_i·sup|∂y_i/∂x_j| for every j; ``cot`` is [K, *shape], ``box`` the faulty input range."""
    alpha, beta, _, size = lrn_parameters(node)
    before, after = _offsets(size)
    d_low, _ = denominator_range(node, box)
    bound = box.abs_max()
    diagonal = cot * d_low ** (-beta)
    weighted = cot * (bound * d_low ** (-beta - 1.0))
    cross = (2.0 * alpha * beta / size) * bound * window_sum(weighted, 2, after, before)
    return diagonal + cross


@register
class LRNRule(OpRule):
    """``LRN``: interval by the ranges of numerator and denominator; slopes by the Jacobian bound."""

    op_types = ("LRN",)
    attributes = {"LRN": {"alpha": FLOAT, "beta": FLOAT, "bias": FLOAT, "size": INT}}
    range_dependent = True

    def interval(self, node, args):
        x = args[0]
        if not isinstance(x, Interval) or x.lo.ndim < 3:
            raise unsupported(node, "LRN needs a variable input of rank ≥ 3 ([N, C, ...])")
        _, beta, _, _ = lrn_parameters(node)
        d_low, d_high = denominator_range(node, x)
        small, large = d_high ** (-beta), d_low ** (-beta)  # D^(−β) ∈ [small, large], both > 0
        return [Interval(np.minimum(x.lo * small, x.lo * large), np.maximum(x.hi * small, x.hi * large))]

    def backward(self, node, cot, ctx: PropagationContext):
        return [lrn_adjoint(node, cot[0], ctx.faulty[node.inputs[0]])]

    def paper(self, node, errs, ctx: PropagationContext):
        box = ctx.faulty[node.inputs[0]]
        columns = lrn_adjoint(node, np.ones((1,) + box.shape), box)
        return [errs[0] * float(columns.max(initial=0.0))]
