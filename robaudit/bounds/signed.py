"""Signed sensitivities for the domain-wide tight bound (docs/method.md §4.1, "Signed terms").

The failures are added one layer at a time, from the last failing layer back to the first:
F̃ − F = Σ_l [F^(≥l) − F^(≥l+1)], F^(≥l) failing only the chosen neurons of layers ≥ l.
Term l changes only the failed neurons of layer l, whose clean values are not yet moved
(every layer before l is correct), and everything after it is the faulty network of the
layers > l. Between two such states every activation acts as a chord slope of its
clean-and-faulty hull (0 included at a failure site that may have failed: its value is
the same in both states), every affine op with its *signed* weight, so the term is
Σ_{i ∈ S_l} κ_i·(v_i − y_i) with κ_i in an interval computed backwards by interval
arithmetic (the signed backward pass of :mod:`robaudit.bounds.certify`, docs/method.md
§7.3, run on the domain-wide boxes). Per output and layer the f_l largest increases and
decreases are kept, for two passes: chord slopes as they are (valid when no layer after
l fails) and with 0 added at every failure site (always valid).

Only for models where the pass is cheap (``ROBAUDIT_SIGNED_BUDGET`` multiply-adds) and whose
failures the argument covers: crash and byzantine neurons, no synapse failures, no
rounding inside the model, one float input. A range restriction's guard carries its chord slopes
(docs/method.md §7.3); the gated network of §4.5 is not taken there (``relational_applies``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np

from robaudit import limits
from robaudit.bounds.certify import LocalCertifier, _LocalState, chord_slopes
from robaudit.bounds.fep import Analysis
from robaudit.bounds.relational import bounds_for
from robaudit.graph.inputs import FLOAT
from robaudit.graph.layers import Layer
from robaudit.graph.ops import Interval
from robaudit.graph.ops.normalization import NORMALIZATION_OPS

#: Output rows back-propagated together.
ROWS = 256


def signed_applies(analysis: Analysis) -> bool:
    """Whether the signed terms are sound and cheap for this analysis (module doc)."""
    net, failure = analysis.network, analysis.failure
    inputs = getattr(net, "inputs", None)
    single = inputs is None or (len(inputs) == 1 and inputs[0].kind == FLOAT)
    if failure.stored or not analysis.ranges_known or any(analysis.synapses) or not single:
        return False
    if net.rounding or not analysis.hidden or not all(_modelled(la) for la in net.layers):
        return False
    return _cost(analysis) <= limits.signed_budget()  # outputs × weight products, ×4 for the intervals


def _modelled(layer: Layer) -> bool:
    """Layers the signed pass of docs/method.md §7.3 carries: dense on one feature vector (not per token),
    1-D and 2-D convolutions (shapes include the batch of 1)."""
    if layer.geometry is None:
        return math.prod(layer.in_shape[:-1]) == 1 and math.prod(layer.out_shape[:-1]) == 1
    return layer.kind == "conv" and len(layer.in_shape) <= 4


def _cost(analysis: Analysis) -> float:
    net = analysis.network
    outputs = int(np.prod(net.clean[net.tail_start].shape))
    per_row = 0.0
    for layer in net.layers:
        weight = int(np.asarray(layer.weight).size)
        spatial = math.prod(layer.out_shape[1:]) if layer.geometry is not None else 1
        per_row += weight * spatial
    return 8.0 * outputs * per_row


def _hull(a: Interval, b: Interval | None) -> Interval:
    return a if b is None else Interval(np.minimum(a.lo, b.lo), np.maximum(a.hi, b.hi))


class SignedTerms:
    """Per hidden layer and output, the largest increases and decreases of F_k that failing
    neurons of that layer can cause in the telescoped sum (docs/method.md §4.1).

    ``inc[p][l]``/``dec[p][l]`` are [outputs, kept] sorted down, p = 0 for the pass with the
    chord slopes as they are, p = 1 with 0 added at every failure site.
    """

    def __init__(self, analysis: Analysis, kept: int):
        net = analysis.network
        self.analysis = analysis
        local = LocalCertifier(net, analysis.failure)
        faulty = analysis.faulty()
        boxes = {v: _hull(box, faulty.get(v)) for v, box in net.clean.items()}
        count = len(analysis.hidden)
        # both ends of a telescoped term lie in the hulls (neither is the clean network): the rules the signed
        # pass falls back on see the hull as their "clean" box too (docs/method.md §4.2)
        exact = _LocalState(boxes, boxes, {}, [np.zeros(0)] * count, [Interval.point(np.zeros(0))] * count)
        for layer in net.layers:
            pre = boxes[layer.preact_value]
            exact.slopes[id(layer)] = chord_slopes(
                layer, local.act_node[id(layer)], pre.lo.reshape(-1), pre.hi.reshape(-1)
            )
        for i, layer in enumerate(analysis.hidden):
            out = net.clean[layer.output_value]
            exact.shifted[i] = Interval(out.lo.reshape(-1), out.hi.reshape(-1))
        zero = copy.copy(exact)
        zero.slopes = dict(exact.slopes)
        for layer in analysis.hidden:
            lo, hi = exact.slopes[id(layer)]
            zero.slopes[id(layer)] = (np.minimum(lo, 0.0), np.maximum(hi, 0.0))
        outputs = local.outputs
        widths = [min(la.neurons, kept) for la in analysis.hidden]
        # narrower enclosures of the same coefficients by linear relaxation (docs/method.md §4.5)
        self.relational = [bounds_for(net, analysis.hidden, state.slopes, boxes) for state in (exact, zero)]
        self.inc = [[np.zeros((outputs, w)) for w in widths] for _ in range(2)]
        self.dec = [[np.zeros((outputs, w)) for w in widths] for _ in range(2)]
        for p, state in enumerate((exact, zero)):
            for start in range(0, outputs, ROWS):
                stop = min(outputs, start + ROWS)
                rows = np.zeros((stop - start, outputs))
                rows[np.arange(stop - start), np.arange(start, stop)] = 1.0
                found = local._signed_backward(rows, state)
                self._keep(p, slice(start, stop), found, state, widths)
        self.after = _later_layers(net, analysis.hidden)
        #: what one vector's pass with the later failed neurons counted needs (docs/method.md §5.5)
        self.exact_slopes, self.hulls, self.shifted = exact.slopes, boxes, exact.shifted
        #: Whether a product of two variable tensors is on the audited path: then §4.1's absolute term of a
        #: layer bounds its signed term only when no later layer fails (docs/method.md §4.2).
        self.products = any(_is_product(node, net.clean) for node in net.nodes)

    def _keep(self, p: int, rows: slice, found: dict, state: _LocalState, widths: list[int]) -> None:
        a, b = self.analysis.failure.failure_range
        factor = self.analysis.network.tail_factor
        for i, (c_lo, c_hi) in found.items():
            narrower = self.relational[p][i]
            if narrower is not None:  # both enclose κ_i: so does their intersection (docs/method.md §4.5)
                c_lo, c_hi = np.maximum(c_lo, narrower[0][rows]), np.minimum(c_hi, narrower[1][rows])
            y = state.shifted[i]
            d_lo, d_hi = (a - y.hi)[None, :], (b - y.lo)[None, :]
            corners = [c_lo * d_lo, c_lo * d_hi, c_hi * d_lo, c_hi * d_hi]
            up = np.maximum(np.maximum.reduce(corners), 0.0) * factor
            down = np.maximum(-np.minimum.reduce(corners), 0.0) * factor
            self.inc[p][i][rows] = _top(up, widths[i])
            self.dec[p][i][rows] = _top(down, widths[i])

    def bound(self, failures: Sequence[int], caps: np.ndarray) -> np.ndarray:
        """Per output: max(Σ_l min(increase_l, cap_l), Σ_l min(decrease_l, cap_l)), ``caps`` [L, outputs]
        the absolute terms of §4.1 (each also bounds term l: docs/method.md §4.1; with a product of two
        variable tensors only when no layer after l fails, §4.2)."""
        up = np.zeros(caps.shape[1])
        down = np.zeros(caps.shape[1])
        for i, f in enumerate(failures):
            if f <= 0:
                continue
            p = 1 if any(failures[j] > 0 for j in self.after[i]) else 0
            f = min(f, self.analysis.hidden[i].neurons)
            cap = caps[i] if p == 0 or not self.products else np.inf
            up = up + np.minimum(_layer_sum(self.inc[p][i], f), cap)
            down = down + np.minimum(_layer_sum(self.dec[p][i], f), cap)
        return np.maximum(up, down)


#: Ops whose error-propagation rule reads the *clean* range of an input besides its faulty one (a
#: normalization's σ floor; see also :func:`_is_product`): their absolute terms hold between the clean and
#: the faulty network only, not between two faulty states (docs/method.md §4.2).
CLEAN_READERS = ("Reciprocal",) + NORMALIZATION_OPS


def _is_product(node, clean: dict) -> bool:
    """A ``Mul``, ``Div`` or ``MatMul`` of two variable tensors, or an op of :data:`CLEAN_READERS` on a
    variable: its rule reads a clean range, so §4.1's absolute term caps a telescoped term only when no
    later layer fails."""
    if node.op_type in CLEAN_READERS:
        return any(v and v in clean for v in node.inputs[:1])
    return node.op_type in ("Mul", "Div", "MatMul") and sum(1 for v in node.inputs[:2] if v and v in clean) == 2


def _top(values: np.ndarray, width: int) -> np.ndarray:
    if width < values.shape[1]:
        values = -np.partition(-values, width - 1, axis=1)[:, :width]
    return -np.sort(-values, axis=1)


def _layer_sum(top: np.ndarray, f: int) -> np.ndarray:
    """Sum of the f largest values per row; past the kept ones each further value is at most the
    smallest kept one (docs/method.md §4.4)."""
    kept = top.shape[1]
    if f <= kept:
        return top[:, :f].sum(axis=1)
    return top.sum(axis=1) + (f - kept) * top[:, -1]


def _later_layers(net, hidden: Sequence[Layer]) -> list[set[int]]:
    """Per hidden layer, the hidden layers after it in the order of the steps (the telescoped sum's order)."""
    position = {id(step): p for p, step in enumerate(net.steps)}
    places = [position[id(la)] for la in hidden]
    return [{j for j, q in enumerate(places) if q > p} for p in places]
