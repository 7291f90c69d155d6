"""The Forward Error Propagation bound (docs/method.md §2, §3), paper and tight methods, and the
inverse problems (largest tolerated failures per layer, uniform, total budget).

The pure formulas (numbers in, numbers out) come first; :class:`PaperBound` and
:class:`TightBound` apply them to a :class:`~robaudit.graph.network.Network`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from robaudit.bounds.slack import epsilon_limit, within
from robaudit.errors import OptionError
from robaudit.graph.ibp import evaluate
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext
from robaudit.graph.ops.affine import conv_abs_adjoint, conv_transpose_abs_adjoint, weight_products
from robaudit.graph.ops.base import rule_for
from robaudit.limits import tight_memory_bytes as tight_memory_limit

#: Largest failure budget searched by the paper method's dynamic programme.
MAX_TOTAL_BUDGET = 4096


# --------------------------------------------------------------------------- pure math


def neuron_delta(failure_range: tuple[float, float], ylo, yhi):
    """δ = max(b − ylo, yhi − a): the largest change one failed neuron causes (docs/method.md §2.1).

    Crash is the range [0, 0], giving max(|ylo|, |yhi|).
    """
    a, b = failure_range
    return np.maximum(np.maximum(b - ylo, yhi - a), 0.0)


def synapse_delta(failure_range: tuple[float, float], w_min: float, w_max: float, y_lo: float, y_hi: float) -> float:
    """d = max(b − w⁻, w⁺ − a), w⁻/w⁺ the extremes of w·y over the layer (docs/method.md §2.2)."""
    products = [w_min * y_lo, w_min * y_hi, w_max * y_lo, w_max * y_hi]
    a, b = failure_range
    return max(b - min(products), max(products) - a, 0.0)


def paper_layer_error(
    e_prev,
    failed: int,
    delta: float,
    neurons: int,
    fanout: int,
    lipschitz: float,
    max_weight: float,
    synapses: int = 0,
    synapse_d: float = 0.0,
):
    """E_l = f·δ + s·K·d + min(fanout, N − f)·K·w_m·E_{l−1} (docs/method.md §3.1)."""
    carried = min(fanout, neurons - failed) * lipschitz * max_weight
    return failed * delta + synapses * lipschitz * synapse_d + carried * e_prev


def largest_within(values: np.ndarray, epsilon: float) -> int:
    """Largest index i with values[i] ≤ ε for a non-decreasing ``values`` (−1 if none)."""
    return int(np.searchsorted(values, epsilon_limit(epsilon), side="right")) - 1


def top_prefix_sums(values: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Per row, the sums of the f largest entries for f = 0..n (or 0..limit): shape [rows, n + 1].

    With ``limit`` only the ``limit`` largest entries are sorted (a partition first).
    """
    if limit is not None and limit < values.shape[-1]:
        values = -np.partition(-values, limit - 1, axis=-1)[..., :limit] if limit > 0 else values[..., :0]
    ordered = -np.sort(-values, axis=-1)
    zeros = np.zeros(values.shape[:-1] + (1,))
    return np.concatenate([zeros, np.cumsum(ordered, axis=-1)], axis=-1)


# --------------------------------------------------------------------------- failure model


@dataclass(frozen=True)
class FailureModel:
    """What a failed neuron sends (docs/method.md §2.1)."""

    #: ``crash`` or ``byzantine``.
    mode: str = "crash"
    #: [a, b]; crash is [0, 0], byzantine [−C, C] or the user's range.
    failure_range: tuple[float, float] = (0.0, 0.0)
    #: |y| ≤ Y for every neuron output, replacing the ranges (``--activation-bound``).
    activation_bound: float | None = None

    @staticmethod
    def crash(activation_bound: float | None = None) -> FailureModel:
        """Crashed neurons send 0."""
        return FailureModel("crash", (0.0, 0.0), activation_bound)

    @staticmethod
    def byzantine(
        capacity: float | None = None,
        failure_range: tuple[float, float] | None = None,
        activation_bound: float | None = None,
    ) -> FailureModel:
        """Byzantine neurons send any value in [−C, C] or in the given range."""
        if failure_range is None:
            if capacity is None:
                raise OptionError("byzantine failures need --capacity C or --failure-range A,B")
            if not capacity > 0 or not np.isfinite(capacity):
                raise OptionError(f"--capacity must be a positive finite number, got {capacity}")
            failure_range = (-float(capacity), float(capacity))
        a, b = failure_range
        if not (np.isfinite(a) and np.isfinite(b)) or a > b:
            raise OptionError(f"--failure-range must be finite A,B with A ≤ B, got {a},{b}")
        return FailureModel("byzantine", (float(a), float(b)), activation_bound)


# --------------------------------------------------------------------------- shared analysis


class Analysis:
    """Per-network quantities shared by both methods: ranges, δ, d, faulty intervals."""

    def __init__(self, network: Network, failure: FailureModel, synapses: Sequence[int] | None = None):
        self.network = network
        self.failure = failure
        self.hidden = network.hidden_layers
        self.synapses = list(synapses) if synapses is not None else [0] * len(self.hidden)
        self.deltas = [
            float(neuron_delta(failure.failure_range, *self.paper_range(la.output_value))) for la in self.hidden
        ]
        self.synapse_ds = [self._synapse_d(la) for la in self.hidden]
        self._faulty: dict[str, Interval] | None = None

    def paper_range(self, value: str) -> tuple[float, float]:
        """[ylo, yhi] of a value for the paper method: activation range or IBP (docs/method.md §2.1), narrowed by
        ``--activation-bound`` Y to [−Y, Y] but never widened by it."""
        net = self.network
        if value in net.input_boxes:
            box = net.input_boxes[value]
            return float(box.lo.min()), float(box.hi.max())
        lo, hi = self._computed_range(value)
        if self.failure.activation_bound is not None:
            y = self.failure.activation_bound
            return float(np.clip(lo, -y, y)), float(np.clip(hi, -y, y))
        return lo, hi

    def _computed_range(self, value: str) -> tuple[float, float]:
        for layer in self.network.layers:
            if layer.output_value == value and layer.activation_range is not None:
                return layer.activation_range
        box = self.network.clean[value]
        return float(box.lo.min()), float(box.hi.max())

    def neuron_ranges(self, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        """Per-neuron [lo, hi] of a layer's output (tight method); ``--activation-bound`` Y only narrows it."""
        box = self.network.clean[layer.output_value]
        lo, hi = box.lo.reshape(-1), box.hi.reshape(-1)
        if self.failure.activation_bound is not None:
            y = self.failure.activation_bound
            return np.clip(lo, -y, y), np.clip(hi, -y, y)
        return lo, hi

    def _synapse_d(self, layer: Layer) -> float:
        y_lo, y_hi = self.paper_range(layer.input_value)
        return synapse_delta(self.failure.failure_range, *layer.weight_range, y_lo, y_hi)

    def faulty(self) -> dict[str, Interval]:
        """Intervals of every value when every hidden neuron may fail (sound for all failure sets)."""
        if self._faulty is None:
            self._faulty = self._faulty_intervals()
        return self._faulty

    def _faulty_intervals(self) -> dict[str, Interval]:
        net = self.network
        if net.is_chain() and not _range_dependent(net):
            return net.clean
        a, b = self.failure.failure_range
        widen = {la.output_value: (a, b) for la in self.hidden}
        radius = {
            la.preact_value: s * d for la, s, d in zip(self.hidden, self.synapses, self.synapse_ds, strict=True) if s
        }
        nodes = net.nodes
        boxes = net.input_boxes
        _, faulty = evaluate(net.graph, nodes, boxes, None, 0, dict(net.constants), widen=widen, radius=radius)
        return faulty

    def context(self) -> PropagationContext:
        """What op rules may look up while propagating deviations."""
        return PropagationContext(self.network.clean, self.faulty(), self.network.constants)


def _range_dependent(net: Network) -> bool:
    """Whether an op's deviation bound reads faulty ranges (normalization, inner Softmax; docs/method.md §13)."""
    return any(isinstance(s, Node) and getattr(rule_for(s), "range_dependent", False) for s in net.steps)


def _node_coefficients(node: Node, ctx: PropagationContext) -> list[list[float]]:
    """The paper rule of ``node`` is linear in its input errors: its matrix, per output."""
    rule = rule_for(node)
    variable = [i for i, v in enumerate(node.inputs) if v and ctx.is_variable(v)]
    columns = []
    for i in range(len(node.inputs)):
        if i not in variable:
            columns.append([0.0] * len(node.outputs))
            continue
        errs = [1.0 if j == i else (0.0 if j in variable else None) for j in range(len(node.inputs))]
        columns.append([float(x) for x in rule.paper(node, errs, ctx)])
    return [[columns[i][o] for i in range(len(node.inputs))] for o in range(len(node.outputs))]


# --------------------------------------------------------------------------- paper method


class PaperBound:
    """Fep of docs/method.md §3.1 over the layer graph; errors of branch inputs add up."""

    name = "paper"

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.network = analysis.network
        self._coefficients: dict[str, list[list[float]]] = {}

    def _coeffs(self, node: Node, ctx) -> list[list[float]]:
        if node.name not in self._coefficients:
            self._coefficients[node.name] = _node_coefficients(node, ctx)
        return self._coefficients[node.name]

    def propagate(self, layer_error) -> float | np.ndarray:
        """Run the forward recursion; ``layer_error(i, layer, e_in)`` gives E of hidden layer i."""
        net, ctx = self.network, self.analysis.context()
        errors: dict = dict.fromkeys(net.input_boxes, 0.0)
        hidden_index = {id(la): i for i, la in enumerate(self.analysis.hidden)}
        for step in net.steps:
            if isinstance(step, Layer):
                e_in = errors.get(step.input_value, 0.0)
                if step.is_output:
                    errors[step.output_value] = step.lipschitz * step.max_abs_weight * e_in
                else:
                    errors[step.output_value] = layer_error(hidden_index[id(step)], step, e_in)
                continue
            errs = [errors.get(v, 0.0) if v else 0.0 for v in step.inputs]
            for out, row in zip(step.outputs, self._coeffs(step, ctx), strict=True):
                errors[out] = sum(c * e for c, e in zip(row, errs, strict=True) if c)
        return errors.get(net.tail_start, 0.0) * net.tail_factor

    def fep(self, failures: Sequence[int]) -> float:
        """Fep for exactly ``failures[l]`` failed neurons in hidden layer l."""
        an = self.analysis

        def layer_error(i, la, e_in):
            return paper_layer_error(
                e_in,
                failures[i],
                an.deltas[i],
                la.neurons,
                la.fanout,
                la.lipschitz,
                la.max_abs_weight,
                an.synapses[i],
                an.synapse_ds[i],
            )

        return float(self.propagate(layer_error))

    def fep_upto(self, failures: Sequence[int]) -> float:
        """The largest Fep over all vectors g ≤ failures (E_l is piecewise linear in g_l)."""
        an = self.analysis

        def layer_error(i, la, e_in):
            f = failures[i]
            candidates = {0, f, min(f, max(0, la.neurons - la.fanout))}
            return max(
                paper_layer_error(
                    e_in,
                    g,
                    an.deltas[i],
                    la.neurons,
                    la.fanout,
                    la.lipschitz,
                    la.max_abs_weight,
                    an.synapses[i],
                    an.synapse_ds[i],
                )
                for g in candidates
            )

        return float(self.propagate(layer_error))

    def total_curve(self, budget: int) -> np.ndarray:
        """C[F] ≥ Fep of every distribution of at most F failures, F = 0..budget (DP over layers)."""
        an = self.analysis

        def layer_error(i, la, e_in):
            e_in = np.broadcast_to(np.asarray(e_in, dtype=np.float64), (budget + 1,))
            best = np.full(budget + 1, -np.inf)
            for g in range(min(budget, la.neurons) + 1):
                value = paper_layer_error(
                    e_in[: budget + 1 - g],
                    g,
                    an.deltas[i],
                    la.neurons,
                    la.fanout,
                    la.lipschitz,
                    la.max_abs_weight,
                    an.synapses[i],
                    an.synapse_ds[i],
                )
                best[g:] = np.maximum(best[g:], value)
            return np.maximum.accumulate(best)

        curve = np.broadcast_to(np.asarray(self.propagate(layer_error), dtype=np.float64), (budget + 1,))
        return np.maximum.accumulate(curve)


# --------------------------------------------------------------------------- tight method


def tight_memory_bytes(network: Network) -> int:
    """What :class:`TightBound` holds at once: P, P·δ and their prefix sums per hidden layer
    ([outputs, N_l] float64 each, plus one more during the sort), and two cotangents
    [outputs, value size] of the widest value during the backward pass."""
    outputs = int(np.prod(network.clean[network.tail_start].shape))
    neurons = sum(layer.neurons for layer in network.hidden_layers)
    widest = max((int(np.prod(box.shape)) for box in network.clean.values()), default=1)
    return 8 * outputs * (4 * neurons + 2 * widest)


def tight_unavailable(network: Network) -> str | None:
    """Why the tight bound is not computed for ``network`` (too much memory), or None."""
    needed, limit = tight_memory_bytes(network), tight_memory_limit()
    if needed <= limit:
        return None
    outputs = int(np.prod(network.clean[network.tail_start].shape))
    neurons = sum(layer.neurons for layer in network.hidden_layers)
    return (
        f"the tight bound was not computed: its sensitivities ({outputs} outputs × {neurons} neurons) would need "
        f"~{needed / 2**30:.1f} GiB, more than ROBAUDIT_TIGHT_MEMORY_MB={limit // 2**20}"
    )


class TightBound:
    """Sensitivity bound: |ΔF_k| ≤ Σ_l Σ_{i failed in l} P[k, i]·δ_i (docs/method.md §4.1).

    P is obtained by back-propagating unit vectors from every output element through
    |W| (affine ops), K (activations) and the absolute adjoints of the other ops. A
    failed neuron's deviation is at most δ_i whatever happened upstream, and every
    other neuron's deviation is bounded by the same linear recursion, so the sum over
    failed neurons of P·δ bounds every output deviation; the worst failure set takes,
    per output and per layer, the f_l largest P·δ.
    """

    name = "tight"

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.network = analysis.network
        #: P per hidden layer, [outputs, N_l] (tail factor included); computed once.
        self.sensitivity = self._sensitivities()
        self.weighted: list[np.ndarray] = []
        self.prefix: list[np.ndarray] = []
        self.synapse_terms: list[np.ndarray] = []
        for i, layer in enumerate(analysis.hidden):
            lo, hi = analysis.neuron_ranges(layer)
            delta = neuron_delta(analysis.failure.failure_range, lo, hi)
            sens = self.sensitivity[i]
            self.weighted.append(sens * delta[None, :])
            self.prefix.append(top_prefix_sums(self.weighted[-1]))
            syn = analysis.synapses[i] * analysis.synapse_ds[i] * layer.lipschitz
            self.synapse_terms.append(syn * sens.max(axis=1))

    def sensitivities(self) -> list[np.ndarray]:
        """P per hidden layer, [outputs, N_l]: |ΔF_k| ≤ Σ_l Σ_i P[k, i]·|Δy_i| (tail factor included)."""
        return self.sensitivity

    def _sensitivities(self) -> list[np.ndarray]:
        net, ctx = self.network, self.analysis.context()
        start_shape = net.clean[net.tail_start].shape
        outputs = int(np.prod(start_shape))
        cot: dict[str, np.ndarray] = {net.tail_start: np.eye(outputs).reshape((outputs,) + start_shape)}
        hidden_index = {id(la): i for i, la in enumerate(self.analysis.hidden)}
        result = [np.zeros((outputs, la.neurons)) for la in self.analysis.hidden]
        needed = _after_hidden_layers(net.steps, hidden_index)

        def add(value: str, grad: np.ndarray) -> None:
            cot[value] = cot[value] + grad if value in cot else grad

        for step in reversed(net.steps):
            if isinstance(step, Layer):
                grad = cot.pop(step.output_value, None)
                if grad is None:
                    continue
                if id(step) in hidden_index:
                    result[hidden_index[id(step)]] = grad.reshape(outputs, -1).copy()
                if step.input_value in needed:
                    add(step.input_value, _layer_adjoint(step, grad * step.lipschitz))
                continue
            grads = [cot.pop(o, None) if o else None for o in step.outputs]
            if all(g is None for g in grads) or not any(v in needed for v in step.inputs):
                continue
            grads = [
                g if g is not None else np.zeros((outputs,) + ctx.shape(o))
                for g, o in zip(grads, step.outputs, strict=True)
            ]
            for value, grad in zip(step.inputs, rule_for(step).backward(step, grads, ctx), strict=False):
                if grad is not None and value and ctx.is_variable(value):
                    add(value, grad)
        return [r * net.tail_factor for r in result]

    def per_output(self, failures: Sequence[int]) -> np.ndarray:
        """Bound on |ΔF_k| for every output element k."""
        total = np.zeros(self.prefix[0].shape[0]) if self.prefix else np.zeros(1)
        for prefix, syn, f in zip(self.prefix, self.synapse_terms, failures, strict=True):
            total = total + prefix[:, min(f, prefix.shape[1] - 1)] + syn
        return total

    def fep(self, failures: Sequence[int]) -> float:
        """max_k Σ_l (sum of the f_l largest P[k, i]·δ_i) (+ synapse terms)."""
        return float(self.per_output(failures).max())

    fep_upto = fep  # already monotone in every f_l

    def total_curve(self, budget: int) -> np.ndarray:
        """C[F]: the worst F failures anywhere — per output, the F largest P·δ over all layers."""
        merged = np.concatenate(self.weighted, axis=1)
        width = min(budget, merged.shape[1])
        prefix = top_prefix_sums(merged, width)
        syn = np.asarray(sum(self.synapse_terms))
        curve = (prefix + (syn[:, None] if np.ndim(syn) else syn)).max(axis=0)
        if width < budget:
            curve = np.concatenate([curve, np.full(budget - width, curve[-1])])
        return curve


def _after_hidden_layers(steps: Sequence, hidden_index: dict[int, int]) -> set[str]:
    """Values computed from some hidden layer's output: the only ones whose sensitivities P uses.

    Back-propagating into the others (the network input, ops before the first layer)
    would cost a product with the first weight and change nothing.
    """
    reached: set[str] = set()
    for step in steps:
        if isinstance(step, Layer):
            if id(step) in hidden_index or step.input_value in reached:
                reached.add(step.output_value)
        elif any(v in reached for v in step.inputs):
            reached.update(v for v in step.outputs if v)
    return reached


def _layer_adjoint(layer: Layer, grad: np.ndarray) -> np.ndarray:
    """|W|ᵀ applied to sensitivities of a layer's pre-activation ([K, *out_shape]).

    Dense: one 2-D product [K·…, out] @ |W| in float64, W read block by block
    (:func:`~robaudit.graph.ops.affine.weight_products`), never copied whole.
    """
    if layer.geometry is None:
        rows = grad.reshape(-1, grad.shape[-1])
        (product,) = weight_products(layer.weight, [(rows, True)])
        return product.reshape(grad.shape[:-1] + (product.shape[-1],))
    if layer.kind == "conv_transpose":
        return conv_transpose_abs_adjoint(grad, layer.weight, layer.geometry, layer.in_shape)
    return conv_abs_adjoint(grad, layer.weight, layer.geometry, layer.in_shape)


# --------------------------------------------------------------------------- inverse problems


class FepBound(Protocol):
    """A sound bound on the output error of failure vectors (docs/method.md §3, §4).

    Implemented by :class:`~robaudit.bounds.fep.PaperBound`,
    :class:`~robaudit.bounds.fep.TightBound` and every :class:`Bound`.
    """

    @property
    def analysis(self) -> Analysis:
        """The ranges, δ and d the bound is built on."""
        ...

    def fep(self, failures: Sequence[int]) -> float:
        """Bound on max_k |ΔF_k| for exactly ``failures[l]`` failed neurons in hidden layer l."""
        ...

    def fep_upto(self, failures: Sequence[int]) -> float:
        """Bound over every vector g ≤ ``failures`` (element-wise)."""
        ...

    def total_curve(self, budget: int) -> np.ndarray:
        """C[F], F = 0..budget: bound over every distribution of at most F failures; non-decreasing."""
        ...


def max_single_layer(method: FepBound, layer_index: int, neurons: int, epsilon: float) -> int:
    """Largest f with Fep ≤ ε when only hidden layer ``layer_index`` fails (binary search, docs/method.md §6.1)."""
    count = len(method.analysis.hidden)

    def ok(f: int) -> bool:
        vector = [0] * count
        vector[layer_index] = f
        return within(method.fep_upto(vector), epsilon)

    return _largest_true(ok, neurons)


def max_uniform(method: FepBound, epsilon: float) -> int:
    """Largest f such that f failures (capped at N_l) in every hidden layer keep Fep ≤ ε (docs/method.md §6.2)."""
    hidden = method.analysis.hidden
    limit = max((la.neurons for la in hidden), default=0)
    return _largest_true(lambda f: within(method.fep_upto([min(f, la.neurons) for la in hidden]), epsilon), limit)


def max_total(method: FepBound, epsilon: float) -> tuple[int, bool]:
    """Largest F such that every distribution of F failures keeps Fep ≤ ε; (F, exact?) (docs/method.md §6.3)."""
    total_neurons = sum(la.neurons for la in method.analysis.hidden)
    budget = min(64, total_neurons)
    while True:
        found = largest_within(method.total_curve(budget), epsilon)
        if found < budget or budget >= total_neurons:
            return max(found, -1), True
        if budget >= MAX_TOTAL_BUDGET:
            return budget, False
        budget = min(budget * 4, total_neurons, MAX_TOTAL_BUDGET)


def _largest_true(ok: Callable[[int], bool], limit: int) -> int:
    """Largest x in [0, limit] with ok(x), ok monotone decreasing; −1 when ok(0) fails."""
    if not ok(0):
        return -1
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
