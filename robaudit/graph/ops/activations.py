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

    def interval(self, node, args):
        x = args[0]
        if not isinstance(x, Interval):
            raise unsupported(node, "activation of a constant should have been folded")
        a, b = self.function(node, x.lo), self.function(node, x.hi)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        minimum = self.minimum(node)
        if minimum is not None:
            inside = (x.lo <= minimum) & (x.hi >= minimum)
            at_min = float(self.function(node, np.array(minimum)))
            lo = np.where(inside, np.minimum(lo, at_min), lo)
        return [Interval(lo, hi)]

    def backward(self, node, cot, ctx):
        return [cot[0] * self.lipschitz(node)] + [None] * (len(node.inputs) - 1)

    def paper(self, node, errs, ctx):
        return [errs[0] * self.lipschitz(node)]


@register
class Relu(Activation):
    op_types = ("Relu",)
    attributes = {"Relu": {"consumed_inputs": INTS}}

    def function(self, node, x):
        return np.maximum(x, 0.0)


@register
class LeakyRelu(Activation):
    op_types = ("LeakyRelu",)
    attributes = {"LeakyRelu": {"alpha": FLOAT, "consumed_inputs": INTS}}

    def lipschitz(self, node):
        return max(1.0, abs(node.attr("alpha", 0.01)))

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

    def output_range(self, node):
        return (0.0, 1.0)

    def function(self, node, x):
        return _sigmoid(x)


@register
class Tanh(Activation):
    op_types = ("Tanh",)
    attributes = {"Tanh": {"consumed_inputs": INTS}}

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

    def function(self, node, x):
        return _softplus(x)


@register
class Softsign(Activation):
    op_types = ("Softsign",)
    attributes = {"Softsign": {}}

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
        return float(lo), float(hi)

    def interval(self, node, args):
        if any(isinstance(a, Interval) for a in args[1:]):
            raise unsupported(node, "Clip bounds must be constants")
        lo, hi = self._bounds(node, args)
        x = args[0]
        return [Interval(np.clip(x.lo, lo, hi), np.clip(x.hi, lo, hi))]

    def clip_range(self, node, constants: dict) -> tuple[float, float] | None:
        """The [min, max] of this Clip, reading min/max inputs from ``constants``."""
        args = [None] + [constants.get(v) if v else None for v in node.inputs[1:]]
        lo, hi = self._bounds(node, args)
        return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


@register
class HardSwish(Activation):
    op_types = ("HardSwish",)
    attributes = {"HardSwish": {}}
    K = 1.5
    minimum_at = -1.5

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

    def function(self, node, x):
        return mish(x)


@register
class Erf(Activation):
    """erf itself (decomposed GELU): K = 2/√π, range (−1, 1)."""

    op_types = ("Erf",)
    attributes = {"Erf": {}}

    def lipschitz(self, node):
        return 2.0 / math.sqrt(math.pi)

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

    def backward(self, node, cot, ctx):
        return [cot[0] * self.slopes_lipschitz(ctx.constants[node.inputs[1]]), None]

    def paper(self, node, errs, ctx):
        return [errs[0] * self.slopes_lipschitz(ctx.constants[node.inputs[1]])]
