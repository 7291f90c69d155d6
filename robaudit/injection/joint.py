"""The worst case over failure sets, byzantine values *and* inputs jointly (docs/method.md §8.2).

A numpy model of the network (its own ops, with failed neurons' outputs replaced) gives the
error and, by a signed backward pass over the layer graph (the machinery of
:mod:`robaudit.bounds.certify` on concrete values), its gradient with respect to the input and
to every failed neuron's value. The search alternates, from several starts (given inputs,
random points of the domain, corners): byzantine values set to the extreme the gradient
points to, swaps of failed neurons ranked by their first-order effect, and projected
sign-gradient ascent on the input inside the domain (or within a radius of a given input).
Whatever it returns is a configuration whose error was computed, never an estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from robaudit.bounds.certify import LocalCertifier, _LocalState, chord_slopes
from robaudit.bounds.fep import FailureModel, stays_finite
from robaudit.graph.inputs import feed_box
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.normalization import NORMALIZATION_OPS
from robaudit.graph.ops.rounding import QuantizeDequantize, Rounding
from robaudit.injection.instrument import CODE_BITS
from robaudit.injection.stored_flips import bit_positions, flipped_values

#: Gradient evaluations of one search for a model of one multiply-add per input: the budget is
#: JOINT_WORK / (multiply-adds per input), clipped to [MIN_CALLS, MAX_CALLS] (a digits MLP gets
#: MAX_CALLS, LeNet about 50).
JOINT_WORK = 2e7
MIN_CALLS, MAX_CALLS = 40, 600

Chosen = list[tuple[np.ndarray, np.ndarray]]

#: Runs of the numpy model remembered (:meth:`ConcreteNetwork.run`).
_RUNS_KEPT = 4


def _signature(part: tuple[np.ndarray, np.ndarray]) -> tuple:
    """One layer's failed neurons and what they send, as a key: dtypes and shapes included (the bytes of [1, 0] as
    int32 are those of [1] as int64)."""
    ids, sent = np.asarray(part[0]), np.asarray(part[1], np.float64)
    return ids.dtype.str, ids.shape, ids.tobytes(), sent.shape, sent.tobytes()

#: Ops between layers the signed backward pass of :mod:`robaudit.bounds.certify` has no rule for
#: (normalization, Softmax inside the network, products of two variables: docs/method.md §13).
_NOT_JOINT = frozenset({*NORMALIZATION_OPS, "Softmax", "LogSoftmax", "MatMul"})


def joint_obstacle(network: Network) -> str | None:
    """What in ``network`` the joint search cannot model (None: nothing), as the end of "not supported for ...".

    It models one float input, dense layers on [1, features] rows and no op of §13 between layers;
    elsewhere it is skipped (the fault-set search still runs) and the report says why.
    """
    if len(network.inputs) != 1:
        return "models with several inputs"
    if network.packed:
        return "token-id (integer) inputs"
    if any(la.internal or la.tied for la in network.layers):
        return "recurrent layers (docs/method.md §14)"
    for step in network.steps:
        if isinstance(step, Layer):
            if step.geometry is None and len(network.clean[step.input_value].shape) > 2:
                return "dense layers on sequences of rows (a transformer's tokens)"
        elif step.op_type in _NOT_JOINT:
            op = "MatMul of two computed values" if step.op_type == "MatMul" else step.op_type.removesuffix("Pattern")
            return f"a {op} between layers (docs/method.md §13)"
    return None


def flips_obstacle(network: Network, failure: FailureModel) -> str | None:
    """What of a flipped or stuck bit the joint search cannot model (None: nothing, or not such a failure), as the
    end of "not supported for ...": a float's exponent bit, or any bit of one, can make its value ±Inf or NaN,
    which the concrete network does not carry as onnxruntime does (a NaN guard's constant)."""
    if not failure.stored:
        return None
    for layer in network.hidden_layers:
        if layer.codes is None and not stays_finite(layer.word, failure.bit, failure.stuck):
            return "flips of a float's exponent bits or of any bit (a value may become ±Inf or NaN)"
    return None


@dataclass(frozen=True)
class JointCandidate:
    """A configuration the joint search evaluated: input, failed neurons and values, error."""

    #: The input, per-sample shape (float32 values).
    x: np.ndarray
    #: Per hidden layer: (neuron ids, values sent).
    chosen: Chosen
    #: max_k |F̃_k(x) − F_k(x)| computed by the numpy model (float64).
    error: float
    #: Where the search started: ``given input i``, ``random point``, ``corner``.
    start: str


class _StraightThrough(LocalCertifier):
    """The signed backward pass of :class:`LocalCertifier` on concrete values, a rounding op (a QDQ pair, a float16
    cast) passed with derivative 1 where its input lies inside the codes' range and 0 where it saturates: the
    straight-through estimate. The certificate's rule carries a rounding as a bare magnitude (|coefficient|, no sign),
    which leaves the input's gradient 0 on every int8 and float16 model and the input where it started. The search's
    direction only (docs/method.md §8.2): what it finds is evaluated again."""

    def _signed_node(self, node, rule, mid, rad, ctx) -> list:
        if not isinstance(rule, Rounding):
            return super()._signed_node(node, rule, mid, rad, ctx)
        inside = straight_through(node, rule, ctx.hull(node.inputs[0]).lo)
        return [np.concatenate([mid[0] * inside, rad[0] * inside])] + [None] * (len(node.inputs) - 1)


def straight_through(node, rule: Rounding, x: np.ndarray) -> np.ndarray:
    """The straight-through derivative of a rounding op at the point ``x`` (its input): 1 where ``x`` lies between
    the lowest and highest value it can give (a QDQ pair's end codes, per channel; ±the largest float16), 0 where it
    saturates. A QDQ pair on a ReLU's codes (zero point at the bottom code) thus has ReLU's own derivative."""
    if isinstance(rule, QuantizeDequantize):
        scale, zp, qmin, qmax = rule.parameters(node, np.shape(x))
        ends = ((qmin - zp) * scale, (qmax - zp) * scale)
        bottom, top = np.minimum(*ends), np.maximum(*ends)
    else:
        bottom, top = rule.saturation(node, np.shape(x)) or (-np.inf, np.inf)
    return ((x >= bottom) & (x <= top)).astype(np.float64)


class ConcreteNetwork:
    """The network's audited nodes evaluated on one input, with failed neurons replaced; a rounding op as onnxruntime
    computes it (:meth:`Rounding.fold`) where robaudit evaluates it, else its rule's lower end."""

    def __init__(self, network: Network, failure: FailureModel):
        self.network = network
        self.failure = failure
        self.local = _StraightThrough(network, failure)
        self.hidden_by_output = {la.output_value: i for i, la in enumerate(network.hidden_layers)}
        #: per hidden layer, what its failed neurons computed in the last faulty :meth:`run` (before they failed)
        self.computed: dict[int, np.ndarray] = {}
        #: the last few runs, (their values, what their failed neurons computed), by input and fault set
        self._runs: dict[tuple, tuple[dict[str, np.ndarray], dict[int, np.ndarray]]] = {}

    def run(self, x: np.ndarray, chosen: Chosen | None = None) -> dict[str, np.ndarray]:
        """Every value of the audited path at input ``x`` (per-sample shape); the values are not to be written.

        A search evaluates a configuration, then takes its gradient at the same point: the last
        ``_RUNS_KEPT`` runs are remembered (the same numbers: the run is deterministic)."""
        point = np.array(x, np.float64)  # a copy: the caller may move x in place
        key = (point.shape, point.tobytes(), None if chosen is None else tuple(_signature(part) for part in chosen))
        if key in self._runs:
            values, computed = self._runs[key]
            self.computed.update(computed)
            return values
        values = self._run(point, chosen)
        computed = {} if chosen is None else {i: self.computed[i] for i, (ids, _) in enumerate(chosen) if len(ids)}
        if len(self._runs) >= _RUNS_KEPT:
            self._runs.pop(next(iter(self._runs)))
        self._runs[key] = (values, computed)
        return values

    def _run(self, point: np.ndarray, chosen: Chosen | None) -> dict[str, np.ndarray]:
        net = self.network
        values = {net.input_name: point[None]}
        for node in net.nodes:
            args = [values.get(v, net.constants.get(v)) if v else None for v in node.inputs]
            if not any(v in values for v in node.inputs if v) or all(o in net.constants for o in node.outputs if o):
                continue  # constant, or a shape read off a variable (folded into the constants)
            wrapped = [Interval.point(values[v]) if v in values else a for a, v in zip(args, node.inputs, strict=True)]
            rule = lookup(node)
            assert rule is not None  # the network was built with a rule for every audited op
            for out, result in zip(node.outputs, self._concrete(node, rule, wrapped), strict=False):
                if not out:
                    continue
                value = result
                idx = self.hidden_by_output.get(out)
                if chosen is not None and idx is not None and len(chosen[idx][0]):
                    value = value.copy().reshape(-1)
                    self.computed[idx] = value[chosen[idx][0]].copy()
                    value[chosen[idx][0]] = self.sent(idx, value, *chosen[idx])
                    value = value.reshape(result.shape)
                values[out] = value
        return values

    @staticmethod
    def _concrete(node, rule, wrapped: list) -> list[np.ndarray]:
        """The node's outputs on point intervals ``wrapped``: a rounding folded as onnxruntime rounds (its interval
        rule only brackets the rounded value), every other op its interval's lower end (a point)."""
        if isinstance(rule, Rounding):
            folded = rule.fold(node, wrapped[0].lo)
            if folded is not None:
                return [np.asarray(folded, np.float64)]
        return [result.lo for result in rule.interval(node, wrapped)]

    def sent(self, idx: int, value: np.ndarray, ids: np.ndarray, sent: np.ndarray) -> np.ndarray:
        """What failed neurons ``ids`` of hidden layer ``idx`` send, from the layer's computed values ``value``
        (flat): ``sent`` itself (crash, byzantine), or their stored value with the bit 2^B of ``sent`` flipped or
        stuck (docs/method.md §2.3)."""
        if not self.failure.stored:
            return sent
        return flipped_values(self.network.hidden_layers[idx], value, ids, sent, self.failure.stuck)

    def tail(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The audited output's elements (the ∞-norm tail's start), flat."""
        return values[self.network.tail_start].reshape(-1) * 1.0

    def error(self, x: np.ndarray, chosen: Chosen, clean: np.ndarray | None = None) -> float:
        """max_k |F̃_k − F_k| at x, on the audited output (tail factor as the bounds use it)."""
        if clean is None:
            clean = self.tail(self.run(x))
        faulty = self.tail(self.run(x, chosen))
        return float(np.abs(faulty - clean).max() * self.network.tail_factor)

    def _state(self, values: dict[str, np.ndarray]) -> _LocalState:
        points = {k: Interval.point(v) for k, v in values.items()}
        st = _LocalState(points, points, {}, [], [])
        for layer in self.network.layers:
            z = values[layer.preact_value].reshape(-1)
            st.slopes[id(layer)] = self._point_slopes(layer, values[layer.preact_value], z)
        return st

    def _point_slopes(self, layer: Layer, preact: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The activation's derivative at each neuron's pre-activation z: the chord rule where it is exact there
        (piecewise-linear, sigmoid, tanh), else a central difference of the activation node (GELU, Swish, …:
        their chord rule at a point is only [−K, K], which would leave the input's gradient without sign); a rounding
        activation (an int8 model's QDQ pair) its straight-through derivative (:func:`straight_through`).
        The search's direction only: what it finds is evaluated again (docs/method.md §8.2)."""
        node = self.local.act_node[id(layer)]
        rule = None if node is None else lookup(node)
        if node is not None and isinstance(rule, Rounding):
            slope = straight_through(node, rule, z.reshape(preact.shape)).reshape(-1)
            return slope, slope
        lo, hi = chord_slopes(layer, node, z, z)
        if node is None or np.array_equal(lo, hi):
            return lo, hi
        assert rule is not None
        step = 1e-4 * (1.0 + np.abs(z))

        def act(u: np.ndarray) -> np.ndarray:
            args = [
                Interval.point(u.reshape(preact.shape)) if v == node.inputs[0] else self.network.constants.get(v)
                for v in node.inputs
            ]
            return rule.interval(node, args)[0].lo.reshape(-1)

        slope = (act(z + step) - act(z - step)) / (2.0 * step)
        return slope, slope

    def gradients(
        self, x: np.ndarray, chosen: Chosen, k: int
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """d(F̃_k − F_k)/dx and, per hidden layer, dF̃_k/d(output of each neuron) in the faulty network."""
        row = np.zeros((1, self.local.outputs))
        row[0, k] = 1.0
        grads = []
        found_faulty: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for faulty in (True, False):
            values = self.run(x, chosen if faulty else None)
            mask = {}
            if faulty:
                for idx, (ids, sent) in enumerate(chosen):
                    if len(ids):
                        keep = np.ones(self.network.hidden_layers[idx].neurons)
                        keep[ids] = self._carried(idx, values, ids, sent)
                        mask[idx] = keep
            into: dict[str, np.ndarray] = {}
            found = self.local._signed_backward(row, self._state(values), mask, into)
            if faulty:
                found_faulty = found
            stacked = into.get(self.network.input_name)
            grads.append(np.zeros_like(x, dtype=np.float64) if stacked is None else stacked[0].reshape(x.shape))
        per_layer = {idx: (lo[0] + hi[0]) / 2 for idx, (lo, hi) in found_faulty.items()}
        return grads[0] - grads[1], per_layer

    def _carried(self, idx: int, values: dict[str, np.ndarray], ids: np.ndarray, sent: np.ndarray) -> np.ndarray:
        """d(sent value)/d(computed value) of failed neurons ``ids`` in the faulty run ``values`` (the last
        :meth:`run`): 0 for a value sent whatever the neuron computes (crash, byzantine); for a flipped or stuck
        bit, 1 where it adds a constant (a mantissa bit, a code's bit) and the ratio of the two values where it
        scales (the sign, an exponent bit)."""
        if not self.failure.stored:
            return np.zeros(len(ids))
        layer = self.network.hidden_layers[idx]
        computed = self.computed[idx]
        flipped = values[layer.output_value].reshape(-1)[ids]
        if layer.codes is not None:
            return np.ones(len(ids))
        mantissa = bit_positions(sent) < layer.word.mantissa_bits
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(computed != 0, flipped / computed, 0.0)
        return np.where(mantissa, 1.0, np.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0))


class JointSearch:
    """Projected gradient ascent over inputs with value and swap moves (docs/method.md §8.2)."""

    def __init__(self, network: Network, failure: FailureModel, rng: np.random.Generator):
        self.model = ConcreteNetwork(network, failure)
        self.network = network
        self.failure = failure
        self.rng = rng
        #: per element of one sample, the input domain's ends (the box of ``--input-range-file`` or one input's range)
        self.low, self.high = (np.broadcast_to(np.asarray(end, np.float64), tuple(network.input_shape[1:]))
                               for end in feed_box(network.inputs, network.packed))
        macs = sum(layer.neurons * layer.fan_in for layer in network.layers)
        self.calls = int(np.clip(JOINT_WORK / max(macs, 1), MIN_CALLS, MAX_CALLS))
        self.rounds = 3 if self.calls >= 300 else 1
        self.outputs_tried = self.model.local.outputs if self.calls >= 300 else min(3, self.model.local.outputs)

    def _box(self, x0: np.ndarray, radius: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Where the climb from ``x0`` may move: the input domain, or its part within ``radius`` of ``x0``."""
        lo, hi = self.low.reshape(x0.shape), self.high.reshape(x0.shape)
        if radius is None:
            return lo.copy(), hi.copy()
        return np.clip(x0 - radius, lo, hi), np.clip(x0 + radius, lo, hi)

    def _values(self, chosen: Chosen, per_layer: dict[int, np.ndarray], sign: float) -> Chosen:
        a, b = self.failure.failure_range
        if a == b:
            return chosen
        out = []
        for idx, (ids, sent) in enumerate(chosen):
            if len(ids) and idx in per_layer:
                sent = np.where(sign * per_layer[idx][ids] > 0, b, a).astype(np.float64)
            out.append((ids, sent))
        return out

    def _swap(self, x: np.ndarray, chosen: Chosen, per_layer, sign: float, values) -> Chosen:
        """Replace, per layer, the weakest failed neuron by the strongest first-order candidate."""
        if self.failure.stored:
            return self._swap_flips(chosen, per_layer, sign, values)
        a, b = self.failure.failure_range
        out = list(chosen)
        for idx, (ids, sent) in enumerate(chosen):
            if not len(ids) or idx not in per_layer:
                continue
            y = values[self.network.hidden_layers[idx].output_value].reshape(-1)
            coef = sign * per_layer[idx]
            gain = np.maximum(coef * (a - y), coef * (b - y))
            gain[ids] = -np.inf
            new = int(np.argmax(gain))
            if not np.isfinite(gain[new]):
                continue
            own = np.maximum(coef[ids] * (a - y[ids]), coef[ids] * (b - y[ids]))
            weakest = int(np.argmin(own))
            ids2, sent2 = ids.copy(), sent.copy()
            ids2[weakest] = new
            sent2[weakest] = b if coef[new] * (b - y[new]) >= coef[new] * (a - y[new]) else a
            order = np.argsort(ids2)
            out[idx] = (ids2[order], sent2[order])
        return out

    def _flip_changes(self, idx: int, values, bits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per neuron of hidden layer ``idx`` at the computed ``values``: the change its flipped (or stuck) bit makes
        and that bit, the one of ``bits`` (per neuron) or, without them, the failure's bit or the position of the
        stored value's bits that changes it most."""
        layer = self.network.hidden_layers[idx]
        y = values[layer.output_value].reshape(-1)
        ids = np.arange(y.size)
        if bits is None and self.failure.bit is not None:
            bits = np.full(y.size, self.failure.bit)
        if bits is not None:
            return self.model.sent(idx, y, ids, 2.0 ** bits.astype(np.float64)) - y, bits
        width = CODE_BITS if layer.codes is not None else layer.word.width
        changes = np.stack([self.model.sent(idx, y, ids, np.full(y.size, 2.0**b)) - y for b in range(width)])
        with np.errstate(invalid="ignore"):
            best = np.argmax(np.where(np.isfinite(changes), np.abs(changes), -1.0), axis=0)
        return changes[best, ids], best

    def _swap_flips(self, chosen: Chosen, per_layer, sign: float, values) -> Chosen:
        """:meth:`_swap` for flipped or stuck bits: each neuron's first-order gain is its coefficient times the change
        its own bit makes at its computed value (the weakest failed neuron's bit kept)."""
        out = list(chosen)
        for idx, (ids, sent) in enumerate(chosen):
            if not len(ids) or idx not in per_layer:
                continue
            coef = sign * per_layer[idx]
            own = coef[ids] * (values[self.network.hidden_layers[idx].output_value].reshape(-1)[ids]
                               - self.model.computed.get(idx, np.zeros(len(ids))))
            weakest = int(np.argmin(own))
            bit = int(bit_positions(sent[weakest : weakest + 1])[0])
            change, _ = self._flip_changes(idx, values, np.full(per_layer[idx].size, bit))
            gain = np.where(np.isfinite(change), coef * change, -np.inf)
            gain[ids] = -np.inf
            new = int(np.argmax(gain))
            if not np.isfinite(gain[new]) or gain[new] <= own[weakest]:
                continue
            ids2, sent2 = ids.copy(), sent.copy()
            ids2[weakest] = new
            order = np.argsort(ids2)
            out[idx] = (ids2[order], sent2[order])
        return out

    def _objective(self, x: np.ndarray, chosen: Chosen) -> tuple[float, int, float]:
        clean = self.model.tail(self.model.run(x))
        faulty = self.model.tail(self.model.run(x, chosen))
        diff = faulty - clean
        k = int(np.argmax(np.abs(diff)))
        return float(abs(diff[k]) * self.network.tail_factor), k, float(np.sign(diff[k]) or 1.0)

    def climb(
        self, x0: np.ndarray, chosen: Chosen, radius: float | None, start: str, steps: int = 12
    ) -> JointCandidate:
        """Alternate value, swap and input moves from (x0, chosen); the best configuration evaluated."""
        low, high = self._box(x0, radius)
        x = np.clip(np.asarray(x0, np.float64), low, high)
        best_err, k, sign = self._objective(x, chosen)
        best = (x.copy(), chosen)
        span = float(np.max(high - low)) if x.size else 0.0
        for _ in range(self.rounds):
            for move in ("values", "swap"):
                grad, per_layer = self.model.gradients(x, chosen, k)
                if move == "values":
                    trial = self._values(chosen, per_layer, sign)
                else:
                    trial = self._swap(x, chosen, per_layer, sign, self.model.run(x, chosen))
                err, k2, s2 = self._objective(x, trial)
                if err > best_err:
                    chosen, best_err, k, sign = trial, err, k2, s2
                    best = (x.copy(), chosen)
            step = 0.25 * span
            for _ in range(steps):
                grad, per_layer = self.model.gradients(x, chosen, k)
                chosen = self._values(chosen, per_layer, sign)
                x = np.clip(x + step * np.sign(sign * grad), low, high)
                err, k, sign = self._objective(x, chosen)
                if err > best_err:
                    best_err, best = err, (x.copy(), chosen)
                step *= 0.7
            x, chosen = best[0].copy(), best[1]
            best_err, k, sign = self._objective(x, chosen)
        x32 = best[0].astype(np.float32)
        return JointCandidate(x32, best[1], self.model.error(x32.astype(np.float64), best[1]), start)

    def initial_set(self, x: np.ndarray, counts: Sequence[int]) -> Chosen:
        """Per layer the ``counts`` neurons with the largest first-order effect on some output at x."""
        values = self.model.run(x)
        a, b = self.failure.failure_range
        best: Chosen | None = None
        best_err = -1.0
        order = np.argsort(-np.abs(self.model.tail(values)), kind="stable")[: self.outputs_tried]
        for k in (int(j) for j in order):
            _, per_layer = self.model.gradients(x, [(np.zeros(0, np.int64), np.zeros(0))] * len(counts), k)
            chosen = []
            for idx, count in enumerate(counts):
                if not count or idx not in per_layer:
                    chosen.append((np.zeros(0, np.int64), np.zeros(0)))
                    continue
                if self.failure.stored:
                    change, bits = self._flip_changes(idx, values)
                    gain = np.where(np.isfinite(change), np.abs(per_layer[idx] * change), -1.0)
                    ids = np.sort(np.argsort(-gain, kind="stable")[:count]).astype(np.int64)
                    chosen.append((ids, 2.0 ** bits[ids].astype(np.float64)))
                    continue
                y = values[self.network.hidden_layers[idx].output_value].reshape(-1)
                gain = np.maximum(np.abs(per_layer[idx] * (a - y)), np.abs(per_layer[idx] * (b - y)))
                ids = np.sort(np.argsort(-gain, kind="stable")[:count]).astype(np.int64)
                chosen.append((ids, np.full(len(ids), b if abs(b) >= abs(a) else a, dtype=np.float64)))
            err = self.model.error(x, chosen)
            if err > best_err:
                best, best_err = chosen, err
        assert best is not None
        return best

    def _sets(self, x0: np.ndarray, counts: Sequence[int], seeds: Sequence[Chosen], small: bool) -> list[Chosen]:
        """Starting fault sets at x0: the given seeds and (unless the budget is small and seeds exist)
        the set of largest first-order effect there."""
        sets = [[(np.asarray(i, np.int64), np.asarray(v, np.float64)) for i, v in seed] for seed in seeds]
        if not (small and sets):
            sets.append(self.initial_set(np.clip(x0, self.low.reshape(x0.shape), self.high.reshape(x0.shape)), counts))
        return sets

    def search(
        self,
        counts: Sequence[int],
        given: np.ndarray | None = None,
        seeds: Sequence[Chosen] = (),
        radius: float | None = None,
        starts: int = 6,
        first: int | None = None,
    ) -> JointCandidate:
        """The best configuration found from given inputs, random points and corners of the domain.

        ``first``: the given input where the seeds were found, climbed from first (so the result is at
        least what the seeds reach there); the other given inputs are drawn at random."""
        lo, hi = self.low, self.high
        shape = tuple(self.network.input_shape[1:])
        small = self.calls < 300
        points: list[tuple[np.ndarray, str]] = []
        if given is not None and len(given):
            count = 1 if small else min(len(given), max(2, starts // 2))
            pick = [int(i) for i in self.rng.choice(len(given), min(len(given), count), replace=False)]
            if first is not None and 0 <= first < len(given):
                pick = [first] + [i for i in pick if i != first][: count - 1]
            points += [(np.asarray(given[i], np.float64), f"given input {i}") for i in pick]
        if radius is None:
            points.append((self.rng.uniform(lo, hi, shape), "random point"))
            if not small:
                points.append((np.where(self.rng.random(shape) < 0.5, lo, hi).astype(np.float64), "corner"))
            points.append((hi.astype(np.float64), "corner"))
        climbs = [(x0, where, chosen) for x0, where in points for chosen in self._sets(x0, counts, seeds, small)]
        steps = max(4, self.calls // max(1, len(climbs) * self.rounds) - 2)
        best: JointCandidate | None = None
        for x0, where, chosen in climbs:
            found = self.climb(x0, chosen, radius, where, steps)
            if best is None or found.error > best.error:
                best = found
        assert best is not None
        return best
