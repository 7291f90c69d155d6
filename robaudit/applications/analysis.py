"""The three analyses on a :class:`~robaudit.graph.network.Network`: gains, bits, waits, weight caps."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from robaudit.applications.formulas import (
    BF16,
    FP16,
    INT4,
    INT8,
    MAX_BITS,
    Gains,
    bits_needed,
    fewest_bits_together,
    fewest_uniform_bits,
    float_growth,
    float_sigma,
    largest_scale,
    max_ignored,
    rounding_error,
    source_layer_error,
    weight_rounding_sigma,
)
from robaudit.applications.results import (
    DesignCheck,
    DesignLayer,
    DesignResult,
    FormatVerdict,
    OutputLayerDesign,
    PrecisionLayer,
    PrecisionResult,
    WaitLayer,
    WaitResult,
)
from robaudit.bounds.audit import (
    BoundOptions,
    compute_bound,
    expand_counts,
    finite_or_none,
    load_network,
    model_info,
    settings_for,
)
from robaudit.bounds.bound import Bound, make_bound
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound, unbounded_note
from robaudit.bounds.ranges import tighten_network
from robaudit.bounds.results import ModelInfo, Settings
from robaudit.bounds.slack import epsilon_limit, within
from robaudit.bounds.tight import sensitivity_gains
from robaudit.errors import OptionError, RoundingOverflowError, UnsupportedModelError
from robaudit.graph.forms import analysed_model
from robaudit.graph.inputs import split_feed
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network, build_network
from robaudit.graph.onnx_graph import build_graph
from robaudit.graph.scaling import Ranges, scaled_network


def select_method(analysis: Analysis, method: str) -> Bound:
    """The bound of ``method``; ``tight`` needs its sensitivities (an error when they do not fit)."""
    return make_bound(analysis, method, strict=True)


def layer_columns(network: Network, analysis: Analysis, method: Bound, epsilon: float) -> list[dict]:
    """The common per-layer columns (``AppLayer`` fields) of every hidden layer."""
    return [
        dict(
            name=la.name,
            index=la.index,
            kind=la.kind,
            neurons=la.neurons,
            max_weight=la.synapse_max_abs_weight,
            lipschitz=la.lipschitz,
            delta=finite_or_none(analysis.deltas[i]),
            max_failures=method.max_single(i, la.neurons, epsilon),
        )
        for i, la in enumerate(network.hidden_layers)
    ]


def refuse_rounding(network: Network, command: str) -> None:
    """The gains of ``precision``/``wait`` are linear in σ; rounding inside the model (docs/method.md §1.2)
    adds a constant they do not carry: refuse such models rather than under-count."""
    if network.rounding or network.tail_rounding:
        what = "computes in float16 (every op's result rounded)" if network.float16 else (
            "rounds inside (QuantizeLinear→DequantizeLinear pairs or casts to float16 and back)")
        raise UnsupportedModelError(
            f"{command}: the model {what}; its linear gains do not include that rounding yet (bound, inject and "
            "check do)"
        )


def refuse_recurrent(network: Network, command: str) -> None:
    """The applications perturb or rescale each layer's own weights and stored values; an unrolled
    GRU/LSTM shares them over its time steps (docs/method.md §14.4): refused, naming the layers."""
    names = sorted({la.name for la in network.hidden_layers if la.tied or la.kind in ("gru", "lstm")})
    if names or any(la.internal for la in network.layers):
        listed = ", ".join(f"'{name}'" for name in names) or "a recurrent cell"
        raise UnsupportedModelError(f"{command} does not handle recurrent layers yet ({listed}); bound and inject do")


def paper_gains(paper: PaperBound, with_output: bool = False) -> np.ndarray:
    """g_l per hidden layer (and the output layer): Fep for σ = 1 at that site alone (docs/method.md §9.1)."""
    hidden = paper.analysis.hidden
    gains = []
    for site in range(len(hidden)):

        def layer_error(i, la, e_in, site=site):
            sigma = 1.0 if i == site else 0.0
            return source_layer_error(e_in, sigma, la.neurons, la.fanout, la.lipschitz, la.max_abs_weight)

        gains.append(float(paper.propagate(layer_error)))
    if with_output and paper.network.output_layer is not None:
        gains.append(float(paper.network.tail_factor))
    return np.array(gains, dtype=np.float64)


def tight_gains(analysis: Analysis) -> np.ndarray:
    """[outputs, L]: S_l[k] = Σ_i P[k, i], the output deviation per unit σ in every neuron of l.

    With the global constants K: rounding and ignored signals are not failures, so the
    faulty intervals the per-neuron slopes rely on need not hold them (docs/method.md §4.3).
    """
    return sensitivity_gains(analysis)


def network_gains(analysis: Analysis, method: str, with_output: bool = False) -> Gains:
    """The gains of ``method``; the tight part only for ``tight`` and without output sources."""
    paper = paper_gains(PaperBound(analysis), with_output)
    if method == "paper" or with_output:
        return Gains(paper)
    return Gains(paper, tight_gains(analysis))


def _value_bound(analysis: Analysis, value: str) -> float:
    """Y = max(|lo|, |hi|) of a value (paper range)."""
    lo, hi = analysis.paper_range(value)
    return max(abs(lo), abs(hi))


def _notes_for(network: Network) -> list[str]:
    """Caveats that hold for every application on this network."""
    notes = []
    for step in network.steps:
        if isinstance(step, Layer):
            continue
        variable = [v for v in step.inputs if v in network.clean]
        if step.op_type == "Mul" and len(variable) > 1:
            notes.append(
                f"node '{step.name}' multiplies two computed tensors; its error rule uses the crash analysis' "
                "intervals, which small perturbations may slightly exceed: treat the bound as approximate"
            )
    return notes


def _check_finite_ranges(names: Sequence[str], ranges: Sequence[tuple[float, float]]) -> None:
    for name, (lo, hi) in zip(names, ranges, strict=True):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UnsupportedModelError(
                f"layer '{name}' has an unbounded value range [{lo}, {hi}]; give --activation-bound Y"
            )


def _settings(options: BoundOptions, network: Network, mode: str, method: str) -> Settings:
    return replace(settings_for(options, network), mode=mode, method=method)


# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class _Sites:
    """What ``precision`` needs per site: names, ranges, σ per unit rounding error, stored values."""

    names: list[str]
    ranges: list[tuple[float, float]]
    #: σ_l = scale_l·q_l: 1 for outputs, K_l·fan-in_l·Y_{l−1} for weights.
    scales: np.ndarray
    values: list[int]
    #: Largest |value| per site (for float formats).
    magnitudes: list[float]
    layers: list[Layer]

    @property
    def widths(self) -> np.ndarray:
        """R_l = hi − lo."""
        return np.array([hi - lo for lo, hi in self.ranges], dtype=np.float64)


def _output_sites(network: Network, analysis: Analysis) -> _Sites:
    hidden = network.hidden_layers
    ranges = [analysis.paper_range(la.output_value) for la in hidden]
    return _Sites(
        [la.name for la in hidden],
        ranges,
        np.ones(len(hidden)),
        [la.neurons for la in hidden],
        [max(abs(lo), abs(hi)) for lo, hi in ranges],
        hidden,
    )


def _weight_sites(network: Network, analysis: Analysis) -> _Sites:
    """One site per layer whose weights are rounded: a sum layer's are its two summands' (docs/method.md §1.4),
    rounded over the hull of both ranges (q at least each one's), σ the sum of both terms."""
    layers = network.hidden_layers + ([network.output_layer] if network.output_layer is not None else [])
    stored = [la.summands or (la,) for la in layers]
    ranges = [(min(float(p.weight.min()) for p in ps), max(float(p.weight.max()) for p in ps)) for ps in stored]
    scales = [
        sum(weight_rounding_sigma(la.lipschitz, p.fan_in, 1.0, _value_bound(analysis, p.input_value)) for p in ps)
        for la, ps in zip(layers, stored, strict=True)
    ]
    return _Sites(
        [la.name for la in layers],
        ranges,
        np.array(scales, dtype=np.float64),
        [sum(int(p.weight.size) for p in ps) for ps in stored],
        [la.synapse_max_abs_weight for la in layers],
        layers,
    )


def _format_verdicts(gains: Gains, sites: _Sites, epsilon: float, weights: bool) -> list[FormatVerdict]:
    """fp16, bf16 (relative rounding), int8 (and int4 for weights) over each site's range."""
    verdicts = []
    depth = len(sites.names)
    for fmt in (FP16, BF16):
        sigmas = [s * float_sigma(fmt, m) for s, m in zip(sites.scales, sites.magnitudes, strict=True)]
        bound = gains.fep(sigmas) * float_growth(fmt, depth)
        over = [n for n, m in zip(sites.names, sites.magnitudes, strict=True) if m > fmt.max_value]
        reason = f"values above {fmt.max_value:g} overflow in {', '.join(over)}" if over else ""
        verdicts.append(
            FormatVerdict(
                fmt.name,
                "float",
                f"relative 2^-{fmt.bits} of |value|",
                bound,
                within(bound, epsilon) and not over,
                reason,
            )
        )
    for fmt in (INT8, INT4) if weights else (INT8,):
        bound = gains.fep(sites.scales * [rounding_error(r, fmt.bits) for r in sites.widths])
        verdicts.append(
            FormatVerdict(fmt.name, "fixed", f"{fmt.bits} bits over each layer's range", bound, within(bound, epsilon))
        )
    return verdicts


def precision_analysis(
    network: Network, options: BoundOptions, model: ModelInfo, weights: bool = False
) -> PrecisionResult:
    """``robaudit precision``: fewest bits per layer and uniform for outputs or weights (docs/method.md §9.1).

    Outputs: σ_l = q_l = R_l/(2·(2^b−1)) over the layer's output range; weights:
    σ_l = K_l·fan-in_l·Δw_l·Y_{l−1} with Δw_l the rounding error over [min W, max W]
    (the output layer's weights included; paper method, since rounded weights may
    exceed |W| element-wise, which the tight sensitivities assume).
    """
    options.check()
    refuse_rounding(network, "precision")
    refuse_recurrent(network, "precision")
    eps = options.epsilon
    analysis = Analysis(network, FailureModel.crash(options.failure.activation_bound))
    method_name = "paper" if weights else options.method
    method = select_method(analysis, method_name)
    sites = _weight_sites(network, analysis) if weights else _output_sites(network, analysis)
    _check_finite_ranges(sites.names, sites.ranges)
    gains = network_gains(analysis, method_name, with_output=weights)
    widths = sites.widths

    def fep_of_bits(bits: Sequence[int]) -> float:
        return gains.fep(sites.scales * [rounding_error(r, b) for r, b in zip(widths, bits, strict=True)])

    unit = [gains.alone(i) * sites.scales[i] for i in range(len(sites.names))]
    alone = [bits_needed(g, r, eps) for g, r in zip(unit, widths, strict=True)]
    uniform = fewest_uniform_bits(fep_of_bits, len(alone), max(alone, default=1), eps)
    together = fewest_bits_together(fep_of_bits, alone, sites.values, eps)
    columns = layer_columns(network, analysis, method, eps)
    rows = []
    for i, la in enumerate(sites.layers):
        common = columns[i] if not la.is_output else _output_columns(la)
        rows.append(
            PrecisionLayer(
                **common,
                range=sites.ranges[i],
                values=sites.values[i],
                gain=unit[i],
                bits=alone[i],
                bits_together=None if together is None else together[i],
                bound_at_bits=unit[i] * rounding_error(widths[i], alone[i]),
                is_output=la.is_output,
            )
        )
    notes = _notes_for(network)
    if weights and options.method == "tight":
        notes.append("--weights uses the paper method: rounded weights may exceed |W| element-wise")
    notes.append(
        "only the stored values are rounded here; arithmetic inside the layers (accumulation) is exact"
        if not weights
        else "biases are kept at full precision"
    )
    return PrecisionResult(
        model=model,
        settings=_settings(options, network, "rounding", method_name),
        quantize="weights" if weights else "outputs",
        layers=tuple(rows),
        uniform_bits=uniform,
        fep_uniform=None if uniform is None else fep_of_bits([uniform] * len(alone)),
        uniform_curve=tuple((b, fep_of_bits([b] * len(alone))) for b in range(1, _curve_top(alone, uniform) + 1)),
        fep_together=None if together is None else fep_of_bits(together),
        memory_uniform=None if uniform is None else uniform * sum(sites.values),
        memory_together=None if together is None else sum(v * b for v, b in zip(sites.values, together, strict=True)),
        formats=tuple(_format_verdicts(gains, sites, eps, weights)),
        notes=tuple(notes),
    )


def _curve_top(alone: Sequence[int], uniform: int | None) -> int:
    """Largest bit count drawn in plots: a few beyond what is needed."""
    return min(MAX_BITS, max([*alone, uniform or MAX_BITS - 4]) + 4)


def _output_columns(layer: Layer) -> dict:
    """``AppLayer`` columns of the output layer (not a failure site: δ 0, no failure count)."""
    return dict(
        name=layer.name,
        index=0,
        kind=layer.kind,
        neurons=layer.neurons,
        max_weight=layer.synapse_max_abs_weight,
        lipschitz=layer.lipschitz,
        delta=0.0,
        max_failures=-1,
    )


# --------------------------------------------------------------------------- wait


def wait_analysis(network: Network, options: BoundOptions, model: ModelInfo) -> WaitResult:
    """``robaudit wait``: per layer the fewest incoming signals a neuron must wait for (docs/method.md §9.1).

    Ignoring r_l signals = r_l crashed synapses into every neuron: σ_l = K_l·r_l·d_l;
    r_l is the largest count with Fep ≤ ε for that layer alone, wait_for = fan-in − r_l.
    Together, every layer gets ε/L (then the largest contributor gives back signals
    until the joint bound is ≤ ε).
    """
    options.check()
    refuse_rounding(network, "wait")
    refuse_recurrent(network, "wait")
    eps = options.epsilon
    analysis = Analysis(network, FailureModel.crash(options.failure.activation_bound))
    method = select_method(analysis, options.method)
    gains = network_gains(analysis, options.method)
    hidden = network.hidden_layers
    per_signal = [la.lipschitz * d for la, d in zip(hidden, analysis.synapse_ds, strict=True)]
    costs = [gains.alone(i) * per_signal[i] for i in range(len(hidden))]
    alone = [max_ignored(c, la.fan_in, eps) for c, la in zip(costs, hidden, strict=True)]
    together = [max_ignored(c, la.fan_in, eps / len(hidden)) for c, la in zip(costs, hidden, strict=True)]
    together, fep_together = _repair_together(gains, per_signal, costs, together, eps)
    columns = layer_columns(network, analysis, method, eps)
    rows = tuple(
        WaitLayer(
            **columns[i],
            fan_in=la.fan_in,
            synapse_delta=analysis.synapse_ds[i],
            cost_per_signal=costs[i],
            ignore=alone[i],
            wait_for=la.fan_in - alone[i],
            wait_for_together=la.fan_in - together[i],
        )
        for i, la in enumerate(hidden)
    )
    notes = _notes_for(network)
    if any(la.kind != "dense" for la in hidden):
        notes.append("conv neurons: fan-in counts every kernel tap, padding included")
    return WaitResult(
        model=model,
        settings=_settings(options, network, "crash", options.method),
        layers=rows,
        fep_together=fep_together,
        notes=tuple(notes),
    )


def _repair_together(
    gains: Gains, per_signal: Sequence[float], costs: Sequence[float], ignored: list[int], epsilon: float
) -> tuple[list[int], float]:
    """Lower the largest contribution r_l·cost_l until the joint bound is ≤ ε."""
    ignored = list(ignored)

    def joint() -> float:
        return gains.fep([r * s for r, s in zip(ignored, per_signal, strict=True)])

    value = joint()
    while value > epsilon_limit(epsilon) and any(ignored):
        worst = max(range(len(ignored)), key=lambda i: ignored[i] * costs[i])
        ignored[worst] -= 1
        value = joint()
    return ignored, value


# --------------------------------------------------------------------------- design


def tolerance_vector(counts: Sequence[int], hidden: Sequence[Layer]) -> list[int]:
    """f per hidden layer: one count applies to every layer (capped at N_l); a list must fit."""
    expanded = expand_counts(counts, len(hidden), "--tolerate") or []
    if len(counts) == 1:
        return [min(c, la.neurons) for c, la in zip(expanded, hidden, strict=True)]
    for count, la in zip(expanded, hidden, strict=True):
        if count > la.neurons:
            raise OptionError(f"--tolerate asks for {count} failures in layer '{la.name}', which has {la.neurons}")
    return expanded


def design_fep(network: Network, options: BoundOptions, tolerate: Sequence[int]) -> float:
    """The bound of any failures up to ``tolerate`` (fep_upto of the selected method)."""
    analysis = Analysis(network, options.failure)
    return select_method(analysis, options.method).fep_upto(tolerate)


def largest_layer_weights(network: Network, options: BoundOptions, tolerate: Sequence[int]) -> list[float | None]:
    """Per layer (hidden, then output), the largest weight factor α with the other weights and every
    range fixed (:attr:`~robaudit.graph.scaling.Ranges.KEPT`; ``check``'s remedy recomputes them)."""
    layers = network.hidden_layers + ([network.output_layer] if network.output_layer is not None else [])
    factors = []
    for la in layers:

        def fep_at(alpha: float, name=la.name) -> float:
            return design_fep(scaled_network(network, {name: alpha}, Ranges.KEPT), options, tolerate)

        factors.append(largest_scale(fep_at, options.epsilon, rel_tol=1e-7))
    return factors


def design_analysis(
    network: Network,
    options: BoundOptions,
    model: ModelInfo,
    rebuild: Callable[[float], Network],
    capacity: float | None = None,
) -> DesignResult:
    """``robaudit design``: weight caps per layer and one shrink factor for a required tolerance (docs/method.md §9.1).

    ``options.failures`` is the tolerance. ``rebuild(s)`` returns the network of the
    model with every weight multiplied by s (ranges recomputed), as ``bound`` would
    read the written copy; the shrink factor is searched on it.
    """
    options.check()
    refuse_recurrent(network, "design")
    hidden = network.require_hidden_layers()
    if options.failures is None:
        raise OptionError("design needs the failures to tolerate: --tolerate N or N1,N2,...")
    tolerate = tolerance_vector(options.failures, hidden)
    analysis = Analysis(network, options.failure)
    method = select_method(analysis, options.method)
    eps = options.epsilon
    factors = largest_layer_weights(network, options, tolerate)
    overflows: list[str] = []

    def fep_rebuilt(scale: float) -> float:
        """The bound of the model with every weight × ``scale``; +inf where a value of a float16 part may then
        overflow (the search treats it as a scale that does not meet ε: ±inf outputs are unbounded errors)."""
        try:
            return design_fep(rebuild(scale), options, tolerate)
        except RoundingOverflowError as exc:
            overflows.append(str(exc).split(" on the input range")[0])
            return math.inf

    shrink = largest_scale(fep_rebuilt, eps, rel_tol=1e-6, floor=1e-9)
    columns = layer_columns(network, analysis, method, eps)
    rows = tuple(
        DesignLayer(
            **columns[i],
            tolerate=tolerate[i],
            max_weight_allowed=_allowed(la.synapse_max_abs_weight, factors[i]),
            weight_factor=factors[i],
        )
        for i, la in enumerate(hidden)
    )
    out = network.output_layer
    output = None
    if out is not None:
        weight = out.synapse_max_abs_weight
        output = OutputLayerDesign(out.name, weight, _allowed(weight, factors[-1]), factors[-1])
    notes = _notes_for(network)
    capped = [f"'{la.name}' ({la.neurons})" for la, f in zip(hidden, tolerate, strict=True) if f < options.failures[0]]
    if len(options.failures) == 1 and capped:
        notes.append(f"--tolerate {options.failures[0]} is capped at the size of layer(s) {', '.join(capped)}")
    if overflows and shrink is not None and math.isfinite(shrink):
        overflows.clear()
        fep_rebuilt(shrink * (1 + 1e-4))  # just above the factor: does an overflow stop it, or ε?
        if overflows:
            notes.append(f"the weights may not grow further: beyond ×{shrink:.4g} {overflows[0]} (overflow to ±inf)")
    fep_now = finite_or_none(method.fep_upto(tolerate))
    unbounded = [row.name for row in rows if row.delta is None]
    if shrink is None and fep_now is None and unbounded:
        notes.append(unbounded_note(unbounded))  # no scale of the weights bounds a value that may become ±Inf
    elif shrink is None:
        notes.append("no single factor in [1e-9, 1e12] brings the bound to ε")
    elif math.isinf(shrink):
        notes.append("the failures are tolerated whatever the scale of the weights")
    return DesignResult(
        model=model,
        settings=settings_for(options, network, capacity),
        layers=rows,
        output_layer=output,
        tolerate=tuple(tolerate),
        fep=fep_now,
        shrink_factor=shrink,
        fep_scaled=finite_or_none(design_fep(rebuild(shrink), options, tolerate))
        if shrink is not None and math.isfinite(shrink)
        else None,
        notes=tuple(notes),
    )


def _allowed(max_weight: float, factor: float | None) -> float | None:
    if factor is None:
        return None
    return math.inf if math.isinf(factor) else max_weight * factor


# --------------------------------------------------------------------------- curves for plots


def failure_curves(
    network: Network, options: BoundOptions, max_count: int | None = None, points: int = 40
) -> dict[str, tuple[list[int], list[float]]]:
    """Fep of the selected method against f failures in one hidden layer alone, per layer.

    Counts run from 1 to ``max_count`` (default: a little beyond the largest tolerated
    count, at least 10), capped at N_l, with at most ``points`` counts per layer.
    For ``robaudit.formats.plot.plot_failure_curves``.
    """
    analysis = Analysis(network, options.failure)
    method = select_method(analysis, options.method)
    hidden = network.hidden_layers
    if max_count is None:
        tolerated = [method.max_single(i, la.neurons, options.epsilon) for i, la in enumerate(hidden)]
        max_count = max(10, 3 * (max(tolerated, default=0) + 1))
    curves = {}
    for i, la in enumerate(hidden):
        top = min(max_count, la.neurons)
        counts = sorted({int(round(c)) for c in np.linspace(1, top, min(points, top))})
        values = []
        for count in counts:
            vector = [0] * len(hidden)
            vector[i] = count
            values.append(float(method.fep_upto(vector)))
        curves[la.name] = (counts, values)
    return curves


def precision_curves(result: PrecisionResult, max_bits: int | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """The bound against the bits of one site alone (Fep = gain·q), per site, for the plot."""
    top = max_bits or len(result.uniform_curve)
    curves = {}
    for la in result.layers:
        width = la.range[1] - la.range[0]
        bits = list(range(1, top + 1))
        curves[la.name] = (bits, [la.gain * rounding_error(width, b) for b in bits])
    return curves


# --------------------------------------------------------------------------- library entry points


@dataclass(frozen=True)
class CheckOptions:
    """What ``--check`` of ``precision`` and ``wait`` simulates on."""

    #: A ``.npy``/``.npz`` file of inputs; None: ``samples`` uniform draws from the input domain.
    inputs: Path | None = None
    samples: int = 200
    #: Random drop patterns per configuration (``wait``).
    trials: int = 10
    seed: int = 0


def compute_precision(
    path: str | Path, options: BoundOptions, weights: bool = False, check: CheckOptions | None = None
) -> PrecisionResult:
    """``robaudit precision``: bits per layer and uniform, optionally checked in onnxruntime."""
    from robaudit.applications import check as sim

    options.check()
    loaded, network = load_network(path, options.network)
    result = precision_analysis(network, options, model_info(loaded), weights)
    if check is None:
        return result
    inputs, source, notes = sim.load_inputs(check.inputs, check.samples, network, check.seed)
    run = sim.check_precision_weights if weights else sim.check_precision_outputs
    return replace(result, check=run(network, loaded.opset, result, inputs, source, notes))


def compute_wait(path: str | Path, options: BoundOptions, check: CheckOptions | None = None) -> WaitResult:
    """``robaudit wait``: signals to wait for per layer, optionally checked in onnxruntime."""
    from robaudit.applications import check as sim

    options.check()
    loaded, network = load_network(path, options.network)
    result = wait_analysis(network, options, model_info(loaded))
    if check is None:
        return result
    inputs, source, notes = sim.load_inputs(check.inputs, check.samples, network, check.seed)
    checked = sim.check_wait(network, loaded.opset, result, inputs, source, check.trials, check.seed, notes)
    return replace(result, check=checked)


def compute_design(
    path: str | Path,
    options: BoundOptions,
    capacity: float | None = None,
    write: Path | None = None,
    check: bool = False,
    inputs: Path | None = None,
    labels: np.ndarray | None = None,
) -> DesignResult:
    """``robaudit design``: weight caps and shrink factor; ``write`` saves the scaled copy, ``check``
    re-runs ``bound`` on it (on a temporary copy when nothing is written)."""
    from robaudit.applications import check as sim

    options.check()
    if write is not None:
        sim.check_model_target(Path(write), Path(path), "--write", "the scaled copy")
    loaded, network = load_network(path, options.network)

    def rebuild(factor: float) -> Network:
        scaled = sim.scale_weights(analysed_model(loaded.proto), network, factor)
        rebuilt = build_network(build_graph(scaled), options.network, loaded.opset)
        # the ranges `bound` takes on the written copy (CROWN by default; interval propagation alone made the
        # factor smaller than needed, and than check's remedy for the same requirement: a new-user trial)
        tighten_network(rebuilt, network.ranges)
        return rebuilt

    result = design_analysis(network, options, model_info(loaded), rebuild, capacity)
    if write is None and not check:
        return result
    if result.shrink_factor is None:
        raise OptionError("no single factor on the weights brings the bound to ε; there is nothing to write or check")
    if math.isinf(result.shrink_factor):
        raise OptionError("the failures are tolerated at any weight scale; there is nothing to write or check")
    model = sim.scale_weights(analysed_model(loaded.proto), network, result.shrink_factor)
    if write is not None:
        sim.write_model(model, Path(write))
        result = replace(result, written=str(write))
    if not check:
        return result
    with tempfile.TemporaryDirectory(prefix="robaudit-design-") as tmp:
        target = Path(write) if write is not None else Path(tmp) / "scaled.onnx"
        if write is None:
            sim.write_model(model, target)
        confirmed = design_check(target, options, result.tolerate, "(temporary copy)" if write is None else None)
        x, source, _ = sim.load_inputs(inputs, 200, network, packed=True)
        feeds = split_feed(network.inputs, x)  # several inputs: packed vectors (docs/method.md §12.3)
        confirmed = compare_predictions(confirmed, Path(path), target, feeds, source, network.output_name, labels)
    return replace(result, check=confirmed)


def compare_predictions(
    check: DesignCheck,
    original: Path,
    scaled: Path,
    x: np.ndarray | dict[str, np.ndarray],
    source: str,
    output: str,
    labels,
) -> DesignCheck:
    """The scaled model's outputs beside the original's on ``x`` (one input's array, or feeds by input
    name) (docs/method.md §9.2): a remedy that changes predictions is never confirmed."""
    import onnx

    from robaudit.applications.harden import _accuracy, _agreement, _run

    before = _run(onnx.load(str(original)), x, [output])[0]
    after = _run(onnx.load(str(scaled)), x, [output])[0]
    agreement = _agreement(before, after)
    return replace(
        check,
        ok=check.ok and agreement == 1.0,
        inputs=len(before),
        source=source,
        agreement=agreement,
        max_output_change=float(np.max(np.abs(after.astype(np.float64) - before))),
        accuracy_before=_accuracy(before, labels),
        accuracy_after=_accuracy(after, labels),
    )


def design_check(path: Path, options: BoundOptions, tolerate: Sequence[int], label: str | None = None) -> DesignCheck:
    """``bound`` on the scaled model: the required failures must give Fep ≤ ε."""
    bound = compute_bound(path, replace(options, failures=tuple(tolerate)))
    fep = math.inf if bound.fep is None else float(bound.fep)  # failures were given: never None
    return DesignCheck(
        path=label or str(path),
        fep=fep,
        uniform=bound.uniform,
        max_failures=tuple(la.max_failures for la in bound.layers),
        ok=fep <= options.epsilon * (1 + 1e-9),
    )
