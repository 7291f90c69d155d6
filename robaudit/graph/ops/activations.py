"""Element-wise activations: global Lipschitz constants (docs/method.md §3.3 table), ranges, intervals."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from robaudit.graph.ops.base import FLOAT, INTS, STRING, Interval, OpRule, Role, register, unsupported

_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh_slope(x: np.ndarray) -> np.ndarray:
    t = np.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


def _mish_slope(x: np.ndarray) -> np.ndarray:
    t = np.tanh(_softplus(x))
    return t + x * (1.0 - t * t) * _sigmoid(x)


#: f′ of the smooth non-monotone activations (closed forms), by template name.
DERIVATIVES = {
    "SiLU": lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))),
    "Gelu": lambda x: 0.5 * (1.0 + _ERF(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi),
    "GeluTanh": _gelu_tanh_slope,
    "Mish": _mish_slope,
    "Softsign": lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
}

#: Relative and absolute slack on slopes found numerically (turning points located to ~1e-7).
_SLOPE_SLACK = (1e-9, 1e-12)


def _turning_points(derivative) -> list[tuple[float, float]]:
    """(x, |f′(x)|) at each local extremum of f′ on [−5, 5] (outside, f′ is monotone for these f:
    f″ keeps one sign there).

    A grid of step 10⁻³ finds them; a grid of step 10⁻⁶ around each refines where and how large.
    """
    grid = np.linspace(-5.0, 5.0, 10001)
    values = derivative(grid)
    step = np.diff(values)
    turns = np.nonzero(np.sign(step[:-1]) != np.sign(step[1:]))[0] + 1
    points = []
    for index in turns:
        fine = np.linspace(grid[index] - 2e-3, grid[index] + 2e-3, 4001)
        local = np.abs(derivative(fine))
        best = int(np.argmax(local))
        points.append((float(fine[best]), float(local[best])))
    return points


_TURNS: dict[str, list[tuple[float, float]]] = {}


def template_slope(name: str, lo, hi) -> np.ndarray:
    """sup |f′| over [lo, hi] for a template f: f′ is monotone between its turning points, so the
    largest |f′| is at an end or at a turning point inside (docs/method.md §4.3)."""
    if name == "HardSwish":
        return hardswish_slope(lo, hi)
    derivative = DERIVATIVES[name]
    if name not in _TURNS:
        _TURNS[name] = _turning_points(derivative)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    slope = np.maximum(np.abs(derivative(lo)), np.abs(derivative(hi)))
    for point, value in _TURNS[name]:
        slope = np.where((lo <= point) & (point <= hi), np.maximum(slope, value), slope)
    relative, absolute = _SLOPE_SLACK
    return slope * (1.0 + relative) + absolute


def hardswish_slope(lo, hi) -> np.ndarray:
    """HardSwish′: 0 below −3, 1 above 3, x/3 + 1/2 in between (linear, so its extremes are at the ends)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    a, b = np.clip(lo, -3.0, 3.0), np.clip(hi, -3.0, 3.0)
    middle = _on((hi > -3.0) & (lo < 3.0), np.maximum(np.abs(a / 3.0 + 0.5), np.abs(b / 3.0 + 0.5)))
    return np.maximum(middle, _on(hi > 3.0, 1.0))


def _closest_to(point: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The point of [lo, hi] nearest ``point`` (where a unimodal |f′| peaking there is largest)."""
    return np.clip(point, lo, hi)


def _on(mask: np.ndarray, value) -> np.ndarray:
    return np.where(mask, value, 0.0)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """GELU, erf form: x·Φ(x)."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def hardswish(x: np.ndarray) -> np.ndarray:
    """x·clip(x/6 + 1/2, 0, 1)."""
    return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)


def mish(x: np.ndarray) -> np.ndarray:
    """x·tanh(softplus(x))."""
    return x * np.tanh(_softplus(x))


def softsign(x: np.ndarray) -> np.ndarray:
    """x / (1 + |x|)."""
    return x / (1.0 + np.abs(x))


class Activation(OpRule):
    """An element-wise function f with |f(u) − f(v)| ≤ K·|u − v| (docs/method.md §3.3).

    ``K`` is the global Lipschitz constant; ``minimum_at`` is where a non-monotone f
    (decreasing then increasing) has its minimum; intervals then take f(minimum_at)
    when it lies inside. Rules whose K or minimum depend on the node override
    :meth:`lipschitz` / :meth:`minimum`.
    """

    role = Role.ACTIVATION
    K: ClassVar[float] = 1.0
    minimum_at: ClassVar[float | None] = None

    def lipschitz(self, node) -> float:
        """Global Lipschitz constant K."""
        return self.K

    def minimum(self, node) -> float | None:
        """Where f has its one minimum (non-monotone f), or None for a monotone f."""
        return self.minimum_at

    def output_range(self, node) -> tuple[float, float] | None:
        """The bounded range of f, or None when f is unbounded."""
        return None

    def function(self, node, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def max_slope(self, node, lo: np.ndarray, hi: np.ndarray, constants: dict | None = None) -> np.ndarray:
        """sup |f′| over [lo, hi], elementwise (docs/method.md §4.3): |f(u) − f(v)| ≤ it·|u − v| for u, v in there.

        ``lo``/``hi`` broadcast together; the default is the global constant K (always sound).
        """
        return np.full(np.broadcast_shapes(np.shape(lo), np.shape(hi)), self.lipschitz(node))

    def backward(self, node, cot, ctx):
        slope = ctx.slope(node, self) if ctx.use_ranges else self.lipschitz(node)
        return [cot[0] * slope] + [None] * (len(node.inputs) - 1)

    def interval(self, node, args):
        x = args[0]
        if not isinstance(x, Interval):
            raise unsupported(node, "activation of a constant should have been folded")
        if x.lo is x.hi:  # a point (the searches' concrete runs): f once, a point out
            image = np.asarray(self.function(node, x.lo))
            return [Interval(image, image)]
        a, b = self.function(node, x.lo), self.function(node, x.hi)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        minimum = self.minimum(node)
        if minimum is not None:
            inside = (x.lo <= minimum) & (x.hi >= minimum)
            at_min = float(self.function(node, np.array(minimum)))
            lo = np.where(inside, np.minimum(lo, at_min), lo)
        return [Interval(lo, hi)]

    def paper(self, node, errs, ctx):
        return [errs[0] * self.lipschitz(node)]


@register
class Relu(Activation):
    op_types = ("Relu",)
    attributes = {"Relu": {"consumed_inputs": INTS}}

    def max_slope(self, node, lo, hi, constants=None):
        """1 where the neuron can be on (hi > 0), 0 where it never is."""
        return _on(np.asarray(hi) > 0, 1.0) + 0.0 * np.asarray(lo)

    def function(self, node, x):
        return np.maximum(x, 0.0)


@register
class LeakyRelu(Activation):
    op_types = ("LeakyRelu",)
    attributes = {"LeakyRelu": {"alpha": FLOAT, "consumed_inputs": INTS}}

    def lipschitz(self, node):
        return max(1.0, abs(node.attr("alpha", 0.01)))

    def max_slope(self, node, lo, hi, constants=None):
        """1 on the positive side, |α| on the negative side, the larger of the two sides reached."""
        alpha = abs(node.attr("alpha", 0.01))
        return np.maximum(_on(np.asarray(hi) > 0, 1.0), _on(np.asarray(lo) < 0, alpha))

    def function(self, node, x):
        alpha = node.attr("alpha", 0.01)
        return np.where(x >= 0, x, alpha * x)

    def interval(self, node, args):
        if node.attr("alpha", 0.01) < 0:
            x = args[0]
            values = [self.function(node, v) for v in (x.lo, x.hi, np.zeros_like(x.lo))]
            inside = (x.lo <= 0) & (x.hi >= 0)
            lo = np.minimum(values[0], values[1])
            hi = np.maximum(np.maximum(values[0], values[1]), np.where(inside, 0.0, -np.inf))
            return [Interval(np.where(inside, np.minimum(lo, 0.0), lo), hi)]
        return super().interval(node, args)


@register
class Sigmoid(Activation):
    op_types = ("Sigmoid",)
    attributes = {"Sigmoid": {"consumed_inputs": INTS}}

    def lipschitz(self, node):
        return 0.25

    def max_slope(self, node, lo, hi, constants=None):
        """σ′ is largest nearest 0: σ′(clip(0, lo, hi)) (saturated neurons: the edge's slope)."""
        s = _sigmoid(_closest_to(0.0, lo, hi))
        return s * (1.0 - s)

    def output_range(self, node):
        return (0.0, 1.0)

    def function(self, node, x):
        return _sigmoid(x)


@register
class Tanh(Activation):
    op_types = ("Tanh",)
    attributes = {"Tanh": {"consumed_inputs": INTS}}

    def max_slope(self, node, lo, hi, constants=None):
        """1 − tanh² is largest nearest 0."""
        return 1.0 - np.tanh(_closest_to(0.0, lo, hi)) ** 2

    def output_range(self, node):
        return (-1.0, 1.0)

    def function(self, node, x):
        return np.tanh(x)


@register
class HardSigmoid(Activation):
    op_types = ("HardSigmoid",)
    attributes = {"HardSigmoid": {"alpha": FLOAT, "beta": FLOAT, "consumed_inputs": INTS}}

    def lipschitz(self, node):
        return abs(node.attr("alpha", 0.2))

    def max_slope(self, node, lo, hi, constants=None):
        """|α| where [lo, hi] meets the linear part (0 < α·x + β < 1), 0 where it is saturated."""
        alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
        a, b = alpha * np.asarray(lo) + beta, alpha * np.asarray(hi) + beta
        meets = (np.maximum(a, b) > 0.0) & (np.minimum(a, b) < 1.0)
        return _on(meets, abs(alpha))

    def output_range(self, node):
        return (0.0, 1.0)

    def function(self, node, x):
        return np.clip(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0.0, 1.0)

    def interval(self, node, args):
        x = args[0]
        a, b = self.function(node, x.lo), self.function(node, x.hi)
        return [Interval(np.minimum(a, b), np.maximum(a, b))]


@register
class Softplus(Activation):
    op_types = ("Softplus",)
    attributes = {"Softplus": {}}

    def max_slope(self, node, lo, hi, constants=None):
        """softplus′ = σ, increasing: σ(hi)."""
        return _sigmoid(np.asarray(hi, np.float64)) + 0.0 * np.asarray(lo)

    def function(self, node, x):
        return _softplus(x)


@register
class Softsign(Activation):
    op_types = ("Softsign",)
    attributes = {"Softsign": {}}

    def max_slope(self, node, lo, hi, constants=None):
        """1/(1 + |x|)² is largest nearest 0."""
        return 1.0 / (1.0 + np.abs(_closest_to(0.0, lo, hi))) ** 2

    def output_range(self, node):
        return (-1.0, 1.0)

    def function(self, node, x):
        return softsign(x)


@register
class Elu(Activation):
    op_types = ("Elu",)
    attributes = {"Elu": {"alpha": FLOAT, "consumed_inputs": INTS}}

    def lipschitz(self, node):
        return max(1.0, abs(node.attr("alpha", 1.0)))

    def max_slope(self, node, lo, hi, constants=None):
        """1 for x > 0; α·eˣ (increasing) for x ≤ 0, largest at min(hi, 0)."""
        alpha = abs(node.attr("alpha", 1.0))
        hi = np.asarray(hi, np.float64)
        return np.maximum(_on(hi > 0, 1.0), _on(np.asarray(lo) <= 0, alpha * np.exp(np.minimum(hi, 0.0))))

    def function(self, node, x):
        alpha = node.attr("alpha", 1.0)
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))

    def interval(self, node, args):
        if node.attr("alpha", 1.0) < 0:
            raise unsupported(node, "Elu with a negative alpha is not monotone")
        return super().interval(node, args)


@register
class Celu(Activation):
    """CELU(x) = max(0, x) + min(0, α·(exp(x/α) − 1)): increasing, slope exp(x/α) ≤ 1 below 0, so K = 1."""

    op_types = ("Celu",)
    attributes = {"Celu": {"alpha": FLOAT}}

    def max_slope(self, node, lo, hi, constants=None):
        """1 for x > 0; exp(x/α) ≤ 1 (increasing) below."""
        hi = np.asarray(hi, np.float64)
        below = np.exp(np.minimum(hi, 0.0) / node.attr("alpha", 1.0))
        return np.where(hi > 0, 1.0, below) + 0.0 * np.asarray(lo)

    def function(self, node, x):
        alpha = node.attr("alpha", 1.0)
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0) / alpha))

    def interval(self, node, args):
        if not node.attr("alpha", 1.0) > 0:
            raise unsupported(node, "Celu needs a positive alpha")
        return super().interval(node, args)


@register
class Selu(Activation):
    op_types = ("Selu",)
    attributes = {"Selu": {"alpha": FLOAT, "consumed_inputs": INTS, "gamma": FLOAT}}

    def lipschitz(self, node):
        alpha = node.attr("alpha", 1.67326319217681884765625)
        return abs(node.attr("gamma", 1.05070102214813232421875)) * max(1.0, alpha)

    def max_slope(self, node, lo, hi, constants=None):
        """γ times Elu's slope with α."""
        alpha = node.attr("alpha", 1.67326319217681884765625)
        gamma = abs(node.attr("gamma", 1.05070102214813232421875))
        hi = np.asarray(hi, np.float64)
        neg = _on(np.asarray(lo) <= 0, abs(alpha) * np.exp(np.minimum(hi, 0.0)))
        return gamma * np.maximum(_on(hi > 0, 1.0), neg)

    def function(self, node, x):
        alpha = node.attr("alpha", 1.67326319217681884765625)
        gamma = node.attr("gamma", 1.05070102214813232421875)
        return gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


@register
class Clip(Activation):
    op_types = ("Clip",)
    attributes = {"Clip": {"consumed_inputs": INTS, "max": FLOAT, "min": FLOAT}}

    def _bounds(self, node, args) -> tuple[float, float]:
        lo, hi = node.attr("min", -np.inf), node.attr("max", np.inf)
        if len(args) > 1 and args[1] is not None:
            lo = float(np.asarray(args[1]))
        if len(args) > 2 and args[2] is not None:
            hi = float(np.asarray(args[2]))
        if lo > hi:  # ONNX: min(max(x, min), max), the constant max (docs/method.md §1.3)
            return float(hi), float(hi)
        return float(lo), float(hi)

    def max_slope(self, node, lo, hi, constants=None):
        """1 where [lo, hi] meets (min, max), 0 where the value is pinned at one end."""
        args = [None] + [(constants or {}).get(v) if v else None for v in node.inputs[1:]]
        c_lo, c_hi = self._bounds(node, args)
        return _on((np.asarray(hi) > c_lo) & (np.asarray(lo) < c_hi), 1.0)

    def interval(self, node, args):
        if any(isinstance(a, Interval) for a in args[1:]):
            raise unsupported(node, "Clip bounds must be constants")
        lo, hi = self._bounds(node, args)
        x = args[0]
        return [Interval(np.clip(x.lo, lo, hi), np.clip(x.hi, lo, hi))]

    def constant_bounds(self, node, constants: dict) -> tuple[float, float] | None:
        """[min, max] as onnxruntime applies them (±inf where absent; a min above the max: [max, max]),
        reading min/max inputs from ``constants``; None when one is not a constant."""
        if any(v and v not in constants for v in node.inputs[1:]):
            return None
        return self._bounds(node, [None] + [constants.get(v) if v else None for v in node.inputs[1:]])

    def clip_range(self, node, constants: dict) -> tuple[float, float] | None:
        """The [min, max] of this Clip, reading min/max inputs from ``constants``; None unless both are finite
        constants."""
        bounds = self.constant_bounds(node, constants)
        return bounds if bounds is not None and np.isfinite(bounds[0]) and np.isfinite(bounds[1]) else None


@register
class HardSwish(Activation):
    op_types = ("HardSwish",)
    attributes = {"HardSwish": {}}
    K = 1.5
    minimum_at = -1.5

    def max_slope(self, node, lo, hi, constants=None):
        """0 below −3, 1 above 3, x/3 + 1/2 (linear: extremes at the ends) in between."""
        return hardswish_slope(lo, hi)

    def function(self, node, x):
        return hardswish(x)


@register
class Gelu(Activation):
    """Gelu (opset 20): the erf form, or the tanh form with ``approximate="tanh"``.

    Both have slopes in [−0.129, 1.129] (K = 1.13) and one minimum, at −0.7517915 (erf)
    and −0.7524614 (tanh).
    """

    op_types = ("Gelu",)
    attributes = {"Gelu": {"approximate": STRING}}
    K = 1.13
    #: Where each form has its minimum.
    MINIMA: ClassVar[dict[str, float]] = {"none": -0.7517915226225846, "tanh": -0.7524614198365138}

    def max_slope(self, node, lo, hi, constants=None):
        """The largest |f′| at the ends or at the turning points of f′ inside (docs/method.md §4.3)."""
        return template_slope("GeluTanh" if node.attr("approximate", "none") == "tanh" else "Gelu", lo, hi)

    def function(self, node, x):
        if node.attr("approximate", "none") == "tanh":
            return gelu_tanh(x)
        return gelu_erf(x)

    def minimum(self, node):
        return self.MINIMA["tanh" if node.attr("approximate", "none") == "tanh" else "none"]

    def interval(self, node, args):
        approximate = node.attr("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise unsupported(node, f"Gelu approximate='{approximate}' is not defined by ONNX")
        return super().interval(node, args)


@register
class Mish(Activation):
    op_types = ("Mish",)
    attributes = {"Mish": {}}
    K = 1.09
    minimum_at = -1.1924

    def max_slope(self, node, lo, hi, constants=None):
        """The largest |f′| at the ends or at the turning points of f′ inside."""
        return template_slope("Mish", lo, hi)

    def function(self, node, x):
        return mish(x)


@register
class Erf(Activation):
    """erf itself (decomposed GELU): K = 2/√π, range (−1, 1)."""

    op_types = ("Erf",)
    attributes = {"Erf": {}}

    def lipschitz(self, node):
        return 2.0 / math.sqrt(math.pi)

    def max_slope(self, node, lo, hi, constants=None):
        """2/√π·e^(−x²) is largest nearest 0."""
        return 2.0 / math.sqrt(math.pi) * np.exp(-_closest_to(0.0, lo, hi) ** 2)

    def output_range(self, node):
        return (-1.0, 1.0)

    def function(self, node, x):
        return _ERF(np.asarray(x))


@register
class Abs(Activation):
    op_types = ("Abs",)
    attributes = {"Abs": {"consumed_inputs": INTS}}

    def function(self, node, x):
        return np.abs(x)

    def interval(self, node, args):
        x = args[0]
        straddles = (x.lo < 0) & (x.hi > 0)
        lo = np.where(straddles, 0.0, np.minimum(np.abs(x.lo), np.abs(x.hi)))
        return [Interval(lo, x.abs_max())]


@register
class Neg(Activation):
    """−x: linear, so it is folded into a layer's affine map or sits between layers; never a layer's activation."""

    op_types = ("Neg",)
    attributes = {"Neg": {"consumed_inputs": INTS}}
    role = Role.BETWEEN

    def function(self, node, x):
        return -np.asarray(x)

    def interval(self, node, args):
        return [Interval(-args[0].hi, -args[0].lo)]


@register
class PRelu(Activation):
    op_types = ("PRelu",)
    attributes = {"PRelu": {"consumed_inputs": INTS}}

    def interval(self, node, args):
        if isinstance(args[1], Interval):
            raise unsupported(node, "PRelu slopes must be constants")
        slope = np.asarray(args[1], np.float64)
        if np.any(slope < 0):
            raise unsupported(node, "PRelu with negative slopes is not monotone")
        x = args[0]
        f = lambda v: np.where(v >= 0, v, slope * v)  # noqa: E731
        return [Interval(f(x.lo), f(x.hi))]

    def slopes_lipschitz(self, slope: np.ndarray) -> float:
        """max(1, max|slope|) for the PRelu slopes."""
        return max(1.0, float(np.max(np.abs(slope), initial=0.0)))

    def max_slope(self, node, lo, hi, constants=None):
        """1 on the positive side, |slope| (per channel) on the negative side."""
        slope = np.abs(np.asarray((constants or {})[node.inputs[1]], np.float64))
        return np.maximum(_on(np.asarray(hi) > 0, 1.0), _on(np.asarray(lo) < 0, slope))

    def backward(self, node, cot, ctx):
        if ctx.use_ranges:
            return [cot[0] * ctx.slope(node, self), None]
        return [cot[0] * self.slopes_lipschitz(ctx.constants[node.inputs[1]]), None]

    def paper(self, node, errs, ctx):
        return [errs[0] * self.slopes_lipschitz(ctx.constants[node.inputs[1]])]
