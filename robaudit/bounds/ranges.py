"""Neuron ranges: interval bound propagation tightened by CROWN-style back-substitution
(docs/method.md §5.1–5.3), for the clean network and for the faulty one.

Every pre-activation (and every input of a stand-alone activation) is bounded by
linear functions of earlier values: starting from ±e_i on the target, coefficients are
carried backwards through affine layers (their signed adjoint), through the linear
relaxation of each activation (:mod:`robaudit.graph.ops.relaxations`) and through the
ops with an exact linear adjoint; at the input box — or at any value the window stops
at, or an op without a linear rule — they are concretized against that value's
interval. Results are intersected with IBP, so a range is never looser than IBP.

Cost: bounding a value of n elements costs 2n back-substitutions; each target layer
gets a window (how many steps back it is carried) within a share of
``ROBAUDIT_CROWN_BUDGET`` multiply-adds, and IBP alone where even one step does not fit.
Within a share of ``ROBAUDIT_ALPHA_BUDGET`` a target's back-substitution is repeated with
other sound lower slopes of the unstable ReLUs it crosses, each bound keeping the best one
(docs/method.md §5.2, "Optimised lower slopes").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from robaudit import limits
from robaudit.errors import OptionError
from robaudit.graph.conv import conv2d, conv2d_adjoint
from robaudit.graph.ibp import FlipTerms, SiteRange, evaluate
from robaudit.graph.inputs import FLOAT
from robaudit.graph.layers import Layer, activation_chain
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext, lookup
from robaudit.graph.ops import normalization as norm
from robaudit.graph.ops.activations import Activation
from robaudit.graph.ops.affine import affine_interval, as_2d, conv_transpose, dense_interval, weight_products
from robaudit.graph.ops.base import NormalizedRows, reduce_to_shape
from robaudit.graph.ops.elementwise import plane_coefficients, product_planes
from robaudit.graph.ops.relaxations import LinearBounds, constant_bounds, linear_bounds, lower_slope_choices
from robaudit.graph.ops.rounding import FLOAT_TYPES, is_rounding

#: The range methods a user may pick (``--ranges``).
RANGE_METHODS = ("ibp", "crown")
#: Multiply-adds of the plain and the optimised pass of :func:`counted_faulty_ranges` (one more range pass
#: per failure vector a report is asked about: kept to a tenth and a hundredth of the defaults).
COUNTED_BUDGET = 3e8
COUNTED_ALPHA_BUDGET = 3e7
#: The repetitions with other lower slopes take at most this many times the plain pass's multiply-adds.
ALPHA_RATIO = 3.0
#: Most back-substitutions one target repeats with other lower slopes.
MAX_REPEATS = 64
#: Cost of one element-wise pass over a coefficient element, in multiply-adds (measured: ~8 passes, each
#: several times slower per element than a BLAS/einsum multiply-add).
PASS_COST = 40.0
#: Coefficient elements held at once per array (rows are chunked to fit): 64 MiB of float64.
CHUNK_ELEMENTS = 2**23
#: Largest coefficient array (elements) kept to bound a normalization's variance from its lines.
LINES_ELEMENTS = 2**24
#: Outward margin on every back-substituted bound, relative to the bound and to the value's IBP magnitude
#: (floating-point rounding of sums of that size).
MARGIN = 1e-9

#: Ops whose ``backward`` is their exact linear adjoint (reused for back-substitution).
_LINEAR_ADJOINT_OPS = frozenset(
    {
        "Identity",
        "Dropout",
        "Cast",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Gather",
        "Pad",
        "Concat",
        "Split",
        "Expand",
        "AveragePool",
        "GlobalAveragePool",
        "ReduceMean",
        "ReduceSum",
        # the identity on every value it receives here: failed neurons send finite values, and a guarded site's
        # word is read as the finite value the guard makes of it (docs/method.md §2.3, "Guarded sites")
        "NanGuard",
    }
)


@dataclass
class RangeReport:
    """How the ranges of one pass were obtained."""

    #: ``ibp`` or ``crown``.
    method: str
    #: Per bounded value: steps back-substituted (0: IBP alone) and whether it reached the input.
    windows: dict[str, tuple[int, bool]] = field(default_factory=dict)
    #: Per bounded value: back-substitutions repeated with other lower slopes (docs/method.md §5.2).
    repeats: dict[str, int] = field(default_factory=dict)
    #: Where CROWN was asked for and IBP used instead: what CROWN does not model (:func:`crown_obstacle`).
    fallback: str | None = None

    def summary(self) -> str:
        """One line: how many targets reached the input, how many used a window, how many IBP."""
        full = sum(1 for _, reached in self.windows.values() if reached)
        ibp = sum(1 for steps, reached in self.windows.values() if steps == 0 and not reached)
        window = len(self.windows) - full - ibp
        optimised = sum(1 for count in self.repeats.values() if count)
        return f"{self.method} ranges: {full} to the input, {window} windowed, {ibp} IBP only, {optimised} optimised"


def check_range_method(method: str) -> None:
    """Refuse an unknown ``--ranges`` value."""
    if method not in RANGE_METHODS:
        raise OptionError(f"--ranges must be one of {', '.join(RANGE_METHODS)}, got '{method}'")


def crown_applies(network: Network) -> bool:
    """Whether the back-substitution models every layer (:func:`crown_obstacle` names what it does not)."""
    return crown_obstacle(network) is None


def crown_obstacle(network: Network) -> str | None:
    """What keeps the back-substitution from a model, in words (None where it applies): several inputs or
    token ids, a rounding op before or after a layer's activation, a ``Gemm`` with
    ``transA=1`` (input laid out [features, 1]) or a 3-D convolution. Such a model keeps its IBP ranges
    (sound, looser; docs/method.md §5.2).

    The back-substitution ends at *the* input box and treats Gather as linear in its data: with several
    inputs (docs/method.md §12) or token ids feeding an embedding Gather neither holds. The relaxations take a
    layer's last node as its activation φ and its pre-activation as W·x + b: a rounding op after the
    activation, or a Q → DQ between the affine op and its bias or before the activation (docs/method.md §1.2),
    moves the value off W·x + b (and its clip to the codes far off).
    """
    inputs = getattr(network, "inputs", None)
    if inputs is not None and not (len(inputs) == 1 and inputs[0].kind == FLOAT):
        return "models of several inputs or of token ids" if len(inputs) > 1 else "token-id inputs"
    by_name = {n.name: n for n in network.nodes}
    for layer in network.layers:
        rounding = _rounding_op(layer, by_name)
        if rounding is not None:
            return f"the {rounding} in layer {layer.name}"
        if layer.geometry is not None and len(layer.in_shape) > 4:
            return f"the 3-D convolution of layer {layer.name}"
        if layer.geometry is None and layer.in_shape[-1] != layer.weight.shape[1]:
            return f"the transposed input (Gemm transA=1) of layer {layer.name}"
    return None


def _rounding_op(layer: Layer, by_name: dict[str, Node]) -> str | None:
    """The rounding op the relaxations cannot take (after the activation, or between the affine op and the
    pre-activation), as the model holds it; None where there is none."""
    chain = activation_chain(layer, by_name)
    after = chain[1:] if len(chain) > 1 else []
    before = [] if not rounds_before_activation(layer, by_name) else [
        by_name[name] for name in layer.nodes if name in by_name and is_rounding(by_name[name])
    ]
    if not after + before:
        return None
    node = (after + before)[0]
    if node.op_type == "FloatRound":  # the model's own float16 arithmetic, or a Cast to float16 and back
        return f"{FLOAT_TYPES[int(node.attr('to'))][0]} rounding"
    rule = lookup(node)
    return node.op_type if rule is None else rule.shown(node)


def tighten_network(
    network: Network, method: str, budget: float | None = None, alpha_budget: float | None = None
) -> RangeReport:
    """Replace ``network.clean`` by the ranges of ``method`` and record the method used (docs/method.md §5.2):
    ``ibp`` where CROWN was asked for but does not apply (:func:`crown_obstacle`, recorded in the report's
    ``fallback``); ``budget`` / ``alpha_budget`` replace ``ROBAUDIT_CROWN_BUDGET`` / ``ROBAUDIT_ALPHA_BUDGET``.

    Raises ``OptionError`` for an unknown method."""
    check_range_method(method)
    obstacle = crown_obstacle(network) if method == "crown" else None
    if obstacle is not None:
        method = "ibp"  # the back-substitution does not model every step here (§5.2): the report says IBP, and why
    network.ranges = method
    if method == "ibp":
        report = RangeReport("ibp", fallback=obstacle)
    else:
        ranges = _tightened(network, network.clean, {}, {}, budget, alpha_budget)
        network.clean = ranges.intervals
        network.sigma_floors = dict(ranges.floors)
        report = ranges.report
    network.range_report = report
    return report


def faulty_ranges(
    network: Network,
    widen: Mapping[str, SiteRange],
    radius: dict[str, float],
    method: str | None = None,
    budget: float | None = None,
    alpha_budget: float | None = None,
    relative: dict[str, FlipTerms] | None = None,
) -> dict[str, Interval]:
    """Ranges of every value when the values in ``widen`` may take any value in [a, b] too (failed
    neurons), those in ``radius`` move by ±r (failed synapses) and those in ``relative`` by ±(c·|v|max + t) of
    their own faulty interval, within the hull of 0, v and |v| where a bit is stuck at 0 (flipped bits of stored
    floats, docs/method.md §2.3) (docs/method.md §5.3)."""
    ibp = _widened_ibp(network, widen, radius, relative)
    method = method or getattr(network, "ranges", "ibp")
    preacts = {layer.preact_value for layer in network.layers}
    if relative or method == "ibp" or not crown_applies(network) or any(value not in preacts for value in radius):
        # a radius on a layer's output (stored-value faults: docs/method.md §2.3) is not a barrier of
        # the back-substitution, which would pass through it as if it did not move: IBP alone is sound
        return ibp
    return _tightened(network, ibp, widen, radius, budget, alpha_budget).intervals


def _tightened(
    network: Network,
    boxes: dict[str, Interval],
    widen: Mapping[str, SiteRange],
    radius: dict[str, float],
    budget: float | None,
    alpha_budget: float | None,
    counts: dict[str, int] | None = None,
) -> _Ranges:
    """The pass of docs/method.md §5.2 over ``boxes``; then, when ``alpha_budget`` > 0 and that plain pass was
    not cut short by its budget or took at most a quarter of ``alpha_budget``, a second pass that starts from
    its ranges, is intersected with them (so it is never looser than plain CROWN) and repeats
    back-substitutions with other lower slopes within ``alpha_budget`` (None: ``ROBAUDIT_ALPHA_BUDGET``, and
    when the plain pass was cut short, at most :data:`ALPHA_RATIO` times what it spent)."""
    budget = limits.crown_budget() if budget is None else budget
    plain = _Ranges(network, dict(boxes), set(widen), widen, budget, radius)
    plain.counts = counts
    plain.run(boxes)
    spent = budget - plain.budget
    total = limits.alpha_budget() if alpha_budget is None else alpha_budget
    if total <= 0 or (plain.limited and 4 * spent > total):  # deep models: plain CROWN, at its cost
        return plain
    if not plain.choosable and not plain.moved:
        # no lower slope to choose anywhere, and every range read as it ended: the second pass would compute
        # the same numbers again (docs/method.md §4.4)
        return plain
    optimised = _Ranges(network, dict(plain.intervals), set(widen), widen, budget, radius)
    optimised.counts = counts
    cut = alpha_budget is None and plain.limited
    optimised.alpha_budget = min(total, ALPHA_RATIO * spent) if cut else total
    optimised.run(dict(plain.intervals))
    return optimised


@dataclass
class SiteLines:
    """Upper bounds of ±v_i for a value v of n elements in the faulty network, carried *through* the failure
    sites (docs/method.md §5.3, "Through the failure sites"): for every failure set with at most f_l
    failed neurons in site l, +v_i ≤ constant[i] + Σ_l (sum of the f_l largest gains[l][i]) and
    −v_i ≤ constant[n + i] + Σ_l (sum of the f_l largest gains[l][n + i])."""

    #: [2n]: the bound with no failure term and the input's coefficients at 0 (rounding margin included).
    constant: np.ndarray
    #: per failure-site output value: [2n, N_l] gains ≥ 0, one per element of the site.
    gains: dict[str, np.ndarray]
    #: [2n, input elements]: the coefficients on the network input x (the bound adds ``inputs`` · x).
    inputs: np.ndarray
    #: the input box the coefficients are concretized over.
    box: Interval

    def upper(self) -> np.ndarray:
        """[2n]: the bound with no failure term, the input's terms maximised over :attr:`box`."""
        return self.constant + _concretize(self.inputs, self.box)


def failure_site_lines(
    network: Network,
    faulty: dict[str, Interval],
    widen: Mapping[str, SiteRange],
    value: str,
    flip_radius: Callable[[Layer, Interval], np.ndarray] | None = None,
) -> SiteLines:
    """Linear bounds of ±``value`` back-substituted from ``value`` to the input box through every step,
    failure sites included (docs/method.md §5.3, "Through the failure sites").

    ``faulty``: the faulty-network boxes of :func:`faulty_ranges` for the same ``widen`` (sound for
    every failure set: they give the activation lines and the boxes of the failure terms);
    ``widen``: failure-site output value → failure range [a, b]. At a site's output ỹ = φ(z̃) + e,
    e_i = 0 unless neuron i failed, then e_i = v_i − φ(z̃_i) ∈ [a − φ̃hi_i, b − φ̃lo_i] (φ̃: φ of the
    faulty pre-activation box); Λ·ỹ is carried on as Λ·φ(z̃) (the activation's lines on the faulty
    box) plus Σ_{failed i} Λ_i·e_i ≤ the f_l largest gains max(0, Λ_i(a − φ̃hi_i), Λ_i(b − φ̃lo_i)).
    ``flip_radius`` (stored-value faults, docs/method.md §2.3): a failed neuron keeps its computed value plus
    e_i, |e_i| ≤ flip_radius(layer, φ̃ box)_i, so its gain is |Λ_i|·r_i (``widen`` then only names the sites).
    Cost: 2n rows through the whole network (the caller checks its budget).
    """
    ranges = _Ranges(network, dict(faulty), set(widen), widen, math.inf)
    ranges.through = {}
    ranges.flip_radius = flip_radius
    shape = faulty[value].shape
    n = _size(shape)
    coef = np.concatenate([np.eye(n), -np.eye(n)]).reshape((2 * n,) + tuple(shape))
    ranges.magnitude = np.zeros(2 * n)
    index = ranges.producer[value]
    constant, coefs = ranges._carry(coef, value, index, 0, None)
    source = network.input_name
    box = ranges.intervals[source]
    inputs = coefs.pop(source, np.zeros((2 * n,) + tuple(box.shape))).reshape(2 * n, -1)
    for name, grad in coefs.items():
        constant += ranges._concretize(grad, ranges.intervals[name])
    gains = ranges.through
    ranges._concretize(inputs, box)  # the input terms' magnitude, for the margin
    magnitude = ranges.magnitude + np.abs(constant) + sum((g.sum(axis=1) for g in gains.values()), np.zeros(2 * n))
    return SiteLines(constant + MARGIN * (1.0 + magnitude), gains, inputs, box)


def _widened_ibp(
    network: Network,
    widen: Mapping[str, SiteRange],
    radius: dict[str, float],
    relative: dict[str, FlipTerms] | None = None,
) -> dict[str, Interval]:
    """IBP of the faulty network (docs/method.md §5.1, §5.3): the values in ``widen`` may also take any
    value in [a, b], those in ``radius`` move by ±r, those in ``relative`` by ±(c·|v|max + t) (and
    toward 0 only where a bit is stuck at 0)."""
    _, ibp = evaluate(
        network.graph,
        network.nodes,
        {name: network.clean.get(name, box) for name, box in network.input_boxes.items()},
        None,
        0,
        dict(network.constants),
        widen=widen,
        radius=radius,
        relative=relative,
    )
    return ibp


def counted_faulty_ranges(
    network: Network,
    counts: dict[str, int],
    failure_range: tuple[float, float],
    within: dict[str, Interval] | None = None,
) -> dict[str, Interval]:
    """Ranges of every value when at most ``counts[v]`` neurons of each failure-site output v fail (sending
    any value of ``failure_range``), the other sites being correct (docs/method.md §5.3, "Through the
    failure sites"): IBP with those outputs widened, then the CROWN pass carried through the sites,
    each adding the sum of its ``counts[v]`` largest failure terms (:meth:`_Ranges._site_terms`).
    ``within``: boxes that hold for these failures too (the faulty boxes of every failure set): every
    range is intersected with them."""
    counts = {v: c for v, c in counts.items() if c > 0}
    widen = {v: failure_range for v in counts}
    ibp = _widened_ibp(network, widen, {})
    if within is not None:
        ibp = {v: _intersect(box, within[v].lo, within[v].hi) if v in within else box for v, box in ibp.items()}
    return _tightened(network, ibp, widen, {}, COUNTED_BUDGET, COUNTED_ALPHA_BUDGET, counts).intervals


def _largest_sum(values: np.ndarray, count: int) -> np.ndarray:
    """Per row of ``values`` [rows, n] (≥ 0), the sum of its ``count`` largest entries."""
    count = min(count, values.shape[1])
    if count <= 0:
        return np.zeros(values.shape[0])
    if count >= values.shape[1]:
        return values.sum(axis=1)
    return np.partition(values, values.shape[1] - count, axis=1)[:, values.shape[1] - count :].sum(axis=1)


def through_cost(network: Network, value: str) -> float:
    """Multiply-adds of :func:`failure_site_lines` for ``value`` (2n rows through every step before it)."""
    ranges = _Ranges(network, dict(network.clean), set(), {}, math.inf)
    index = ranges.producer.get(value)
    if index is None:
        return math.inf
    return 2.0 * _size(network.clean[value].shape) * float(sum(ranges.costs[: index + 1]))


def rounds_before_activation(layer: Layer, by_name: dict[str, Node]) -> bool:
    """Whether a rounding op (docs/method.md §1.2) lies between ``layer``'s affine op and its pre-activation."""
    after = {node.name for node in activation_chain(layer, by_name)}
    return any(name in by_name and name not in after and is_rounding(by_name[name]) for name in layer.nodes)


# --------------------------------------------------------------------------- the pass


def _intersect(box: Interval, lo: np.ndarray, hi: np.ndarray) -> Interval:
    """``box`` ∩ [lo, hi], of the same value: a box that says more of it (:class:`NormalizedRows`,
    :class:`Probabilities`) keeps saying it."""
    lo, hi = np.maximum(box.lo, lo), np.minimum(box.hi, hi)
    hi = np.maximum(hi, lo)  # rounding can cross by an ulp; never an empty box
    return dataclasses.replace(box, lo=lo, hi=hi) if type(box) is not Interval else Interval(lo, hi)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two float arrays hold the same numbers bit for bit (−0.0 ≠ 0.0, NaN = the same NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.int64), b.view(np.int64)))


def _size(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class _Ranges:
    """One forward pass over ``network.steps`` tightening every layer's pre-activation."""

    def __init__(
        self,
        network: Network,
        intervals: dict[str, Interval],
        barriers: set[str],
        widen: Mapping[str, SiteRange],
        budget: float,
        radius: dict[str, float] | None = None,
    ) -> None:
        self.net = network
        self.intervals = intervals
        self.barriers = barriers
        self.widen = widen
        self.radius = radius or {}
        self.report = RangeReport("crown")
        self.nodes = {n.name: n for n in network.nodes}
        self.producer: dict[str, int] = {}
        for index, step in enumerate(network.steps):
            for out in [step.output_value] if isinstance(step, Layer) else step.outputs:
                if out:
                    self.producer[out] = index
        self.costs = [self._cost(step) for step in network.steps]
        #: Budget left, and targets left to share it (a target that needs less leaves the rest to later ones).
        self.budget = budget
        self.targets_left = sum(1 for step in network.steps if self._is_target(step))
        self.relaxations: dict[str, LinearBounds] = {}
        #: Optimised lower slopes (docs/method.md §5.2): the budget they may take, each source's lower slope
        #: choices [C, *shape] (None: nothing to choose), the sources with choices the current target's
        #: back-substitution crossed (in order), the choice index per row for the pass running now (None: 0),
        #: and the multiply-adds of one pass of the current target.
        self.alpha_budget = 0.0
        self.choices: dict[str, np.ndarray | None] = {}
        self.crossed: list[str] = []
        self.choice: dict[str, np.ndarray] | None = None
        self.pass_cost = 0.0
        #: Repeated back-substitutions the current target used (charged to ``alpha_budget`` once it is done).
        self.used = 0
        #: Whether some target's window was cut short by the budget (not by a failure site).
        self.limited = False
        #: Whether some target's back-substitution crossed a source with lower slope choices, and whether some
        #: range was tightened after it had been stored (read before that by later steps): without either, a
        #: second pass from this pass's ranges repeats its numbers (docs/method.md §4.4).
        self.choosable = False
        self.moved = False
        #: Per row of the back-substitution running now: Σ of the magnitudes of the terms summed.
        self.magnitude = np.zeros(0)
        self.ctx = PropagationContext(intervals, intervals, network.constants)
        #: Per normalization node: its input's box and a lower bound on σ (RMSNorm: r) per group there
        #: (docs/method.md §13.1).
        self.floors: dict[str, tuple[Interval, np.ndarray]] = {}
        #: Failure sites carried through instead of concretized (:func:`failure_site_lines`): per site
        #: output, the largest gain Λ_i·e_i ≥ 0 of each element's failure term [rows, N]; None: barriers.
        self.through: dict[str, np.ndarray] | None = None
        #: Stored-value faults carried through the sites: the flip's radius from the stored value's box.
        self.flip_radius: Callable[[Layer, Interval], np.ndarray] | None = None
        #: At most this many failed neurons per failure site (:func:`counted_faulty_ranges`): the sites are
        #: carried through, each adding the sum of its ``counts`` largest gains; None: barriers.
        self.counts: dict[str, int] | None = None

    # ------------------------------------------------------------------ forward

    def run(self, original: dict[str, Interval]) -> dict[str, Interval]:
        """Tighten every step in order; the result is ⊆ ``original`` value by value."""
        for index, step in enumerate(self.net.steps):
            if isinstance(step, Layer):
                self._layer(index, step, original)
            else:
                self._node(index, step, original)
        return self.intervals

    def _layer(self, index: int, layer: Layer, original: dict[str, Interval]) -> None:
        box = _affine_forward(layer, self.intervals[layer.input_value])
        r = self.radius.get(layer.preact_value, 0.0)
        lo, hi = box.lo - r, box.hi + r
        window = self._window(index, layer)
        if window is not None:
            b_lo, b_hi = self._back_substitute(layer.preact_value, index, window, layer)
            lo, hi = np.maximum(lo, b_lo - r), np.minimum(hi, b_hi + r)
        self.report.windows[layer.preact_value] = self._window_info(index, window)
        pre = _intersect(original[layer.preact_value], lo, hi)
        self.intervals[layer.preact_value] = pre
        if layer.output_value == layer.preact_value:
            out = pre
        else:
            node = self.nodes[layer.nodes[-1]]
            out = _activation_forward(node, pre, self.net.constants)
        self._store(layer.output_value, out, original)

    def _node(self, index: int, node: Node, original: dict[str, Interval]) -> None:
        outs = [o for o in node.outputs if o]
        if not outs or not all(o in self.intervals for o in outs):
            return  # Shape and other nodes whose outputs are constants
        rule = lookup(node)
        assert rule is not None  # the IBP pass refused nodes without a rule
        source = node.inputs[0]
        if isinstance(rule, norm.Normalization) and source in self.producer:
            self._normalization(index, node, rule, original)
            return
        if isinstance(rule, Activation) and source in self.intervals and source in self.producer:
            producer = self.net.steps[self.producer[source]]
            if not (isinstance(producer, Layer) and producer.output_value == source):
                self._tighten_value(source, self.producer[source], original)
        args = [self.intervals.get(v, self.net.constants.get(v)) if v else None for v in node.inputs]
        for out, value in zip(node.outputs, rule.interval(node, args), strict=False):
            if out:
                self._store(out, value, original)

    def _tighten_value(self, value: str, index: int, original: dict[str, Interval]) -> None:
        window = self._window(index, None)
        self.report.windows[value] = self._window_info(index, window)
        if window is None:
            return
        lo, hi = self._back_substitute(value, index, window, None)
        before = self.intervals[value]
        self.intervals[value] = after = _intersect(before, lo, hi)
        self.moved = self.moved or not (_same_bits(before.lo, after.lo) and _same_bits(before.hi, after.hi))

    def _normalization(self, index: int, node: Node, rule: norm.Normalization, original: dict[str, Interval]) -> None:
        """A LayerNorm / RMSNorm: its centred deviations (RMSNorm: its input) bounded by back-substitution, the
        variance floor from those lines, and the range of z from both (docs/method.md §13.1)."""
        args = [self.intervals.get(v, self.net.constants.get(v)) if v else None for v in node.inputs]
        (out,) = rule.interval(node, args)[:1]
        source = node.inputs[0]
        box = self.intervals[source]
        groups, n = rule._groups(node, box.shape)
        rms, epsilon = rule._rms(node), float(node.attr("epsilon", 1e-5))
        window = self._norm_window(self.producer[source], 2 * groups * n)
        self.report.windows[node.outputs[0]] = self._window_info(self.producer[source], window)
        lo, hi = box.lo.reshape(groups, n), box.hi.reshape(groups, n)
        floor = norm.min_mean_square(lo, hi) if rms else norm.min_variance(lo, hi)
        d_lo, d_hi = (lo, hi) if rms else norm.deviation_interval(lo, hi)
        if window is not None:
            found = self._deviation_lines(source, self.producer[source], window, groups, n, rms)
            d_lo, d_hi = np.maximum(d_lo, found[0]), np.minimum(d_hi, found[1])
            floor = np.maximum(floor, norm.variance_from_deviations(d_lo, np.maximum(d_hi, d_lo)))
            if found[2] is not None:
                floor = np.maximum(floor, norm.variance_from_lines(*found[2]))
        self.floors[node.name] = (box, np.sqrt(floor + epsilon))
        top = norm.max_mean_square(lo, hi) if rms else norm.max_variance(lo, hi)
        z = norm.normalized_from_deviations(d_lo, np.maximum(d_hi, d_lo), floor, top, epsilon, rms)
        gamma, beta = rule._affine(node, args, box.shape)
        a, b = z.lo * gamma + beta, z.hi * gamma + beta
        shape = out.shape
        tight = Interval(np.minimum(a, b).reshape(shape), np.maximum(a, b).reshape(shape))
        self._store(node.outputs[0], _intersect(out, tight.lo, tight.hi), original)

    def _norm_window(self, index: int, rows: int) -> int | None:
        """First step the deviations of a normalization's input (produced by step ``index``) are carried back
        to, the producing step included, within its share of the budget; None: intervals alone (also when the
        window holds no affine layer, which alone can make the lines tighter than the boxes)."""
        share = self.budget / max(self.targets_left, 1)
        self.targets_left -= 1
        spent, first, affine = 0.0, None, False
        for j in range(index, -1, -1):
            step = self.net.steps[j]
            if isinstance(step, Layer) and step.output_value in self.barriers:
                break
            if rows * (spent + self.costs[j]) > share:
                self.limited = True
                break
            spent += self.costs[j]
            first, affine = j, affine or isinstance(step, Layer)
        if not affine:  # without an affine map inside, the lines are the boxes themselves: nothing to gain
            return None
        self.budget -= rows * spent
        return first

    def _deviation_lines(self, value: str, index: int, first: int, groups: int, n: int, rms: bool):
        """Bounds [lo, hi] ([G, n]) of the centred deviations x_i − mean (RMSNorm: x_i) of ``value`` carried back
        to step ``first``, and, when they fit in memory, their lower and upper lines over the values where the
        back-substitution stopped (for :func:`variance_from_lines`)."""
        shape = self.intervals[value].shape
        size = groups * n
        eye = np.eye(n) if rms else np.eye(n) - 1.0 / n
        coef = np.zeros((2 * size, groups, n))
        for g in range(groups):
            coef[g * n : (g + 1) * n, g] = eye
        coef[size:] = -coef[:size]
        self.magnitude = np.zeros(2 * size)
        constant, coefs = self._carry(coef.reshape((2 * size,) + shape), value, index, first, None)
        names = sorted(coefs)
        upper = constant.copy()
        for name in names:
            upper += self._concretize(coefs[name], self.intervals[name])
        slack = MARGIN * (1.0 + self.magnitude + np.abs(upper))
        upper += slack
        d_hi, d_lo = upper[:size].reshape(groups, n), -upper[size:].reshape(groups, n)
        free = sum(_size(self.intervals[name].shape) for name in names)
        if not names or self.barriers or 2 * size * free > LINES_ELEMENTS:
            # the faulty pass (barriers) keeps no floor of σ: its lines would only narrow z a little
            return d_lo, d_hi, None
        matrix = np.concatenate([coefs[name].reshape(2 * size, -1) for name in names], axis=1)
        shift = constant + slack
        box = Interval(
            np.concatenate([self.intervals[name].lo.reshape(-1) for name in names]),
            np.concatenate([self.intervals[name].hi.reshape(-1) for name in names]),
        )
        up = (matrix[:size].reshape(groups, n, free), shift[:size].reshape(groups, n))
        down = (-matrix[size:].reshape(groups, n, free), -shift[size:].reshape(groups, n))
        return d_lo, d_hi, (down, up, box)

    def _store(self, value: str, box: Interval, original: dict[str, Interval]) -> None:
        if value in self.widen:
            a, b = self.widen[value]
            box = Interval(np.minimum(box.lo, a), np.maximum(box.hi, b))
        self.intervals[value] = _intersect(original[value], box.lo, box.hi) if value in original else box

    # ------------------------------------------------------------------ windows

    def _is_target(self, step) -> bool:
        return isinstance(step, Layer) or isinstance(lookup(step), Activation | norm.Normalization)

    def _cost(self, step) -> float:
        """Multiply-adds of one back-substitution row through ``step`` (element-wise passes count
        :data:`PASS_COST` each: they are memory-bound)."""
        if isinstance(step, Layer):
            passes = PASS_COST * (_size(step.in_shape) + _size(step.out_shape))
            if step.geometry is None:
                lead = _size(self.net.clean[step.preact_value].shape[:-1])  # batch 1, wherever it sits
                return float(step.weight.size) * max(lead, 1) + passes
            spatial = step.in_shape[2:] if step.kind == "conv_transpose" else step.out_shape[2:]
            return float(step.weight.size) * _size(spatial) + passes
        return PASS_COST * float(sum(_size(self.net.clean[v].shape) for v in step.outputs if v in self.net.clean))

    def _window(self, index: int, layer: Layer | None) -> int | None:
        """The first step index the back-substitution reaches, or None for IBP alone."""
        value = layer.preact_value if layer is not None else self._output_of(index)
        rows = 2 * _size(self.intervals[value].shape)
        share = self.budget / max(self.targets_left, 1)
        self.targets_left -= 1
        spent = self.costs[index] if layer is not None else 0.0
        first = index
        for j in range(index - 1, -1, -1):
            step = self.net.steps[j]
            if isinstance(step, Layer) and step.output_value in self.barriers and self.counts is None:
                break  # nothing flows through a failure site's output: stop here
            if rows * (spent + self.costs[j]) > share:
                self.limited = True
                break
            spent += self.costs[j]
            first = j
        if first == index:
            return None
        self.budget -= rows * spent
        self.pass_cost = rows * spent
        return first

    def _step_size(self, index: int) -> int:
        step = self.net.steps[index]
        values = [step.input_value, step.output_value] if isinstance(step, Layer) else step.outputs
        return max((_size(self.intervals[v].shape) for v in values if v in self.intervals), default=1)

    def _output_of(self, index: int) -> str:
        step = self.net.steps[index]
        return step.output_value if isinstance(step, Layer) else step.outputs[0]

    def _window_info(self, index: int, window: int | None) -> tuple[int, bool]:
        if window is None:
            return 0, False
        return index - window, window == 0 and not self.barriers

    # ------------------------------------------------------------------ back-substitution

    def _back_substitute(
        self, value: str, index: int, first: int, layer: Layer | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of ``value`` from linear bounds carried back to step ``first``."""
        shape = self.intervals[value].shape
        n = _size(shape)
        widest = max(self._step_size(j) for j in range(first, index + 1))
        widest = max(widest, _size(self.intervals[self.net.input_name].shape), n)
        chunk = max(1, CHUNK_ELEMENTS // widest)
        upper, magnitude = np.empty(2 * n), np.empty(2 * n)
        passes, self.used = self._alpha_passes(), 0
        for start in range(0, 2 * n, chunk):
            rows = np.arange(start, min(start + chunk, 2 * n))
            coef = np.zeros((rows.size, n))
            coef[np.arange(rows.size), rows % n] = np.where(rows < n, 1.0, -1.0)
            found = self._optimised(coef.reshape((rows.size,) + shape), value, index, first, layer, passes)
            upper[rows], magnitude[rows] = found
        self.report.repeats[value] = self.used
        self.alpha_budget -= self.used * self.pass_cost
        hi, lo = upper[:n], -upper[n:]
        # rounding grows with the magnitude of the summed terms, not only with the bound
        slack = MARGIN * (1.0 + magnitude[:n]), MARGIN * (1.0 + magnitude[n:])
        return (lo - slack[1]).reshape(shape), (hi + slack[0]).reshape(shape)

    def _alpha_passes(self) -> int:
        """How many repeated back-substitutions the current target's share of ``alpha_budget`` pays for
        (what it does not use is left to later targets)."""
        if self.alpha_budget <= 0 or self.pass_cost <= 0:
            return 0
        share = self.alpha_budget / max(self.targets_left + 1, 1)
        return int(min(share // self.pass_cost, MAX_REPEATS))

    def _pass(self, coef, value, index, first, layer, choice) -> tuple[np.ndarray, np.ndarray]:
        """(upper bound, summed magnitude) per row with the lower slope choices ``choice`` (None: adaptive)."""
        self.choice = choice
        self.magnitude = np.zeros(coef.shape[0])
        try:
            upper = self._upper(coef, value, index, first, layer)
        finally:
            self.choice = None
        return upper, self.magnitude + np.abs(upper)

    def _optimised(self, coef, value, index, first, layer, passes: int) -> tuple[np.ndarray, np.ndarray]:
        """The upper bound per row, the best over up to 1 + ``passes`` back-substitutions with different lower
        slopes of the unstable ReLUs crossed (docs/method.md §5.2, "Optimised lower slopes"): first the same
        choice at every source, then each source's choices in turn (coordinate search), every row keeping its
        best choice so far. Every pass is a sound bound, so is their minimum."""
        self.crossed = []
        best, magnitude = self._pass(coef, value, index, first, layer, None)
        sources = list(dict.fromkeys(self.crossed))
        self.choosable = self.choosable or bool(sources)
        if passes <= 0 or not sources:
            return best, magnitude
        k = coef.shape[0]
        count = min(len(c) for c in (self.choices[s] for s in sources) if c is not None)
        chosen = {s: np.zeros(k, dtype=np.intp) for s in sources}
        trials = [{s: np.full(k, c, dtype=np.intp) for s in sources} for c in range(1, count)]
        trials += [{s: np.full(k, c, dtype=np.intp)} for s in sources for c in range(count)]
        self.used = max(self.used, min(passes, len(trials)))
        for trial in trials[:passes]:
            upper, mag = self._pass(coef, value, index, first, layer, {**chosen, **trial})
            better = upper < best
            best, magnitude = np.where(better, upper, best), np.where(better, mag, magnitude)
            for s, c in trial.items():
                chosen[s] = np.where(better, c, chosen[s])
        return best, magnitude

    def _carry(
        self, coef: np.ndarray, value: str, index: int, first: int, layer: Layer | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Linear upper bounds of coef·value carried back to step ``first``: (constant, coefficients on the
        values where they stop); every other value met on the way is concretized into the constant."""
        constant = np.zeros(coef.shape[0])
        coefs: dict[str, np.ndarray] = {}
        if layer is not None:
            grad, shift = _affine_back(layer, coef)
            coefs[layer.input_value] = grad
            constant += shift
            self.magnitude += np.abs(shift)
            stop = index - 1
        else:
            coefs[value] = coef
            stop = self.producer[value]

        def add(name: str, grad: np.ndarray) -> None:
            coefs[name] = coefs[name] + grad if name in coefs else grad

        for j in range(stop, first - 1, -1):
            step = self.net.steps[j]
            outs = [step.output_value] if isinstance(step, Layer) else [o for o in step.outputs if o]
            if not any(o in coefs for o in outs):
                continue
            if isinstance(step, Layer):
                grad = coefs.pop(step.output_value)
                if step.output_value in self.barriers:
                    if self.through is None and self.counts is None:
                        constant += self._concretize(grad, self.intervals[step.output_value])
                        continue
                    gains = self._site_terms(step, grad)  # then on through φ(z̃)
                    if self.through is not None:
                        self.through[step.output_value] = gains
                    if self.counts is not None:
                        top = _largest_sum(gains, self.counts[step.output_value])
                        constant += top
                        self.magnitude += top
                if step.output_value != step.preact_value:
                    grad, shift = self._through_activation(self.nodes[step.nodes[-1]], step.preact_value, grad)
                    constant += shift
                    self.magnitude += np.abs(shift)
                grad, shift = _affine_back(step, grad)
                constant += shift
                self.magnitude += np.abs(shift)
                add(step.input_value, grad)
                continue
            shift = self._through_node(step, coefs, add)
            constant += shift
            self.magnitude += np.abs(shift)
        return constant, coefs

    def _site_terms(self, layer: Layer, grad: np.ndarray) -> np.ndarray:
        """Per row and element i of a failure site's output ỹ = φ(z̃) + e (e_i = 0 unless i failed, then
        v_i − φ(z̃_i) ∈ [a − φ̃hi_i, b − φ̃lo_i]): max(0, max over e_i of grad_i·e_i), [rows, N]
        (docs/method.md §5.3, "Through the failure sites")."""
        pre = self.intervals[layer.preact_value]
        healthy = pre if layer.output_value == layer.preact_value else _activation_forward(
            self.nodes[layer.nodes[-1]], pre, self.net.constants
        )
        rows = grad.reshape(grad.shape[0], -1)
        if self.flip_radius is not None:  # e_i ∈ [−r_i, r_i] around the stored value (docs/method.md §2.3)
            radius = self.flip_radius(layer, healthy)
            low, high = -radius, radius
        else:
            a, b = self.widen[layer.output_value]
            low, high = (a - healthy.hi).reshape(-1), (b - healthy.lo).reshape(-1)
        with np.errstate(invalid="ignore"):
            gain = np.maximum(rows * low[None, :], rows * high[None, :])
        gain = np.where(rows == 0.0, 0.0, np.where(np.isnan(gain), np.inf, gain))  # ∞·0 of a box: unbounded
        return np.maximum(gain, 0.0)

    def _upper(self, coef: np.ndarray, value: str, index: int, first: int, layer: Layer | None) -> np.ndarray:
        """max of coef·value over the domain, by linear upper bounds carried back to step ``first``."""
        constant, coefs = self._carry(coef, value, index, first, layer)
        for name, grad in coefs.items():
            constant += self._concretize(grad, self.intervals[name])
        return constant

    def _concretize(self, grad: np.ndarray, box: Interval) -> np.ndarray:
        """max over the box of grad·x per row; its terms' magnitude Σ|grad|·max|x| is recorded for the margin."""
        self.magnitude += np.abs(grad.reshape(grad.shape[0], -1)) @ box.abs_max().reshape(-1)
        return _concretize(grad, box)

    def _through_activation(self, node: Node, source: str, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients on the activation's input, and the constant, of an upper bound of grad·f(source)."""
        if source not in self.relaxations:  # the lines and the slope choices from the same box
            box = self.intervals[source]
            self.relaxations[source] = linear_bounds(node, box.lo, box.hi, self.net.constants)
            self.choices[source] = lower_slope_choices(node, box.lo, box.hi, self.net.constants)
        lb, options = self.relaxations[source], self.choices[source]
        lower = lb.lower_slope
        if options is not None:
            self.crossed.append(source)
            if self.choice is not None and source in self.choice:
                lower = options[self.choice[source]]  # [rows, *shape]: each row its own choice
        pos = np.maximum(grad, 0.0)
        neg = grad - pos
        new = pos * lb.upper_slope
        new += neg * lower
        k = grad.shape[0]
        shift = pos.reshape(k, -1) @ lb.upper_icpt.reshape(-1) + neg.reshape(k, -1) @ lb.lower_icpt.reshape(-1)
        return new, shift

    def _through_node(self, node: Node, coefs: dict[str, np.ndarray], add) -> np.ndarray:
        """Carry the coefficients of ``node``'s outputs to its inputs; the constant it adds."""
        rule = lookup(node)
        assert rule is not None  # the IBP pass refused nodes without a rule
        grads = [coefs.pop(o, None) if o else None for o in node.outputs]
        k = next(g.shape[0] for g in grads if g is not None)
        variable = [v for v in node.inputs if v and v in self.intervals]
        if isinstance(rule, Activation) and len(variable) == 1 and grads[0] is not None:
            grad, shift = self._through_activation(node, node.inputs[0], grads[0])
            add(node.inputs[0], grad)
            return shift
        op = node.op_type
        linear = op in _LINEAR_ADJOINT_OPS or (op in ("Add", "Sub") and len(variable) == 2)
        if linear:
            full: list[np.ndarray | None] = [
                g if g is not None else np.zeros((k,) + self.intervals[o].shape)
                for g, o in zip(grads, node.outputs, strict=False)
            ]
            constant = np.zeros(k)
            moved = rule.backward(node, full, self.ctx)
            for position, (name, part) in enumerate(zip(node.inputs, moved, strict=False)):
                if part is not None and name in self.intervals:
                    add(name, -part if (op == "Sub" and position == 1) else part)
            if op == "Concat":  # constant pieces of a Concat add their coefficient · value
                constant += self._concat_constants(node, full[0])
            if op == "Pad" and node.attr("mode", "constant") == "constant":  # so do padded elements
                constant += self._pad_constants(node, rule, full[0])
            return constant
        first = grads[0]
        if op in ("Add", "Sub", "Mul", "Div", "BatchNormalization") and len(variable) == 1 and first is not None:
            return self._elementwise_affine(node, rule, first, add)
        if op == "Mul" and len(variable) == 2 and first is not None and self._finite(node.inputs[:2]):
            return self._through_product(node, first, add)
        constant = np.zeros(k)
        for rest, out in zip(grads, node.outputs, strict=False):
            if rest is not None:
                constant += self._concretize(rest, self.intervals[out])
        return constant

    def _finite(self, names: Sequence[str]) -> bool:
        """Whether the boxes of ``names`` are finite (McCormick planes need finite ends)."""
        boxes = [self.intervals[v] for v in names]
        return all(np.all(np.isfinite(box.lo)) and np.all(np.isfinite(box.hi)) for box in boxes)

    def _through_product(self, node: Node, grad: np.ndarray, add) -> np.ndarray:
        """An upper bound of grad·(x·y) through McCormick planes of each product (docs/method.md §4.2)."""
        x_name, y_name = node.inputs[:2]
        x_box, y_box = self.intervals[x_name], self.intervals[y_name]
        planes = product_planes(x_box, y_box)
        if grad.flags.c_contiguous:  # a block of rows at a time, the same numbers (docs/method.md §4.4)
            x_coef, y_coef, constant, magnitude = plane_coefficients(grad, planes, x_box.shape, y_box.shape)
            add(x_name, x_coef)
            add(y_name, y_coef)
            self.magnitude += magnitude
            return constant
        pos = np.maximum(grad, 0.0)
        neg = grad - pos
        k = grad.shape[0]
        for name, box, (upper, lower) in ((x_name, x_box, planes[0]), (y_name, y_box, planes[1])):
            add(name, reduce_to_shape(pos * upper + neg * lower, box.shape))
        up_const, low_const = planes[2]
        terms = (pos * up_const).reshape(k, -1), (neg * low_const).reshape(k, -1)
        self.magnitude += np.abs(terms[0]).sum(axis=1) + np.abs(terms[1]).sum(axis=1)  # rounding of the sum
        return terms[0].sum(axis=1) + terms[1].sum(axis=1)

    def _concat_constants(self, node: Node, grad: np.ndarray | None) -> np.ndarray:
        shapes = [self.ctx.shape(v) for v in node.inputs]
        axis = node.attr("axis") % len(shapes[0])
        assert grad is not None
        pieces = np.split(grad, np.cumsum([s[axis] for s in shapes])[:-1], axis=axis + 1)
        constant = np.zeros(grad.shape[0])
        for name, piece in zip(node.inputs, pieces, strict=True):
            if name not in self.intervals:
                value = np.broadcast_to(np.asarray(self.net.constants[name], np.float64), piece.shape[1:])
                constant += (piece * value).reshape(grad.shape[0], -1).sum(axis=1)
        return constant

    def _pad_constants(self, node: Node, rule, grad: np.ndarray | None) -> np.ndarray:
        assert grad is not None
        value = float(node.attr("value", 0.0))
        if len(node.inputs) > 2 and node.inputs[2] and np.size(self.net.constants.get(node.inputs[2], [])):
            value = float(np.asarray(self.net.constants[node.inputs[2]]).reshape(-1)[0])
        if value == 0.0:
            return np.zeros(grad.shape[0])
        padded = rule._index_map(node, self.ctx).reshape(-1) < 0  # DataMovement: −1 marks a padded element
        return value * grad.reshape(grad.shape[0], -1)[:, padded].sum(axis=1)

    def _elementwise_affine(self, node: Node, rule, grad: np.ndarray, add) -> np.ndarray:
        from robaudit.graph.ops.base import reduce_to_shape

        index = 0 if node.inputs[0] in self.intervals else 1
        source = node.inputs[index]
        in_shape = self.intervals[source].shape
        args = [self.net.constants.get(v) if v and v not in self.intervals else None for v in node.inputs]
        scale, shift = rule.scale_shift(node, args, len(in_shape))
        add(source, reduce_to_shape(grad * scale, in_shape))
        return (grad * shift).reshape(grad.shape[0], -1).sum(axis=1)


# --------------------------------------------------------------------------- layer maths


def _concretize(grad: np.ndarray, box: Interval) -> np.ndarray:
    """max over the box of grad·x, per row: Σ grad⁺·hi + grad⁻·lo (only used through the method); over
    normalized rows (:class:`NormalizedRows`) the least of that and their 2-norm bound
    (:func:`_over_normalized_rows`)."""
    rows = grad.reshape(grad.shape[0], -1)
    upper = np.maximum(rows, 0.0) @ box.hi.reshape(-1) + np.minimum(rows, 0.0) @ box.lo.reshape(-1)
    if isinstance(box, NormalizedRows) and box.gamma.size == box.shape[-1]:
        return np.minimum(upper, _over_normalized_rows(grad, box))
    return upper


def _over_normalized_rows(grad: np.ndarray, box: NormalizedRows) -> np.ndarray:
    """max of grad·x per row of ``grad`` [K, *shape] over x = γ⊙z + β whose rows z (along the last axis, n elements)
    each have ‖z‖₂ ≤ √n and, centred, Σ z = 0: Σ_rows (g·β + √n·‖g⊙γ less its mean‖₂), each row of x free of the
    others (docs/method.md §13.1); widened by 10⁻⁹ of its terms for float64 rounding."""
    n = box.gamma.size
    g = grad.reshape(grad.shape[0], -1, n)
    scaled = g * box.gamma
    if box.centred:
        scaled = scaled - scaled.mean(axis=-1, keepdims=True)
    radius = math.sqrt(n) * np.sqrt((scaled * scaled).sum(axis=-1)).sum(axis=-1)
    centre = (g * box.beta).sum(axis=(1, 2))
    return centre + radius + 1e-9 * (radius + np.abs(g * box.beta).sum(axis=(1, 2)))


def _bias_view(layer: Layer) -> np.ndarray:
    if layer.geometry is None:
        return layer.bias
    return layer.bias.reshape((-1,) + (1,) * (len(layer.out_shape) - 2))


def _affine_back(layer: Layer, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients on the layer's input (signed adjoint Wᵀ) and the constant grad·bias."""
    k = grad.shape[0]
    shift = (grad * _bias_view(layer)).reshape(k, -1).sum(axis=1)
    if layer.geometry is None:
        rows = grad.reshape(-1, grad.shape[-1])
        (product,) = weight_products(layer.weight, [(rows, False)])
        return product.reshape(grad.shape[:-1] + (product.shape[-1],)), shift
    in_shape = layer.in_shape
    weight = np.asarray(layer.weight, np.float64)
    if layer.kind == "conv_transpose":
        flat = grad.reshape((k,) + tuple(grad.shape[2:]))
        out = conv2d(flat, weight, layer.geometry)[:, :, : in_shape[2], : in_shape[3]]
        return out.reshape((k,) + tuple(in_shape)), shift
    flat = as_2d(grad.reshape((k,) + tuple(grad.shape[2:])))
    hw = (1, in_shape[-1]) if len(in_shape) == 3 else (in_shape[-2], in_shape[-1])
    out = conv2d_adjoint(flat, as_2d(weight), layer.geometry, hw)
    return out.reshape((k,) + tuple(in_shape)), shift


def _affine_forward(layer: Layer, x: Interval) -> Interval:
    """IBP of the layer's affine map (weight and bias folded) on the box ``x``."""
    if layer.geometry is None:
        return dense_interval(x, layer.weight.T, layer.bias)
    weight = np.asarray(layer.weight, np.float64)
    bias = _bias_view(layer)
    if layer.kind == "conv_transpose":
        out_hw = tuple(layer.out_shape[2:])

        def apply_t(v, signed):
            out = conv_transpose(v, weight if signed else np.abs(weight), layer.geometry, out_hw)
            return out + bias if signed else out

        return affine_interval(x, apply_t)
    one_d = len(layer.in_shape) == 3
    w2 = as_2d(weight)

    def apply(v, signed):
        out = conv2d(as_2d(v), w2 if signed else np.abs(w2), layer.geometry)
        out = out[:, :, 0, :] if one_d else out
        return out + bias if signed else out

    return affine_interval(x, apply)


def _activation_forward(node: Node, pre: Interval, constants: dict) -> Interval:
    args = [pre] + [constants.get(v) if v else None for v in node.inputs[1:]]
    rule = lookup(node)
    assert rule is not None  # the IBP pass refused nodes without a rule
    return rule.interval(node, args)[0]


__all__ = [
    "RANGE_METHODS",
    "RangeReport",
    "check_range_method",
    "constant_bounds",
    "faulty_ranges",
    "tighten_network",
]
