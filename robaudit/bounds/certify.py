"""Per-input certificates (docs/method.md §7): sound bounds on the output change that f_l
failed neurons per layer can cause *at given inputs* (or within an ∞-norm radius of them),
and whether they can change the predicted class.

At a known input every clean value is known, so the local analysis is much tighter than
the domain-wide bound:

* δ of a failed neuron is exact, ``max(b − y_i(x), y_i(x) − a)``;
* a forward pass bounds the deviation of every pre-activation (sensitivities through
  |W| and the chord slopes of the activations, the f_l largest contributions per layer),
  so a neuron whose faulty pre-activation interval does not cross a kink keeps its exact
  slope (a ReLU that stays inactive blocks every deviation);
* the output deviation and every margin change are propagated backwards with *signed*
  weights and interval chord slopes (a linear relaxation of the deviation), telescoped
  over the layers, and the f_l largest contributions per failure site are summed.

Everything is numpy; inputs are processed one at a time (progress reported per input).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from robaudit import limits
from robaudit.bounds.fep import (
    UNBOUNDED_REPORTED,
    Analysis,
    FailureModel,
    float_bit_delta,
    integer_bit_delta,
    neuron_delta,
    rounding_sources,
    stays_finite,
    unbounded_note,
)
from robaudit.bounds.results import Reportable
from robaudit.bounds.slack import FLOAT32_ABSOLUTE, FLOAT32_RELATIVE
from robaudit.bounds.tail_order import TailOrder
from robaudit.bounds.tight import TightBound, _after_hidden_layers, _layer_adjoint
from robaudit.errors import OptionError, UnsupportedModelError
from robaudit.graph.conv import ConvGeometry, conv2d_adjoint
from robaudit.graph.ibp import evaluate
from robaudit.graph.inputs import FLOAT
from robaudit.graph.layers import Layer, activation_chain
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext, lookup
from robaudit.graph.ops.activations import Clip
from robaudit.graph.ops.affine import ElementwiseAffine, as_2d, weight_products
from robaudit.graph.ops.base import reduce_to_shape
from robaudit.graph.ops.dynamic import is_dynamic_rounding
from robaudit.graph.ops.pooling import _windows, pool_geometry
from robaudit.graph.ops.shape_ops import Concat, DataMovement, Expand, Split
from robaudit.inputs import refuse_outside_domain

#: Rows of sensitivities back-propagated at once when bounding a layer's pre-activation.
ROW_CHUNK = 512
#: Most numbers kept of the input-independent |W|ᵀ e_j rows (float64: 8 bytes each).
UNIT_CACHE = 1 << 23

#: ``progress(stage, done, total)``: stage is ``inputs`` or a layer name.
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class InputCertificate:
    """The certificate of one given input (docs/method.md §7)."""

    #: Position of the input in the given file.
    index: int
    #: Sound bound on max_k |F̃_k(x') − F_k(x')| over every failure set (and every x' in the radius).
    bound: float
    #: Whether no failure set can change the predicted class (no classes: bound ≤ ε).
    certified: bool
    #: Predicted class at the input (None when the output has one element).
    predicted: int | None = None
    #: The given label, if any.
    label: int | None = None
    #: Smallest clean margin F_c − F_j over j ≠ c (over the radius box).
    margin: float | None = None
    #: Lower bound on min_j (F̃_c − F̃_j) under the failures: the clean margin minus its largest decrease.
    margin_slack: float | None = None


@dataclass(frozen=True)
class LayerCertificate:
    """One hidden layer of a certify report."""

    name: str
    neurons: int
    #: Failures applied in this layer for the per-input certificates.
    failures: int
    #: Largest count that keeps every given input certified when only this layer fails (−1: none; None: not
    #: searched, ``layer_counts=False`` / ``--no-layer-counts``).
    max_failures_certified: int | None
    #: The columns every report gives a hidden layer (README "Reports"): kind, w_m of its synapses, K, and δ of
    #: the failure model over the layer's domain-wide range (docs/method.md §2.1).
    kind: str = ""
    max_weight: float = 0.0
    lipschitz: float = 1.0
    delta: float | None = None


@dataclass(frozen=True)
class CertifyResult(Reportable):
    """Per-input certificates and their summary (docs/method.md §7)."""

    inputs: list[InputCertificate]
    layers: list[LayerCertificate]
    #: Largest per-input bound.
    max_bound: float
    #: Fraction of inputs certified.
    certified_fraction: float
    #: Fraction of inputs predicted correctly *and* certified (labels given), else None.
    certified_accuracy: float | None
    #: Whether the output has classes (:func:`output_has_classes` or as asked): ``certified`` is then about
    #: the arg-max, else bound ≤ ε.
    classes: bool
    #: ∞-norm radius around each input (None: the inputs themselves).
    radius: float | None
    epsilon: float
    #: Extra report blocks (model, settings) filled by the caller.
    model: object = None
    settings: object = None
    inputs_file: str = ""
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- slopes


def _relu_like(zlo: np.ndarray, zhi: np.ndarray, kink: float, left: float, right: float):
    """Chord slopes of a function with slope ``left`` below ``kink`` and ``right`` above it."""
    lo = np.where(zlo >= kink, right, np.where(zhi <= kink, left, min(left, right)))
    hi = np.where(zlo >= kink, right, np.where(zhi <= kink, left, max(left, right)))
    return lo.astype(np.float64), hi.astype(np.float64)


def _bell_slopes(derivative: Callable[[np.ndarray], np.ndarray], zlo: np.ndarray, zhi: np.ndarray):
    """Chord slopes of a function whose derivative is even and decreasing in |z| (sigmoid, tanh)."""
    nearest = np.clip(0.0, zlo, zhi)
    return np.minimum(derivative(zlo), derivative(zhi)), derivative(nearest)


def _sigmoid_derivative(z: np.ndarray) -> np.ndarray:
    s = 0.5 * (1.0 + np.tanh(0.5 * z))
    return s * (1.0 - s)


def _tanh_derivative(z: np.ndarray) -> np.ndarray:
    return 1.0 - np.tanh(z) ** 2


#: Activations that never decrease: their chord slopes lie in [0, K].
_MONOTONE = {"Softplus", "Softsign", "Elu", "Selu", "Celu", "Erf", "HardSigmoid"}


def chord_slopes(layer: Layer, node: Node | None, zlo: np.ndarray, zhi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[s_lo, s_hi] ⊇ {(σ(u) − σ(z)) / (u − z) : u, z ∈ [zlo, zhi]} per neuron (docs/method.md §7.2).

    Exact for piecewise-linear activations whose interval does not cross a kink; the
    derivative's range for sigmoid and tanh; [0, K] for the other monotone activations
    and [−K, K] otherwise.
    """
    act = layer.activation
    if act is None:
        return np.ones_like(zlo), np.ones_like(zlo)
    if act == "Relu":
        return _relu_like(zlo, zhi, 0.0, 0.0, 1.0)
    if act == "LeakyRelu" and node is not None:
        return _relu_like(zlo, zhi, 0.0, float(node.attr("alpha", 0.01)), 1.0)
    if act == "Clip" and layer.activation_range is not None:
        c1, c2 = layer.activation_range
        inside = (zlo >= c1) & (zhi <= c2)
        outside = (zhi <= c1) | (zlo >= c2)
        return np.where(inside, 1.0, 0.0), np.where(outside, 0.0, 1.0)
    if act == "Sigmoid":
        return _bell_slopes(_sigmoid_derivative, zlo, zhi)
    if act == "Tanh":
        return _bell_slopes(_tanh_derivative, zlo, zhi)
    k = layer.lipschitz
    increasing = node is None or float(node.attr("alpha", 1.0)) >= 0 and float(node.attr("gamma", 1.0)) >= 0
    if act in _MONOTONE and increasing:
        return np.zeros_like(zlo), np.full_like(zlo, k)
    return np.full_like(zlo, -k), np.full_like(zlo, k)


#: Ops between layers whose adjoint is the exact linear one (docs/method.md §4.5): the signed pass carries
#: mid and radius through them separately.
LINEAR_REDUCTIONS = ("AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum")


def node_chord_slopes(
    node: Node, zlo: np.ndarray, zhi: np.ndarray, constants: dict | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """[s_lo, s_hi] ⊇ {(σ(u) − σ(z)) / (u − z) : u, z ∈ [zlo, zhi]} per element for a stand-alone activation
    node (one that is not part of a layer: the ReLU after a residual ``Add``), with the rules of
    :func:`chord_slopes` (docs/method.md §4.5); a range restriction's guard (§1.3) too: the NaN guard is the
    identity on numbers, a ``Clip`` (bounds read from ``constants``) or per-element ``ChannelClip`` has
    slope 1 inside its range, 0 outside (docs/method.md §7.3). ``zlo``/``zhi`` in the node input's shape
    (a ChannelClip's bounds broadcast against it). None for an op without such a rule here."""
    if node.op_type == "NanGuard":
        return np.ones_like(zlo), np.ones_like(zlo)
    if node.op_type in ("Clip", "ChannelClip"):
        bounds = _restriction_bounds(node, constants)
        if bounds is None:
            return None
        c1, c2 = (np.broadcast_to(c, np.broadcast_shapes(np.shape(c), np.shape(zlo))) for c in bounds)
        if np.shape(c1) != np.shape(zlo):
            return None
        inside = (zlo >= c1) & (zhi <= c2)
        outside = (zhi <= c1) | (zlo >= c2)
        return np.where(inside, 1.0, 0.0), np.where(outside, 0.0, 1.0)
    if node.op_type == "Relu":
        return _relu_like(zlo, zhi, 0.0, 0.0, 1.0)
    if node.op_type == "LeakyRelu":
        return _relu_like(zlo, zhi, 0.0, float(node.attr("alpha", 0.01)), 1.0)
    if node.op_type == "Sigmoid":
        return _bell_slopes(_sigmoid_derivative, zlo, zhi)
    if node.op_type == "Tanh":
        return _bell_slopes(_tanh_derivative, zlo, zhi)
    return None


def _restriction_bounds(node: Node, constants: dict | None) -> tuple[np.ndarray | float, np.ndarray | float] | None:
    """A Clip's [min, max] as onnxruntime applies it (a min above the max pins the value at the max, §1.3) or a
    ChannelClip's per-element arrays; None when a Clip bound is not a known constant."""
    if node.op_type == "ChannelClip":
        return np.asarray(node.attr("low"), np.float64), np.asarray(node.attr("high"), np.float64)
    return Clip().constant_bounds(node, constants or {})


def interval_scale(mid: np.ndarray, rad: np.ndarray, s_lo: np.ndarray, s_hi: np.ndarray):
    """(mid, rad) of the interval product [mid − rad, mid + rad]·[s_lo, s_hi] (four corners), elementwise."""
    lo, hi = mid - rad, mid + rad
    corners = [lo * s_lo, lo * s_hi, hi * s_lo, hi * s_hi]
    c_lo, c_hi = np.minimum.reduce(corners), np.maximum.reduce(corners)
    return (c_lo + c_hi) / 2, (c_hi - c_lo) / 2


# --------------------------------------------------------------------------- helpers


def top_sum(values: np.ndarray, count: int) -> np.ndarray:
    """Per row of ``values`` [R, N], the sum of the ``count`` largest entries (all when count ≥ N)."""
    if count <= 0 or values.shape[-1] == 0:
        return np.zeros(values.shape[:-1])
    if count >= values.shape[-1]:
        return values.sum(axis=-1)
    if count == 1:
        return values.max(axis=-1)
    part = np.partition(values, values.shape[-1] - count, axis=-1)
    return part[..., values.shape[-1] - count :].sum(axis=-1)


def _hull(box: Interval, low: float, high: float) -> Interval:
    return Interval(np.minimum(box.lo, low), np.maximum(box.hi, high))


def _maxpool_candidates(node: Node, box: Interval) -> tuple[np.ndarray, np.ndarray] | None:
    """(input index, candidate mask), each [outputs, window], of a 2-D MaxPool over ``box``.

    A candidate may be a window's maximum somewhere in ``box`` (its hi reaches the
    largest lo of the window); None for 1-D pooling.
    """
    if box.lo.ndim != 4:
        return None
    geom, kernel = pool_geometry(node, box.shape)
    assert isinstance(geom, ConvGeometry)  # 2-D windows only: checked above
    ids = np.arange(box.lo.size, dtype=np.float64).reshape(box.shape)
    index = _windows(ids, geom, kernel, -1.0)
    lows = _windows(box.lo, geom, kernel, -np.inf)
    highs = _windows(box.hi, geom, kernel, -np.inf)
    window = kernel[0] * kernel[1]
    index = index.reshape(-1, window).astype(np.int64)
    lows, highs = lows.reshape(-1, window), highs.reshape(-1, window)
    mask = (highs >= lows.max(axis=1, keepdims=True)) & (index >= 0)
    return index, mask


def _scatter(values: np.ndarray, index: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Σ over windows of values[r, o]·mask[o, w] into input index[o, w]: [R, size].

    Computed as gathers (one per reference rank: the k-th window that reads an input),
    which numpy does far faster than column scatters; the terms of each input are added in
    window-offset order, so the sums are those of a scatter per offset, bit for bit
    (docs/method.md §7.7).
    """
    rows = values.shape[0]
    offsets, outputs = np.nonzero(mask.T)  # ordered by window offset, then output
    target = index[outputs, offsets]
    order = np.argsort(target, kind="stable")
    target, source = target[order], outputs[order]
    rank = np.arange(target.size) - np.searchsorted(target, target, side="left")
    out = None
    for k in range(int(rank.max()) + 1 if rank.size else 0):
        pick = rank == k
        columns = np.zeros(size, np.int64)
        valid = np.zeros(size, bool)
        columns[target[pick]] = source[pick]
        valid[target[pick]] = True
        part = np.take(values, columns, axis=1)
        if not valid.all():
            part *= valid[None]
        out = part if out is None else np.add(out, part, out=out)
    return np.zeros((rows, size)) if out is None else out


def conv_adjoint(grad: np.ndarray, weight: np.ndarray, layer: Layer) -> np.ndarray:
    """Wᵀ (the weight as given, signed or |W|) of a conv layer applied to [R, *out_shape] → [R, *in_shape].

    Groups of 1 use one BLAS product per kernel offset; others :func:`conv2d_adjoint`.
    """
    geom, in_shape = layer.geometry, layer.in_shape
    assert geom is not None
    rows = grad.shape[0]
    hw = (1, in_shape[-1]) if len(in_shape) == 3 else (in_shape[-2], in_shape[-1])
    g = as_2d(grad.reshape((rows,) + layer.out_shape[1:]))
    w = as_2d(weight)
    if geom.groups != 1:
        return conv2d_adjoint(g, w, geom, hw).reshape((rows,) + tuple(in_shape))
    _, c_in, kh, kw = w.shape
    ho, wo = g.shape[2], g.shape[3]
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    top, left, bottom, right = geom.pads
    height, width = hw
    out = np.zeros((rows, height + top + bottom, width + left + right, c_in))
    gt = np.ascontiguousarray(g.transpose(0, 2, 3, 1))  # [R, Ho, Wo, C_out]
    for i in range(kh):
        for j in range(kw):
            part = gt @ w[:, :, i, j]  # [R, Ho, Wo, C_in]
            out[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw] += part
    out = out[:, top : top + height, left : left + width].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out).reshape((rows,) + tuple(in_shape))


def interval_product(c_lo: np.ndarray, c_hi: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """[lo, hi] of c·v for c ∈ [c_lo, c_hi], v ∈ [lo, hi] (broadcast), with 0·∞ = 0 (a zero
    coefficient times any finite value)."""
    with np.errstate(invalid="ignore"):
        corners = [c_lo * lo, c_lo * hi, c_hi * lo, c_hi * hi]
    corners = [np.where(np.isnan(c), 0.0, c) for c in corners]
    return np.minimum.reduce(corners), np.maximum.reduce(corners)


def product_signed_adjoint(node: Node, mid: np.ndarray, rad: np.ndarray, ctx: PropagationContext) -> list:
    """Signed-interval adjoint of ``Mul`` of two variable tensors (docs/method.md §4.2).

    Between two states A and B, u_A − u_B = x_A·(y_A − y_B) + y_B·(x_A − x_B): the coefficient
    of Δy is c·x_A and that of Δx is c·y_B, with x_A, y_B anywhere in the hull of their clean
    and faulty boxes; the products are interval corners, summed over broadcast axes.
    ``mid``/``rad`` are [R, *out_shape]; returns the stacked (mid; rad) per input.
    """
    names = node.inputs[:2]
    c_lo, c_hi = mid - rad, mid + rad
    out: list = [None] * len(node.inputs)
    for index, name in enumerate(names):
        other = ctx.hull(names[1 - index])
        lo, hi = interval_product(c_lo, c_hi, other.lo[None], other.hi[None])
        shape = ctx.shape(name)
        finite = np.isfinite(lo) & np.isfinite(hi)  # an unbounded end: centre 0, radius ∞ (never NaN)
        m = reduce_to_shape(np.where(finite, (lo + hi) / 2, 0.0), shape)
        r = reduce_to_shape(np.where(finite, (hi - lo) / 2, np.inf), shape)
        out[index] = np.concatenate([m, r])
    return out


def abs_layer_adjoint(layer: Layer, grad: np.ndarray) -> np.ndarray:
    """|W|ᵀ of a layer applied to [R, *out_shape] sensitivities (fast conv path)."""
    if layer.kind == "conv":
        return conv_adjoint(grad, np.abs(np.asarray(layer.weight, np.float64)), layer)
    return _layer_adjoint(layer, grad)


# --------------------------------------------------------------------------- the local analysis


@dataclass
class _LocalState:
    """Everything the certificate of one input box needs, for one failure vector."""

    clean: dict[str, Interval]
    faulty: dict[str, Interval]
    #: Per layer (id): chord-slope interval of its activation, flattened like its output.
    slopes: dict[int, tuple[np.ndarray, np.ndarray]]
    #: Per hidden layer: δ against the clean value, and the range of the non-failed faulty value.
    delta: list[np.ndarray]
    shifted: list[Interval]


class LocalCertifier:
    """Certificates of one network under one failure model (docs/method.md §7).

    ``certify_box`` bounds one input box; results are per-output deviations and
    margin decreases, computed from the clean intervals of that box.
    """

    def __init__(self, network: Network, failure: FailureModel):
        self.network = network
        self.failure = failure
        self.hidden = network.hidden_layers
        self.hidden_index = {id(la): i for i, la in enumerate(self.hidden)}
        self.position = {id(s): p for p, s in enumerate(network.steps)}
        by_name = {n.name: n for n in network.nodes}
        self.act_chain = {id(la): activation_chain(la, by_name) if la.activation else [] for la in network.layers}
        self.act_node = {key: (chain[0] if chain else None) for key, chain in self.act_chain.items()}
        self.needed = _after_hidden_layers(network.steps, self.hidden_index)
        self.shape = network.clean[network.tail_start].shape
        self.outputs = int(np.prod(self.shape))
        #: what the output tail's roundings take from a class margin (docs/method.md §7.4, "Rounded outputs")
        self.order = TailOrder(network)
        #: no change of a bounded output (Softmax, Sigmoid, Tanh, Clip) exceeds its width (docs/method.md §3.4)
        self.cap = network.output_width
        #: per rounding value (QDQ pair, float16 cast): the hidden layers whose failures make it deviate
        self.rounding_upstream = {v: up for v, (up, _) in rounding_sources(network).items()}
        #: bit flips and stuck-at bits bounded at each box (docs/method.md §7.2, "Stored-value faults"): integer
        #: codes, or a float bit that keeps the value finite; otherwise the domain-wide bound stands alone (§7.4)
        self.local_stored = failure.stored and all(
            la.codes is not None or stays_finite(la.word, failure.bit, failure.stuck) for la in self.hidden
        )
        self._units: dict[tuple[int, int], np.ndarray] = {}
        self._unit_size = 0

    # ------------------------------------------------------------------ clean values

    def clean_values(self, boxes: dict[str, Interval]) -> dict[str, Interval]:
        """IBP of the input boxes (one per variable input) through the audited nodes (exact for points)."""
        net = self.network
        _, clean = evaluate(net.graph, net.nodes, boxes, None, 0, dict(net.constants))
        return clean

    # ------------------------------------------------------------------ forward pass

    def state(self, clean: dict[str, Interval], failures: Sequence[int]) -> _LocalState:
        """Deviation bounds, faulty intervals, chord slopes and δ for one box and failure vector."""
        net = self.network
        a, b = self.failure.failure_range
        count = len(self.hidden)
        st = _LocalState(clean, {}, {}, [np.zeros(0)] * count, [Interval.point(np.zeros(0))] * count)
        for spec in net.variable_inputs:
            st.faulty[spec.name] = clean[spec.name]
        failing_before = False
        for step in net.steps:
            if isinstance(step, Layer):
                pre = clean[step.preact_value]
                idx = self.hidden_index.get(id(step))
                useful = step.activation is not None or idx is not None
                dev = self._preact_deviation(step, st, failures) if failing_before and useful else 0.0
                zlo, zhi = pre.lo - dev, pre.hi + dev
                st.slopes[id(step)] = chord_slopes(step, self.act_node[id(step)], zlo.reshape(-1), zhi.reshape(-1))
                shifted = self._activation(step, Interval(zlo, zhi))
                if idx is not None:
                    st.shifted[idx] = Interval(shifted.lo.reshape(-1), shifted.hi.reshape(-1))
                    if self.failure.stored:  # the bit of the stored value ỹ, which upstream failures moved
                        st.delta[idx] = self.stored_delta(step, st.shifted[idx])
                    else:
                        out = clean[step.output_value]
                        st.delta[idx] = neuron_delta((a, b), out.lo.reshape(-1), out.hi.reshape(-1))
                    if failures[idx] > 0:
                        if self.failure.stored:
                            widen = st.delta[idx].reshape(shifted.lo.shape)
                            shifted = Interval(shifted.lo - widen, shifted.hi + widen)
                        else:
                            shifted = _hull(shifted, a, b)
                        failing_before = True
                st.faulty[step.output_value] = shifted
                continue
            args = [st.faulty.get(v, net.constants.get(v)) if v else None for v in step.inputs]
            if not any(isinstance(x, Interval) for x in args):
                continue
            rule = lookup(step)
            assert rule is not None  # every audited op has a rule (the network was built with them)
            for name, value in zip(step.outputs, rule.interval(step, args), strict=False):
                if name:
                    st.faulty[name] = value
        return st

    def stored_delta(self, layer: Layer, stored: Interval) -> np.ndarray:
        """Per neuron (flat), the largest |ỹ' − ỹ| of a flipped (or stuck) bit of a stored value ỹ in the box
        ``stored`` (the faulty range, flat): the δ of docs/method.md §2.3 taken over that box — float words with
        their own rounding, integer codes exactly 2^B·s — without a guard (the guard is a step after the site).
        Only for :attr:`local_stored` bits (a finite value)."""
        failure = self.failure
        if layer.codes is not None:
            delta = integer_bit_delta(layer.codes, failure.bit, stored.lo, stored.hi, None)
        else:
            delta = float_bit_delta(failure.bit, stored.lo, stored.hi, None, False, layer.word, failure.stuck)
        return np.broadcast_to(np.asarray(delta, np.float64).reshape(-1), stored.lo.shape).copy()

    def _activation(self, layer: Layer, pre: Interval) -> Interval:
        """The layer's output box from its pre-activation box: every node after the pre-activation in turn
        (the activation, then any rounding op after it, docs/method.md §1.2)."""
        box = pre
        for node in self.act_chain[id(layer)]:
            args = [box] + [self.network.constants.get(v) if v else None for v in node.inputs[1:]]
            rule = lookup(node)
            assert rule is not None
            box = rule.interval(node, args)[0]
        return box

    def _preact_deviation(self, layer: Layer, st: _LocalState, failures: Sequence[int]) -> np.ndarray:
        """|Δ pre-activation| of every neuron of ``layer`` under the failures upstream: the smaller of the
        absolute bound of §7.2 and the signed one of §7.3 taken with the pre-activation as the linear form."""
        n = layer.neurons
        shape = layer.out_shape
        pos = self.position[id(layer)]
        result = np.zeros(n)
        for start in range(0, n, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n)
            grad = self._unit_adjoint(layer, start, stop)
            rounded: dict[str, np.ndarray] = {}
            found = self._abs_backward(pos, {layer.input_value: grad}, st, rounded)
            result[start:stop] = self._abs_total(found, st, failures, stop - start, rounded)
        pre = st.clean[layer.preact_value]
        zlo, zhi = pre.lo.reshape(-1) - result, pre.hi.reshape(-1) + result
        s_lo, s_hi = chord_slopes(layer, self.act_node[id(layer)], zlo, zhi)
        # where a narrower bound may make a slope exact (exact slopes stay exact), in dense layers: on the conv
        # layers of LeNet and the digits CNNs it changed no certificate at 1.7-3x the time (§7.2)
        uncertain = np.flatnonzero(s_lo != s_hi) if layer.geometry is None else np.zeros(0, np.int64)
        for first in range(0, uncertain.size, ROW_CHUNK):
            chosen = uncertain[first : first + ROW_CHUNK]
            result[chosen] = np.minimum(result[chosen], self._signed_preact_deviation(layer, st, failures, chosen))
        return result.reshape(shape)

    def _signed_preact_deviation(
        self, layer: Layer, st: _LocalState, failures: Sequence[int], neurons: np.ndarray
    ) -> np.ndarray:
        """max(largest increase, largest decrease) of the pre-activations ``neurons`` (flat indices) of ``layer``
        under the failures upstream, by the signed pass of §7.3 with each pre-activation as the linear form (its
        affine op with the signed weight, then every step before it with the chord slopes of this forward pass,
        whose boxes are sound: docs/method.md §7.2, "Signed deviations")."""
        rows = neurons.size
        unit = np.zeros((rows, layer.neurons))
        unit[np.arange(rows), neurons] = 1.0
        unit = unit.reshape((rows,) + layer.out_shape)
        begin = {layer.input_value: self._signed_affine(layer, unit, np.zeros_like(unit))}
        rounded: dict[str, np.ndarray] = {}
        coefficients = self._signed_backward(unit.reshape(rows, -1), st, rounded=rounded, start=begin)
        increase, decrease = self._signed_totals(coefficients, st, failures, rows)
        return np.maximum(increase, decrease) + self._rounding_total(rounded, failures, rows)

    def _unit_adjoint(self, layer: Layer, start: int, stop: int) -> np.ndarray:
        """|W|ᵀ e_j for the pre-activations j in [start, stop) of ``layer``: [rows, *in_shape].

        The same for every input, so kept (up to :data:`UNIT_CACHE` numbers in all; docs/method.md §7.7).
        """
        key = (id(layer), start)
        grad = self._units.get(key)
        if grad is None:
            rows, n = stop - start, layer.neurons
            cot = np.zeros((rows, n))
            cot[np.arange(rows), np.arange(start, stop)] = 1.0
            grad = abs_layer_adjoint(layer, cot.reshape((rows,) + layer.out_shape))
            if self._unit_size + grad.size <= UNIT_CACHE:
                grad.setflags(write=False)  # shared by every input: nothing may write into it
                self._units[key] = grad
                self._unit_size += grad.size
        return grad

    # ------------------------------------------------------------------ backward passes

    def _ctx(self, st: _LocalState) -> PropagationContext:
        return PropagationContext(st.clean, st.faulty, self.network.constants)

    def _abs_total(
        self,
        found: dict[int, np.ndarray],
        st: _LocalState,
        failures: Sequence[int],
        rows: int,
        rounded: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Σ_l (sum of the f_l largest P·δ) per row, plus Σ_v P_v·ρ_v over the rounding values ``rounded``
        (P_v ≥ 0 there) that the failures make deviate (docs/method.md §1.2, §7.2)."""
        total = np.zeros(rows)
        for idx, sens in found.items():
            if failures[idx] > 0:
                total += top_sum(sens.reshape(rows, -1) * st.delta[idx][None, :], failures[idx])
        return total + self._rounding_total(rounded or {}, failures, rows)

    def _rounding_total(self, rounded: dict[str, np.ndarray], failures: Sequence[int], rows: int) -> np.ndarray:
        """Σ_v Σ_i |g_v[row, i]|·ρ_v,i over the rounding values v downstream of a failing layer: both the
        clean and the faulty value round, so a deviating element may move by ρ more (docs/method.md §1.2)."""
        failing = {i for i, f in enumerate(failures) if f > 0}
        total = np.zeros(rows)
        for value, grad in rounded.items():
            if self.rounding_upstream.get(value, set()) & failing:
                total += np.abs(grad.reshape(rows, -1)) @ self.network.rounding[value].reshape(-1)
        return total

    def _record_rounding(self, rounded: dict[str, np.ndarray] | None, value: str, grad: np.ndarray | None) -> None:
        if rounded is not None and grad is not None and value in self.network.rounding:
            rounded[value] = grad

    def _abs_backward(
        self, stop: int, cot: dict[str, np.ndarray], st: _LocalState, rounded: dict[str, np.ndarray] | None = None
    ) -> dict[int, np.ndarray]:
        """Sensitivities P (≥ 0) at every hidden layer output, from ``cot`` placed before step ``stop``;
        with ``rounded``, also those at every rounding value passed (keyed by value)."""
        ctx = self._ctx(st)
        found: dict[int, np.ndarray] = {}
        for step in reversed(self.network.steps[:stop]):
            if isinstance(step, Layer):
                grad = cot.pop(step.output_value, None)
                self._record_rounding(rounded, step.output_value, grad)
                if grad is None:
                    continue
                idx = self.hidden_index.get(id(step))
                if idx is not None:
                    found[idx] = grad
                if step.input_value in st.clean and self._upstream_of_failure(step):
                    lo, hi = st.slopes[id(step)]
                    slope = np.maximum(np.abs(lo), np.abs(hi)).reshape(step.out_shape)
                    _add(cot, step.input_value, abs_layer_adjoint(step, grad * slope[None]))
                continue
            for out in step.outputs:
                self._record_rounding(rounded, out, cot.get(out))
            self._node_backward(step, cot, ctx, signed=False)
        return found

    def _upstream_of_failure(self, layer: Layer) -> bool:
        return layer.input_value in self.needed

    def _node_backward(
        self, node: Node, cot: dict[str, np.ndarray], ctx: PropagationContext, signed: bool, reach: set | None = None
    ) -> None:
        grads = [cot.pop(o, None) if o else None for o in node.outputs]
        reach = self.needed if reach is None else reach
        if all(g is None for g in grads) or not any(v in reach for v in node.inputs):
            return
        rows = next(g for g in grads if g is not None).shape[0]
        filled = [
            g if g is not None else np.zeros((rows,) + ctx.shape(o)) for g, o in zip(grads, node.outputs, strict=True)
        ]
        rule = lookup(node)
        assert rule is not None
        if node.op_type == "MaxPool" and len(node.outputs) == 1:
            cand = _maxpool_candidates(node, ctx.faulty[node.inputs[0]])
            if cand is not None:
                _add(cot, node.inputs[0], self._maxpool_back(filled[0], cand, ctx.shape(node.inputs[0]), signed))
                return
        if signed:
            half = rows // 2
            mid, rad = [g[:half] for g in filled], [g[half:] for g in filled]
            results = self._signed_node(node, rule, mid, rad, ctx)
        else:
            results = list(rule.backward(node, list(filled), ctx))
        for value, grad in zip(node.inputs, results, strict=False):
            if grad is not None and value and ctx.is_variable(value):
                _add(cot, value, grad)

    def _signed_node(self, node, rule, mid, rad, ctx) -> list:
        """Signed-interval adjoint (mid/rad stacked) of an op between layers."""
        # averages and sums are linear with non-negative coefficients: their adjoint is exact for signed rows too
        linear = isinstance(rule, DataMovement | Concat | Split | Expand) or node.op_type in LINEAR_REDUCTIONS
        two_variable = sum(1 for v in node.inputs[:2] if v and ctx.is_variable(v)) == 2
        both = node.op_type in ("Add", "Sub") and two_variable
        if linear or both:
            mids, rads = rule.backward(node, mid, ctx), rule.backward(node, rad, ctx)
            if node.op_type == "Sub" and both:
                mids = [mids[0], -mids[1]]
            return [None if m is None else np.concatenate([m, r]) for m, r in zip(mids, rads, strict=False)]
        if isinstance(rule, ElementwiseAffine) and not two_variable:
            index = rule._var_index(node, ctx)
            scale, _ = rule.scale_shift(node, rule._const_args(node, ctx), len(ctx.shape(node.inputs[index])))
            shape = ctx.shape(node.inputs[index])
            m = reduce_to_shape(mid[0] * scale, shape)
            r = reduce_to_shape(rad[0] * np.abs(scale), shape)
            out: list = [None] * len(node.inputs)
            out[index] = np.concatenate([m, r])
            return out
        if node.op_type == "Mul" and two_variable:
            return product_signed_adjoint(node, mid[0], rad[0], ctx)
        if len(node.outputs) == 1 and ctx.is_variable(node.inputs[0]):
            # a stand-alone activation: chord slopes over the hull of its input (docs/method.md §4.5)
            box = ctx.hull(node.inputs[0])
            slopes = node_chord_slopes(node, box.lo, box.hi, ctx.constants)
            if slopes is not None:
                m, r = interval_scale(mid[0], rad[0], slopes[0], slopes[1])
                return [np.concatenate([m, r])] + [None] * (len(node.inputs) - 1)
        magnitude = [np.abs(m) + r for m, r in zip(mid, rad, strict=True)]
        results = rule.backward(node, magnitude, ctx)
        return [None if g is None else np.concatenate([np.zeros_like(g), g]) for g in results]

    def _maxpool_back(self, grad: np.ndarray, cand, in_shape, signed: bool) -> np.ndarray:
        index, mask = cand
        rows = grad.shape[0]
        size = int(np.prod(in_shape))
        flat = grad.reshape(rows, -1)
        if not signed:
            return _scatter(flat, index, mask, size).reshape((rows,) + tuple(in_shape))
        half = rows // 2
        mid, rad = flat[:half], flat[half:]
        single = mask.sum(axis=1) == 1
        lo, hi = mid - rad, mid + rad
        # several candidates: Δmax = Σ μ_i Δx_i with μ in the simplex, so each coefficient ∈ hull(0, c)
        lo = np.where(single[None], lo, np.minimum(lo, 0.0))
        hi = np.where(single[None], hi, np.maximum(hi, 0.0))
        m = _scatter((lo + hi) / 2, index, mask, size)
        r = _scatter((hi - lo) / 2, index, mask, size)
        return np.concatenate([m, r]).reshape((rows,) + tuple(in_shape))

    def _signed_backward(
        self,
        rows: np.ndarray,
        st: _LocalState,
        mask: dict[int, np.ndarray] | None = None,
        into: dict[str, np.ndarray] | None = None,
        rounded: dict[str, np.ndarray] | None = None,
        start: dict[str, np.ndarray] | None = None,
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Coefficient intervals (lo, hi) [R, N_l] at each hidden layer output for the linear forms ``rows``.

        ``start``: the stacked (mid; rad) coefficients [2R, ...] of the forms at some values instead of
        ``rows`` at the audited output (a hidden layer's pre-activations, :meth:`_signed_preact_deviation`).

        ``mask`` multiplies the coefficients of a hidden layer's neurons before they pass
        through it (0: a failed neuron, whose value does not depend on what comes before; a flipped
        bit's derivative, ±1 or a power of 2, in the joint search);
        with ``into`` the pass continues to the network input and leaves its stacked
        (mid, rad) coefficients there under the input's name; with ``rounded``, the largest
        |coefficient| (|mid| + rad) at every rounding value passed is kept there.
        """
        net = self.network
        reach = None if into is None else set(st.clean)
        r = rows.shape[0]
        if start is None:
            cot = {net.tail_start: np.concatenate([rows, np.zeros_like(rows)]).reshape((2 * r,) + self.shape)}
        else:
            cot = dict(start)
        ctx = self._ctx(st)
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for step in reversed(net.steps):
            if isinstance(step, Layer):
                grad = cot.pop(step.output_value, None)
                self._record_rounding(rounded, step.output_value, _magnitude(grad, r))
                if grad is None:
                    continue
                flat = grad.reshape(2 * r, -1)
                mid, rad = flat[:r], flat[r:]
                idx = self.hidden_index.get(id(step))
                if idx is not None:
                    found[idx] = (mid - rad, mid + rad)
                    if mask is not None and idx in mask:
                        mid, rad = mid * mask[idx][None], rad * np.abs(mask[idx])[None]
                if step.input_value in st.clean and (reach is not None or self._upstream_of_failure(step)):
                    _add(cot, step.input_value, self._signed_layer(step, mid, rad, st))
                continue
            for out in step.outputs:
                self._record_rounding(rounded, out, _magnitude(cot.get(out), r))
            self._node_backward(step, cot, ctx, signed=True, reach=reach)
        if into is not None and net.input_name in cot:
            into[net.input_name] = cot[net.input_name]
        return found

    def _signed_layer(self, layer: Layer, mid: np.ndarray, rad: np.ndarray, st: _LocalState) -> np.ndarray:
        """Coefficient interval through the activation's chord slopes and the signed weight."""
        s_lo, s_hi = st.slopes[id(layer)]
        lo, hi = mid - rad, mid + rad
        corners = [lo * s_lo, lo * s_hi, hi * s_lo, hi * s_hi]
        c_lo, c_hi = np.minimum.reduce(corners), np.maximum.reduce(corners)
        return self._signed_affine(layer, (c_lo + c_hi) / 2, (c_hi - c_lo) / 2)

    def _signed_affine(self, layer: Layer, m: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Coefficient interval (mid ``m``, radius ``r``, [R, N]) at the pre-activation through the signed weight
        to the layer's input: stacked (mid; rad) [2R, *in_shape]."""
        rows = m.shape[0]
        shape = (rows,) + layer.out_shape
        if layer.geometry is None:  # per token too: the rows of every token through the one weight
            outputs = layer.weight.shape[0]
            flat_m, flat_r = m.reshape(-1, outputs), r.reshape(-1, outputs)
            in_m, in_r = weight_products(layer.weight, [(flat_m, False), (flat_r, True)])
            in_shape = layer.in_shape
            return np.concatenate([in_m.reshape((rows,) + in_shape), in_r.reshape((rows,) + in_shape)])
        if layer.kind == "conv":
            weight = np.asarray(layer.weight, np.float64)
            out_m = conv_adjoint(m.reshape(shape), weight, layer)
            out_r = conv_adjoint(r.reshape(shape), np.abs(weight), layer)
            return np.concatenate([out_m, out_r])
        magnitude = _layer_adjoint(layer, (np.abs(m) + r).reshape(shape))
        return np.concatenate([np.zeros_like(magnitude), magnitude])

    # ------------------------------------------------------------------ one box

    def certify_box(
        self,
        clean: dict[str, Interval],
        center_tail: np.ndarray,
        failures: Sequence[int],
        classes: bool,
        domain: np.ndarray | None = None,
    ) -> BoxBound:
        """Bounds for one input box under ``failures`` (docs/method.md §7.3–7.4).

        ``center_tail`` holds the clean tail values at the box's centre (the prediction); ``domain``, when
        given, the domain-wide bound on |ΔF_k| per output for these failures (the box lies in the domain,
        so each certificate is at most that: §7.4).
        """
        net = self.network
        predicted = self.order.predicted(center_tail.reshape(-1)) if classes else None
        others = [j for j in range(self.outputs) if j != predicted] if classes else []
        margins = self._margins(clean, predicted, others)
        tail_box = clean[net.tail_start]
        magnitude = float(np.maximum(np.abs(tail_box.lo), np.abs(tail_box.hi)).max(initial=0.0))
        if not any(f > 0 for f in failures):
            none = np.zeros(len(others))
            bb = BoxBound(np.zeros(self.outputs), predicted, margins, none, float32_allowance(none, magnitude))
            return self._through_tail(bb, tail_box, 0.0, others)
        if self.failure.stored and not self.local_stored:  # an exponent bit: the domain bound alone (§7.4)
            per_output = np.full(self.outputs, np.inf) if domain is None else domain
            per_output = np.where(per_output >= UNBOUNDED_REPORTED, np.inf, per_output)
            moves = per_output[predicted] + per_output[others] if classes else np.zeros(0)
            bb = BoxBound(per_output, predicted, margins, moves, float32_allowance(moves, magnitude))
            return self._through_tail(bb, tail_box, per_output / min(net.tail_factor, 1.0), others)
        st = self.state(clean, failures)
        eye = np.eye(self.outputs)
        rounded: dict[str, np.ndarray] = {}
        found = self._abs_backward(
            len(net.steps), {net.tail_start: eye.reshape((self.outputs,) + self.shape)}, st, rounded
        )
        absolute = self._abs_total(found, st, failures, self.outputs, rounded)
        stacked = eye
        if classes:
            margin_rows = np.zeros((len(others), self.outputs))
            margin_rows[:, predicted] = 1.0
            margin_rows[np.arange(len(others)), others] = -1.0
            stacked = np.concatenate([eye, margin_rows])
        rounded_signed: dict[str, np.ndarray] = {}
        coefficients = self._signed_backward(stacked, st, rounded=rounded_signed)
        increase, decrease = self._signed_totals(coefficients, st, failures, stacked.shape[0])
        rounding = self._rounding_total(rounded_signed, failures, stacked.shape[0])
        increase, decrease = increase + rounding, decrease + rounding
        signed = np.maximum(increase[: self.outputs], decrease[: self.outputs])
        moved = np.minimum(absolute, signed)
        tail = np.where(moved > 0, net.tail_rounding, 0.0)  # rounding in the tail (docs/method.md §1.2)
        per_output = np.minimum(moved * net.tail_factor + tail, self.cap)
        if domain is not None:
            per_output = np.minimum(per_output, domain)
        drops, moves = np.zeros(0), np.zeros(0)
        if classes and predicted is not None:
            moves = absolute[predicted] + absolute[others]
            each = moved if domain is None or not self._tailless else np.minimum(moved, domain)
            drops = margin_drops(decrease[self.outputs :], moves, each, predicted, others)
        bb = BoxBound(per_output, predicted, margins, drops, float32_allowance(moves, magnitude))
        return self._through_tail(bb, tail_box, moved, others)

    def _through_tail(self, bb: BoxBound, tail_box: Interval, moved: np.ndarray | float, others: list[int]) -> BoxBound:
        """``bb`` with what the output tail's roundings take from its margins (docs/method.md §7.4, "Rounded
        outputs"): ``moved`` bounds |ΔF_k| where the tail starts (flat), so the faulty values lie in the clean
        box widened by it."""
        if bb.predicted is None or not self.order.rounds:
            return bb
        lo, hi = tail_box.lo.reshape(-1), tail_box.hi.reshape(-1)
        room, cap, gap = self.order.room(lo - moved, hi + moved, bb.predicted, others)
        clean_room, clean_cap, clean_gap = self.order.room(lo, hi, bb.predicted, others)
        return dataclasses.replace(
            bb, room=room, cap=cap, gap=gap, clean_room=clean_room, clean_cap=clean_cap, clean_gap=clean_gap
        )

    def _signed_totals(self, coefficients, st: _LocalState, failures: Sequence[int], rows: int):
        """Σ_l of the f_l largest possible increases / decreases of each linear form."""
        a, b = self.failure.failure_range
        increase, decrease = np.zeros(rows), np.zeros(rows)
        for idx, (c_lo, c_hi) in coefficients.items():
            f = failures[idx]
            if f <= 0:
                continue
            shifted = st.shifted[idx]
            if self.failure.stored:  # ỹ' − ỹ for the stored ỹ in ``shifted``: within ±δ (§7.2)
                d_lo, d_hi = -st.delta[idx][None, :], st.delta[idx][None, :]
            else:
                d_lo, d_hi = (a - shifted.hi)[None, :], (b - shifted.lo)[None, :]
            # the largest and smallest κ·d over the box: corners taken pairwise (no stacked copy of all four)
            low_lo, low_hi, high_lo, high_hi = c_lo * d_lo, c_lo * d_hi, c_hi * d_lo, c_hi * d_hi
            largest = np.maximum(np.maximum(low_lo, low_hi), np.maximum(high_lo, high_hi))
            smallest = np.minimum(np.minimum(low_lo, low_hi), np.minimum(high_lo, high_hi))
            increase += top_sum(np.maximum(largest, 0.0, out=largest), f)
            decrease += top_sum(np.maximum(-smallest, 0.0), f)
        return increase, decrease

    @property
    def _tailless(self) -> bool:
        """Whether the audited output is where the tail starts, unscaled and unrounded: a bound on |ΔF_k| of the
        output is then one at the tail's start too."""
        net = self.network
        return net.tail_start == net.output_name and net.tail_factor == 1.0 and not net.tail_rounding

    def _margins(self, clean: dict[str, Interval], predicted: int | None, others: list[int]) -> np.ndarray:
        """Lower bounds of F_c − F_j over the box, one per other class j."""
        if predicted is None:
            return np.zeros(0)
        tail = clean[self.network.tail_start]
        return tail.lo.reshape(-1)[predicted] - tail.hi.reshape(-1)[others]


@dataclass(frozen=True)
class BoxBound:
    """The local bounds of one input box."""

    #: Bound on |ΔF_k| per output element k (tail factor included).
    per_output: np.ndarray
    predicted: int | None
    #: Clean margins F_c − F_j (lower bounds over the box), per other class j.
    margins: np.ndarray
    #: Bounds on the decrease of each margin under the failures.
    drops: np.ndarray
    #: Room kept on each margin for float32 inference (docs/method.md §7.4, §10.2).
    allowance: np.ndarray | float = 0.0
    #: Through the output tail's roundings, per other class j under the failures (``room``, ``cap``, ``gap``) and on
    #: the clean box (``clean_*``): the rounded output keeps c ahead of j when min(margin, cap) − room > 0 or when
    #: gap > 0 (:meth:`~robaudit.bounds.tail_order.TailOrder.room`; docs/method.md §7.4, "Rounded outputs").
    room: np.ndarray | float = 0.0
    cap: np.ndarray | float = np.inf
    gap: np.ndarray | float = -np.inf
    clean_room: np.ndarray | float = 0.0
    clean_cap: np.ndarray | float = np.inf
    clean_gap: np.ndarray | float = -np.inf

    @property
    def margin(self) -> float | None:
        """The smallest margin of the model's own output over the box (a lower bound), None without classes."""
        if not self.margins.size:
            return None
        return float(np.maximum(np.minimum(self.margins, self.clean_cap) - self.clean_room, self.clean_gap).min())

    @property
    def margin_slack(self) -> float | None:
        """The smallest margin left under the failures (a lower bound), None without classes."""
        if not self.drops.size:
            return None
        return float(np.maximum(np.minimum(self.margins - self.drops, self.cap) - self.room, self.gap).min())

    @property
    def bound(self) -> float:
        """max_k of the per-output bounds."""
        return float(self.per_output.max()) if self.per_output.size else 0.0

    def certified(self, epsilon: float) -> bool:
        """No failure set changes the arg-max (no classes: the bound is within ε)."""
        if self.predicted is None:
            return self.bound <= epsilon * (1 + 1e-12)
        # min(margin − drop, cap) − room > allowance, written without the subtraction (the plain rule's rounding)
        room = self.allowance + self.room
        kept = (self.drops + room < self.margins) & (room < self.cap)
        return bool(np.all(kept | (self.gap > self.allowance)))


def margin_drops(
    signed: np.ndarray, absolute: np.ndarray, each: np.ndarray, predicted: int, others: Sequence[int]
) -> np.ndarray:
    """Bounds on the fall of each margin F_c − F_j under the failures, [len(others)] (docs/method.md §7.4): the
    signed pass's row ``signed`` and ``absolute`` (|ΔF_c| + |ΔF_j| from the absolute pass) both hold, and so
    does |ΔF_c| + |ΔF_j| from ``each`` [outputs], any bound on every |ΔF_k| at the tail's start (the signed
    and absolute passes' smaller, or on an output without a tail the domain-wide bound): the signed row may
    be far looser than twice the reported bound."""
    return np.minimum(signed, np.minimum(absolute, each[predicted] + each[list(others)]))


def float32_allowance(moves: np.ndarray, magnitude: float) -> np.ndarray:
    """Room on each margin F_c − F_j for onnxruntime's float32 rounding (docs/method.md §7.4).

    ``moves`` [classes − 1]: bounds on |ΔF_c| + |ΔF_j| (before the tail); ``magnitude``: the
    largest |F| over the clean box. Each of the two outputs may be off by the allowance of
    §10.2, FLOAT32_RELATIVE of its deviation bound plus FLOAT32_ABSOLUTE·max(1, |F|).
    """
    return FLOAT32_RELATIVE * np.asarray(moves, np.float64) + 2 * FLOAT32_ABSOLUTE * max(1.0, magnitude)


def _magnitude(stacked: np.ndarray | None, rows: int) -> np.ndarray | None:
    """|mid| + rad of a stacked (mid, rad) coefficient array [2·rows, ...]: the largest |coefficient|."""
    if stacked is None:
        return None
    flat = stacked.reshape(2 * rows, -1)
    return np.abs(flat[:rows]) + flat[rows:]


def _add(cot: dict[str, np.ndarray], value: str, grad: np.ndarray) -> None:
    cot[value] = cot[value] + grad if value in cot else grad


# --------------------------------------------------------------------------- driver


def _refuse_recurrent(network: Network) -> None:
    """Local certificates do not model unrolled GRU/LSTM cells yet (docs/method.md §14.4)."""
    names = sorted({la.name for la in network.hidden_layers if la.kind in ("gru", "lstm")})
    if names or any(la.internal for la in network.layers):
        listed = ", ".join(f"'{name}'" for name in names) or "a recurrent cell"
        raise UnsupportedModelError(
            f"certify does not bound recurrent layers yet ({listed}); use 'robaudit bound' or 'robaudit inject'"
        )


def check_certify_inputs(network: Network, inputs: np.ndarray, radius: float | None) -> None:
    """Refuse inputs outside the domain, radii that are not in (0, HI − LO], and dynamically quantized
    models (exit 2).

    ``inputs`` [M, *sample shape], or for several or token inputs [M, Σ elements] packed in
    graph order (docs/method.md §12.3): float parts inside their boxes, token ids whole
    numbers among the table's ids; a model without a hidden layer (nothing can fail, as for every command).
    """
    network.require_hidden_layers()
    if any(isinstance(step, Node) and is_dynamic_rounding(step) for step in network.steps):
        raise UnsupportedModelError(
            "certify does not carry the rounding of a dynamically quantized model (its step grows with the "
            "faulty tensor: docs/method.md §11); use bound or inject"
        )
    refuse_outside_domain(network, inputs, "a certificate holds only inside the domain")
    variable = network.variable_inputs
    if radius is None:
        return
    if not any(spec.kind == FLOAT for spec in variable):
        raise OptionError("--radius moves float inputs; this model reads only token ids (they stay as given)")
    low, high = network.input_range
    if not (np.isfinite(radius) and 0 < radius <= high - low):
        raise OptionError(f"--radius must be > 0 and at most the domain's width {high - low:g}, got {radius:g}")


def input_boxes(network: Network, x: np.ndarray, radius: float | None) -> dict[str, Interval]:
    """Per variable input, the box of one given sample (batch dimension 1 added).

    A float input: the point, or [x − r, x + r] clipped to its domain box; a token input: its
    given ids (``radius`` never moves them). ``x`` is the sample as the model's one input
    takes it, or packed in graph order (docs/method.md §7.6, §12.3).
    """
    flat = np.asarray(x, np.float64).reshape(-1)
    boxes, offset = {}, 0
    for spec in network.variable_inputs:
        size = int(np.prod(spec.shape[1:], dtype=np.int64))
        point = flat[offset : offset + size].reshape(spec.shape)
        offset += size
        if radius is None or spec.kind != FLOAT:
            boxes[spec.name] = Interval(point, point.copy())
        else:
            lo, hi = spec.box.lo, spec.box.hi
            boxes[spec.name] = Interval(np.clip(point - radius, lo, hi), np.clip(point + radius, lo, hi))
    return boxes


def output_has_classes(network: Network) -> bool:
    """Whether the audited output reads as class scores (:attr:`Network.has_classes`, docs/method.md §7.1)."""
    return network.has_classes


def domain_certificate(analysis: Analysis, failures: Sequence[int]) -> float | None:
    """The local certificate of §7 with the whole input domain as the box: a bound on max_k |F̃_k(x) − F_k(x)|
    over every input of the domain and every set of exactly ``failures`` (per hidden layer) failed neurons
    (docs/method.md §7.8). The deviation bounds and chord slopes are those of this one vector — narrower than the
    faulty ranges where every neuron may fail, which the domain-wide bound takes.

    None where it does not apply (synapse failures, recurrent layers, 1-D or 3-D convolutions,
    a dynamically quantized model, a float bit that may leave ±Inf or NaN, no failure) or would cost more than
    ``ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET`` multiply-adds
    (:func:`domain_certificate_cost`)."""
    net = analysis.network
    if not any(f > 0 for f in failures) or any(analysis.synapses):
        return None
    if any(la.tied or la.internal for la in net.layers) or not all(_local_layer(la) for la in net.layers):
        return None
    if any(isinstance(step, Node) and is_dynamic_rounding(step) for step in net.steps):
        return None
    if domain_certificate_cost(net, failures) > limits.domain_certificate_budget():
        return None
    local = LocalCertifier(net, analysis.failure)
    if analysis.failure.stored and not local.local_stored:
        return None
    box = local.certify_box(net.clean, np.zeros(local.outputs), failures, False, None)
    return box.bound


def _local_layer(layer: Layer) -> bool:
    """Layers §7's passes take: dense ones and 2-D convolutions (a 1-D or 3-D convolution is not carried)."""
    return layer.geometry is None or (len(layer.in_shape) == 4 and len(layer.out_shape) == 4)


def domain_certificate_cost(network: Network, failures: Sequence[int]) -> float:
    """Multiply-adds of :func:`domain_certificate`, estimated: every neuron of a layer after the first failing one
    back-propagated to the layers before it (§7.2's deviation bounds), and every output through the whole network,
    once in the absolute pass and about four times in the signed one (§7.3); 8 per multiply-add and interval end."""
    hidden = network.hidden_layers
    first = next((la for la, f in zip(hidden, failures, strict=True) if f > 0), None)
    if first is None:
        return 0.0
    cost, before, started = 0.0, 0.0, False
    for layer in network.layers:
        started = started or layer is first
        if started and layer is not first:
            cost += layer.neurons * before
        spatial = math.prod(layer.out_shape[1:-1] if layer.geometry is None else layer.out_shape[2:])
        before += float(np.asarray(layer.weight).size) * spatial
    outputs = int(np.prod(network.clean[network.tail_start].shape))
    return 8.0 * (cost + 5 * outputs * before)


class Certifier:
    """Certificates of many inputs: clean values computed once, any failure vector (docs/method.md §7)."""

    def __init__(
        self,
        network: Network,
        failure: FailureModel,
        inputs: np.ndarray,
        radius: float | None = None,
        classes: bool | None = None,
    ):
        _refuse_recurrent(network)
        check_certify_inputs(network, inputs, radius)
        self.network = network
        self.local = LocalCertifier(network, failure)
        self.inputs = inputs
        self.radius = radius
        self.classes = output_has_classes(network) if classes is None else classes and self.local.outputs > 1
        self._clean: list[dict[str, Interval]] = []
        self._centers: list[np.ndarray] = []
        self._domain: TightBound | None = None
        self._domain_bounds: dict[tuple[int, ...], np.ndarray] = {}

    def domain_bound(self, failures: Sequence[int]) -> np.ndarray:
        """The domain-wide tight bound on |ΔF_k| per output for ``failures``, refined for this one vector as
        ``bound`` reports it (docs/method.md §4.1), computed once: every certified box lies in the domain, so no
        certificate needs to exceed it (§7.4)."""
        key = tuple(int(f) for f in failures)
        if key not in self._domain_bounds:
            if self._domain is None:
                self._domain = TightBound(Analysis(self.network, self.local.failure))
            refined = self._domain.refined_per_output(key)  # what `bound` reports for this one vector
            plain = self._domain.per_output(key) * self._domain.analysis.carry_factor(key)
            self._domain_bounds[key] = plain if refined is None else np.minimum(plain, refined)
        return self._domain_bounds[key]

    def _prepare(self, progress: Progress | None) -> None:
        if self._clean:
            return
        tail = self.network.tail_start
        for i, x in enumerate(self.inputs):
            clean = self.local.clean_values(input_boxes(self.network, x, self.radius))
            self._clean.append(clean)
            if self.radius is not None:
                clean = self.local.clean_values(input_boxes(self.network, x, None))
            center = clean
            self._centers.append(center[tail].lo.reshape(-1))
            if progress is not None:
                progress("clean values", i + 1, len(self.inputs))

    def box(self, i: int, failures: Sequence[int]) -> BoxBound:
        """The local bounds of input ``i`` under ``failures`` (one count per hidden layer)."""
        self._prepare(None)
        domain = self.domain_bound(failures) if any(f > 0 for f in failures) else None
        return self.local.certify_box(self._clean[i], self._centers[i], failures, self.classes, domain)

    def all_certified(self, failures: Sequence[int], epsilon: float, order: Sequence[int]) -> bool:
        """Whether every input is certified; stops at the first one that is not."""
        return all(self.box(i, failures).certified(epsilon) for i in order)

    def max_failures_certified(self, layer_index: int, epsilon: float, progress: Progress | None = None) -> int:
        """Largest f keeping every input certified when only hidden layer ``layer_index`` fails (−1: none).

        Certification is monotone in f (every bound is), so the count is found by
        doubling then bisection; inputs with the smallest margins are tried first.
        """
        self._prepare(progress)
        hidden = self.local.hidden
        order = self._hardest_first()
        limit = hidden[layer_index].neurons
        name = hidden[layer_index].name

        def ok(f: int) -> bool:
            vector = [0] * len(hidden)
            vector[layer_index] = f
            if progress is not None:
                progress(name, f, limit)
            return self.all_certified(vector, epsilon, order)

        if not ok(0):
            return -1
        good, bad = 0, None
        f = 1
        while f <= limit:
            if ok(f):
                good = f
                f *= 2
            else:
                bad = f
                break
        if bad is None:
            if good == limit or ok(limit):
                return limit
            bad = limit
        while bad - good > 1:
            mid = (good + bad) // 2
            if ok(mid):
                good = mid
            else:
                bad = mid
        return good

    def _hardest_first(self) -> list[int]:
        margins = []
        for i in range(len(self.inputs)):
            bb = self.box(i, [0] * len(self.local.hidden))
            margins.append(float(bb.margins.min()) if bb.margins.size else 0.0)
        return [int(i) for i in np.argsort(margins, kind="stable")]


def certify_inputs(
    network: Network,
    failure: FailureModel,
    inputs: np.ndarray,
    failures: Sequence[int],
    epsilon: float,
    radius: float | None = None,
    labels: np.ndarray | None = None,
    progress: Progress | None = None,
    layer_counts: bool = True,
    workers: int = 1,
    classes: bool | None = None,
) -> CertifyResult:
    """Certificates of ``inputs`` [M, *sample_shape] under ``failures`` per hidden layer (docs/method.md §7).

    ``workers`` > 1 splits the inputs into that many contiguous slices certified in separate
    processes (docs/method.md §7.5); the result is the same whatever the split. ``classes``: whether
    the output's elements are class scores (certified: the arg-max cannot change) or not (certified:
    bound ≤ ε); None reads it from the output's shape (:func:`output_has_classes`). Raises
    InputDataError for inputs outside the domain, OptionError for a bad radius or worker count, or
    labels without classes, or ``failures`` that is not one count ≥ 0 per hidden layer.
    """
    if workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    layers = len(network.hidden_layers)
    if len(failures) != layers or any(int(f) < 0 for f in failures):
        raise OptionError(f"failures must be {layers} count(s) ≥ 0, one per hidden layer; got {list(failures)}")
    check_certify_inputs(network, inputs, radius)
    with_classes = output_has_classes(network) if classes is None else classes
    if labels is not None and not with_classes:
        raise OptionError("labels need an output with classes (the output is certified within ε here)")
    job = _SliceJob(
        network, failure, inputs, tuple(int(f) for f in failures), epsilon, radius, layer_counts, with_classes
    )
    if min(workers, len(inputs)) == 1:
        parts = [_certify_slice(job, progress)]
    else:
        from robaudit.injection.workers import map_in_processes, split_evenly  # process pools: only when asked

        slices = split_evenly(len(inputs), min(workers, len(inputs)))
        parts = map_in_processes(_certify_slice, [job.part(s) for s in slices], len(slices))
        if progress is not None:
            progress("inputs", len(inputs), len(inputs))
    return _merged(parts, network, failure, failures, labels, radius, epsilon, layer_counts)


@dataclass(frozen=True)
class _SliceJob:
    """The certificates of one slice of the inputs (picklable: what a worker process receives)."""

    network: Network
    failure: FailureModel
    inputs: np.ndarray
    failures: tuple[int, ...]
    epsilon: float
    radius: float | None
    layer_counts: bool
    classes: bool

    def part(self, where: range) -> _SliceJob:
        """The same job on inputs ``where``."""
        return dataclasses.replace(self, inputs=self.inputs[where.start : where.stop])


@dataclass(frozen=True)
class _SliceResult:
    boxes: list[BoxBound]
    certified: list[bool]
    #: Per hidden layer: the largest count keeping every input of the slice certified (−1: none).
    counts: list[int]


def _certify_slice(job: _SliceJob, progress: Progress | None = None) -> _SliceResult:
    """Per-input bounds of the slice and, per layer, its largest count keeping all of them certified."""
    certifier = Certifier(job.network, job.failure, job.inputs, job.radius, job.classes)
    certifier._prepare(progress)
    boxes = []
    for i in range(len(job.inputs)):
        boxes.append(certifier.box(i, job.failures))
        if progress is not None:
            progress("inputs", i + 1, len(job.inputs))
    counts = [-1] * len(certifier.local.hidden)
    if job.layer_counts:
        counts = [certifier.max_failures_certified(i, job.epsilon, progress) for i in range(len(counts))]
    return _SliceResult(boxes, [b.certified(job.epsilon) for b in boxes], counts)


def _merged(
    parts: list[_SliceResult],
    network: Network,
    failure: FailureModel,
    failures: Sequence[int],
    labels: np.ndarray | None,
    radius: float | None,
    epsilon: float,
    layer_counts: bool,
) -> CertifyResult:
    """One report from the slices, in input order; a layer's count is the smallest of the slices'."""
    boxes = [b for part in parts for b in part.boxes]
    flags = [c for part in parts for c in part.certified]
    results = []
    for i, (bb, ok) in enumerate(zip(boxes, flags, strict=True)):
        results.append(
            InputCertificate(
                index=i,
                bound=bb.bound,
                certified=ok,
                predicted=bb.predicted,
                label=None if labels is None else int(labels[i]),
                margin=bb.margin,
                margin_slack=bb.margin_slack,
            )
        )
    layers = []
    analysis = Analysis(network, failure)
    deltas = analysis.deltas
    for idx, layer in enumerate(network.hidden_layers):
        counts = [part.counts[idx] for part in parts]
        count = (-1 if min(counts) < 0 else min(counts)) if layer_counts else None
        delta = deltas[idx] if deltas[idx] < UNBOUNDED_REPORTED else None
        layers.append(
            LayerCertificate(
                layer.name, layer.neurons, int(failures[idx]), count, layer.kind, layer.synapse_max_abs_weight,
                layer.lipschitz, delta,
            )
        )
    classes = boxes[0].predicted is not None
    accuracy = None
    if labels is not None and classes:
        accuracy = float(np.mean([r.certified and r.predicted == r.label for r in results]))
    return CertifyResult(
        inputs=results,
        layers=layers,
        max_bound=max(r.bound for r in results),
        certified_fraction=float(np.mean(flags)),
        certified_accuracy=accuracy,
        classes=classes,
        radius=radius,
        epsilon=epsilon,
        notes=[unbounded_note(analysis.unbounded())] if analysis.unbounded() else [],
    )
