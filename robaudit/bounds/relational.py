"""Coefficient bounds of the signed terms by linear relaxation of the gated deviation network
(docs/method.md §4.5).

A telescoped term of the signed bound (docs/method.md §4.1, "Signed terms") is Σ_{i ∈ S_l} κ_i·(v_i − y_i),
where κ_i is what a unit deviation of failed neuron i becomes at output k when every scalar activation
after layer l multiplies the deviation reaching it by a chord slope λ_j ∈ [s_lo_j, s_hi_j], the same λ
for every neuron of S_l (the two states of the term are fixed). So κ_i = κ_i(λ) for one λ in the box of
chord slopes, and the interval arithmetic of the signed pass is one enclosure of {κ_i(λ)}. This module
computes a second one, usually much narrower on residual networks where every ReLU may switch: for each
origin neuron i, the *gated deviation network* — the unit deviation e_i at layer l's output, the affine
ops exact with their signed weights, each activation replaced by t_j = λ_j·s_j with λ_j free in its
chord interval — is bounded by CROWN-style back-substitution (Zhang et al. 2018) from each output, with
the pre-gate boxes of s_j from an interval pass of the same network started at e_i (so every intercept
is paid only where the deviation of *that* neuron can reach). For s ∈ [l, u] and λ ∈ [a, b] the value
t = λ·s lies between min(a·s, b·s) (concave in s) and max(a·s, b·s) (convex in s): exact lines where s
keeps its sign, the chords of the two over [l, u] where it does not. A min and a max of sound
enclosures of κ_i are sound (the signed terms take their intersection).

Only models made of dense and convolution layers, sums and differences of two values, stand-alone
activations with chord slopes (ReLU, LeakyReLU, Sigmoid, Tanh — not a range restriction's guard ops,
``GUARD_OPS``, nor one reading a layer's own pre-activation), pure reshapes and linear reductions
(``GlobalAveragePool``, ``ReduceMean``, ``ReduceSum``) are handled, and only while the work
(origins × rows × multiply-adds after the origin layer) fits in ``ROBAUDIT_RELATIONAL_BUDGET``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from robaudit import limits
from robaudit.bounds.certify import LINEAR_REDUCTIONS, conv_adjoint, node_chord_slopes
from robaudit.graph.conv import conv2d, conv2d_adjoint
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext, lookup
from robaudit.graph.ops.affine import as_2d, weight_products

#: A range restriction's guard ops (docs/method.md §7.3): the signed pass carries their chord slopes; the gated
#: deviation network does not model them (its relaxation of them is not tested; the signed terms stay sound
#: without it: their own enclosure is the one the network narrows).
GUARD_OPS = ("NanGuard", "Clip", "ChannelClip")

#: Origins handled together (the coefficient tensors are [origins × 2·outputs, *value]).
ORIGINS = 64
#: Relative margin on every bound for float64 rounding (the products and sums of the passes).
MARGIN = 1e-9
#: Ops that only reshape a value: the deviation keeps its elements (a ``Cast`` that rounds is refused).
RESHAPES = ("Identity", "Dropout", "Cast", "Flatten", "Reshape", "Squeeze", "Unsqueeze")

Slopes = tuple[np.ndarray, np.ndarray]


def relational_applies(net: Network) -> bool:
    """Whether every step of ``net`` is one this module models (module doc); the batch on axis 0."""
    if net.batch_axes:
        return False
    hidden = [p for p, step in enumerate(net.steps) if isinstance(step, Layer) and not step.is_output]
    preacts = {step.preact_value for step in net.steps if isinstance(step, Layer)}
    for step in net.steps[hidden[0] if hidden else len(net.steps) :]:  # before the first failure site nothing deviates
        if isinstance(step, Layer):
            if step.internal or step.tied or step.kind not in ("dense", "conv"):
                return False
            if step.geometry is None and math.prod(step.in_shape[:-1]) != 1:
                return False
            if step.geometry is not None and len(step.in_shape) != 4:
                return False
        elif not _modelled_node(step, net):
            return False
        elif step.op_type not in ("Add", "Sub") and step.inputs[0] in preacts:
            # a gate reading a layer's pre-activation (a layer without an activation: its output) would be keyed by
            # the value the layer's own gate is, and replace it — the failure site's slope with 0 added was lost
            # and an independent attack measured 10 against a bound of 7 (docs/method.md §4.5)
            return False
    return True


def _modelled_node(node: Node, net: Network) -> bool:
    variables = [v for v in node.inputs if v and v in net.clean]
    if node.op_type in ("Add", "Sub") and len(variables) == 2:
        return True
    if len(variables) != 1 or node.inputs[0] not in net.clean or len(node.outputs) != 1:
        return False
    if node.op_type == "Cast" and node.outputs[0] in net.rounding:  # a narrowing cast rounds (docs/method.md §1.2)
        return False
    if node.op_type in RESHAPES or node.op_type in LINEAR_REDUCTIONS[1:]:
        return True
    box = net.clean[node.inputs[0]]
    if node.op_type in GUARD_OPS:
        return False
    return node_chord_slopes(node, box.lo, box.hi, net.constants) is not None


def _steps_after(net: Network, origin: Layer) -> list:
    """The network's steps after the layer ``origin``, in order."""
    index = next((i for i, step in enumerate(net.steps) if step is origin), len(net.steps))
    return list(net.steps[index + 1 :])


def _weight_products(layer: Layer) -> float:
    """Multiply-adds of one row through ``layer``'s affine op (weights × output positions)."""
    spatial = math.prod(layer.out_shape[2:]) if layer.geometry is not None else 1
    return float(np.asarray(layer.weight).size * spatial)


def relational_cost(net: Network, origin: Layer, outputs: int) -> float:
    """Multiply-adds of :func:`coefficient_bounds` for one origin layer: origins × (2·outputs + 2) rows ×
    the weight products of the layers after it."""
    per_row = 0.0
    for step in _steps_after(net, origin):
        if isinstance(step, Layer):
            per_row += _weight_products(step)
    return float(origin.neurons) * (2 * outputs + 2) * per_row


def refine_cost(net: Network, origin: Layer) -> float:
    """Multiply-adds of tightening every pre-gate box for the origins of one layer (:meth:`GatedDeviations._refined`):
    origins × Σ over the gated values v after the origin layer of 2·|v| rows × the weight products from there to v."""
    per_row = 0.0
    total = 0.0
    for step in _steps_after(net, origin):
        if isinstance(step, Layer):
            per_row += _weight_products(step)
            if step.activation is not None:
                total += 2.0 * step.neurons * per_row
        elif isinstance(step, Node) and step.op_type not in ("Add", "Sub") and step.op_type not in RESHAPES:
            total += 2.0 * math.prod(net.clean[step.outputs[0]].shape) * per_row
    return float(origin.neurons) * total


def gate_lines(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Lines below and above t = λ·s for λ ∈ [a, b], s ∈ [lo, hi] (elementwise, a ≤ b):
    (lower slope, lower intercept, upper slope, upper intercept), docs/method.md §4.5.

    max(a·s, b·s) is convex and min(a·s, b·s) concave in s (slopes a then b, b then a, across 0): where
    s keeps its sign they are the lines b·s / a·s themselves; across 0 the chord over [lo, hi] lies
    above the convex one and below the concave one.
    """
    cross = (lo < 0) & (hi > 0)
    width = np.where(cross, hi - lo, 1.0)
    up_chord = (b * hi - a * lo) / width
    low_chord = (a * hi - b * lo) / width
    up_slope = np.where(cross, up_chord, np.where(lo >= 0, b, a))
    up_cut = np.where(cross, a * lo - up_chord * lo, 0.0)
    low_slope = np.where(cross, low_chord, np.where(lo >= 0, a, b))
    low_cut = np.where(cross, b * lo - low_chord * lo, 0.0)
    return low_slope, low_cut, up_slope, up_cut


def _gate_box(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[min, max] of λ·s over λ ∈ [a, b], s ∈ [lo, hi] (the four corners)."""
    corners = [a * lo, a * hi, b * lo, b * hi]
    return np.minimum.reduce(corners), np.maximum.reduce(corners)


def _relax(coef: np.ndarray, lines: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """coef·t ≤ (coef⁺·upper slope + coef⁻·lower slope)·s + Σ (coef⁺·upper cut + coef⁻·lower cut):
    the new coefficient on s and the constant per row. ``coef`` [g, R, n], lines [G, 1, n] (g and G equal,
    or either 1: rows shared by every origin stay shared while the lines are the same for all,
    docs/method.md §5.6). Computed as coef·lower + coef⁺·(upper − lower), the constants as two matrix-vector
    products (the same sums, rounded differently)."""
    if coef.shape[0] == 1 and lines[0].shape[0] > 1 and all(bool((g == g[:1]).all()) for g in lines):
        lines = tuple(g[:1] for g in lines)
    low_slope, low_cut, up_slope, up_cut = lines
    carried = coef * low_slope
    cuts = bool(up_cut.any() or low_cut.any())
    same = np.array_equal(low_slope, up_slope)
    if same and not cuts:  # one line, through 0: no choice by sign, no intercept
        return carried, np.zeros(carried.shape[:2])
    positive = np.maximum(coef, 0.0)
    if cuts:
        const = np.matmul(coef, low_cut.transpose(0, 2, 1)) + np.matmul(positive, (up_cut - low_cut).transpose(0, 2, 1))
        const = np.broadcast_to(const[..., 0], carried.shape[:2])
    else:
        const = np.zeros(carried.shape[:2])
    if not same:
        carried += positive * (up_slope - low_slope)
    return carried, const


def unit_rows(chosen: np.ndarray, size: int) -> np.ndarray:
    """[2m, size] for the m flat indices ``chosen``: the rows +e_j, then the rows −e_j (the two sides of each
    element's box, docs/method.md §4.5 step 1)."""
    m = chosen.size
    rows = np.zeros((2 * m, size))
    rows[np.arange(m), chosen] = 1.0
    rows[m + np.arange(m), chosen] = -1.0
    return rows


class GatedDeviations:
    """The gated deviation network of one model for one pass of the signed terms (module doc).

    ``layer_slopes`` (per layer id, flat per neuron) and the stand-alone activations' chord slopes over
    ``boxes`` (the clean-and-faulty hulls) are the λ intervals.
    """

    def __init__(self, net: Network, layer_slopes: dict[int, Slopes], boxes: dict[str, Interval]):
        self.net = net
        self.layer_slopes = layer_slopes
        self.ctx = PropagationContext(boxes, boxes, net.constants)
        self.node_slopes: dict[str, Slopes] = {}
        for step in net.steps:
            if isinstance(step, Node) and step.op_type not in ("Add", "Sub") and step.inputs[0] in boxes:
                box = boxes[step.inputs[0]]
                found = None if step.op_type in GUARD_OPS else node_chord_slopes(step, box.lo, box.hi, net.constants)
                if found is not None and step.op_type not in RESHAPES:
                    self.node_slopes[step.name] = (found[0].reshape(-1), found[1].reshape(-1))
        self.outputs = int(np.prod(net.clean[net.tail_start].shape))
        #: Whether every pre-gate box is tightened by its own back-substitution (:meth:`_refined`).
        self.refine = False
        self._neurons = np.zeros(0, np.int64)
        #: per pre-gate value of the current pass whose box is one point: that point, [G, n].
        self._points: dict[str, np.ndarray] = {}
        #: the current pass's pre-gate boxes ([G, n] each) and value boxes ([G, *shape] each).
        self._pregates: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def coefficient_bounds(self, origin: Layer) -> tuple[np.ndarray, np.ndarray]:
        """[lower, upper] of κ_i at every output k for every neuron i of ``origin``: two [outputs, N_l] arrays."""
        lower = np.empty((self.outputs, origin.neurons))
        upper = np.empty((self.outputs, origin.neurons))
        for start in range(0, origin.neurons, ORIGINS):
            stop = min(origin.neurons, start + ORIGINS)
            low, up = self._chunk(origin, np.arange(start, stop))
            lower[:, start:stop], upper[:, start:stop] = low.T, up.T
        return lower, upper

    # ------------------------------------------------------------------ forward: pre-gate boxes

    def _chunk(self, origin: Layer, neurons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lower, upper] of κ for the origin neurons ``neurons`` (flat indices), [len(neurons), outputs] each."""
        count = len(neurons)
        unit = np.zeros((count, origin.neurons))
        unit[np.arange(count), neurons] = 1.0
        steps = self._after(origin)
        start = unit.reshape((count,) + tuple(origin.out_shape[1:]))
        gates = self._forward(origin, steps, start, neurons)
        coef, const = self._backward(origin, steps, gates, count)  # [count, 2·outputs, N_l], [count, 2·outputs]
        value = coef[np.arange(count)[:, None], np.arange(coef.shape[1])[None, :], neurons[:, None]] + const
        top = value[:, : self.outputs]  # ≥ κ_i,k
        bottom = -value[:, self.outputs :]  # ≤ κ_i,k
        return bottom - MARGIN * (1 + np.abs(bottom)), top + MARGIN * (1 + np.abs(top))

    def _after(self, origin: Layer) -> list:
        steps = self.net.steps
        index = next(p for p, step in enumerate(steps) if step is origin)
        return steps[index + 1 :]

    def _forward(
        self, origin: Layer, steps: Sequence, start: np.ndarray, neurons: np.ndarray
    ) -> dict[str, tuple[np.ndarray, ...]]:
        """Interval pass of the gated network from the unit deviations ``start`` [G, *shape] (origin neurons
        ``neurons``): the lines of every gate (by the value its pre-gate deviation lives in), [G, 1, n] each;
        with :attr:`refine`, each pre-gate box also tightened by its own back-substitution."""
        boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {origin.output_value: (start, start)}
        gates: dict[str, tuple[np.ndarray, ...]] = {}
        count = start.shape[0]
        self._neurons = neurons
        self._points = {}
        self._pregates = {}
        self._boxes = boxes
        for position, step in enumerate(steps):
            if isinstance(step, Layer):
                if step.input_value not in boxes:
                    continue
                lo, hi = _affine_box(step, *boxes[step.input_value])
                if self.refine and self._tightens(step):
                    lo, hi = self._refined(origin, steps[:position], gates, step, lo, hi)
                a, b = self.layer_slopes[id(step)]
                flat_lo, flat_hi = lo.reshape(count, -1), hi.reshape(count, -1)
                self._note_point(step.preact_value, flat_lo, flat_hi)
                gates[step.preact_value] = tuple(g[:, None] for g in gate_lines(a[None], b[None], flat_lo, flat_hi))
                out = self._layer_box(step, a[None], b[None], flat_lo, flat_hi)
                boxes[step.output_value] = (out[0].reshape(lo.shape), out[1].reshape(hi.shape))
                continue
            moved = [v for v in step.inputs if v in boxes]
            if not moved:
                continue
            out_shape = (count,) + tuple(self.net.clean[step.outputs[0]].shape[1:])
            if step.op_type in ("Add", "Sub"):
                boxes[step.outputs[0]] = _sum_box(step, boxes, out_shape)
            elif step.name in self.node_slopes:
                a, b = self.node_slopes[step.name]
                lo, hi = boxes[step.inputs[0]]
                if self.refine:
                    lo, hi = self._refined(origin, steps[:position], gates, step, lo, hi)
                flat_lo, flat_hi = lo.reshape(count, -1), hi.reshape(count, -1)
                self._note_point(step.inputs[0], flat_lo, flat_hi)
                gates[step.inputs[0]] = tuple(g[:, None] for g in gate_lines(a[None], b[None], flat_lo, flat_hi))
                out = _gate_box(a[None], b[None], flat_lo, flat_hi)
                boxes[step.outputs[0]] = (out[0].reshape(out_shape), out[1].reshape(out_shape))
            elif step.op_type in RESHAPES:
                lo, hi = boxes[step.inputs[0]]
                boxes[step.outputs[0]] = (lo.reshape(out_shape), hi.reshape(out_shape))
            else:  # a linear reduction with a positive scale: the interval rule is exact on boxes
                lo, hi = boxes[step.inputs[0]]
                rule = lookup(step)
                assert rule is not None
                args = [Interval(lo, hi)] + [self.net.constants.get(v) if v else None for v in step.inputs[1:]]
                reduced = rule.interval(step, args)[0]
                boxes[step.outputs[0]] = (reduced.lo.reshape(out_shape), reduced.hi.reshape(out_shape))
        return gates

    def _note_point(self, value: str, lo: np.ndarray, hi: np.ndarray) -> None:
        """Keep the pre-gate box [lo, hi] ([G, n]) of ``value``, and its point when it is one for every origin."""
        self._pregates[value] = (lo, hi)
        if np.array_equal(lo, hi):
            self._points[value] = lo

    def _refined(
        self, origin: Layer, before: Sequence, gates: dict, step: Layer | Node, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pre-gate box [lo, hi] of ``step`` ([G, *shape]) intersected with ±e_j back-substituted from each
        of its elements through the gates already relaxed (``before``) to the origin (docs/method.md §4.5)."""
        count = lo.shape[0]
        size = int(np.prod(lo.shape[1:]))
        flat_lo, flat_hi = lo.reshape(count, -1), hi.reshape(count, -1)
        chosen = self._refine_rows(flat_lo, flat_hi)
        if chosen.size == 0:
            return lo, hi
        m = chosen.size
        rows = unit_rows(chosen, size)
        if isinstance(step, Layer):
            back = _signed_adjoint(step, rows.reshape((2 * m,) + tuple(step.out_shape[1:])))
            start = {step.input_value: back[None]}  # the same rows for every origin until a gate differs
        else:
            start = {step.inputs[0]: rows.reshape((1, 2 * m) + tuple(lo.shape[1:]))}
        coef, const = self._substitute(origin, before, gates, start, count, 2 * m)
        neurons = self._neurons
        value = coef[np.arange(count)[:, None], np.arange(2 * m)[None, :], neurons[:, None]] + const
        up = np.full((count, size), np.inf)
        down = np.full((count, size), -np.inf)
        up[:, chosen] = value[:, :m] + MARGIN * (1 + np.abs(value[:, :m]))
        down[:, chosen] = -value[:, m:] - MARGIN * (1 + np.abs(value[:, m:]))
        return (np.maximum(flat_lo, down).reshape(lo.shape), np.minimum(flat_hi, up).reshape(hi.shape))

    # ------------------------------------------------------------------ backward: back-substitution

    def _backward(
        self, origin: Layer, steps: Sequence, gates: dict[str, tuple[np.ndarray, ...]], count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows ±e_k from the audited output back to the origin's output: the coefficients there
        [G, 2·outputs, N_l] and the constants [G, 2·outputs]."""
        net, k = self.net, self.outputs
        tail_shape = tuple(net.clean[net.tail_start].shape[1:])
        eye = np.eye(k)
        rows = np.concatenate([eye, -eye]).reshape((1, 2 * k) + tail_shape)
        cot: dict[str, np.ndarray] = {net.tail_start: rows}
        return self._substitute(origin, steps, gates, cot, count, 2 * k)

    def _substitute(
        self, origin: Layer, steps: Sequence, gates: dict[str, tuple[np.ndarray, ...]], cot: dict[str, np.ndarray],
        count: int, k2: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Back-substitution of the linear forms ``cot`` ([g, k2, *value] per value, g = ``count`` or 1 for rows
        shared by every origin) through ``steps`` in reverse to the origin's output: the coefficients there
        [G, k2, N_l] and the constants [G, k2]. A form reaching a pre-gate value whose box is one point (every
        gate before it exact) is that point's value (:meth:`_point_value`) and goes no further."""
        const = np.zeros((count, k2))
        for step in reversed(list(steps)):
            const += self._back_one(step, gates, cot, k2)
        found = cot.get(origin.output_value)
        if found is None:
            return np.zeros((count, k2, origin.neurons)), const
        return np.broadcast_to(found.reshape(found.shape[0], k2, -1), (count, k2, origin.neurons)), const

    def _back_one(
        self, step: Layer | Node, gates: dict[str, tuple[np.ndarray, ...]], cot: dict[str, np.ndarray], k2: int
    ) -> np.ndarray | float:
        """One step of :meth:`_substitute`: the forms at ``step``'s output moved to its inputs in ``cot``; returns
        what they add to the constants ([g, k2] or 0)."""
        net = self.net
        const: np.ndarray | float = 0.0
        if isinstance(step, Layer):
            grad = cot.pop(step.output_value, None)
            if grad is None or step.preact_value not in gates:
                return const
            rows = grad.reshape(grad.shape[0], k2, -1)
            const = self._site_terms(step, rows)
            flat, extra = _relax(rows, gates[step.preact_value])
            const = const + extra
            if step.preact_value in self._points:
                return const + self._point_value(flat, step.preact_value)
            g = flat.shape[0]
            _add(cot, step.input_value, _signed_adjoint(step, flat.reshape((g * k2,) + step.out_shape[1:]))
                 .reshape((g, k2) + tuple(step.in_shape[1:])))
            return const
        grad = cot.pop(step.outputs[0], None)
        if grad is None:
            return const
        g = grad.shape[0]
        if step.op_type in ("Add", "Sub"):
            for position, value in enumerate(step.inputs[:2]):
                if value in net.clean:
                    _add(cot, value, -grad if step.op_type == "Sub" and position == 1 else grad)
            return const
        value = step.inputs[0]
        in_shape = tuple(net.clean[value].shape[1:])
        if step.name in self.node_slopes:
            if value not in gates:  # no deviation reaches it from this origin
                return const
            flat, extra = _relax(grad.reshape(g, k2, -1), gates[value])
            if value in self._points:
                return extra + self._point_value(flat, value)
            _add(cot, value, flat.reshape((flat.shape[0], k2) + in_shape))
            return extra
        if step.op_type in RESHAPES:
            _add(cot, value, grad.reshape((g, k2) + in_shape))
            return const
        rule = lookup(step)
        assert rule is not None
        full = grad.reshape((g * k2,) + tuple(net.clean[step.outputs[0]].shape))
        back = rule.backward(step, [full], self.ctx)[0]
        _add(cot, value, np.asarray(back).reshape((g, k2) + in_shape))
        return const

    def _point_value(self, coef: np.ndarray, value: str) -> np.ndarray:
        """Σ_j coef_j·s_j ([g, k2, n] → [G, k2]) for a pre-gate value s whose box is the one point p: every gate
        from the origin to s is then exact (equal slopes, or a deviation of exactly 0), so the back-substitution
        of these rows from s to the origin is the linear map that gives s, evaluated at the origin's unit
        deviation: coef·p (docs/method.md §5.6)."""
        return np.matmul(coef, self._points[value][:, :, None])[..., 0]

    def _layer_box(
        self, layer: Layer, a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The box of a layer's gated output λ·s, λ ∈ [a, b], s ∈ [lo, hi] ([G, n] each); a subclass may
        widen it (docs/method.md §5.5)."""
        return _gate_box(a, b, lo, hi)

    def _tightens(self, layer: Layer) -> bool:
        """Whether :attr:`refine` tightens ``layer``'s pre-gate box: where it has an activation (a subclass may
        add layers whose boxes enter other terms, docs/method.md §5.6)."""
        return layer.activation is not None

    def _refine_rows(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The elements (flat indices) of a pre-gate box [lo, hi] ([G, n]) that :meth:`_refined` back-substitutes:
        all of them here (a subclass may keep fewer; any subset is sound, docs/method.md §5.6)."""
        return np.arange(lo.shape[1])

    def _site_terms(self, layer: Layer, coef: np.ndarray) -> np.ndarray | float:
        """What the rows [G, R, n] of ``coef`` at ``layer``'s output add to their constants besides its gate
        lines: nothing here (a subclass adds failure terms, docs/method.md §5.5)."""
        return 0.0


def _add(cot: dict[str, np.ndarray], value: str, grad: np.ndarray) -> None:
    cot[value] = grad if value not in cot else cot[value] + grad


def _affine_box(layer: Layer, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[W·x] over the box x ∈ [lo, hi] (no bias: deviations), [G, *in] → [G, *out]: centre through W,
    radius through |W|."""
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    weight = np.asarray(layer.weight, np.float64)
    if layer.geometry is None:
        m = mid.reshape(mid.shape[0], -1) @ weight.T
        r = rad.reshape(rad.shape[0], -1) @ np.abs(weight).T
        shape = (mid.shape[0],) + tuple(layer.out_shape[1:])
    else:
        m = conv2d(mid, as_2d(weight), layer.geometry)
        r = conv2d(rad, np.abs(as_2d(weight)), layer.geometry)
        shape = (mid.shape[0],) + tuple(layer.out_shape[1:])
    return (m - r).reshape(shape), (m + r).reshape(shape)


def _signed_adjoint(layer: Layer, grad: np.ndarray) -> np.ndarray:
    """Wᵀ (signed) of a layer applied to [R, *out] coefficients → [R, *in]."""
    if layer.geometry is None:
        rows = grad.reshape(grad.shape[0], -1)
        (product,) = weight_products(layer.weight, [(rows, False)])
        return product.reshape((grad.shape[0],) + tuple(layer.in_shape[1:]))
    full = grad.reshape((grad.shape[0],) + tuple(layer.out_shape))
    weight = np.asarray(layer.weight, np.float64)
    geom = layer.geometry
    if geom.groups == 1 and len(layer.in_shape) == 4:  # one BLAS product for all taps (docs/method.md §4.4)
        back = conv2d_adjoint(as_2d(grad.reshape((grad.shape[0],) + tuple(layer.out_shape[1:]))), weight, geom,
                              (layer.in_shape[2], layer.in_shape[3]))
        return back.reshape((grad.shape[0],) + tuple(layer.in_shape[1:]))
    return conv_adjoint(full, weight, layer).reshape((grad.shape[0],) + tuple(layer.in_shape[1:]))


def _sum_box(node: Node, boxes: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Box of the deviation of a sum or difference of two values (a value without an entry deviates by 0)."""
    lo, hi = np.zeros(shape), np.zeros(shape)
    for position, value in enumerate(node.inputs[:2]):
        if value not in boxes:
            continue
        v_lo, v_hi = boxes[value]
        if node.op_type == "Sub" and position == 1:
            v_lo, v_hi = -v_hi, -v_lo
        lo, hi = lo + v_lo, hi + v_hi
    return lo, hi


def bounds_for(
    net: Network, hidden: Sequence[Layer], layer_slopes: dict[int, Slopes], boxes: dict[str, Interval],
    budget: float | None = None, progress: Callable[[int], None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per hidden layer, [lower, upper] of κ at every output for every neuron ([outputs, N_l] each), or
    None where the layer's share of ``budget`` (``ROBAUDIT_RELATIONAL_BUDGET``) does not pay for it."""
    if not relational_applies(net):
        return [None] * len(hidden)
    gated = GatedDeviations(net, layer_slopes, boxes)
    left = limits.relational_budget() if budget is None else budget
    base = sum(relational_cost(net, layer, gated.outputs) for layer in hidden)
    # every pre-gate box tightened by its own back-substitution when that fits for every layer
    gated.refine = base + sum(refine_cost(net, layer) for layer in hidden) <= left
    found: list[tuple[np.ndarray, np.ndarray] | None] = []
    for layer in hidden:
        cost = relational_cost(net, layer, gated.outputs)
        if cost > left:
            found.append(None)
            continue
        left -= cost + (refine_cost(net, layer) if gated.refine else 0.0)
        found.append(gated.coefficient_bounds(layer))
    return found
