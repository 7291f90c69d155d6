"""The arg-max through the roundings of the output tail (docs/method.md §7.4, "Rounded outputs").

A certificate compares the logits F_c − F_j where the ∞-norm tail starts (``Network.tail_start``); the
model's own output may pass a rounding op after that (the output's QDQ pair of an int8 model, a float16
cast). A rounding is monotone but not strictly: two logits a > b may round to the same code, and
onnxruntime's arg-max then takes the first — a failure that leaves c ahead before the rounding can still
change the prediction (a new-user trial measured it: margin 0.083 before the output's QDQ, a tie after).

Sound ways to keep c strictly ahead after the roundings, per other class j (either suffices):

* **margin**, where every rounding of the tail comes before any op that mixes elements (Softmax, LogSoftmax,
  Concat, Transpose): with one rounding r = q∘clip, the same for every element, r(F̃_c) − r(F̃_j) ≥
  min(F̃_c − F̃_j, top − F̃_j, F̃_c − bottom, top − bottom) − ρ_c − ρ_j; otherwise r(F̃_c) − r(F̃_j) ≥
  (F̃_c − F̃_j) − down_c − up_j, with down (up) bounds of how far the roundings can lower (raise) each value
  over its faulty box (:meth:`Rounding.deviations`);
* **boxes**: the faulty boxes pushed through the whole tail by the interval rules: the lower end of c's
  output above the upper end of j's.
"""

from __future__ import annotations

import numpy as np

from robaudit.errors import RobauditError
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.rounding import Rounding

#: Tail ops after which elements no longer keep their own place (a rounding there is not elementwise on F).
_MIXING = {"Softmax", "LogSoftmax", "Concat", "Transpose"}


def tail_chain(network: Network) -> list[Node]:
    """The nodes from ``tail_start`` to the audited output, in the order they run (empty: no tail)."""
    producers = {out: node for node in network.nodes for out in node.outputs if out}
    chain, value = [], network.output_name
    while value != network.tail_start and (node := producers.get(value)) is not None:
        chain.append(node)
        value = next((v for v in node.inputs if v and v not in network.constants), node.inputs[0])
    return chain[::-1]


class TailOrder:
    """What the roundings of a network's output tail take from a class margin (module doc)."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.chain = tail_chain(network)
        self.rounds = any(isinstance(lookup(node), Rounding) for node in self.chain)
        mixed, self.elementwise = False, True
        for node in self.chain:
            mixed = mixed or node.op_type in _MIXING
            if mixed and isinstance(lookup(node), Rounding):
                self.elementwise = False

    def room(
        self, lo: np.ndarray, hi: np.ndarray, predicted: int, others: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(room, cap, gap) per other class j, for the faulty box [lo, hi] (flat, at ``tail_start``): the rounded
        output keeps c ahead of j when min(margin, cap) − room > 0, the margin being a lower bound of F̃_c − F̃_j
        (``room`` ∞ where that way does not apply), or when ``gap`` > 0: c's lower end above j's upper end after
        the whole tail (its interval rules). No rounding: zeros, +∞ and −∞."""
        count = len(others)
        if not self.rounds:
            return np.zeros(count), np.full(count, np.inf), np.full(count, -np.inf)
        room, cap = np.full(count, np.inf), np.full(count, np.inf)
        roundings = [node for node in self.chain if isinstance(lookup(node), Rounding)]
        if self.elementwise and len(roundings) == 1:
            room, cap = self._one_rounding(roundings[0], lo, hi, predicted, others)
        elif self.elementwise:
            down, up = self._deviations(lo, hi)
            room = down[predicted] + up[others]
        room = np.where(np.isnan(room), np.inf, room)
        cap = np.where(np.isnan(cap), -np.inf, cap)
        return room, cap, self._gap(lo, hi, predicted, others)

    def _one_rounding(
        self, node: Node, lo: np.ndarray, hi: np.ndarray, predicted: int, others: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(room, cap) of one rounding r = q∘clip, the same function for every element (a per-tensor QDQ pair, a
        float16 cast): for a = F̃_c > b = F̃_j, clip(a) − clip(b) = min(a, top) − max(b, bottom) ≥ min(a − b,
        top − b, a − bottom, top − bottom) and q moves each value by at most ρ, so r(a) − r(b) ≥ min(a − b, cap) −
        (ρ_c + ρ_j) with cap = min(top − hi_j, lo_c − bottom, top − bottom); other roundings: how far each value
        can be lowered or raised (:meth:`_deviations`)."""
        rule = lookup(node)
        assert isinstance(rule, Rounding)
        shape = self.network.clean[node.inputs[0]].shape
        ends = rule.saturation(node, shape)
        if ends is None:
            down, up = self._deviations(lo, hi)
            return down[predicted] + up[others], np.full(len(others), np.inf)
        box = Interval(lo.reshape(shape), hi.reshape(shape))
        rho = np.broadcast_to(rule.radius(node, box), shape).astype(np.float64).reshape(-1)
        bottom, top = ends
        cap = np.minimum(np.minimum(top - hi[others], lo[predicted] - bottom), top - bottom)
        return rho[predicted] + rho[others], cap

    def predicted(self, center: np.ndarray) -> int:
        """The class onnxruntime's arg-max answers for the clean tail values ``center`` (flat): the first of the
        largest after the tail's roundings (each as onnxruntime computes it, :meth:`Rounding.fold`), so a tie the
        rounding makes is read as the model reads it; the plain arg-max where a rounding cannot be evaluated."""
        value = np.asarray(center, np.float64)
        for node in self.chain:
            rule = lookup(node)
            if not isinstance(rule, Rounding):
                continue
            shape = self.network.clean[node.inputs[0]].shape
            folded = rule.fold(node, value.reshape(shape).astype(np.float32))
            if folded is None or not self.elementwise:
                return int(np.argmax(center))
            value = np.asarray(folded, np.float64).reshape(-1)
        return int(np.argmax(value))

    def _deviations(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How far the tail's roundings can lower and raise each element (flat), in the order they run."""
        down, up = np.zeros(lo.size), np.zeros(lo.size)
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
        for node in self.chain:
            rule = lookup(node)
            if not isinstance(rule, Rounding):
                continue
            shape = self.network.clean[node.inputs[0]].shape
            d, u = rule.deviations(node, Interval(lo.reshape(shape), hi.reshape(shape)))
            d, u = np.broadcast_to(d, shape).reshape(-1), np.broadcast_to(u, shape).reshape(-1)
            down, up, lo, hi = down + d, up + u, lo - d, hi + u
        return down, up

    def _gap(self, lo: np.ndarray, hi: np.ndarray, predicted: int, others: list[int]) -> np.ndarray:
        """Per other class j: the lower end of c's output box less the upper end of j's (the tail's interval
        rules); −∞ where a rule cannot take the box."""
        none = np.full(len(others), -np.inf)
        shape = self.network.clean[self.network.tail_start].shape
        values: dict[str, Interval] = {self.network.tail_start: Interval(lo.reshape(shape), hi.reshape(shape))}
        try:
            for node in self.chain:
                args = [values.get(v, self.network.constants.get(v)) if v else None for v in node.inputs]
                rule = lookup(node)
                if rule is None:
                    return none
                for name, box in zip(node.outputs, rule.interval(node, args), strict=False):
                    values[name] = box
        except (RobauditError, ValueError, TypeError):  # a rule that cannot take this box: no order shown
            return none
        out = values.get(self.network.output_name)
        if out is None or out.lo.size != lo.size:
            return none
        with np.errstate(invalid="ignore"):
            gap = out.lo.reshape(-1)[predicted] - out.hi.reshape(-1)[others]
        return np.where(np.isnan(gap), -np.inf, gap)
