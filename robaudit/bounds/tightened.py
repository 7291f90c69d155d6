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
   output cut) are below it, or when the next chunk would exceed ``ROBAUDIT_TIGHTENED_BUDGET`` (charged the
   multiply-adds each chunk did, :attr:`TightenedDeviations.work`); where every top corner is tightened, the
   clean ranges of those origins are narrowed by splitting the input box instead (:class:`_Splitting`,
   docs/method.md §5.8, ``ROBAUDIT_SPLIT_BUDGET``) and the loop goes on.

Only the crossing elements (box straddling 0) of a pre-gate box are back-substituted — a gate whose box keeps
its sign has exact lines, so the box of such an element enters no intercept — and every element the deviation
reaches at a later failing layer (its box sets the failure terms of docs/method.md §5.5), in values reached
from the origin through two gates or more (a cost choice: behind one gate and one affine map, as in a residual
block, the interval box is exact). Every enclosure computed is sound for every λ in the box of chord slopes
and every zeroed set of the later failing layers, so each origin keeps the intersection of all its enclosures,
and every layer's term is the smaller of the stored one and the one computed here (both bound the same
telescoped term).

The rows of a chunk go back once through the steps whose gate lines are the same for every origin of the chunk,
then per origin on the elements its deviation reaches (box not [0, 0]): each layer's weights restricted to those
elements as one dense matrix, and a form that reaches a pre-gate box of one point (every gate before it exact)
is evaluated there. The enclosures are those of the whole-plane back-substitution (docs/method.md §5.6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from robaudit import limits
from robaudit.bounds.relational import (
    MARGIN,
    RESHAPES,
    _add,
    _relax,
    _signed_adjoint,
    _steps_after,
    _weight_products,
    relational_applies,
    relational_cost,
    unit_rows,
)
from robaudit.bounds.shared_input import first_layer_map, shared_input_terms
from robaudit.bounds.signed import SignedTerms, _layer_sum
from robaudit.bounds.splitting import InputSplit, refined_outputs
from robaudit.bounds.zeroed import (
    ZeroedDeviations,
    failing_layers,
    largest_sum,
    open_gates,
    rise_and_fall,
    vector_cost,
)
from robaudit.graph.conv import conv2d
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.affine import as_2d

Slopes = tuple[np.ndarray, np.ndarray]

#: Pieces of the input box evaluated per refined end of one origin's clean range (docs/method.md §5.8).
SPLIT_EVALUATIONS = 400
#: Origin neurons tightened together (the rows of one chunk are the union of their crossing elements).
CHUNK = 8
#: Largest layer (outputs × inputs) whose weights are kept as one dense matrix for the back-substitution of
#: one origin's rows (32 MiB in float64); larger layers go through their adjoint on whole planes.
DENSE_ENTRIES = 1 << 22


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
        self._dense: dict[int, np.ndarray | None] = {}
        #: Multiply-adds done by the tightening so far: the rows through the weights, and one per coefficient
        #: relaxed (what the budget is charged, docs/method.md §5.6).
        self.work = 0.0

    def _tightens(self, layer: Layer) -> bool:
        """Layers with an activation, and the failing layers: their boxes set the failure terms (§5.5)."""
        return layer.activation is not None or id(layer) in self.failing

    def _refine_rows(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The elements whose box straddles 0 for some origin of the chunk ([G, n] → flat indices); at a failing
        layer also every element the deviation reaches whose gate has a failure term (both ends of its box enter
        it; an open gate has none, docs/method.md §5.7)."""
        crossing = ((lo < 0) & (hi > 0)).any(axis=0)
        if self._site is not None and id(self._site) in self.failing:
            reached = ((lo != 0) | (hi != 0)).any(axis=0)
            if isinstance(self._site, Layer) and id(self._site) in self.layer_slopes:
                a, b = self.layer_slopes[id(self._site)]
                reached &= ~np.broadcast_to(open_gates(a, b), reached.shape)
            return np.flatnonzero(reached | crossing)
        return np.flatnonzero(crossing)

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
            return self._refined_each(origin, before, gates, step, lo, hi)
        finally:
            self._site = None

    def _refined_each(
        self, origin: Layer, before: Sequence, gates: dict, step: Layer | Node, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`GatedDeviations._refined` computed per origin on the elements its deviation reaches: the rows
        (shared by the chunk) first go back through the steps whose gate lines are the same for every origin
        (:meth:`_shared_back`), then each origin's through the others (:meth:`_each_back`). The same enclosure:
        an element whose box is [0, 0] keeps it (its rows are not run), and a coefficient on an element of box
        [0, 0] multiplies 0 (docs/method.md §5.6)."""
        count = lo.shape[0]
        size = int(np.prod(lo.shape[1:]))
        flat_lo, flat_hi = lo.reshape(count, -1), hi.reshape(count, -1)
        chosen = self._refine_rows(flat_lo, flat_hi)
        if chosen.size == 0:
            return lo, hi
        m = chosen.size
        rows = unit_rows(chosen, size)
        cot: dict[str, np.ndarray]
        if isinstance(step, Layer):
            self.work += 2 * m * _weight_products(step)
            cot = {step.input_value: _signed_adjoint(step, rows.reshape((2 * m,) + tuple(step.out_shape[1:])))[None]}
        else:
            cot = {step.inputs[0]: rows.reshape((1, 2 * m) + tuple(lo.shape[1:]))}
        rest, const = self._shared_back(list(before), gates, cot, 2 * m)
        up = np.full((count, size), np.inf)
        down = np.full((count, size), -np.inf)
        for g in range(count):
            keep = np.flatnonzero((flat_lo[g, chosen] != 0) | (flat_hi[g, chosen] != 0))
            if keep.size == 0:
                continue
            value = self._each_back(origin, rest, gates, cot, const, g, np.concatenate([keep, m + keep]))
            k = keep.size
            up[g, chosen[keep]] = value[:k] + MARGIN * (1 + np.abs(value[:k]))
            down[g, chosen[keep]] = -value[k:] - MARGIN * (1 + np.abs(value[k:]))
        return (np.maximum(flat_lo, down).reshape(lo.shape), np.minimum(flat_hi, up).reshape(hi.shape))

    def _shared_back(
        self, steps: list, gates: dict, cot: dict[str, np.ndarray], k2: int
    ) -> tuple[list, np.ndarray]:
        """Back-substitute the shared rows ``cot`` ([1, k2, *value]) through the last steps of ``steps`` while their
        gate lines are the same for every origin; the steps left and the constants so far ([1 or G, k2])."""
        const: np.ndarray = np.zeros((1, k2))
        while steps:
            step = steps[-1]
            if isinstance(step, Layer):
                lines = gates.get(step.preact_value) if step.output_value in cot else None
            else:
                lines = gates.get(step.inputs[0]) if step.name in self.node_slopes and step.outputs[0] in cot else None
            if lines is not None and not all(bool((x == x[:1]).all()) for x in lines):
                break
            if isinstance(step, Layer) and step.output_value in cot:
                self.work += cot[step.output_value].shape[0] * k2 * (_weight_products(step) + step.neurons)
            const = const + self._back_one(steps.pop(), gates, cot, k2)
        return steps, const

    def _each_back(
        self, origin: Layer, steps: list, gates: dict, shared: dict[str, np.ndarray], const: np.ndarray, g: int,
        rows: np.ndarray,
    ) -> np.ndarray:
        """The rows ``rows`` of origin ``g`` back from ``shared`` through ``steps`` to the origin neuron: the
        value of each (its coefficient there plus its constant), [len(rows)]. Every coefficient array holds only
        the elements of its value that the origin's deviation reaches (box not [0, 0])."""
        reach: dict[str, np.ndarray] = {}

        def where(value: str, pregate: bool = False) -> np.ndarray:
            key = ("pre:" if pregate else "") + value
            if key not in reach:
                lo, hi = self._pregates[value] if pregate else self._boxes[value]
                reach[key] = np.flatnonzero((lo[g].reshape(-1) != 0) | (hi[g].reshape(-1) != 0))
            return reach[key]

        k2 = rows.size
        cot: dict[str, np.ndarray] = {}
        for value, array in shared.items():
            if value in self._boxes:
                flat = array[min(g, array.shape[0] - 1)].reshape(array.shape[1], -1)
                cot[value] = flat[np.ix_(rows, where(value))]
        total = const[min(g, const.shape[0] - 1), rows].copy()
        for step in reversed(steps):
            if isinstance(step, Layer):
                grad = cot.pop(step.output_value, None)
                if grad is None or step.preact_value not in gates:
                    continue
                pre = where(step.preact_value, pregate=True)
                coef = _remap(grad, where(step.output_value), pre)
                total += self._site_terms(step, coef, g, pre)
                carried, extra = self._each_relax(coef, gates[step.preact_value], g, pre)
                total += extra
                if step.preact_value in self._points:
                    total += carried @ self._points[step.preact_value][g, pre]
                    continue
                if step.input_value in self._boxes:
                    _add(cot, step.input_value, self._each_adjoint(step, carried, pre, where(step.input_value)))
                continue
            grad = cot.pop(step.outputs[0], None)
            if grad is None:
                continue
            here = where(step.outputs[0])
            if step.op_type in ("Add", "Sub"):
                for position, value in enumerate(step.inputs[:2]):
                    if value in self._boxes:
                        moved = _remap(grad, here, where(value))
                        _add(cot, value, -moved if step.op_type == "Sub" and position == 1 else moved)
                continue
            value = step.inputs[0]
            if step.name in self.node_slopes:
                if value not in gates:
                    continue
                pre = where(value, pregate=True)
                carried, extra = self._each_relax(_remap(grad, here, pre), gates[value], g, pre)
                total += extra
                if value in self._points:
                    total += carried @ self._points[value][g, pre]
                else:
                    _add(cot, value, _remap(carried, pre, where(value)))
            elif step.op_type in RESHAPES:
                _add(cot, value, _remap(grad, here, where(value)))
            else:
                rule = lookup(step)
                assert rule is not None
                out_shape = tuple(self.net.clean[step.outputs[0]].shape)
                full = np.zeros((k2, math.prod(out_shape[1:])))
                full[:, here] = grad
                back = rule.backward(step, [full.reshape((k2,) + out_shape)], self.ctx)[0]
                _add(cot, value, np.asarray(back).reshape(k2, -1)[:, where(value)])
        found = cot.get(origin.output_value)
        if found is not None:
            total += _remap(found, where(origin.output_value), self._neurons[g : g + 1])[:, 0]
        return total

    def _each_relax(
        self, coef: np.ndarray, lines: tuple[np.ndarray, ...], g: int, pre: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~robaudit.bounds.relational._relax` of origin ``g``'s rows [k2, |pre|] on the elements ``pre``."""
        self.work += float(coef.size)
        carried, extra = _relax(coef[None], tuple(x[g : g + 1][:, :, pre] for x in lines))
        return carried[0], extra[0]

    def _site_terms(
        self, layer: Layer, coef: np.ndarray, g: int | None = None, pre: np.ndarray | None = None
    ) -> np.ndarray | float:
        """:meth:`ZeroedDeviations._site_terms` (the sum of the f_m largest g_j = max(0, −c_j·t_lo_j, −c_j·t_hi_j)
        per row), for rows [G, R, n] or, given ``g`` and ``pre``, origin ``g``'s rows [R, |pre|] on the elements
        ``pre`` (elsewhere the box of λ·s is [0, 0]: g_j = 0). As t_lo ≤ t_hi, g_j = |c_j|·max(0, −t_lo_j) where
        c_j ≥ 0 and |c_j|·max(0, t_hi_j) where c_j < 0 (the same floats)."""
        count = self.failing.get(id(layer), 0)
        if count <= 0:
            return 0.0
        t_lo, t_hi = self.gate_boxes[id(layer)]
        if g is not None and pre is not None:
            t_lo, t_hi = t_lo[g, 0, pre], t_hi[g, 0, pre]
        below, above = np.maximum(-t_lo, 0.0), np.maximum(t_hi, 0.0)
        return largest_sum(np.abs(coef) * np.where(coef >= 0, below, above), count)

    def _each_adjoint(self, layer: Layer, coef: np.ndarray, out: np.ndarray, into: np.ndarray) -> np.ndarray:
        """Wᵀ of ``layer`` on rows [k2, |out|] held on the output elements ``out``, kept on the input elements
        ``into``: [k2, |into|]."""
        matrix = self._dense_weights(layer)
        if matrix is not None:
            self.work += float(coef.shape[0]) * out.size * into.size
            return coef @ matrix[np.ix_(out, into)]
        self.work += coef.shape[0] * _weight_products(layer)
        full = np.zeros((coef.shape[0], layer.neurons))
        full[:, out] = coef
        back = _signed_adjoint(layer, full.reshape((coef.shape[0],) + tuple(layer.out_shape[1:])))
        return back.reshape(coef.shape[0], -1)[:, into]

    def _dense_weights(self, layer: Layer) -> np.ndarray | None:
        """The layer's linear map as one [outputs, inputs] float64 matrix (a convolution applied to the unit
        inputs: every entry is one weight or 0), or None above :data:`DENSE_ENTRIES`."""
        if id(layer) not in self._dense:
            inputs = math.prod(layer.in_shape[1:])
            matrix = None
            if layer.neurons * inputs <= DENSE_ENTRIES:
                weight = np.asarray(layer.weight, np.float64)
                if layer.geometry is None:
                    matrix = np.ascontiguousarray(weight.reshape(layer.neurons, inputs))
                else:
                    unit = np.eye(inputs).reshape((inputs,) + tuple(layer.in_shape[1:]))
                    matrix = np.ascontiguousarray(conv2d(unit, as_2d(weight), layer.geometry).reshape(inputs, -1).T)
            self._dense[id(layer)] = matrix
        return self._dense[id(layer)]

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


def _remap(coef: np.ndarray, held: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows [k2, |held|] on the sorted elements ``held`` moved onto the sorted elements ``wanted`` ([k2, |wanted|]):
    0 on an element not held, an element not wanted dropped (its box is [0, 0])."""
    if held.size == wanted.size and np.array_equal(held, wanted):
        return coef
    out = np.zeros((coef.shape[0], wanted.size))
    if wanted.size == 0 or held.size == 0:
        return out
    position = np.minimum(np.searchsorted(wanted, held), wanted.size - 1)
    found = wanted[position] == held
    out[:, position[found]] = coef[:, found]
    return out


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
    #: the clean ranges of the layer's outputs the corners use, refined by splitting (docs/method.md §5.8)
    y: Interval | None = None
    #: (origin, end) pairs whose clean range was refined: end 1 the upper end, −1 the lower one
    split: set = field(default_factory=set)
    splitter: InputSplit | None = None
    pre: Interval | None = None
    #: the first layer's term over one shared input per output, increase and decrease (docs/method.md §5.9)
    shared: tuple[np.ndarray, np.ndarray] | None = None


def tightened_cost(net: Network, layer: Layer, outputs: int, failing: dict[int, int]) -> float:
    """Multiply-adds expected per origin neuron of ``layer`` before its first chunk: 2·|v| rows × the weight
    products from the origin to v for every gated or failing value v after it (as
    :func:`~robaudit.bounds.relational.refine_cost`, the layers of ``failing`` added), plus its relaxation pass —
    an upper bound of the work (fewer rows, fewer elements per row); later chunks are expected to cost what the
    last one of their layer did (:attr:`TightenedDeviations.work`)."""
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
    per_origin: dict[int, float] = {}  # per layer: the work of one origin in its last chunk
    splitting = _Splitting(signed, limits.split_budget())
    shared = _Shared(signed, limits.shared_budget())
    while True:
        up, down = fixed_up.copy(), fixed_down.copy()
        for state in states:
            inc, dec = _terms(state)
            up, down = up + inc, down + dec
        bound = np.maximum(up, down)
        k = int(np.argmax(np.minimum(bound, ceiling)))
        if ceiling[k] <= bound[k]:
            break  # the other bounds decide output k (and every output is at most this one)
        rising = bool(up[k] >= down[k])
        chosen = _next_chunk(states, k, rising)
        if chosen is None and not splitting.step(states, k, rising):
            # every top corner tightened, no range left to split: the first layer's term over one shared input
            # (§5.9), then the untightened origins of its best set
            fresh = shared.refresh(states)
            chosen = shared.wanted(k, rising)
            if chosen is None:
                if fresh:
                    continue
                break
        elif chosen is None:
            continue
        state, neurons = chosen
        if state.index not in per_origin:
            per_origin[state.index] = tightened_cost(net, state.layer, outputs, state.gated.failing)
        if spent + per_origin[state.index] * len(neurons) > budget:  # no budget for it: narrower clean ranges
            if splitting.step(states, k, rising):
                continue
            break
        done = state.gated.work
        _tighten(state, neurons, signed)
        work = state.gated.work - done + relational_cost(net, state.layer, outputs) / state.layer.neurons * len(neurons)
        per_origin[state.index] = work / len(neurons)
        spent += work
    return bound


class _Shared:
    """The first layer's term over one shared input (docs/method.md §5.9) within ``budget`` multiply-adds, and
    the origins of its best sets whose pre-gate boxes are not tightened yet (§5.6)."""

    def __init__(self, signed: SignedTerms, budget: float) -> None:
        self.signed = signed
        self.budget = budget
        self.spent = 0.0
        self.state: _LayerState | None = None
        self.sets: list[list[list[int]]] = [[], []]
        self.key: tuple[int, int] | None = None
        #: per layer state: the layer's pre-activation as A·x + c, or None where §5.9 does not apply
        self.maps: dict[int, tuple[np.ndarray, np.ndarray, bool] | None] = {}

    def refresh(self, states: list[_LayerState]) -> bool:
        """Recompute the shared-input terms of the first layer's state where its enclosure or corners changed since
        the last time; True where they were recomputed (False where none applies or the budget is spent)."""
        if self.budget - self.spent <= 0:
            return False
        net = self.signed.analysis.network
        candidates = [self.state] if self.state is not None else states
        for state in candidates:
            key = (int(state.done.sum()), len(state.split))
            if key == self.key:
                return False
            y = state.y if state.y is not None else self.signed.shifted[state.index]
            if state.index not in self.maps:  # A and c depend on the layer alone: built once per vector
                self.maps[state.index] = first_layer_map(net, state.layer) if state.count >= 2 else None
            found = shared_input_terms(net, self.maps[state.index], (state.lower, state.upper), y.lo,
                                       self.signed.analysis.failure.failure_range, (state.rise, state.fall),
                                       state.count, self.budget - self.spent)
            if found is not None:
                inc, dec = found[0], found[1]
                if state.shared is not None:  # each bounds the same term: keep the smaller
                    inc, dec = np.minimum(inc, state.shared[0]), np.minimum(dec, state.shared[1])
                state.shared = (inc, dec)
                self.spent += found[2]
                self.sets = found[3]
                self.state = state
                self.key = key
                return True
        self.budget = 0.0  # no layer has it: never look again
        return False

    def wanted(self, k: int, rising: bool) -> tuple[_LayerState, np.ndarray] | None:
        """The first layer's state and the untightened origins of its best set on output ``k``'s side, then the
        next untightened ones by corner, :data:`CHUNK` at most; None where that set is tightened already."""
        state = self.state
        if state is None or not self.sets[0]:
            return None
        chosen = [i for i in self.sets[0 if rising else 1][k] if not state.done[i]]
        if not chosen:
            return None
        values = (state.rise if rising else state.fall)[k]
        more = [int(n) for n in np.argsort(-values, kind="stable") if not state.done[n] and int(n) not in chosen]
        return state, np.asarray((chosen + more)[:CHUNK], np.int64)


def _initial(
    signed: SignedTerms, failures: Sequence[int], caps: np.ndarray
) -> tuple[list[_LayerState], np.ndarray, np.ndarray]:
    """The failing layers with a relaxed enclosure of κ (their states), and the summed terms of the others."""
    analysis = signed.analysis
    net = analysis.network
    fixed_up, fixed_down = np.zeros(caps.shape[1]), np.zeros(caps.shape[1])
    states: list[_LayerState] = []
    for i, layer, f, later, p in failing_layers(signed, failures):
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
    state.rise, state.fall = rise_and_fall(signed, state.index, state.lower, state.upper, state.y)


class _Splitting:
    """Clean ranges of the origins that decide a vector's bound, narrowed by splitting the input box
    (docs/method.md §5.8), within ``budget`` multiply-adds (:attr:`InputSplit.cost` per piece evaluated)."""

    def __init__(self, signed: SignedTerms, budget: float) -> None:
        self.signed = signed
        self.budget = budget
        self.spent = 0.0
        net = signed.analysis.network
        self.applies = budget > 0 and len(net.input_boxes) == 1 and net.input_name in net.clean

    def step(self, states: list[_LayerState], k: int, rising: bool) -> bool:
        """Refine the untried ends of the f_l largest corners on output ``k``'s side in the layer whose term
        there is largest; False when there is none or the budget does not pay for one more origin."""
        if not self.applies:
            return False
        best: tuple[float, _LayerState, list[tuple[int, int]]] | None = None
        for state in states:
            wanted = _split_wanted(state, k, rising, self.signed)
            if not wanted:
                continue
            inc, dec = _terms(state)
            used = float((inc if rising else dec)[k])
            if best is None or used > best[0]:
                best = (used, state, wanted)
        if best is None:
            return False
        state = best[1]
        net = self.signed.analysis.network
        if state.splitter is None:
            state.splitter = InputSplit(net, state.layer)
            pre = net.clean[state.layer.preact_value]
            state.pre = Interval(pre.lo.reshape(-1).copy(), pre.hi.reshape(-1).copy())
        pre_box = state.pre
        assert pre_box is not None
        cost = state.splitter.cost * SPLIT_EVALUATIONS
        done = False
        for neuron, end in best[2]:
            if self.spent + cost > self.budget:
                break
            before = state.splitter.evaluations
            found = state.splitter.upper(neuron, float(end), SPLIT_EVALUATIONS)
            self.spent += state.splitter.cost * (state.splitter.evaluations - before)
            if end > 0:
                pre_box.hi[neuron] = min(pre_box.hi[neuron], found)
            else:
                pre_box.lo[neuron] = max(pre_box.lo[neuron], -found)
            state.split.add((neuron, end))
            done = True
        if not done:
            return False
        lo, hi = refined_outputs(net, state.layer, pre_box.lo, np.maximum(pre_box.hi, pre_box.lo))
        shifted = self.signed.shifted[state.index]
        y_lo, y_hi = np.maximum(shifted.lo, lo), np.minimum(shifted.hi, hi)
        state.y = Interval(y_lo, np.maximum(y_hi, y_lo))
        _corners(state, self.signed)
        return True


def _split_wanted(state: _LayerState, k: int, rising: bool, signed: SignedTerms) -> list[tuple[int, int]]:
    """The (origin, end) pairs among the f_l largest corners of output ``k``'s side whose corner takes an end of
    the clean range not refined yet: end 1 where it takes d = a − yhi (the upper end of y), −1 where it takes
    d = b − ylo (the lower end)."""
    values = (state.rise if rising else state.fall)[k]
    top = np.argsort(-values, kind="stable")[: state.count]
    a, b = signed.analysis.failure.failure_range
    y = state.y if state.y is not None else signed.shifted[state.index]
    wanted = []
    for n in (int(t) for t in top):
        if values[n] <= 0:
            continue
        kappa = (state.lower[k, n], state.upper[k, n])
        with_hi = [c * (a - y.hi[n]) for c in kappa]
        with_lo = [c * (b - y.lo[n]) for c in kappa]
        pick = max if rising else min
        end = 1 if (pick(with_hi) >= pick(with_lo) if rising else pick(with_hi) <= pick(with_lo)) else -1
        if (n, end) not in state.split:
            wanted.append((n, end))
    return wanted


def _terms(state: _LayerState) -> tuple[np.ndarray, np.ndarray]:
    """The layer's term per output on each side: the smaller of the stored one and the sum of the f largest
    corners of the current enclosure, capped by §4.1's absolute term."""
    inc = np.minimum(np.minimum(state.stored_inc, largest_sum(state.rise, state.count)), state.cap)
    dec = np.minimum(np.minimum(state.stored_dec, largest_sum(state.fall, state.count)), state.cap)
    if state.shared is not None:  # the first layer's term over one shared input (docs/method.md §5.9)
        inc, dec = np.minimum(inc, state.shared[0]), np.minimum(dec, state.shared[1])
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
