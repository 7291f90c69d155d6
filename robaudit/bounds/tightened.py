"""Tightened pre-gate boxes for the largest signed terms of one failure vector (docs/method.md §5.6).

The signed terms of a reported vector (docs/method.md §4.1, §4.5, §5.5) bound each coefficient κ_i of an
origin neuron i by back-substituting the rows ±e_k through the gated deviation network, whose gate lines
are the chords of λ·s over the *pre-gate boxes* of s. Those boxes come from an interval pass: on the
trained small ResNet they are several times wider than what the deviation of one neuron can produce, and
the intercepts of the chords charge that width. Tightening a pre-gate box by back-substituting ±e_j from
each of its elements through the gates already relaxed (docs/method.md §4.5, step 1) halves the largest
stem terms there, but it costs about a thousand rows per origin, far too much for every origin of every
layer. This module pays it only where the vector's bound is decided:

1. per failing layer, start from the enclosure of κ the vector's bound already uses (the relaxation of
   §4.5, intersected with the counted one of §5.5 where a later layer fails);
2. repeatedly find the output k and the side (increase or decrease) where the vector's signed bound is
   largest, and in the layer contributing most to it the origins among the f_l largest corners whose
   boxes were not yet tightened; tighten them (with the ones next in line, a chunk at a time), intersect
   the new enclosure with the old one, and recompute;
3. stop when the largest side's top corners are all tightened, when the other bounds (§4.1's cuts, the
   output cut) are below it, or when ``ROBAUDIT_TIGHTENED_BUDGET`` is spent.

Only the crossing elements (box straddling 0) of a pre-gate box are back-substituted — a gate whose box keeps
its sign has exact lines, so the box of such an element enters no intercept — and every element the deviation
reaches at a later failing layer (its box sets the failure terms of docs/method.md §5.5), in values reached
from the origin through two gates or more (a cost choice: behind one gate and one affine map, as in a residual
block, the interval box is exact). Every enclosure computed is sound for every λ in the box of chord slopes
and every zeroed set of the later failing layers, so each origin keeps the intersection of all its enclosures,
and every layer's term is the smaller of the stored one and the one computed here (both bound the same
telescoped term).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from robaudit import limits
from robaudit.bounds.relational import (
    RESHAPES,
    _steps_after,
    _weight_products,
    relational_applies,
    relational_cost,
)
from robaudit.bounds.signed import SignedTerms, _layer_sum
from robaudit.bounds.zeroed import ZeroedDeviations, largest_sum, vector_cost
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval

Slopes = tuple[np.ndarray, np.ndarray]

#: Origin neurons tightened together (the rows of one chunk are the union of their crossing elements).
CHUNK = 8


class TightenedDeviations(ZeroedDeviations):
    """The counted gated deviation network of docs/method.md §5.5 (``failing`` may be empty: then the one of
    §4.5) with every crossing pre-gate box tightened by its own back-substitution (docs/method.md §5.6)."""

    def __init__(
        self, net: Network, layer_slopes: dict[int, Slopes], boxes: dict[str, Interval], failing: dict[int, int]
    ) -> None:
        super().__init__(net, layer_slopes, boxes, failing)
        self.refine = True
        self._depths: dict[int, dict[str, int]] = {}
        self._site: Layer | Node | None = None

    def _tightens(self, layer: Layer) -> bool:
        """Layers with an activation, and the failing layers: their boxes set the failure terms (§5.5)."""
        return layer.activation is not None or id(layer) in self.failing

    def _refine_rows(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The elements whose box straddles 0 for some origin of the chunk ([G, n] → flat indices); at a failing
        layer every element the deviation reaches (both ends of its box enter the failure terms)."""
        if self._site is not None and id(self._site) in self.failing:
            return np.flatnonzero(((lo != 0) | (hi != 0)).any(axis=0))
        return np.flatnonzero(((lo < 0) & (hi > 0)).any(axis=0))

    def _refined(
        self, origin: Layer, before: Sequence, gates: dict, step: Layer | Node, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pre-gate box of ``step`` tightened (:meth:`GatedDeviations._refined`) when some path from the
        origin to it crosses two gates or more; with fewer, the back-substitution only meets exact gate boxes
        (a cost heuristic: keeping a box is always sound)."""
        value = step.input_value if isinstance(step, Layer) else step.inputs[0]
        if self._gate_depths(origin).get(value, 2) < 2:
            return lo, hi
        self._site = step
        try:
            return super()._refined(origin, before, gates, step, lo, hi)
        finally:
            self._site = None

    def _gate_depths(self, origin: Layer) -> dict[str, int]:
        """The largest number of gates (activations, failing layers) on a path from ``origin``'s output to each
        value it reaches."""
        if id(origin) not in self._depths:
            depth: dict[str, int] = {origin.output_value: 0}
            for step in self._after(origin):
                if isinstance(step, Layer):
                    if step.input_value in depth:  # an activation or a failing layer's zeroed gates
                        gate = step.activation is not None or id(step) in self.failing
                        depth[step.output_value] = depth[step.input_value] + gate
                    continue
                reached = [depth[v] for v in step.inputs if v in depth]
                if reached:
                    depth[step.outputs[0]] = max(reached) + (step.name in self.node_slopes)
            self._depths[id(origin)] = depth
        return self._depths[id(origin)]


@dataclass
class _LayerState:
    """One failing layer's enclosure of κ ([outputs, N] each) and what the bound takes from it."""

    index: int
    layer: Layer
    count: int
    lower: np.ndarray
    upper: np.ndarray
    stored_inc: np.ndarray
    stored_dec: np.ndarray
    cap: np.ndarray
    gated: TightenedDeviations
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    rise: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fall: np.ndarray = field(default_factory=lambda: np.zeros(0))


def tightened_cost(net: Network, layer: Layer, outputs: int, failing: dict[int, int]) -> float:
    """Multiply-adds charged per origin neuron of ``layer`` tightened: 2·|v| rows × the weight products from
    the origin to v for every gated or failing value v after it (as :func:`~robaudit.bounds.relational.refine_cost`,
    the layers of ``failing`` added), plus its relaxation pass — an upper bound: fewer rows are back-substituted."""
    per_row = 0.0
    total = 0.0
    for step in _steps_after(net, layer):
        if isinstance(step, Layer):
            per_row += _weight_products(step)
            if step.activation is not None or id(step) in failing:
                total += 2.0 * step.neurons * per_row
        elif step.op_type not in ("Add", "Sub") and step.op_type not in RESHAPES:
            total += 2.0 * math.prod(net.clean[step.outputs[0]].shape) * per_row
    return total + relational_cost(net, layer, outputs) / max(1, layer.neurons)


def tightened_signed_bound(
    signed: SignedTerms, failures: Sequence[int], caps: np.ndarray, ceiling: np.ndarray
) -> np.ndarray | None:
    """Per output, the signed bound of exactly ``failures`` (docs/method.md §5.5) with the pre-gate boxes of
    the origins that decide it tightened (module doc, docs/method.md §5.6). ``caps`` [L, outputs]: the
    absolute terms of docs/method.md §4.1; ``ceiling`` [outputs]: what the other bounds already give (no
    work is spent where they are smaller). None where the rule does not apply (no relaxed enclosure, the
    counted rule of §5.5 over its budget, ``ROBAUDIT_TIGHTENED_BUDGET`` = 0). Raises
    :class:`~robaudit.errors.OptionError` for a budget that is not a number ≥ 0."""
    analysis = signed.analysis
    net = analysis.network
    budget = limits.tightened_budget()
    if budget <= 0 or signed.hulls is None or not relational_applies(net) or not any(f > 0 for f in failures):
        return None
    if vector_cost(signed, failures) > limits.zeroed_budget():
        return None
    states, fixed_up, fixed_down = _initial(signed, failures, caps)
    if not states:
        return None
    outputs = caps.shape[1]
    spent = 0.0
    while True:
        up, down = fixed_up.copy(), fixed_down.copy()
        for state in states:
            inc, dec = _terms(state)
            up, down = up + inc, down + dec
        bound = np.maximum(up, down)
        k = int(np.argmax(np.minimum(bound, ceiling)))
        if ceiling[k] <= bound[k]:
            break  # the other bounds decide output k (and every output is at most this one)
        chosen = _next_chunk(states, k, rising=bool(up[k] >= down[k]))
        if chosen is None:
            break
        state, neurons = chosen
        cost = tightened_cost(net, state.layer, outputs, state.gated.failing) * len(neurons)
        if spent + cost > budget:
            break
        spent += cost
        _tighten(state, neurons, signed)
    return bound


def _initial(
    signed: SignedTerms, failures: Sequence[int], caps: np.ndarray
) -> tuple[list[_LayerState], np.ndarray, np.ndarray]:
    """The failing layers with a relaxed enclosure of κ (their states), and the summed terms of the others."""
    analysis = signed.analysis
    net = analysis.network
    fixed_up, fixed_down = np.zeros(caps.shape[1]), np.zeros(caps.shape[1])
    states: list[_LayerState] = []
    for i, f in enumerate(failures):
        if f <= 0:
            continue
        layer = analysis.hidden[i]
        later = {id(analysis.hidden[j]): failures[j] for j in signed.after[i] if failures[j] > 0}
        p = 1 if later else 0
        f = min(f, layer.neurons)
        stored_inc, stored_dec = _layer_sum(signed.inc[p][i], f), _layer_sum(signed.dec[p][i], f)
        cap = caps[i] if p == 0 or not signed.products else np.full(caps.shape[1], np.inf)
        base = signed.relational[p][i]
        if later:  # the counted enclosure of §5.5, intersected with the relaxation's own
            counted = ZeroedDeviations(net, signed.exact_slopes, signed.hulls, later).coefficient_bounds(layer)
            base = counted if base is None else (np.maximum(base[0], counted[0]), np.minimum(base[1], counted[1]))
        if base is None:
            fixed_up += np.minimum(stored_inc, cap)
            fixed_down += np.minimum(stored_dec, cap)
            continue
        gated = TightenedDeviations(net, signed.exact_slopes, signed.hulls, later)
        lower, upper = base
        state = _LayerState(i, layer, f, lower.copy(), upper.copy(), stored_inc, stored_dec, cap, gated,
                            np.zeros(layer.neurons, bool))
        _corners(state, signed)
        states.append(state)
    return states, fixed_up, fixed_down


def _corners(state: _LayerState, signed: SignedTerms) -> None:
    """The largest increase and decrease κ_i·d_i of every origin ([outputs, N] each), d_i ∈ [a − yhi_i,
    b − ylo_i] (docs/method.md §4.1), times the tail factor."""
    a, b = signed.analysis.failure.failure_range
    y = signed.shifted[state.index]
    d_lo, d_hi = (a - y.hi)[None, :], (b - y.lo)[None, :]
    corners = [state.lower * d_lo, state.lower * d_hi, state.upper * d_lo, state.upper * d_hi]
    factor = signed.analysis.network.tail_factor
    state.rise = np.maximum(np.maximum.reduce(corners), 0.0) * factor
    state.fall = np.maximum(-np.minimum.reduce(corners), 0.0) * factor


def _terms(state: _LayerState) -> tuple[np.ndarray, np.ndarray]:
    """The layer's term per output on each side: the smaller of the stored one and the sum of the f largest
    corners of the current enclosure, capped by §4.1's absolute term."""
    inc = np.minimum(np.minimum(state.stored_inc, largest_sum(state.rise, state.count)), state.cap)
    dec = np.minimum(np.minimum(state.stored_dec, largest_sum(state.fall, state.count)), state.cap)
    return inc, dec


def _next_chunk(states: list[_LayerState], k: int, rising: bool) -> tuple[_LayerState, np.ndarray] | None:
    """The layer contributing most to output ``k``'s side among those with an untightened origin in its f
    largest corners there, and its next :data:`CHUNK` untightened origins by that corner; None if none."""
    best: tuple[float, _LayerState] | None = None
    for state in states:
        values = (state.rise if rising else state.fall)[k]
        top = np.argsort(-values, kind="stable")[: state.count]
        if not np.any(~state.done[top] & (values[top] > 0)):  # nothing left to tighten among them
            continue
        inc, dec = _terms(state)
        used = float((inc if rising else dec)[k])
        if best is None or used > best[0]:
            best = (used, state)
    if best is None:
        return None
    state = best[1]
    values = (state.rise if rising else state.fall)[k]
    order = [int(n) for n in np.argsort(-values, kind="stable") if not state.done[n] and values[n] > 0]
    return state, np.asarray(order[:CHUNK], np.int64)


def _tighten(state: _LayerState, neurons: np.ndarray, signed: SignedTerms) -> None:
    """Tighten the origins ``neurons`` of one layer and intersect their enclosures (docs/method.md §5.6)."""
    lower, upper = state.gated._chunk(state.layer, neurons)  # [len, outputs] each
    state.lower[:, neurons] = np.maximum(state.lower[:, neurons], lower.T)
    state.upper[:, neurons] = np.minimum(state.upper[:, neurons], upper.T)
    state.done[neurons] = True
    _corners(state, signed)
