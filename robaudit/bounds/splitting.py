"""Clean ranges of single neurons refined by splitting the input box (docs/method.md §5.8).

The CROWN ranges of docs/method.md §5.2 bound every neuron over the whole input box at once; a neuron
fed by a small patch of the input (a convolution one or two layers deep) is bounded much more tightly
on pieces of that box, where the ReLUs before it stop crossing 0. The maximum of a value over the box is
the largest of its maxima over pieces that cover the box, so splitting the box (branch and bound) and
keeping, per piece, an upper bound of the value there gives an upper bound over the whole box.

:class:`InputSplit` does this for one element of one layer's pre-activation at a time: a piece's bound is
the interval pass (docs/method.md §5.1) from the piece through the steps before the layer, intersected
with the domain-wide clean boxes (they hold on every piece), then one back-substitution of ±e_i to the
input (docs/method.md §5.2), concretized over the piece. The piece with the largest bound is split in two
along the input coordinate with the largest |coefficient| × width, until the evaluations run out.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from robaudit.bounds.ranges import MARGIN, _activation_forward, _Ranges, _size
from robaudit.graph.layers import Layer, activation_chain
from robaudit.graph.network import Network
from robaudit.graph.ops import Interval

#: Evaluations after which a bound that dropped by less than :data:`STALL_DROP` (relative) stops splitting.
STALL = 100
STALL_DROP = 0.01


class InputSplit:
    """Branch and bound over the input box for the pre-activation range of single neurons (module doc).

    ``network``: a model with one float input whose clean boxes (``network.clean``) hold over the input box
    ``network.clean[network.input_name]``; ``layer``: one of its layers (a :class:`Layer` in ``network.steps``).
    """

    def __init__(self, network: Network, layer: Layer) -> None:
        self.net = network
        self.layer = layer
        self.index = next(j for j, step in enumerate(network.steps) if step is layer)
        self.input = network.input_name
        self.shape = network.clean[layer.preact_value].shape
        self.ranges = _Ranges(network, dict(network.clean), set(), {}, 0.0)
        #: multiply-adds charged per evaluation of one piece: the interval pass of the steps before the layer
        #: and one row back through them and the layer (docs/method.md §5.8).
        self.cost = 2.0 * sum(self.ranges.costs[: self.index + 1])
        #: evaluations of pieces done so far.
        self.evaluations = 0

    def upper(self, element: int, sign: float, evaluations: int) -> float:
        """An upper bound of sign·z_element over the input box (z the layer's pre-activation, flattened
        index ``element``, ``sign`` ±1): the largest bound over the pieces after at most ``evaluations``
        bounds of pieces (the box itself first; each split evaluates two). Never above the domain-wide box."""
        box = self.net.clean[self.input]
        pre = self.net.clean[self.layer.preact_value]
        known = float(pre.hi.reshape(-1)[element] if sign > 0 else -pre.lo.reshape(-1)[element])
        found, grad = self._piece(element, sign, box.lo, box.hi)
        counter = itertools.count()
        heap = [(-found, next(counter), box.lo, box.hi, grad)]
        spent = 1
        mark, marked = found, 1  # the bound STALL evaluations ago
        while spent + 2 <= evaluations:
            if spent - marked >= STALL:
                if -heap[0][0] > mark - STALL_DROP * abs(mark):
                    break  # splitting no longer pays here (an exact range, or a neuron fed by the whole box)
                mark, marked = -heap[0][0], spent
            worst, _, lo, hi, grad = heapq.heappop(heap)
            width = (hi - lo).reshape(-1)
            axis = int(np.argmax(np.abs(grad) * width))
            if width[axis] <= 0.0 or grad[axis] == 0.0:  # the bound of this piece is flat: no split helps
                heapq.heappush(heap, (worst, next(counter), lo, hi, grad))
                break
            middle = 0.5 * (lo.reshape(-1)[axis] + hi.reshape(-1)[axis])
            for half in (0, 1):
                flat_lo, flat_hi = lo.copy().reshape(-1), hi.copy().reshape(-1)
                if half == 0:
                    flat_hi[axis] = middle
                else:
                    flat_lo[axis] = middle
                p_lo, p_hi = flat_lo.reshape(lo.shape), flat_hi.reshape(hi.shape)
                bound, g = self._piece(element, sign, p_lo, p_hi)
                heapq.heappush(heap, (-bound, next(counter), p_lo, p_hi, g))
            spent += 2
        return min(known, -heap[0][0])

    def _piece(self, element: int, sign: float, lo: np.ndarray, hi: np.ndarray) -> tuple[float, np.ndarray]:
        """(upper bound of sign·z_element over the piece [lo, hi] with its rounding margin, the row's input
        coefficients): the interval pass from the piece, then one back-substitution (module doc)."""
        self.evaluations += 1
        ranges = self.ranges
        ranges.intervals.clear()
        ranges.intervals.update(self.net.clean)
        ranges.intervals[self.input] = Interval(lo, hi)
        ranges.relaxations.clear()
        ranges.choices.clear()
        ranges.floors.clear()
        ranges.budget = 0.0  # the interval pass alone before the layer (no window)
        for j in range(self.index):
            step = self.net.steps[j]
            if isinstance(step, Layer):
                ranges._layer(j, step, self.net.clean)
            else:
                ranges._node(j, step, self.net.clean)
        coef = np.zeros((1, _size(self.shape)))
        coef[0, element] = sign
        ranges.magnitude = np.zeros(1)
        row = coef.reshape((1,) + self.shape)
        constant, coefs = ranges._carry(row, self.layer.preact_value, self.index, 0, self.layer)
        grad = coefs.pop(self.input, np.zeros((1,) + lo.shape))
        for name, other in coefs.items():  # values where the carry stopped: their (piece) boxes
            constant = constant + ranges._concretize(other, ranges.intervals[name])
        bound = constant + ranges._concretize(grad, ranges.intervals[self.input])
        return float(bound[0] + MARGIN * (1.0 + ranges.magnitude[0])), grad.reshape(-1)


def refined_outputs(
    network: Network, layer: Layer, pre_lo: np.ndarray, pre_hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The box of the layer's output (flattened) from its pre-activation box [pre_lo, pre_hi] (flattened):
    the activation's interval rule (docs/method.md §5.1), or the box itself for a layer without one."""
    if layer.output_value == layer.preact_value:
        return pre_lo.copy(), pre_hi.copy()
    shape = network.clean[layer.preact_value].shape
    chain = activation_chain(layer, {n.name: n for n in network.nodes})
    if len(chain) != 1:  # φ then a rounding op (docs/method.md §5.2): no refined box
        return np.full(pre_lo.size, -np.inf), np.full(pre_lo.size, np.inf)
    node = chain[0]
    out = _activation_forward(node, Interval(pre_lo.reshape(shape), pre_hi.reshape(shape)), network.constants)
    return out.lo.reshape(-1), out.hi.reshape(-1)

