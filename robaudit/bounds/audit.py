"""The library entry points behind ``inspect`` and ``bound``: path + options in, results out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from robaudit.bounds.bound import Bound, CombinedBound, PaperMethod, make_bounds
from robaudit.bounds.fep import UNBOUNDED_REPORTED, Analysis, FailureModel, site_values, unbounded_note
from robaudit.bounds.ranges import check_range_method, tighten_network
from robaudit.bounds.results import (
    BoundResult,
    BranchInfo,
    InspectResult,
    LayerBound,
    LayerInfo,
    ModelInfo,
    Settings,
)
from robaudit.bounds.slack import within
from robaudit.errors import OptionError
from robaudit.graph.layers import Layer, layer_label
from robaudit.graph.loader import LoadedModel, load_model
from robaudit.graph.network import Network, NetworkOptions, build_network
from robaudit.graph.onnx_graph import Node, build_graph
from robaudit.graph.ops import lookup
from robaudit.graph.ops.normalization import Normalization
from robaudit.graph.recurrent import CELL_KEY
from robaudit.options import Method

METHODS = Method.values()


@dataclass(frozen=True)
class BoundOptions:
    """Everything ``bound`` needs besides the model (docs/method.md §2, §3, §6; README "Commands")."""

    epsilon: float
    failure: FailureModel = FailureModel.crash()
    method: Method | str = Method.TIGHT
    network: NetworkOptions = NetworkOptions()
    #: Explicit failures per hidden layer (a single value applies to every layer).
    failures: tuple[int, ...] | None = None
    #: Failed synapses per hidden layer (a single value applies to every layer).
    synapses: tuple[int, ...] | None = None
    #: Make the output layer a failure site too.
    include_output_layer: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method.coerce(self.method))

    def check(self) -> None:
        """Refuse nonsense values before any work is done."""
        if not (self.epsilon > 0 and np.isfinite(self.epsilon)):
            raise OptionError(f"--epsilon must be a positive finite number, got {self.epsilon}")
        Method.parse(self.method, "--method")
        check_input_range(self.network.input_range)
        check_range_method(self.network.ranges)
        bound = self.failure.activation_bound
        if bound is not None and not (bound > 0 and np.isfinite(bound)):
            raise OptionError(f"--activation-bound must be a positive finite number, got {bound}")


def check_input_range(input_range: tuple[float, float]) -> None:
    """LO ≤ HI, both finite."""
    lo, hi = input_range
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise OptionError(f"--input-range must be finite LO,HI with LO ≤ HI, got {lo},{hi}")


def check_domain(options: NetworkOptions) -> None:
    """Every given [LO, HI] (plain and per input) finite with LO ≤ HI."""
    check_input_range(options.input_range)
    for name, lo, hi in options.named_ranges:
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise OptionError(f"--input-range {name}=LO,HI must be finite with LO ≤ HI, got {name}={lo:g},{hi:g}")


def model_info(loaded: LoadedModel) -> ModelInfo:
    """The ``model`` block of every report."""
    return ModelInfo(str(loaded.path), loaded.sha256, loaded.producer, loaded.opset)


def load_network(
    path: str | Path, options: NetworkOptions, include_output_layer: bool = False
) -> tuple[LoadedModel, Network]:
    """Load a model file and build its layer graph."""
    check_domain(options)
    loaded = load_model(path)
    return loaded, network_of(loaded, options, include_output_layer)


def network_of(loaded: LoadedModel, options: NetworkOptions, include_output_layer: bool = False) -> Network:
    """The layer graph of a loaded model."""
    check_domain(options)
    graph = build_graph(loaded.skeleton, loaded.initializer_bytes)
    network = build_network(graph, options, loaded.opset, include_output_layer)
    network.source_name = loaded.path.name
    tighten_network(network, options.ranges)
    return network


def expand_counts(counts: Sequence[int] | None, layers: int, what: str) -> list[int] | None:
    """A single count applies to every hidden layer; a list must have one per layer."""
    if counts is None:
        return None
    counts = list(counts)
    if any(c < 0 for c in counts):
        raise OptionError(f"{what} counts must be ≥ 0, got {','.join(map(str, counts))}")
    if len(counts) == 1:
        return counts * layers
    if len(counts) != layers:
        raise OptionError(
            f"{layers} hidden layers, {len(counts)} counts given ({what}): give one count for every layer "
            "or one per hidden layer"
        )
    return counts


def check_counts_fit(counts: Sequence[int], layers: Sequence[Layer], what: str, per: str = "neurons") -> None:
    """Refuse more failures than a layer has neurons (or synapses)."""
    for count, layer in zip(counts, layers, strict=True):
        limit = layer.neurons if per == "neurons" else layer.fan_in * layer.neurons
        if count > limit:
            raise OptionError(f"{what} asks for {count} failures in layer '{layer.name}', which has only {limit} {per}")


def settings_for(options: BoundOptions, network: Network, capacity: float | None = None) -> Settings:
    """The ``settings`` block for a bound-like report."""
    return Settings(
        mode=options.failure.mode,
        epsilon=options.epsilon,
        method=options.method,
        input_range=network.input_range,
        capacity=capacity,
        failure_range=options.failure.failure_range,
        activation_bound=options.failure.activation_bound,
        output=network.output_name,
        input_shape=network.input_shape,
        inputs=input_settings(network),
        bit=options.failure.bit,
        stuck=options.failure.stuck,
        ranges=network.ranges,
        float16=network.float16,
    )


def certify_settings(network: Network, failure: FailureModel, epsilon: float, capacity: float | None) -> Settings:
    """The ``settings`` block of a ``certify`` report: :func:`settings_for` with the method ``local`` (every input
    of a multi-input model, the range method the network was built with)."""
    options = BoundOptions(epsilon=epsilon, failure=failure)
    return replace(settings_for(options, network, capacity), method="local")


def input_settings(network: Network) -> tuple[dict, ...]:
    """Every input's kind, shape, range and where it came from; empty for one input with a plain range."""
    if not network.packed and network.inputs[0].source == "--input-range":
        return ()
    return tuple(spec.describe() for spec in network.inputs)


def _sources(network: Network, value: str) -> str:
    """The layer or op that produced ``value`` (for readable graph structure).

    Walks back through single-input ops in a loop (a chain of thousands of shape ops
    must not hit Python's recursion limit).
    """
    producers: dict[str, Layer | Node] = {}
    for step in network.steps:
        for out in [step.output_value] if isinstance(step, Layer) else step.outputs:
            producers.setdefault(out, step)
    while value not in network.input_boxes:
        found = producers.get(value)
        if found is None:
            return value
        step = found
        if isinstance(step, Layer):
            return step.name
        producer_inputs = [v for v in step.inputs if v in network.clean]
        if step.op_type in ("Add", "Sub", "Mul", "Concat") and len(producer_inputs) > 1:
            return f"{step.op_type}({step.name})"
        if not producer_inputs:
            return value
        value = producer_inputs[0]
    return "input"


def _restricted_to(network: Network, layer: Layer) -> tuple[float, float] | None:
    """The [lo, hi] the Clip after ``layer`` keeps its output in (the widest over a per-channel range), or None."""
    guard = network.protections.get(layer.output_value)
    if guard is None:
        return None
    return float(np.min(guard.low)), float(np.max(guard.high))


def _shown(node: Node) -> str:
    """How inspect names an op of the audited path: as the model holds it (a fused node by its ONNX ops)."""
    rule = lookup(node)
    return node.op_type if rule is None else rule.shown(node)


def inspect_model(path: str | Path, options: NetworkOptions = NetworkOptions(), epsilon: float = 0.1) -> InspectResult:
    """Layers, their sizes, weights, activations and ranges, and the graph's merges.

    Hidden layers also carry δ and ``max_failures`` for crash failures at ``epsilon``
    (tight method), the per-layer keys every report has (README "Reports").
    """
    loaded, network = load_network(path, options)
    crash = {}
    if network.hidden_layers:
        result = bound_network(network, BoundOptions(epsilon=epsilon, network=options), lambda: model_info(loaded))
        crash = {la.name: (la.delta, la.max_failures) for la in result.layers}
    layers = tuple(
        LayerInfo(
            name=la.name,
            index=la.index,
            kind=la.kind,
            neurons=la.neurons,
            fan_in=la.fan_in,
            fanout=la.synapse_fanout,
            max_weight=la.synapse_max_abs_weight,
            activation=la.activation,
            lipschitz=la.lipschitz,
            output_range=_site_range(network, la),
            nodes=tuple(la.nodes),
            inputs_from=(_sources(network, la.input_value),),
            is_output=la.is_output,
            delta=crash.get(la.name, (None, None))[0],
            max_failures=crash.get(la.name, (None, None))[1],
            part=la.part,
            summands=tuple(part.name for part in la.summands),
            restricted_to=_restricted_to(network, la),
        )
        for la in network.layers
        if not la.internal  # a recurrent cell's gates and later time steps (docs/method.md §14.1)
    )
    branches = tuple(
        BranchInfo(s.name, s.op_type, tuple(_sources(network, v) for v in s.inputs if v in network.clean))
        for s in network.steps
        if isinstance(s, Node) and sum(1 for v in s.inputs if v in network.clean) > 1 and CELL_KEY not in s.metadata
    ) + tuple(  # a recurrent cell merges its input with its own previous step (docs/method.md §14.1)
        BranchInfo(la.name, la.kind.upper(), ("input", f"{la.name} at the previous step"))
        for la in network.hidden_layers
        if la.tied
    )
    others = tuple(sorted({_shown(s) for s in network.steps if isinstance(s, Node)}))
    settings = Settings(
        "crash", epsilon, "tight", network.input_range, output=network.output_name, input_shape=network.input_shape,
        float16=network.float16, inputs=input_settings(network),
    )
    return InspectResult(
        model_info(loaded), settings, layers, branches, network.is_chain(), others, network.output_range
    )


def _site_range(network: Network, layer: Layer) -> tuple[float, float]:
    """A layer's output range, joined over every time step of a recurrent layer (docs/method.md §14.2)."""
    ranges = [_value_range(network, value) for value in site_values(layer)]
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _value_range(network: Network, value: str) -> tuple[float, float]:
    box = network.clean[value]
    return float(box.lo.min()), float(box.hi.max())


def compute_bound(path: str | Path, options: BoundOptions, capacity: float | None = None) -> BoundResult:
    """``robaudit bound``: per-layer, uniform and total tolerated failures, and Fep(f)."""
    options.check()
    loaded, network = load_network(path, options.network, options.include_output_layer)
    return bound_network(network, options, lambda: model_info(loaded), capacity)


def bound_network(
    network: Network,
    options: BoundOptions,
    model: ModelInfo | Callable[[], ModelInfo],
    capacity: float | None = None,
    build: Callable[[Analysis], tuple[PaperMethod, CombinedBound]] = make_bounds,
) -> BoundResult:
    """The bound of an already built network (used by ``check`` and the applications).

    ``model`` may be a function giving the report's ``model`` block; it is called once
    the bounds are computed, so that the file's SHA-256 (:attr:`LoadedModel.sha256`,
    hashed on another thread) is waited for only then. ``build`` makes both methods' bounds
    of the analysis (``inject`` keeps them for its own vector's bound).
    """
    options.check()
    hidden = network.require_hidden_layers()
    synapses = expand_counts(options.synapses, len(hidden), "--synapse") or [0] * len(hidden)
    check_counts_fit(synapses, hidden, "--synapse", per="synapses")
    analysis = Analysis(network, options.failure, synapses)
    paper, tight = build(analysis)
    methods: dict[str, Bound] = {Method.PAPER: paper, Method.TIGHT: tight}
    selected = methods[options.method]
    eps = options.epsilon
    per_layer = {name: [m.max_single(i, la.neurons, eps) for i, la in enumerate(hidden)] for name, m in methods.items()}
    uniform = {name: m.max_uniform(eps) for name, m in methods.items()}
    totals = {name: m.max_total(eps) for name, m in methods.items()}
    failures = expand_counts(options.failures, len(hidden), options.failure.count_flag)
    if failures is None and any(synapses):  # failed synapses alone are a vector too: its Fep is reported
        failures = [0] * len(hidden)
    fep = fep_paper = fep_tight = None
    if failures is not None:
        check_counts_fit(failures, hidden, "the failure vector")
        fep_paper = paper.fep(failures)
        fep_tight = tight.fep_vector(failures)
        fep = fep_tight if selected is tight else selected.fep_vector(failures)
        fep_paper, fep_tight, fep = (finite_or_none(v) for v in (fep_paper, fep_tight, fep))
    layers = tuple(
        LayerBound(
            name=la.name,
            index=la.index,
            kind=la.kind,
            neurons=la.neurons,
            max_weight=la.synapse_max_abs_weight,
            lipschitz=la.lipschitz,
            delta=finite_or_none(analysis.deltas[i]),
            max_failures=per_layer[options.method][i],
            max_failures_paper=per_layer["paper"][i],
            max_failures_tight=per_layer["tight"][i],
            fanout=la.synapse_fanout,
            fan_in=la.fan_in,
            synapse_delta=analysis.synapse_ds[i],
            failures=None if failures is None else failures[i],
            synapses=synapses[i],
        )
        for i, la in enumerate(hidden)
    )
    total_selected = totals[selected.method][0]
    cap = network.output_width
    capped = not analysis.unbounded() and (within(cap, eps) or (fep is not None and fep >= cap))
    notes = [] if network.output_range is None or analysis.unbounded() else [_cap_note(network.output_range, capped)]
    if analysis.unbounded():
        notes.append(unbounded_note(analysis.unbounded()))
    reach = None if capped or network.output_range is not None else _reach_note(analysis, fep)
    if reach is not None:
        notes.append(reach)
    notes += _float32_normalization_notes(network)
    fallback = getattr(network.range_report, "fallback", None)
    if fallback is not None:
        notes.append(f"ranges by IBP: CROWN does not model {fallback} (sound, looser)")
    if not totals[selected.method][1]:
        notes.append(f"total budget search stopped at {totals['paper'][0]}; the true budget may be larger")
    if failures is not None and fep is not None and within(fep, eps):
        singles = [la.max_failures for la in layers]
        if not counts_cover(failures, uniform[options.method], total_selected, singles):
            notes.append(_refined_note(failures, fep, eps))
    info = model() if callable(model) else model
    hints: tuple[str, ...] = ()
    if any(synapses) and all(la.max_failures < 0 for la in layers):
        hints = (synapse_hint(float(selected.fep([0] * len(hidden))), synapses, eps),)
    elif uniform[options.method] <= 0 and total_selected <= 0 and all(la.max_failures <= 0 for la in layers):
        hints = zero_hints(selected, layers, eps, info.path)
    return BoundResult(
        model=info,
        hints=hints,
        settings=settings_for(options, network, capacity),
        layers=layers,
        uniform=uniform[options.method],
        uniform_paper=uniform["paper"],
        uniform_tight=uniform["tight"],
        total=total_selected,
        total_paper=totals["paper"][0],
        total_tight=totals["tight"][0],
        total_exact=totals[selected.method][1],
        failures=None if failures is None else tuple(failures),
        fep=fep,
        fep_paper=fep_paper,
        fep_tight=fep_tight,
        notes=tuple(notes),
        output_range=network.output_range,
        capped=capped,
    )


def counts_cover(failures: Sequence[int], uniform: int, total: int, singles: Sequence[int]) -> bool:
    """Whether the tolerated counts show ``failures`` tolerated: every f_l within ``uniform``, their sum within
    ``total``, or one layer failing alone within its ``singles`` count (docs/method.md §6)."""
    counts = [int(f) for f in failures]
    alone = [i for i, f in enumerate(counts) if f > 0]
    if len(alone) <= 1 and all(counts[i] <= singles[i] for i in alone):
        return True
    return all(f <= uniform for f in counts) or sum(counts) <= total


#: Above this estimate of onnxruntime's float32 deviation of a normalization's output (:meth:`float32_mean_error`),
#: ``bound`` says that its exact-arithmetic rules may not cover what onnxruntime computes.
FLOAT32_NORMALIZATION_NOTE = 1e-2


def _float32_normalization_notes(network: Network) -> list[str]:
    """A note per LayerNorm/RMSNorm whose input's mean may be so large against its spread that onnxruntime's float32
    kernel (the mean rounded to float32) strays from the exact output the bounds assume (docs/method.md §13.1)."""
    notes = []
    for node in network.nodes:
        rule = lookup(node)
        box = network.clean.get(node.inputs[0]) if node.inputs else None
        if not isinstance(rule, Normalization) or box is None:
            continue
        error = rule.float32_mean_error(node, box)
        if error > FLOAT32_NORMALIZATION_NOTE:
            notes.append(
                f"normalization {node.describe()}: its input may reach a mean of {error / 2.0**-24:.3g} times its "
                f"smallest spread, where onnxruntime's float32 kernel may move an output element by about {error:.2g} "
                "from the exact value these bounds assume (docs/method.md §13.1): the bound may not cover it there"
            )
    return notes


def _refined_note(failures: Sequence[int], fep: float, epsilon: float) -> str:
    """Why the vector's own bound is within ε while the tolerated counts do not show it: the counts are searched
    with bounds that never decrease as a count grows (docs/method.md §6), the vector's bound is refined for it alone
    (§4.1, §5.5, §5.8)."""
    return (
        f"the bound of exactly {list(failures)} ({fep:.4g}) is within ε = {epsilon:g}, but the tolerated counts "
        "above do not show it: they are searched with bounds that never decrease as a count grows, which this "
        "vector's refinements do not enter; both are sound (robaudit check's uniform requirement refines every "
        "vector up to the count asked, one by one)"
    )


def _cap_note(output_range: tuple[float, float], capped: bool) -> str:
    """The table's line about the output-range cap (docs/method.md §3.4)."""
    lo, hi = output_range
    where = "and the cap is what binds here" if capped else "(not binding here)"
    return f"the output lies in [{lo:g}, {hi:g}]: every bound is capped at {hi - lo:g} {where}"


def _reach_note(analysis: Analysis, fep: float | None) -> str | None:
    """The note when the vector's bound is the output's whole reach: the widest hull, over its elements, of the
    clean box and the box with every hidden neuron failing (the output cut of docs/method.md §4.1 gives it for
    any counts), or the farthest that box lies from the clean one (the boxes' own cut, §4.1). Such a bound does not
    grow with the counts (a new user read the same 12.85 for 1 and 50 failures per layer without being told why).
    Only where those boxes were computed for the bound already."""
    net = analysis.network
    faulty = analysis.faulty_if_computed()
    if fep is None or faulty is None or analysis.unbounded() or net.output_name not in faulty:
        return None
    clean, hull = net.clean[net.output_name], faulty[net.output_name]
    width = float(np.max(np.maximum(clean.hi, hull.hi) - np.minimum(clean.lo, hull.lo)))
    farthest = float(np.max(np.maximum(hull.hi - clean.lo, clean.hi - hull.lo)))  # the boxes' own cut (§4.1)
    for said, reach in ((f"width {width:.4g}", width), (f"{farthest:.4g} from the clean output", farthest)):
        if np.isfinite(reach) and abs(fep - reach) <= 1e-3 * reach:
            return (f"this bound is (within 0.1 % of) the output's whole reach under failures ({said}, every "
                    "neuron failing): it does not grow with the counts, and at ε ≥ it every count is tolerated; "
                    "inject measures what failures really do")
    return None


def finite_or_none(value: float | None) -> float | None:
    """A bound, or None when it is unbounded (a float bit flip: docs/method.md §2.3)."""
    return None if value is None or value >= UNBOUNDED_REPORTED else value


def synapse_hint(synapses_alone: float, synapses: Sequence[int], epsilon: float) -> str:
    """The hint when the failed synapses alone exceed ε, so that no count of failed neurons is tolerated (−1,
    "none" in the table)."""
    return (
        f"the failed synapses alone ({list(synapses)} per layer) give a bound of {synapses_alone:.4g} > ε = "
        f"{epsilon:g}: no count of failed neurons is tolerated beside them (\"none\"); fewer --synapse or a larger ε"
    )


def zero_hints(method: Bound, layers: Sequence[LayerBound], epsilon: float, path: str) -> tuple[str, ...]:
    """Advice when nothing is tolerated: which layer's δ or gain dominates, what ε would tolerate
    one failure per layer, and what may help (docs/method.md §6).

    ``method`` has ``fep(failures)``; the gain of layer l is its one-failure bound divided by δ_l.
    """
    count = len(layers)
    if any(la.delta is None for la in layers):  # unbounded (float bit flips): the note gives the remedy
        return ()
    singles = [float(method.fep([1 if j == i else 0 for j in range(count)])) for i in range(count)]
    if not all(np.isfinite(singles)):
        return ()
    worst = int(np.argmax(singles))
    layer = layers[worst]
    deltas = np.array([la.delta for la in layers], dtype=float)
    gains = np.array([s / d if d > 0 else 0.0 for s, d in zip(singles, deltas, strict=True)])
    assert layer.delta is not None  # unbounded layers returned above
    delta_ratio = layer.delta / max(middle_value(deltas), 1e-300)
    gain_ratio = gains[worst] / max(middle_value(gains), 1e-300)
    if count == 1:  # no other layer to set it beside
        what = "the only failure site"
    elif delta_ratio >= gain_ratio:
        what = f"its δ (the largest deviation one neuron may cause) is {delta_ratio:.3g}× the median layer's"
    else:
        what = f"its gain to the output is {gain_ratio:.3g}× the median layer's"
    every = float(method.fep([1] * count))
    helps = (
        "what may help: a bound on your own data (robaudit certify "
        f"{path} --inputs FILE), a realistic --input-range LO,HI, a Clip after each layer at its range on "
        f"your data (robaudit harden {path} --inputs FILE -o OUT.onnx); robaudit inject shows what failures really do"
    )
    if any(la.kind in ("gru", "lstm") for la in layers):  # certify and harden refuse recurrent layers (§14.4)
        helps = "what may help: a realistic --input-range LO,HI; robaudit inject shows what failures really do"
    return (
        f"every count is 0 at ε = {epsilon:g}: one failure in {layer_label(layer.index, layer.name)} alone gives a "
        f"bound of {singles[worst]:.4g} (δ {layer.delta:.4g} × gain {gains[worst]:.4g}); {what}",
        _threshold_hint(max(singles), every, getattr(method, "cap", math.inf)),
        helps,
    )


def _threshold_hint(single: float, every: float, cap: float) -> str:
    """What ε would tolerate one failure per layer; where a bound is the output's whole width ``cap`` (a bounded
    output, docs/method.md §3.4), that ε tolerates anything and the line says so instead (a new-user trial read
    'ε ≥ 1 would let each layer tolerate one failure' on probabilities as advice)."""
    if single >= cap * (1 - 1e-12):
        return (f"one failure alone may already move the output across its whole width ({cap:.4g}) by these bounds; "
                f"an ε of that width tolerates any failure, as the output cannot move more")
    whole = " (the output's whole width)" if every >= cap * (1 - 1e-12) else ""
    return (f"ε ≥ {_at_least(single)} would let each layer tolerate one failure alone; "
            f"ε ≥ {_at_least(every)} one failure in every layer at once{whole}")


def middle_value(values: np.ndarray) -> float:
    """The median of the 1-D ``values``, the number ``np.median`` gives (the middle value, or the mean
    (a + b) / 2 of the two middle ones; NaN if any value is NaN or there is none), without importing
    numpy's masked arrays, which ``np.median`` does on its first call (about 40 ms of a ``bound`` process)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))  # NaN sorts last
    count = ordered.size
    if count == 0 or np.isnan(ordered[-1]):
        return math.nan
    if count % 2:
        return float(ordered[count // 2])
    with np.errstate(invalid="ignore"):  # −∞ + ∞: NaN, as np.median gives
        return float((ordered[count // 2 - 1] + ordered[count // 2]) / 2.0)


def _at_least(value: float) -> str:
    """``value`` in 4 significant digits, rounded up: an ε threshold printed as 398.6 when it is 398.646
    would not do what the hint says."""
    text = f"{value:.4g}"
    if not math.isfinite(value) or value <= 0 or float(text) >= value:
        return text
    step = 10.0 ** (math.floor(math.log10(value)) - 3)
    return f"{math.ceil(value / step) * step:.4g}"
