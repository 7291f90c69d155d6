"""Signed terms of one failure vector with the later failed neurons counted, not every gate opened
(docs/method.md §5.5).

A telescoped term l of the signed bound (docs/method.md §4.1, "Signed terms") compares two states that
both fail the chosen neurons of the layers after l. A failed neuron sends the same value in both, so
it passes no deviation on: its gate is 0. Not knowing which ones failed, the second pass of §4.1 adds 0
to the chord-slope interval of *every* neuron of every failure site, which on a residual network opens
identity sites (slope exactly 1) to [0, 1] everywhere. For one vector f this module counts them instead:
at a later site m at most f_m gates are 0, the others keep their chord slopes. In the back-substitution
of the gated deviation network (:mod:`robaudit.bounds.relational`) a row's linear form at site m's
output is Σ_{j ∉ S_m} c_j·λ_j·s_j = Σ_j c_j·λ_j·s_j + Σ_{j ∈ S_m} (−c_j·λ_j·s_j): the first sum is
relaxed by the gate lines as usual, and each term of the second is at most
g_j = max(0, −c_j·t_lo_j, −c_j·t_hi_j), [t_lo, t_hi] the box of λ_j·s_j, so the second sum is at most
the sum of the f_m largest g_j (the failure terms of docs/method.md §5.3, here on the deviation
network). The forward boxes open site m's gates to 0 (a zero gate's output 0 must lie in them). A gate
whose chord-slope interval already holds 0 (a ReLU whose hull straddles 0) gets no failure term: zeroing it
is the point λ_j = 0 of the λ box, which the gate lines cover (docs/method.md §5.7).

The result is, for this one vector, one more enclosure of every κ_i; it is intersected with the
relaxation's own (docs/method.md §4.5) and its term per layer compared with the stored one
(:class:`~robaudit.bounds.signed.SignedTerms`): each is sound, so is the smaller. Used for the vector a
``bound`` report is asked about (``TightBound.refined``), not inside the inverse problems.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from robaudit import limits
from robaudit.bounds.relational import GatedDeviations, _gate_box, relational_applies, relational_cost
from robaudit.bounds.signed import SignedTerms, _layer_sum, _top
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.ops import Interval

Slopes = tuple[np.ndarray, np.ndarray]


def largest_sum(values: np.ndarray, count: int) -> np.ndarray:
    """Sum of the ``count`` largest entries along the last axis ([..., n] → [...]); every entry ≥ 0."""
    n = values.shape[-1]
    if count >= n:
        return values.sum(axis=-1)
    if count == 1:
        return values.max(axis=-1)
    return -np.partition(-values, count - 1, axis=-1)[..., :count].sum(axis=-1)


def open_gates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Gates whose chord-slope interval [a, b] holds 0 (elementwise, broadcast shape): a zeroed gate there is the
    point λ_j = 0 of the λ box, which the gate lines already cover, so it needs no failure term
    (docs/method.md §5.7)."""
    return (a <= 0.0) & (b >= 0.0)


class ZeroedDeviations(GatedDeviations):
    """The gated deviation network in which at most ``failing[id(layer)]`` gates of each listed layer are 0
    (module doc). ``layer_slopes``: the chord slopes without 0 added (the first pass of §4.1)."""

    def __init__(
        self, net: Network, layer_slopes: dict[int, Slopes], boxes: dict[str, Interval], failing: dict[int, int]
    ) -> None:
        super().__init__(net, layer_slopes, boxes)
        self.failing = failing
        #: per failing layer id: the box of λ·s with λ in its chord slopes, [G, 1, n] each.
        self.gate_boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layer_box(
        self, layer: Layer, a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """λ·s's box, and at a failing layer its hull with 0 (a failed neuron passes no deviation)."""
        t_lo, t_hi = _gate_box(a, b, lo, hi)
        if id(layer) not in self.failing:
            return t_lo, t_hi
        covered = open_gates(a, b)  # zeroing these is a point of the λ box already: no failure term (§5.7)
        self.gate_boxes[id(layer)] = (np.where(covered, 0.0, t_lo)[:, None], np.where(covered, 0.0, t_hi)[:, None])
        return np.minimum(t_lo, 0.0), np.maximum(t_hi, 0.0)

    def _site_terms(self, layer: Layer, coef: np.ndarray) -> np.ndarray | float:
        """The sum of the f_m largest failure terms g_j per row ([G, R]) at a failing layer, else 0."""
        count = self.failing.get(id(layer), 0)
        if count <= 0:
            return 0.0
        t_lo, t_hi = self.gate_boxes[id(layer)]
        terms = np.maximum(np.maximum(-coef * t_lo, -coef * t_hi), 0.0)
        return largest_sum(terms, count)


def vector_cost(signed: SignedTerms, failures: Sequence[int]) -> float:
    """Multiply-adds of :func:`vector_signed_bound` for ``failures``: one relaxation pass per failing
    layer with a later failing layer."""
    analysis = signed.analysis
    outputs = int(np.prod(analysis.network.clean[analysis.network.tail_start].shape))
    return sum(
        relational_cost(analysis.network, layer, outputs)
        for i, layer in enumerate(analysis.hidden)
        if failures[i] > 0 and any(failures[j] > 0 for j in signed.after[i])
    )


def failing_layers(
    signed: SignedTerms, failures: Sequence[int]
) -> Iterator[tuple[int, Layer, int, dict[int, int], int]]:
    """Per failing layer of ``failures``: (its index, the layer, its count capped at its size, the later failing
    layers as {id(layer): count}, the pass p of §4.1 its stored terms come from: 1 with a later failure, else 0)."""
    hidden = signed.analysis.hidden
    for i, f in enumerate(failures):
        if f <= 0:
            continue
        later = {id(hidden[j]): failures[j] for j in signed.after[i] if failures[j] > 0}
        yield i, hidden[i], min(f, hidden[i].neurons), later, 1 if later else 0


def rise_and_fall(
    signed: SignedTerms, index: int, lower: np.ndarray, upper: np.ndarray, y: Interval | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The largest increase and decrease κ_i·d_i of every origin of layer ``index`` ([outputs, N] each), for κ_i in
    [lower, upper] and d_i ∈ [a − yhi_i, b − ylo_i] (docs/method.md §4.1), times the tail factor; ``y``: clean
    ranges [ylo, yhi] of the layer's outputs (flattened) narrower than the CROWN ones (docs/method.md §5.8)."""
    a, b = signed.analysis.failure.failure_range
    y = signed.shifted[index] if y is None else y
    d_lo, d_hi = (a - y.hi)[None, :], (b - y.lo)[None, :]
    corners = [lower * d_lo, lower * d_hi, upper * d_lo, upper * d_hi]
    factor = signed.analysis.network.tail_factor
    return np.maximum(np.maximum.reduce(corners), 0.0) * factor, np.maximum(-np.minimum.reduce(corners), 0.0) * factor


def vector_signed_bound(signed: SignedTerms, failures: Sequence[int], caps: np.ndarray) -> np.ndarray | None:
    """Per output, the signed bound of exactly ``failures`` with the later failed neurons counted (module
    doc): like :meth:`SignedTerms.bound`, each layer's term the smaller of the stored one and this one.
    None where it does not apply, no layer has a later failing layer, or it exceeds
    ``ROBAUDIT_ZEROED_BUDGET`` (:func:`robaudit.limits.zeroed_budget`). ``caps``: [L, outputs], the absolute
    terms of docs/method.md §4.1. Raises :class:`~robaudit.errors.OptionError` for a budget that is not a
    number ≥ 0."""
    analysis = signed.analysis
    net = analysis.network
    cost = vector_cost(signed, failures)
    if cost <= 0 or cost > limits.zeroed_budget() or signed.hulls is None or not relational_applies(net):
        return None
    up = np.zeros(caps.shape[1])
    down = np.zeros(caps.shape[1])
    for i, layer, f, later, p in failing_layers(signed, failures):
        inc, dec = _layer_sum(signed.inc[p][i], f), _layer_sum(signed.dec[p][i], f)
        if later:
            gated = ZeroedDeviations(net, signed.exact_slopes, signed.hulls, later)
            c_lo, c_hi = gated.coefficient_bounds(layer)
            other = signed.relational[1][i]
            if other is not None:  # both enclose κ_i: so does their intersection
                c_lo, c_hi = np.maximum(c_lo, other[0]), np.minimum(c_hi, other[1])
            rise, fall = rise_and_fall(signed, i, c_lo, c_hi)
            inc = np.minimum(inc, _top(rise, f).sum(axis=1))
            dec = np.minimum(dec, _top(fall, f).sum(axis=1))
        cap = caps[i] if p == 0 or not signed.products else np.inf
        up = up + np.minimum(inc, cap)
        down = down + np.minimum(dec, cap)
    return np.maximum(up, down)
