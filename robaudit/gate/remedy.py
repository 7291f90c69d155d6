"""What it would take to meet an unmet requirement: weight targets (docs/method.md §9.1 ``design``).

For a requirement a model misses, the largest max-|weight| a layer may have (the other
layers fixed) such that the bound meets it, and the single factor by which all weights
must shrink. Both come from bisection on a scale factor s applied to the effective
weights: with the biases fixed and the interval ranges recomputed, Fep is
non-decreasing in s (E_l carries w_m^{(l)} linearly, docs/method.md §3.1; ReLU-type ranges and
hence δ grow with s), so the set of passing scales is an interval [0, s*], found by a
bracketed search on log s.

Shrinking every weight meets a bound by shrinking the outputs, which may ruin the model; so
:func:`try_remedies` runs the scaled model beside the original (on the policy's inputs, or
samples of the domain) and, with inputs, restricts each layer's range to them (``harden``,
docs/method.md §9.2) and reports that model's figures too (docs/method.md §9.2).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from robaudit.bounds.audit import BoundOptions, bound_network
from robaudit.bounds.bound import make_bound
from robaudit.bounds.fep import Analysis
from robaudit.bounds.ranges import tighten_network
from robaudit.bounds.slack import epsilon_limit, within
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.scaling import Ranges, scaled_network, unscalable

#: Smallest scale factor tried; a requirement still unmet there counts as unreachable.
SMALLEST_SCALE = 1e-3
#: Relative precision of the bisection on the scale factor.
SCALE_TOLERANCE = 1e-2


@dataclass(frozen=True)
class WeightTarget:
    """The largest max-|weight| of one layer that meets the requirement, others fixed."""

    #: Layer name.
    layer: str
    #: w_m now.
    max_weight: float
    #: Largest w_m that meets the requirement; None when no scale down to 1e-3·w_m does.
    max_weight_allowed: float | None


@dataclass(frozen=True)
class ProposedModel:
    """A remedy's model run beside the original on inputs (docs/method.md §9.2)."""

    #: ``scaled`` (all weights × the shrink factor) or ``hardened`` (a Clip per layer at its range on the inputs).
    kind: str
    #: Where the inputs came from and how many there were.
    source: str
    inputs: int
    #: Fraction of the inputs whose arg-max is unchanged, and the largest |change| of the audited output.
    agreement: float
    max_output_change: float
    #: Accuracy of the original and of this model (with labels).
    accuracy_before: float | None
    accuracy_after: float | None
    #: The requirement's figure (tolerated count) on this model, and whether it meets the requirement.
    achieved: int | None = None
    meets: bool | None = None

    @property
    def changes_predictions(self) -> bool:
        """Whether some prediction differs from the original's on the inputs."""
        return self.agreement < 1.0


@dataclass(frozen=True)
class Remedy:
    """Ways to meet an unmet requirement (docs/method.md §9.1 ``design``, §9.2 ``harden``)."""

    #: Per-layer targets: for a layer requirement that layer and the layers reading its output.
    layers: tuple[WeightTarget, ...]
    #: Factor s ≤ 1 by which every weight (output layer included) must be multiplied; None if none found.
    shrink_factor: float | None
    #: Float layers whose stored values a bit flip can make ±Inf/NaN: only range restriction or
    #: quantization bounds them (docs/method.md §2.3), not smaller weights.
    unbounded: tuple[str, ...] = ()
    #: Why there are no weight targets for this model (its weights cannot be rescaled:
    #: :func:`~robaudit.graph.scaling.unscalable`); empty when there are.
    unscalable: str = ""
    #: The model with every weight × ``shrink_factor`` run beside the original; None when not run.
    scaled: ProposedModel | None = None
    #: The range-restricted model (``harden`` on the policy's inputs); None without inputs.
    hardened: ProposedModel | None = None


# --------------------------------------------------------------------------- pure search


def largest_scale_within(
    bound_at: Callable[[float], float],
    epsilon: float,
    smallest: float = SMALLEST_SCALE,
    tolerance: float = SCALE_TOLERANCE,
) -> float | None:
    """Largest s in [smallest, 1] with bound_at(s) ≤ ε, for a non-decreasing ``bound_at``.

    A bracketed search on log s: each step guesses the crossing by interpolating
    log bound_at linearly in log s (exact for a power law c·s^p, which the paper bound
    is when one layer's weights scale, docs/method.md §3.1), then probes one tolerance step past it
    to close the bracket; when a guess does not halve the bracket the next one
    bisects. The result was itself evaluated, so it is a verified passing scale within
    a factor (1 + tolerance) of the crossing. None when even ``smallest`` does not pass.
    """
    limit = epsilon_limit(epsilon)
    f_lo, f_hi = bound_at(smallest), bound_at(1.0)
    if f_lo > limit:
        return None
    if f_hi <= limit:
        return 1.0
    step = math.log1p(tolerance)
    lo, hi = math.log(smallest), 0.0
    interpolate = True
    while hi - lo > step:
        width = hi - lo
        guess = _log_secant(lo, hi, f_lo, f_hi, limit) if interpolate else (lo + hi) / 2
        guess = min(max(guess, lo + step / 2), hi - step / 2)
        for x in (guess, None):
            if x is None:  # the probe one step past the guess, towards the other end
                x = lo + step if lo == guess else hi - step
                if not lo < x < hi:
                    break
            value = bound_at(math.exp(x))
            if value <= limit:
                lo, f_lo = x, value
            else:
                hi, f_hi = x, value
        interpolate = hi - lo < width / 2
    return math.exp(lo)


def _log_secant(lo: float, hi: float, f_lo: float, f_hi: float, limit: float) -> float:
    """Where log f reaches log ε on the line through (lo, log f_lo) and (hi, log f_hi); the midpoint if undefined."""
    if f_lo <= 0 or f_hi <= f_lo:
        return (lo + hi) / 2
    a, b = math.log(f_lo), math.log(f_hi)
    return lo + (math.log(limit) - a) * (hi - lo) / (b - a)


# --------------------------------------------------------------------------- requirement test


def requirement_bound(
    network: Network, options: BoundOptions, kind: str, count: int, layer_index: int | None = None
) -> float:
    """The bound that decides whether ``network`` tolerates ``count`` failures of this kind (docs/method.md §6).

    The same decision as ``bound_network``'s figures (tolerated iff this is ≤ ε):
    ``uniform`` is f = min(count, N_l) in every hidden layer, ``layer`` is count failures
    in hidden layer ``layer_index`` (0-based) alone, ``total`` the worst distribution of
    ``count`` failures (the DP's curve, or the uniform vector (count, …, count) that holds every distribution,
    or for one failure the worst single layer: as ``at_least_implied``); ``tight`` takes the smaller of the two
    bounds, ``paper`` the paper bound alone. More failures than neurons give +inf.
    """
    analysis = Analysis(network, options.failure)
    hidden = analysis.hidden
    bound = make_bound(analysis, options.method)
    if kind == "total":
        if count > sum(la.neurons for la in hidden):
            return math.inf
        uniform = [min(count, la.neurons) for la in hidden]
        covering = min(float(bound.total_curve(count)[count]), bound.fep_upto(uniform))
        if count == 1:
            alone = [[int(k == i) for k in range(len(hidden))] for i in range(len(hidden))]
            covering = min(covering, max(bound.fep_upto(vector) for vector in alone))
        return covering
    if kind == "uniform":
        if count > max(la.neurons for la in hidden):
            return math.inf
        vector = [min(count, la.neurons) for la in hidden]
    else:
        index = _layer_index(layer_index)
        if count > hidden[index].neurons:
            return math.inf
        vector = [0] * len(hidden)
        vector[index] = count
    return bound.fep_upto(vector)


def _layer_index(layer_index: int | None) -> int:
    """The hidden-layer index a ``layer`` requirement needs."""
    if layer_index is None:
        raise ValueError("a 'layer' requirement needs the index of its hidden layer")
    return layer_index


def meets(network: Network, options: BoundOptions, kind: str, count: int, layer_index: int | None = None) -> bool:
    """True when the bound tolerates the requirement (:func:`requirement_bound` ≤ ε)."""
    return within(requirement_bound(network, options, kind, count, layer_index), options.epsilon)


# --------------------------------------------------------------------------- scaled networks


def reading_layers(network: Network, layer: Layer) -> list[Layer]:
    """The layers whose input carries ``layer``'s output, through the ops between layers."""
    frontier, seen = [layer.output_value], {layer.output_value}
    found: list[Layer] = []
    while frontier:
        value = frontier.pop()
        for step in network.steps:
            if isinstance(step, Layer):
                if step.input_value == value and all(step is not f for f in found):
                    found.append(step)
            elif value in step.inputs:
                fresh = [out for out in step.outputs if out and out not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
    return found


# --------------------------------------------------------------------------- remedy


def remedy(network: Network, options: BoundOptions, kind: str, count: int, layer_index: int | None = None) -> Remedy:
    """Weight targets that would make the bound meet an unmet requirement (docs/method.md §9.1 ``design``).

    For a ``layer`` requirement: that layer and the layers reading its output (a layer
    with a bounded activation cannot help itself: its δ does not shrink with its weights).
    For every kind: the factor all weights must be multiplied by.
    """

    def search(names: Collection[str]) -> float | None:
        def bound_at(scale: float) -> float:
            scaled = scaled_network(network, dict.fromkeys(names, scale), Ranges.RECOMPUTED)
            tighten_network(scaled, network.ranges)  # IBP was recomputed; the network's range method again
            return requirement_bound(scaled, options, kind, count, layer_index)

        return largest_scale_within(bound_at, options.epsilon)

    from robaudit.bounds.fep import Analysis

    unbounded = tuple(Analysis(network, options.failure).unbounded()) if options.failure.stored else ()
    if unbounded:
        return Remedy((), None, unbounded)
    reason = unscalable(network)
    if reason is not None:
        return Remedy((), None, unscalable=reason)
    targets = []
    if kind == "layer":
        failing = network.hidden_layers[_layer_index(layer_index)]
        for layer in [failing, *reading_layers(network, failing)]:
            scale = search({layer.name})
            allowed = None if scale is None else scale * layer.synapse_max_abs_weight
            targets.append(WeightTarget(layer.name, layer.synapse_max_abs_weight, allowed))
    shrink = search({layer.name for layer in network.layers})
    return Remedy(tuple(targets), shrink)


# --------------------------------------------------------------------------- the remedies, tried


def try_remedies(
    fix: Remedy,
    path: str | Path,
    network: Network,
    options: BoundOptions,
    requirement: tuple[str, int, int | None],
    inputs: Path | None,
    labels: str | None,
) -> Remedy:
    """``fix`` with its scaled model, and the range-restricted one, run beside the original (docs/method.md §9.2).

    ``requirement`` is (kind, count, hidden-layer index). The scaled model runs on ``inputs``,
    or on 200 samples of the domain without them; ``harden`` needs real inputs and runs only
    with them; ``labels`` (a labels file) adds accuracies. A model with several, token or held
    inputs gets no figures. Raises the input readers' errors for unusable files.
    """
    from robaudit.applications import check as sim
    from robaudit.errors import UnsupportedModelError
    from robaudit.inputs import load_labels

    try:
        x, source, _ = sim.load_inputs(inputs, 200, network)
    except UnsupportedModelError:
        return fix
    classes = int(network.clean[network.tail_start].lo.size)
    y = None if labels is None or inputs is None else load_labels(labels, len(x), classes)[0]
    scaled = None
    if fix.shrink_factor is not None and 0 < fix.shrink_factor < 1:
        import onnx

        from robaudit.graph.forms import analysed_model

        original = onnx.load(str(path))
        model = sim.scale_weights(analysed_model(original), network, fix.shrink_factor)
        scaled = _compare(original, model, network.output_name, x, source, y, "scaled")
        scaled = replace(scaled, achieved=requirement[1], meets=True)  # the search verified the scale
    hardened = None
    if inputs is not None and _inside_domain(network, x):  # harden refuses the others (its ranges would be loose)
        hardened = _hardened(path, network, options, requirement, x, source, y)
    return replace(fix, scaled=scaled, hardened=hardened)


def _inside_domain(network: Network, x: np.ndarray) -> bool:
    """Whether every value of the inputs ``x`` lies in the input domain (what ``harden`` takes)."""
    from robaudit.errors import InputDataError
    from robaudit.inputs import refuse_outside_domain

    try:
        refuse_outside_domain(network, x, "")
    except InputDataError:
        return False
    return True


def _compare(original, proposed, output: str, x: np.ndarray, source: str, labels, kind: str) -> ProposedModel:
    from robaudit.applications.harden import _accuracy, _agreement, _run

    before = _run(original, x, [output])[0].astype(np.float64)
    after = _run(proposed, x, [output])[0].astype(np.float64)
    return ProposedModel(
        kind, source, len(x), _agreement(before, after), float(np.max(np.abs(after - before))),
        _accuracy(before, labels), _accuracy(after, labels),
    )


def _hardened(path, network: Network, options: BoundOptions, requirement: tuple[str, int, int | None],
              x: np.ndarray, source: str, labels) -> ProposedModel:
    """The model restricted to its ranges on the inputs (``harden``, no margin), and the requirement's
    figure on it."""
    import onnx

    from robaudit.applications.harden import restricted_model
    from robaudit.bounds.audit import load_network, model_info
    from robaudit.graph.forms import analysed_model

    kind, count, index = requirement
    original = onnx.load(str(path))
    hardened, _ = restricted_model(analysed_model(original), network, x, original=original)
    with tempfile.TemporaryDirectory(prefix="robaudit-remedy-") as tmp:
        target = Path(tmp) / "hardened.onnx"
        onnx.save(hardened, str(target))
        loaded, after = load_network(target, options.network)
        bound = bound_network(after, options, model_info(loaded))
    if kind == "uniform":
        achieved = bound.uniform
    elif kind == "layer":
        achieved = bound.layers[_layer_index(index)].max_failures
    else:
        achieved = bound.total
    figures = _compare(original, hardened, network.output_name, x, source, labels, "hardened")
    return replace(figures, achieved=achieved, meets=achieved >= count)
