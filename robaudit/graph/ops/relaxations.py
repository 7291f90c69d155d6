"""Linear relaxations of element-wise activations over an interval (docs/method.md §5.2).

For a pre-activation interval [l, u] (per element) a relaxation gives two lines with

    lower_slope·x + lower_icpt ≤ f(x) ≤ upper_slope·x + upper_icpt   for every x in [l, u].

ReLU and LeakyReLU get the triangle relaxation with the adaptive lower line (CROWN);
S-shaped activations (Sigmoid, Tanh, Erf, Softsign) a chord and a tangent on a
one-signed interval and two parallel lines of the smallest endpoint slope across 0;
piecewise activations (HardSwish, HardSigmoid, Clip) the chord shifted down and up by
the extremes of f − chord, found at the interval ends, the breakpoints and the
stationary points. Any other activation gets constant lines from its interval.

:func:`lower_slope_choices` lists other sound lower lines of the ReLU family (the lines
through 0 with any slope between the two pieces' slopes) for the optimised back-substitution
of docs/method.md §5.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops.activations import Clip
from robaudit.graph.ops.base import Interval, lookup

_ERF = np.vectorize(math.erf, otypes=[np.float64])
#: Intervals narrower than this get constant lines (slopes of a near-point are ill-conditioned).
_NARROW = 1e-9


@dataclass
class LinearBounds:
    """Per-element lines below and above f on [l, u] (arrays shaped like the interval)."""

    lower_slope: np.ndarray
    lower_icpt: np.ndarray
    upper_slope: np.ndarray
    upper_icpt: np.ndarray


def constant_bounds(lo: np.ndarray, hi: np.ndarray) -> LinearBounds:
    """lo ≤ f ≤ hi as lines of slope 0 (any op with a sound interval)."""
    zero = np.zeros_like(lo)
    return LinearBounds(zero, lo, zero.copy(), hi)


def _relu_like(alpha: np.ndarray | float, lo: np.ndarray, hi: np.ndarray) -> LinearBounds:
    """f(x) = x (x ≥ 0), α·x (x < 0): chord on the concave/convex side, adaptive line through 0 on the other."""
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), lo.shape)
    straddle = (lo < 0) & (hi > 0)
    stable = np.where(hi <= 0, alpha, 1.0)
    width = np.where(straddle, hi - lo, 1.0)
    chord = np.where(straddle, (hi - alpha * lo) / width, stable)
    chord_icpt = np.where(straddle, alpha * lo - chord * lo, 0.0)
    # the line through 0 with the slope of the longer side is the better adaptive choice
    adaptive = np.where(straddle, np.where(hi >= -lo, 1.0, alpha), stable)
    convex = alpha <= 1.0  # max(x, αx): chord above, adaptive below; min(x, αx) the other way round
    zero = np.zeros_like(lo)
    return LinearBounds(
        np.where(convex, adaptive, chord),
        np.where(convex, zero, chord_icpt),
        np.where(convex, chord, adaptive),
        np.where(convex, chord_icpt, zero),
    )


def lower_slope_choices(node: Node, lo: np.ndarray, hi: np.ndarray, constants: dict) -> np.ndarray | None:
    """Sound lower slopes of a ReLU / LeakyReLU / PReLU on [lo, hi]: array [C, *lo.shape], choice 0 the adaptive
    slope of :func:`linear_bounds` (docs/method.md §5.2); None for any other op or when no element straddles 0.

    Each choice goes with the lower intercept of :func:`linear_bounds` unchanged. Where f(x) = max(x, αx)
    (α ≤ 1) and lo < 0 < hi, every line s·x with α ≤ s ≤ 1 lies below f on the whole real line (s·x ≤ x for
    x ≥ 0 and s·x ≤ αx for x < 0), and that line's intercept is 0: the choices there are α, 1 and the chord
    slope (hi − α·lo)/(hi − lo), which lies between them. Everywhere else (stable elements, concave PReLU
    slopes > 1, whose lower line is the chord) every choice is the adaptive slope itself.
    """
    if node.op_type == "Relu":
        alpha = np.zeros_like(lo)
    elif node.op_type == "LeakyRelu":
        alpha = np.full_like(lo, float(node.attr("alpha", 0.01)))
    elif node.op_type == "PRelu" and node.inputs[1] in constants:
        alpha = np.broadcast_to(np.asarray(constants[node.inputs[1]], np.float64), lo.shape)
    else:
        return None
    free = (lo < 0) & (hi > 0) & (alpha <= 1.0)
    if not free.any():
        return None
    adaptive = _relu_like(alpha, lo, hi).lower_slope
    chord = (hi - alpha * lo) / np.where(free, hi - lo, 1.0)
    choices = [adaptive] + [np.where(free, s, adaptive) for s in (alpha, np.ones_like(lo), chord)]
    return np.stack(choices)


def _s_shaped(f, df, lo: np.ndarray, hi: np.ndarray) -> LinearBounds:
    """f increasing, convex below 0 and concave above, f' largest at 0 (sigmoid, tanh, erf, softsign).

    u ≤ 0: chord above, tangent at the midpoint below; l ≥ 0: the reverse. Across 0:
    k = min(f'(l), f'(u)) ≤ f' on [l, u], so f − k·x increases and f(l) + k(x − l) ≤ f(x) ≤ f(u) + k(x − u).
    """
    narrow = hi - lo < _NARROW
    width = np.where(narrow, 1.0, hi - lo)
    f_lo, f_hi = f(lo), f(hi)
    chord = (f_hi - f_lo) / width
    chord_icpt = f_lo - chord * lo
    mid = (lo + hi) / 2.0
    tangent, tangent_icpt = df(mid), f(mid) - df(mid) * mid
    k = np.minimum(df(lo), df(hi))
    convex, concave = hi <= 0, lo >= 0
    lower_slope = np.where(convex, tangent, np.where(concave, chord, k))
    lower_icpt = np.where(convex, tangent_icpt, np.where(concave, chord_icpt, f_lo - k * lo))
    upper_slope = np.where(convex, chord, np.where(concave, tangent, k))
    upper_icpt = np.where(convex, chord_icpt, np.where(concave, tangent_icpt, f_hi - k * hi))
    zero = np.zeros_like(lo)
    return LinearBounds(
        np.where(narrow, zero, lower_slope),
        np.where(narrow, f_lo, lower_icpt),
        np.where(narrow, zero, upper_slope),
        np.where(narrow, f_hi, upper_icpt),
    )


def _shifted_chord(f, lo: np.ndarray, hi: np.ndarray, candidates) -> LinearBounds:
    """Chord slope k and lines k·x + min/max of f − k·x over ``candidates(k)`` ∪ {l, u}.

    Sound when the extremes of f − k·x on [l, u] lie among the candidates: true for
    piecewise linear or piecewise convex/concave-quadratic f given its breakpoints and
    the stationary points of each quadratic piece.
    """
    narrow = hi - lo < _NARROW
    width = np.where(narrow, 1.0, hi - lo)
    k = np.where(narrow, 0.0, (f(hi) - f(lo)) / width)
    low = np.minimum(f(lo) - k * lo, f(hi) - k * hi)
    high = np.maximum(f(lo) - k * lo, f(hi) - k * hi)
    for point in candidates(k):
        point = np.broadcast_to(point, lo.shape)
        inside = (point > lo) & (point < hi)
        value = np.where(inside, f(point) - k * point, low)
        low = np.minimum(low, value)
        high = np.maximum(high, np.where(inside, value, high))
    return LinearBounds(k, low, k.copy(), high)


def _hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)


def linear_bounds(node: Node, lo: np.ndarray, hi: np.ndarray, constants: dict) -> LinearBounds:
    """Lines below and above the activation ``node`` on [lo, hi] (docs/method.md §5.2).

    ``constants`` gives the node's constant operands (PRelu slopes, Clip bounds). An
    op without a rule here gets constant lines from its own interval rule.
    """
    op, rule = node.op_type, lookup(node)
    if op == "GatedActivation" and node.attr("template") == "HardSwish":
        # c·HardSwish (c > 0): the HardSwish lines scaled by c
        plain = Node(node.name, "HardSwish", "", node.inputs, node.outputs)
        lines, c = linear_bounds(plain, lo, hi, constants), node.attr("scale")
        return LinearBounds(c * lines.lower_slope, c * lines.lower_icpt, c * lines.upper_slope, c * lines.upper_icpt)
    if op == "Relu":
        return _relu_like(0.0, lo, hi)
    if op == "LeakyRelu":
        return _relu_like(float(node.attr("alpha", 0.01)), lo, hi)
    if op == "PRelu" and node.inputs[1] in constants:
        slope = np.broadcast_to(np.asarray(constants[node.inputs[1]], np.float64), lo.shape)
        return _relu_like(slope, lo, hi)
    if op == "Neg":
        one = np.ones_like(lo)
        return LinearBounds(-one, 0 * one, -one, 0 * one)
    if op == "Sigmoid":
        sig = lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))  # noqa: E731
        return _s_shaped(sig, lambda x: sig(x) * (1.0 - sig(x)), lo, hi)
    if op == "Tanh":
        return _s_shaped(np.tanh, lambda x: 1.0 - np.tanh(x) ** 2, lo, hi)
    if op == "Erf":
        return _s_shaped(_ERF, lambda x: 2.0 / math.sqrt(math.pi) * np.exp(-(x**2)), lo, hi)
    if op == "Softsign":
        return _s_shaped(lambda x: x / (1.0 + np.abs(x)), lambda x: 1.0 / (1.0 + np.abs(x)) ** 2, lo, hi)
    if op == "HardSwish":
        # pieces 0 | x(x+3)/6 | x with breakpoints ±3; x(x+3)/6 − kx is stationary at 3k − 1.5
        return _shifted_chord(
            _hardswish, lo, hi, lambda k: [np.full_like(lo, -3.0), np.full_like(lo, 3.0), 3 * k - 1.5]
        )
    if op == "HardSigmoid":
        alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
        f = lambda x: np.clip(alpha * x + beta, 0.0, 1.0)  # noqa: E731
        breaks = [] if alpha == 0 else [np.full_like(lo, -beta / alpha), np.full_like(lo, (1 - beta) / alpha)]
        return _shifted_chord(f, lo, hi, lambda k: breaks)
    if isinstance(rule, Clip):
        args = [None] + [constants.get(v) if v else None for v in node.inputs[1:]]
        low, high = rule._bounds(node, args)
        f = lambda x: np.clip(x, low, high)  # noqa: E731
        breaks = [np.full_like(lo, b) for b in (low, high) if np.isfinite(b)]
        return _shifted_chord(f, lo, hi, lambda k: breaks)
    if rule is not None:
        args = [Interval(lo, hi)] + [constants.get(v) if v else None for v in node.inputs[1:]]
        out = rule.interval(node, args)[0]
        return constant_bounds(out.lo, out.hi)
    raise ValueError(f"no rule for {node.op_type}")
