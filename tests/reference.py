"""A second, deliberately simple implementation of docs/method.md §2, §3 for dense chains.

It shares no code with ``robaudit``: it reads the ONNX file with ``onnx`` and
``onnx.numpy_helper`` only, turns the weights into plain Python lists, and computes
everything with explicit loops:

* interval bound propagation with lo/hi and the positive/negative parts of each
  weight (not centre/radius as robaudit does);
* w_m, K, N, δ (activation range for bounded activations, IBP otherwise, or
  ``activation_bound``) and the synapse deviation d (docs/method.md §2.2);
* the Fep recursion of docs/method.md §3.1 (``fep_paper``);
* the sensitivity ("tight") bound of docs/method.md §4.1 by brute force over failure sets:
  P[k][i] is obtained by chaining s_j·|W| backwards from the output, s_j the largest slope of
  neuron j's activation over the hull of its clean and faulty-network pre-activation
  intervals (docs/method.md §4.3; the global K under ``activation_bound``), and the bound of
  a failure vector is max_k Σ_l max over subsets S of size f_l of Σ_{i∈S} P[k][i]·δ_i;
* the signed terms and the cuts of docs/method.md §4.1: coefficient intervals carried
  backwards from each output with lo/hi interval products (chord slopes of each activation
  written out again), the layers added from the last failing one back; cut widths from the
  clean and faulty IBP boxes, and the boxes' output cut (the output's faulty box against its clean box), each
  output keeping the smallest of these bounds;
* the inverse problems by exhaustive search over failure vectors (tiny nets only);
* the cap at the output's width (1 after a Softmax, docs/method.md §3.4).

Semantics of the inverse problems (a count f is "tolerated" when every count up to
f is, since a bound for fewer failures may exceed the bound for more):

* per layer: the largest f ≤ N_l such that bound(g·e_l) ≤ ε for every g ≤ f;
* uniform: the largest f ≤ max N_l such that bound(g) ≤ ε for every vector g with
  g_l ≤ min(f, N_l);
* total: the largest F such that bound(g) ≤ ε for every vector g with Σ g_l ≤ F
  (g_l ≤ N_l);

each −1 when even the empty failure vector exceeds ε (possible with synapse failures).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import onnx
from onnx import numpy_helper

#: Relative slack when comparing a bound with ε (the same order robaudit uses).
EPS_SLACK = 1e-12

LIPSCHITZ = {
    "Relu": lambda a: 1.0,
    "Sigmoid": lambda a: 0.25,
    "Tanh": lambda a: 1.0,
    "LeakyRelu": lambda a: max(1.0, abs(a.get("alpha", 0.01))),
    "HardSigmoid": lambda a: abs(a.get("alpha", 0.2)),
    "Elu": lambda a: max(1.0, a.get("alpha", 1.0)),
}
BOUNDED_RANGE = {"Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0), "HardSigmoid": (0.0, 1.0)}


def max_slope(op: str | None, attrs: dict, lo: float, hi: float) -> float:
    """sup |f′| over [lo, hi], from each function's derivative written out by hand."""
    if op is None:
        return 1.0
    if op == "Relu":
        return 1.0 if hi > 0 else 0.0
    if op in ("Sigmoid", "Tanh"):
        x = 0.0 if lo <= 0.0 <= hi else (lo if lo > 0 else hi)  # |f′| falls with |x|
        return _sigmoid(x) * (1.0 - _sigmoid(x)) if op == "Sigmoid" else 1.0 - math.tanh(x) ** 2
    if op == "LeakyRelu":
        alpha = abs(attrs.get("alpha", 0.01))
        return max(1.0 if hi > 0 else 0.0, alpha if lo < 0 else 0.0)
    if op == "HardSigmoid":
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        ends = sorted((alpha * lo + beta, alpha * hi + beta))
        return abs(alpha) if ends[1] > 0.0 and ends[0] < 1.0 else 0.0
    if op == "Elu":
        alpha = attrs.get("alpha", 1.0)
        negative = alpha * math.exp(min(hi, 0.0)) if lo <= 0 else 0.0
        return max(1.0 if hi > 0 else 0.0, negative)
    raise ValueError(f"reference: no slope for {op}")


def _derivative(op: str, x: float) -> float:
    return _sigmoid(x) * (1.0 - _sigmoid(x)) if op == "Sigmoid" else 1.0 - math.tanh(x) ** 2


def chord_slopes(op: str | None, attrs: dict, lo: float, hi: float) -> tuple[float, float]:
    """[s_lo, s_hi] ∋ (f(u) − f(v)) / (u − v) for u ≠ v in [lo, hi] (docs/method.md §7.2's table)."""
    if op is None:
        return 1.0, 1.0
    if op in ("Relu", "LeakyRelu"):
        left = 0.0 if op == "Relu" else attrs.get("alpha", 0.01)
        if lo >= 0:
            return 1.0, 1.0
        if hi <= 0:
            return left, left
        return min(left, 1.0), max(left, 1.0)
    if op in ("Sigmoid", "Tanh"):
        nearest = min(max(0.0, lo), hi)
        return min(_derivative(op, lo), _derivative(op, hi)), _derivative(op, nearest)
    k = LIPSCHITZ[op](attrs)
    return (0.0, k) if attrs.get("alpha", 1.0) >= 0 else (-k, k)  # HardSigmoid, Elu: increasing for α ≥ 0


def _times(lo: float, hi: float, s_lo: float, s_hi: float) -> tuple[float, float]:
    corners = (lo * s_lo, lo * s_hi, hi * s_lo, hi * s_hi)
    return min(corners), max(corners)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def activate(op: str | None, attrs: dict, x: float) -> float:
    """The activation function at one point (all used here are non-decreasing)."""
    if op is None:
        return x
    if op == "Relu":
        return max(x, 0.0)
    if op == "Sigmoid":
        return _sigmoid(x)
    if op == "Tanh":
        return math.tanh(x)
    if op == "LeakyRelu":
        return x if x >= 0 else attrs.get("alpha", 0.01) * x
    if op == "HardSigmoid":
        return min(1.0, max(0.0, attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5)))
    if op == "Elu":
        return x if x > 0 else attrs.get("alpha", 1.0) * (math.exp(x) - 1.0)
    raise ValueError(f"reference: no activation {op}")


@dataclass
class RefLayer:
    """One affine layer: W[out][in] (alpha applied), bias[out] (beta applied), activation."""

    weight: list[list[float]]
    bias: list[float]
    activation: str | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def neurons(self) -> int:
        return len(self.weight)

    @property
    def max_weight(self) -> float:
        return max(abs(w) for row in self.weight for w in row)

    @property
    def lipschitz(self) -> float:
        return 1.0 if self.activation is None else LIPSCHITZ[self.activation](self.attrs)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def read_chain(path) -> tuple[list[RefLayer], float]:
    """The layers of a dense chain file and the output tail factor (1/2 for a final Softmax)."""
    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t).astype(float).tolist() for t in model.graph.initializer}
    layers: list[RefLayer] = []
    tail = 1.0
    for node in model.graph.node:
        op, attrs = node.op_type, _attrs(node)
        if op == "Gemm":
            assert attrs.get("transA", 0) == 0
            alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
            b = init[node.input[1]]
            if not attrs.get("transB", 0):  # B is [in, out]: transpose to [out, in]
                b = [[b[i][j] for i in range(len(b))] for j in range(len(b[0]))]
            weight = [[alpha * w for w in row] for row in b]
            c = init[node.input[2]] if len(node.input) > 2 else [0.0] * len(weight)
            while isinstance(c[0], list):  # [1, out] → [out]
                c = c[0]
            layers.append(RefLayer(weight, [beta * v for v in c]))
        elif op == "MatMul":
            b = init[node.input[1]]
            weight = [[b[i][j] for i in range(len(b))] for j in range(len(b[0]))]
            layers.append(RefLayer(weight, [0.0] * len(weight)))
        elif op == "Add":
            bias = init[node.input[1]]
            layers[-1].bias = [x + y for x, y in zip(layers[-1].bias, bias, strict=True)]
        elif op in LIPSCHITZ:
            layers[-1].activation, layers[-1].attrs = op, attrs
        elif op == "Softmax":
            tail *= 0.5
        elif op == "Identity":
            pass
        else:
            raise ValueError(f"reference: unexpected op {op}")
    return layers, tail


def interval_propagation(
    layers: list[RefLayer],
    lo: float,
    hi: float,
    inputs: int,
    widen: tuple[float, float] | None = None,
    radius: list[float] | None = None,
    preacts: list | None = None,
) -> list[tuple[list, list]]:
    """Per-neuron [lo, hi] of every layer's output for the input box [lo, hi]^inputs.

    ``widen`` joins [a, b] into every hidden layer's output and ``radius[l]`` widens its
    pre-activation (the faulty network); ``preacts`` receives the pre-activation boxes.
    """
    box_lo, box_hi = [lo] * inputs, [hi] * inputs
    result = []
    for index, layer in enumerate(layers):
        new_lo, new_hi, pre_lo, pre_hi = [], [], [], []
        for row, bias in zip(layer.weight, layer.bias, strict=True):
            low = high = bias
            for w, xl, xh in zip(row, box_lo, box_hi, strict=True):
                if w >= 0:
                    low += w * xl
                    high += w * xh
                else:
                    low += w * xh
                    high += w * xl
            if radius is not None and index < len(radius):
                low, high = low - radius[index], high + radius[index]
            new_lo.append(activate(layer.activation, layer.attrs, low))
            new_hi.append(activate(layer.activation, layer.attrs, high))
            pre_lo.append(low)
            pre_hi.append(high)
        if preacts is not None:
            preacts.append((pre_lo, pre_hi))
        if widen is not None and index < len(layers) - 1:
            new_lo = [min(v, widen[0]) for v in new_lo]
            new_hi = [max(v, widen[1]) for v in new_hi]
        result.append((new_lo, new_hi))
        box_lo, box_hi = new_lo, new_hi
    return result


def neuron_delta(a: float, b: float, ylo: float, yhi: float) -> float:
    """δ = max(b − ylo, yhi − a) (docs/method.md §2.1)."""
    return max(b - ylo, yhi - a)


class Reference:
    """Every number of ``robaudit bound`` for a dense chain, computed the simple way."""

    def __init__(
        self,
        path,
        input_range=(0.0, 1.0),
        failure_range=(0.0, 0.0),
        activation_bound: float | None = None,
        synapses: list[int] | None = None,
        include_output_layer: bool = False,
    ):
        layers, self.tail = read_chain(path)
        assert not include_output_layer
        self.hidden, self.out = layers[:-1], layers[-1]
        self.a, self.b = failure_range
        self.bound = activation_bound
        self.synapses = synapses or [0] * len(self.hidden)
        inputs = len(layers[0].weight[0])
        clean = interval_propagation(layers, *input_range, inputs)
        self.ranges, self.output_box = clean[:-1], clean[-1]
        self.input_range = input_range
        self.neurons = [la.neurons for la in self.hidden]
        self.max_weights = [la.max_weight for la in self.hidden]
        self.lipschitz = [la.lipschitz for la in self.hidden]
        self.layer_ranges = [self._layer_range(i) for i in range(len(self.hidden))]
        self.deltas = [neuron_delta(self.a, self.b, lo, hi) for lo, hi in self.layer_ranges]
        self.synapse_ds = [self._synapse_d(i) for i in range(len(self.hidden))]
        self.slopes = self._slopes(layers, inputs)
        self.width = self._output_width()
        self.sens = self._sensitivities()
        self.neuron_deltas = [self._neuron_deltas(i) for i in range(len(self.hidden))]
        self.known = activation_bound is None  # the ranges are trusted: cuts and signed terms (§4.1)
        self.signed = self._signed() if self.known and not any(self.synapses) else None
        self.fep_paper = lru_cache(maxsize=None)(self._fep_paper)
        self.fep_tight_only = lru_cache(maxsize=None)(self._fep_tight_only)

    # ---- docs/method.md §3.4 bounded outputs
    def _output_width(self) -> float:
        if self.tail != 1.0:  # a Softmax at the output
            return 1.0
        if self.out.activation in BOUNDED_RANGE:
            lo, hi = BOUNDED_RANGE[self.out.activation]
            return hi - lo
        return math.inf

    # ---- docs/method.md §4.3: per-neuron slopes over clean ∪ faulty pre-activation intervals
    def _slopes(self, layers: list[RefLayer], inputs: int) -> list[list[float]]:
        if self.bound is not None:
            return [[la.lipschitz] * la.neurons for la in layers]
        clean: list = []
        faulty: list = []
        interval_propagation(layers, *self.input_range, inputs, preacts=clean)
        radius = [s * d for s, d in zip(self.synapses, self.synapse_ds, strict=True)]
        outs = interval_propagation(layers, *self.input_range, inputs, (self.a, self.b), radius, faulty)
        (clo, chi), (flo, fhi) = self.output_box, outs[-1]
        # the boxes' output cut (§4.1): the output with every neuron failing against the clean output, per element
        self.box_cut = [self.tail * max(h - lo, hi - low) for lo, hi, low, h in zip(clo, chi, flo, fhi, strict=True)]
        self.hulls = [
            [(min(a, c), max(b, d)) for a, b, c, d in zip(clo, chi, flo, fhi, strict=True)]
            for (clo, chi), (flo, fhi) in zip(clean, faulty, strict=True)
        ]
        self.cut_widths = [
            [max(h1, h2, self.b) - min(l1, l2, self.a) for l1, h1, l2, h2 in zip(clo, chi, flo, fhi, strict=True)]
            for (clo, chi), (flo, fhi) in zip(self.ranges, outs, strict=False)
        ]
        slopes = []
        for layer, (clo, chi), (flo, fhi) in zip(layers, clean, faulty, strict=True):
            slopes.append(
                [
                    max_slope(layer.activation, layer.attrs, min(a, c), max(b, d))
                    for a, b, c, d in zip(clo, chi, flo, fhi, strict=True)
                ]
            )
        return slopes

    # ---- docs/method.md §2.1
    def _narrowed(self, lo: float, hi: float) -> tuple[float, float]:
        """--activation-bound Y narrows a computed range to [−Y, Y], never widens it."""
        if self.bound is None:
            return lo, hi
        return min(max(lo, -self.bound), self.bound), min(max(hi, -self.bound), self.bound)

    def _layer_range(self, i: int) -> tuple[float, float]:
        layer = self.hidden[i]
        if layer.activation in BOUNDED_RANGE:
            return self._narrowed(*BOUNDED_RANGE[layer.activation])
        lo, hi = self.ranges[i]
        return self._narrowed(min(lo), max(hi))

    def _synapse_d(self, i: int) -> float:
        y_lo, y_hi = self.input_range if i == 0 else self.layer_ranges[i - 1]
        products = [w * y for row in self.hidden[i].weight for w in row for y in (y_lo, y_hi)]
        return max(self.b - min(products), max(products) - self.a, 0.0)

    def _neuron_deltas(self, i: int) -> list[float]:
        lo, hi = self.ranges[i]
        return [neuron_delta(self.a, self.b, *self._narrowed(low, high)) for low, high in zip(lo, hi, strict=True)]

    # ---- docs/method.md §3.1, paper method
    def _fep_paper(self, failures: tuple[int, ...]) -> float:
        error = 0.0
        for i, f in enumerate(failures):
            n, k, w = self.neurons[i], self.lipschitz[i], self.max_weights[i]
            error = f * self.deltas[i] + self.synapses[i] * k * self.synapse_ds[i] + min(n, n - f) * k * w * error
        return self.out.lipschitz * self.out.max_weight * error * self.tail

    # ---- docs/method.md §4.1, sensitivity method
    def _sensitivities(self) -> list[list[list[float]]]:
        """P_l[k][i]: output k's sensitivity to neuron i of hidden layer l."""
        out_slopes = self.slopes[-1]
        current = [[self.tail * out_slopes[k] * abs(w) for w in row] for k, row in enumerate(self.out.weight)]
        result = [current]
        for index in range(len(self.hidden) - 1, 0, -1):
            layer, s = self.hidden[index], self.slopes[index]
            inputs = len(layer.weight[0])
            current = [
                [sum(row[j] * s[j] * abs(layer.weight[j][i]) for j in range(layer.neurons)) for i in range(inputs)]
                for row in current
            ]
            result.append(current)
        return list(reversed(result))

    def _terms(self, k: int, failures: tuple[int, ...]) -> list[float]:
        """Per hidden layer: max over subsets S of size f_l of Σ_{i∈S} P[k][i]·δ_i, plus its synapse term."""
        terms = []
        for i, f in enumerate(failures):
            row, deltas = self.sens[i][k], self.neuron_deltas[i]
            term = max(
                (sum(row[j] * deltas[j] for j in subset) for subset in itertools.combinations(range(len(row)), f)),
                default=0.0,
            )
            reach = max(r * s for r, s in zip(row, self.slopes[i], strict=True))
            terms.append(term + self.synapses[i] * self.synapse_ds[i] * reach)
        return terms

    def _fep_sums(self, failures: tuple[int, ...]) -> float:
        """§4.1's sum alone (no signed terms, no cuts)."""
        return max(sum(self._terms(k, failures)) for k in range(len(self.out.weight)))

    def _fep_tight_only(self, failures: tuple[int, ...]) -> float:
        worst = 0.0
        for k in range(len(self.out.weight)):
            terms = self._terms(k, failures)
            best = sum(terms)
            if self.signed is not None and any(failures):
                best = min(best, self._signed_bound(k, failures, terms))
            if self.known and not any(self.synapses) and any(failures):
                best = min(best, self.box_cut[k])
            if self.known:
                for c in range(len(self.hidden)):
                    if any(failures[i] or self.synapses[i] for i in range(c + 1)):
                        cost = sum(p * w for p, w in zip(self.sens[c][k], self.cut_widths[c], strict=True))
                        best = min(best, cost + sum(terms[c + 1 :]))
            worst = max(worst, best)
        return worst

    # ---- docs/method.md §4.1, signed terms
    def _signed(self) -> list[list[list[tuple[list[float], list[float]]]]]:
        """[pass][k][hidden layer] → (increases, decreases) per neuron (tail factor included)."""
        result = []
        for zero in (False, True):
            per_output = []
            for k in range(len(self.out.weight)):
                intervals = [(0.0, 0.0)] * len(self.out.weight)
                intervals[k] = (1.0, 1.0)
                layers = [*self.hidden, self.out]
                found = [None] * len(self.hidden)
                for index in range(len(layers) - 1, -1, -1):
                    layer = layers[index]
                    if index < len(self.hidden):
                        found[index] = self._corners(index, intervals)
                        if index == 0:
                            break
                    hidden = index < len(self.hidden)
                    scaled = []
                    for j, (lo, hi) in enumerate(intervals):
                        s_lo, s_hi = chord_slopes(layer.activation, layer.attrs, *self.hulls[index][j])
                        if zero and hidden:
                            s_lo, s_hi = min(s_lo, 0.0), max(s_hi, 0.0)
                        scaled.append(_times(lo, hi, s_lo, s_hi))
                    inputs = len(layer.weight[0])
                    intervals = []
                    for i in range(inputs):
                        low = high = 0.0
                        for j, (lo, hi) in enumerate(scaled):
                            w = layer.weight[j][i]
                            low += min(w * lo, w * hi)
                            high += max(w * lo, w * hi)
                        intervals.append((low, high))
                per_output.append(found)
            result.append(per_output)
        return result

    def _corners(self, index: int, intervals) -> tuple[list[float], list[float]]:
        lows, highs = self.ranges[index]
        ups, downs = [], []
        for (lo, hi), ylo, yhi in zip(intervals, lows, highs, strict=True):
            d_lo, d_hi = self.a - yhi, self.b - ylo
            corners = (lo * d_lo, lo * d_hi, hi * d_lo, hi * d_hi)
            ups.append(max(max(corners), 0.0) * self.tail)
            downs.append(max(-min(corners), 0.0) * self.tail)
        return ups, downs

    def _signed_bound(self, k: int, failures: tuple[int, ...], terms: list[float]) -> float:
        up = down = 0.0
        for i, f in enumerate(failures):
            if f == 0:
                continue
            later = any(failures[j] > 0 for j in range(i + 1, len(failures)))
            ups, downs = self.signed[1 if later else 0][k][i]
            up += min(sum(sorted(ups, reverse=True)[:f]), terms[i])
            down += min(sum(sorted(downs, reverse=True)[:f]), terms[i])
        return max(up, down)

    def fep(self, failures, method: str) -> float:
        """The bound of one failure vector: ``paper``, ``tight`` = min(sensitivity, paper),
        ``sensitivity`` alone (signed terms and cuts included) or ``sums`` (§4.1's sum alone)."""
        failures = tuple(failures)
        if method == "paper":
            return min(self.fep_paper(failures), self.width)
        if method == "sensitivity":
            return min(self.fep_tight_only(failures), self.width)
        if method == "sums":
            return min(self._fep_sums(failures), self.width)
        return min(self.fep_paper(failures), self.fep_tight_only(failures), self.width)

    # ---- inverse problems (exhaustive)
    def _vectors(self, caps):
        return itertools.product(*(range(c + 1) for c in caps))

    def max_failures(self, layer: int, epsilon: float, method: str) -> int:
        best = -1
        for f in range(self.neurons[layer] + 1):
            vector = [0] * len(self.hidden)
            vector[layer] = f
            if self.fep(vector, method) > epsilon * (1 + EPS_SLACK):
                break
            best = f
        return best

    def uniform(self, epsilon: float, method: str) -> int:
        best = -1
        for f in range(max(self.neurons) + 1):
            caps = [min(f, n) for n in self.neurons]
            if any(self.fep(g, method) > epsilon * (1 + EPS_SLACK) for g in self._vectors(caps)):
                break
            best = f
        return best

    def worst_by_total(self, method: str) -> list[float]:
        """W[F] = max bound over vectors with Σ g = F exactly."""
        worst = [0.0] * (sum(self.neurons) + 1)
        for g in self._vectors(self.neurons):
            worst[sum(g)] = max(worst[sum(g)], self.fep(g, method))
        return worst

    def total(self, epsilon: float, method: str) -> int:
        """Largest F with bound ≤ ε for every vector of at most F failures."""
        best = -1
        for value in self.worst_by_total(method):
            if value > epsilon * (1 + EPS_SLACK):
                break
            best += 1
        return best
