"""``inject --replay REPORT``: run again the fault sets an ``inject`` report recorded (docs/method.md §8).

An inject report lists, per failure vector, its worst fault sets: per layer the
failed neurons (flat indices) or synapses (source i, destination j) and the values
they sent, with the largest error measured and the input reaching it. Replaying
re-runs exactly those sets on the model, with the report's settings (failure model,
input range, output, input shape, method), on the report's inputs (the same
``--samples`` count and ``--seed``, or the ``--inputs`` file given again), and sets
each replayed error beside the recorded one and beside the bound of the set's own
failure vector. The model file must be the one the report names (same SHA-256).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robaudit.bounds.audit import BoundOptions, bound_network, settings_for
from robaudit.bounds.fep import FailureModel
from robaudit.bounds.results import LayerBound, ModelInfo, Settings
from robaudit.errors import ReportError
from robaudit.formats.serial import read_report_file
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network, NetworkOptions
from robaudit.injection.campaign import campaign_inputs, fault_sites
from robaudit.injection.instrument import CODE_BITS, instrument
from robaudit.injection.results import FailureVector, InjectOptions, InputsInfo, LayerFaults
from robaudit.injection.sandbox import Limits, open_evaluator
from robaudit.injection.search import MARGIN_RELATIVE, Campaign, Tally, stack_fault_sets
from robaudit.inputs import outside_domain


@dataclass(frozen=True)
class RecordedSet:
    """One fault set as an inject report recorded it."""

    #: The failure vector (neurons, synapses per hidden layer) the set belongs to.
    vector: FailureVector
    faults: tuple[LayerFaults, ...]
    #: The largest error the report measured for the set, and the input reaching it.
    error: float
    input_index: int
    #: The input the joint search moved to (flattened), when the set was found there.
    moved_input: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Recording:
    """What a replay needs from an inject report."""

    sha256: str
    failure: FailureModel
    network: NetworkOptions
    method: str
    epsilon: float
    #: Inputs as the report drew them (used when no ``--inputs`` file is given).
    samples: int
    seed: int
    inputs_source: str
    sets: tuple[RecordedSet, ...]


@dataclass(frozen=True)
class ReplayedSet:
    """One recorded fault set, run again."""

    recorded: RecordedSet
    #: Largest error over the inputs now, and the input reaching it.
    error: float
    input_index: int
    #: Bound of the selected method for the set's failure vector, and both methods' values.
    bound: float
    fep_paper: float
    fep_tight: float
    #: The replayed error equals the recorded one (within the float32 margin).
    reproduced: bool
    #: The replayed error is above the bound plus the float32 margin.
    violation: bool


@dataclass(frozen=True)
class ReplayResult:
    """Output of ``robaudit inject --replay``."""

    model: ModelInfo
    settings: Settings
    report: str
    layers: tuple[LayerBound, ...]
    sets: tuple[ReplayedSet, ...]
    inputs: InputsInfo
    margin_relative: float
    margin_absolute: float
    notes: tuple[str, ...] = ()

    @property
    def violation(self) -> bool:
        """Whether a replayed error is above its bound."""
        return any(s.violation for s in self.sets)

    @property
    def reproduced(self) -> bool:
        """Whether every recorded error was measured again."""
        return all(s.reproduced for s in self.sets)


# --------------------------------------------------------------------------- reading the report


def read_recording(data: Any, where: str) -> Recording:
    """The settings and fault sets of an inject report mapping; :class:`ReportError` when it is not one."""
    if not isinstance(data, dict) or data.get("command") != "inject":
        raise ReportError(f"--replay: {where} is not a report of 'robaudit inject'")
    settings = _mapping(data, "settings", where)
    search = _mapping(data, "search", where)
    inputs = _mapping(data, "inputs", where)
    model = _mapping(data, "model", where)
    vectors = data.get("vectors")
    if not isinstance(vectors, list) or not vectors:
        raise ReportError(f"--replay: {where} has no 'vectors' with fault sets")
    sets = tuple(
        _recorded_set(vector, fault_set, f"{where} vectors[{v}].worst[{s}]")
        for v, vector in enumerate(vectors)
        for s, fault_set in enumerate(_list(vector, "worst", f"{where} vectors[{v}]"))
    )
    moved = tuple(
        _moved_set(vector, f"{where} vectors[{v}].moved_input")
        for v, vector in enumerate(vectors)
        if isinstance(vector, dict) and vector.get("moved_input")
    )
    sets = sets + moved
    if not sets:
        raise ReportError(f"--replay: {where} records no fault sets")
    if settings.get("inputs"):
        raise ReportError(f"--replay: {where} was made with several, token, held or per-element inputs; not replayable")
    return Recording(
        sha256=str(model.get("sha256", "")),
        failure=_failure_model(settings, where),
        network=NetworkOptions(
            input_shape=tuple(int(d) for d in settings.get("input_shape") or ()) or None,
            output=settings.get("output") or None,
            input_range=_pair(settings.get("input_range"), "input_range", where),
        ),
        method=str(settings.get("method", "tight")),
        epsilon=_number(settings.get("epsilon", 0.1), "epsilon", where),
        samples=int(inputs.get("count", 0)),
        seed=int(search.get("seed", 0)),
        inputs_source=str(inputs.get("source", "")),
        sets=sets,
    )


def _mapping(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ReportError(f"--replay: {where} has no '{key}' mapping")
    return value


def _list(data: Any, key: str, where: str) -> list:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise ReportError(f"--replay: {where} has no '{key}' list")
    return value


def _number(value: Any, key: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ReportError(f"--replay: {where} '{key}' is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ReportError(f"--replay: {where} '{key}' is not finite: {value!r}")
    return number


def _error(value: Any, where: str) -> float:
    """A recorded error: a number ≥ 0, or +inf (an exponent bit's flip makes a value ±Inf or NaN, and inject
    records that error as 'inf')."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ReportError(f"--replay: {where} 'error' is not a number: {value!r}") from None
    if math.isnan(number) or number < 0:
        raise ReportError(f"--replay: {where} 'error' is not a number ≥ 0: {value!r}")
    return number


def _pair(value: Any, key: str, where: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ReportError(f"--replay: {where} '{key}' must be a list [A, B], got {value!r}")
    return _number(value[0], key, where), _number(value[1], key, where)


def _failure_model(settings: dict, where: str) -> FailureModel:
    bound = settings.get("activation_bound")
    activation_bound = None if bound is None else _number(bound, "activation_bound", where)
    if settings.get("mode") == "crash":
        return FailureModel.crash(activation_bound)
    if settings.get("mode") == "byzantine":
        return FailureModel.byzantine(
            failure_range=_pair(settings.get("failure_range"), "failure_range", where),
            activation_bound=activation_bound,
        )
    bit = settings.get("bit")
    bit = None if bit is None else int(_number(bit, "bit", where))
    if settings.get("mode") == "bit_flip":
        return FailureModel.bit_flip(bit, activation_bound)
    if settings.get("mode") == "stuck_at":
        return FailureModel.stuck_at(int(_number(settings.get("stuck"), "stuck", where)), bit, activation_bound)
    raise ReportError(
        f"--replay: {where} settings 'mode' must be crash, byzantine, bit_flip or stuck_at, "
        f"got {settings.get('mode')!r}"
    )


def _recorded_set(vector: Any, fault_set: Any, where: str) -> RecordedSet:
    failures = tuple(int(f) for f in _list(vector, "failures", where))
    synapses = tuple(int(s) for s in (vector.get("synapses") or ()))
    faults = []
    for index, entry in enumerate(_list(fault_set, "faults", where)):
        at = f"{where}.faults[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), str):
            raise ReportError(f"--replay: {at} has no layer name")
        neurons = tuple(_index(n, at) for n in entry.get("neurons") or ())
        values = tuple(_number(v, "values", at) for v in entry.get("values") or ())
        pairs = tuple(_synapse(p, at) for p in entry.get("synapses") or ())
        synapse_values = tuple(_number(v, "synapse_values", at) for v in entry.get("synapse_values") or ())
        if len(values) != len(neurons) or len(synapse_values) != len(pairs):
            raise ReportError(f"--replay: {at} gives {len(neurons)} neurons with {len(values)} values")
        faults.append(LayerFaults(entry["layer"], neurons, values, pairs, synapse_values))
    error = _error(fault_set.get("error"), where)
    return RecordedSet(FailureVector(failures, synapses), tuple(faults), error, int(fault_set.get("input_index", 0)))


def _moved_set(vector: dict, where: str) -> RecordedSet:
    """The configuration of the joint search: a fault set on the input it recorded."""
    entry = vector["moved_input"]
    if not isinstance(entry, dict):
        raise ReportError(f"--replay: {where} is not a mapping")
    values = tuple(_number(v, "input", where) for v in _list(entry, "input", where))
    recorded = _recorded_set(vector, entry, where)
    return RecordedSet(recorded.vector, recorded.faults, recorded.error, -1, values)


def _index(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"--replay: {where} has a neuron index that is not a non-negative integer: {value!r}")
    return value


def _synapse(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ReportError(f"--replay: {where} has a synapse that is not a pair [i, j]: {value!r}")
    return _index(value[0], where), _index(value[1], where)


# --------------------------------------------------------------------------- replaying


def replay(
    network: Network,
    recording: Recording,
    model: ModelInfo,
    report: str,
    inputs: np.ndarray | None = None,
    inputs_source: str = "",
    isolate: bool = True,
    limits: Limits = Limits(),
) -> ReplayResult:
    """Run every recorded fault set on ``network`` (with the report's inputs unless ``inputs`` is given)."""
    check_same_model(recording, model.path, model.sha256)
    _check_failure_values(recording, network)
    chosen = [_chosen(network, recorded) for recorded in recording.sets]
    vectors = [
        _own_vector(network, recorded, per_layer) for recorded, per_layer in zip(recording.sets, chosen, strict=True)
    ]
    options = InjectOptions(
        failure=recording.failure,
        vectors=tuple(vectors),
        epsilon=recording.epsilon,
        method=recording.method,
        seed=recording.seed,
        inputs=inputs,
        inputs_source=inputs_source,
        samples=max(recording.samples, 1),
        isolate=isolate,
        limits=limits,
    )
    options.check()
    rng = np.random.default_rng(options.seed)
    x, _, source = campaign_inputs(network, options, rng)  # the draw run_injection makes first, for the same seed
    sites = fault_sites(network, vectors, recording.failure.stored)
    spec = instrument(
        network, sites, model.opset, recording.failure.failure_range != (0.0, 0.0), recording.failure.stuck
    )
    campaign = Campaign(network, spec.sites, options, x, None, rng, None)
    evaluator = open_evaluator(spec, x, limits, isolate)
    replayed_sets: list[ReplayedSet] = []
    try:
        campaign.start(evaluator)
        for recorded, per_layer, vector in zip(recording.sets, chosen, vectors, strict=True):
            if recorded.moved_input is None:
                replayed_sets.append(_replayed(campaign, spec.sites, recorded, per_layer, vector))
                continue
            own = _moved_inputs(network, recorded)
            mover = Campaign(network, spec.sites, options, own, None, rng, None)
            moved_evaluator = open_evaluator(spec, own, limits, isolate)
            try:
                mover.start(moved_evaluator)
                result = _replayed(mover, spec.sites, recorded, per_layer, vector)
                replayed_sets.append(dataclasses.replace(result, input_index=-1))
            finally:
                moved_evaluator.close()
    finally:
        evaluator.close()
    replayed = tuple(replayed_sets)
    bound_options = BoundOptions(
        epsilon=recording.epsilon, failure=recording.failure, method=recording.method, network=recording.network
    )
    fraction = outside_domain(x, network.input_range)
    return ReplayResult(
        model=model,
        settings=settings_for(bound_options, network),
        report=report,
        layers=bound_network(network, bound_options, model).layers,
        sets=replayed,
        inputs=InputsInfo(source, len(x), fraction, False, None),
        margin_relative=MARGIN_RELATIVE,
        margin_absolute=campaign.margin_absolute,
        notes=(_other_inputs_note(recording, source),) if other_inputs(recording, source) else (),
    )


def recorded_inputs_file(recording: Recording) -> str | None:
    """The inputs file the report read (``file.npz:x``, as it recorded it), or None when it drew its samples."""
    source = recording.inputs_source
    drawn = re.fullmatch(r"\d+ samples uniform .* \(seed \d+\)", source) is not None
    given = re.fullmatch(r"\d+ given inputs", source) is not None  # arrays passed to the Python API
    return None if drawn or given or not source else source


def other_inputs(recording: Recording, source: str) -> bool:
    """Whether the replay runs on other inputs than the report did (drawn where the report read a file, a file
    where it drew samples, another file): the recorded errors are then not expected back."""
    return bool(recording.inputs_source) and recording.inputs_source != source


def _other_inputs_note(recording: Recording, source: str) -> str:
    drawn = re.fullmatch(r"\d+ samples uniform .* \(seed \d+\)", recording.inputs_source) is not None
    fix = "pass the report's --inputs file"
    if drawn:
        fix = "replay without --inputs (it draws the report's samples again)"
    return (
        f"the report ran on {recording.inputs_source}; this replay on {source}, so the recorded errors are not "
        f"expected back: {fix}"
    )


def check_same_model(recording: Recording, path: str, sha256: str) -> None:
    """The report must describe this very file (before anything is built from it)."""
    if recording.sha256 != sha256:
        raise ReportError(
            f"--replay: the report was made for a model file with SHA-256 {recording.sha256[:12] or '(none)'}…, "
            f"but '{path}' has {sha256[:12]}…"
        )


def _chosen(network: Network, recorded: RecordedSet) -> dict[tuple[str, str], tuple]:
    """Per (kind, layer name): the flat ids and values of a recorded set, checked against the network."""
    hidden = {layer.name: layer for layer in network.hidden_layers}
    chosen: dict[tuple[str, str], tuple] = {}
    for faults in recorded.faults:
        layer = hidden.get(faults.layer)
        if layer is None:
            raise ReportError(
                f"--replay: the report fails layer '{faults.layer}', which is not a hidden layer of this model "
                "(was the report made with --include-output-layer?)"
            )
        if faults.neurons:
            _check_range(faults.neurons, layer.neurons, f"neuron of layer '{layer.name}'")
            chosen[("neuron", layer.name)] = (np.array(faults.neurons), np.array(faults.values))
        if faults.synapses:
            ids = _synapse_ids(layer, faults.synapses)
            chosen[("synapse", layer.name)] = (ids, np.array(faults.synapse_values))
    return chosen


def _check_range(ids, size: int, what: str, unique: bool = True) -> None:
    if max(ids) >= size:
        raise ReportError(f"--replay: the report fails {what} {max(ids)}, but it has {size}")
    if unique and len(set(ids)) != len(ids):
        raise ReportError(f"--replay: the report fails a {what} twice in one fault set")


def _synapse_ids(layer: Layer, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Flat synapse ids j·fan_in + i (the order the campaign uses)."""
    _check_range([i for i, _ in pairs], layer.fan_in, f"synapse source of layer '{layer.name}'", unique=False)
    _check_range([j for _, j in pairs], layer.neurons, f"synapse destination of layer '{layer.name}'", unique=False)
    ids = np.array([j * layer.fan_in + i for i, j in pairs], dtype=np.int64)
    if len(set(ids.tolist())) != len(ids):
        raise ReportError(f"--replay: the report fails a synapse of layer '{layer.name}' twice in one fault set")
    return ids


def _own_vector(network: Network, recorded: RecordedSet, chosen: dict) -> FailureVector:
    """The failure vector a recorded set realises; it must be the vector the report filed it under."""
    hidden = network.hidden_layers
    position = {layer.name: i for i, layer in enumerate(hidden)}
    neurons, synapses = [0] * len(hidden), [0] * len(hidden)
    for (kind, name), (ids, _) in chosen.items():
        (neurons if kind == "neuron" else synapses)[position[name]] = len(ids)
    own = FailureVector(tuple(neurons), tuple(synapses) if any(synapses) else ())
    filed = recorded.vector
    if own.neurons != filed.neurons or own.synapse_counts() != filed.synapse_counts():
        raise ReportError(
            f"--replay: a fault set fails {list(own.neurons)} neurons"
            + (f" and {list(own.synapse_counts())} synapses" if any(synapses) else "")
            + f" per hidden layer, but the report files it under failures {list(filed.neurons)}"
            + (f", synapses {list(filed.synapse_counts())}" if any(filed.synapse_counts()) else "")
            + " (edited report, or another model?)"
        )
    return own


def _replayed(campaign: Campaign, sites, recorded: RecordedSet, chosen: dict, vector: FailureVector) -> ReplayedSet:
    """Evaluate one recorded set on every input and set it beside the recorded error and its vector's bound."""
    empty = (np.zeros(0, np.int64), np.zeros(0))
    per_site = [chosen.get((site.kind, site.layer), empty) for site in sites]
    order = [np.argsort(ids, kind="stable") for ids, _ in per_site]
    per_site = [(ids[o], sent[o]) for (ids, sent), o in zip(per_site, order, strict=True)]
    counts = [len(ids) for ids, _ in per_site]
    errors, _ = campaign._evaluate(stack_fault_sets([per_site], sites, counts), None, Tally(), "replaying fault sets")
    error, index = float(errors[0].max()), int(errors[0].argmax())
    paper, tight = campaign._bound(vector)
    bound = paper if campaign.options.method == "paper" else tight
    margin = campaign.margin_absolute
    same = error == recorded.error  # an infinite error reproduced is infinite again
    reproduced = same or abs(error - recorded.error) <= MARGIN_RELATIVE * max(error, recorded.error) + margin
    violation = error > bound * (1 + MARGIN_RELATIVE) + margin
    return ReplayedSet(recorded, error, index, bound, paper, tight, bool(reproduced), bool(violation))


def _moved_inputs(network: Network, recorded: RecordedSet) -> np.ndarray:
    """The recorded moved input as a batch of one, checked against the model's input shape."""
    shape = tuple(network.input_shape[1:])
    values = np.asarray(recorded.moved_input, np.float32)
    if values.size != int(np.prod(shape)):
        raise ReportError(
            f"--replay: a moved input has {values.size} values; the model's input has {int(np.prod(shape))}"
        )
    return values.reshape((1,) + shape)


def _check_failure_values(recording: Recording, network: Network) -> None:
    """Values outside the report's failure range are not covered by the bound: refuse them."""
    if recording.failure.stored:  # bit flips send 2^B, B a bit of the stored value (a code, a float word)
        widths = {la.name: CODE_BITS if la.codes is not None else la.word.width for la in network.hidden_layers}
        for recorded in recording.sets:
            for faults in recorded.faults:
                width = widths.get(faults.layer, 0)  # a layer the model lacks: named when the sets are read
                if width and any(v not in [2.0**b for b in range(width)] for v in faults.values):
                    raise ReportError(
                        f"--replay: layer '{faults.layer}' has a bit-flip value that is not 2^B, B < {width}"
                    )
        return
    lo, hi = recording.failure.failure_range
    slack = 1e-9 * max(1.0, abs(lo), abs(hi))
    for recorded in recording.sets:
        for faults in recorded.faults:
            for value in faults.values + faults.synapse_values:
                if not lo - slack <= value <= hi + slack:
                    raise ReportError(
                        f"--replay: layer '{faults.layer}' sends {value:g}, outside the report's failure range "
                        f"[{lo:g}, {hi:g}]"
                    )


def load_report(path: Path) -> Any:
    """The mapping of a YAML or JSON report file."""
    return read_report_file(path, "--replay", ReportError)
