"""Fault-injection campaigns (SPEC §5): measured errors set beside the Fep bound.

:func:`run_injection` instruments the model once (:mod:`robaudit.inject.instrument`),
evaluates fault configurations in batches (:mod:`robaudit.inject.sandbox`) and, per
failure vector f, reports the error ``err(x) = max_k |F̃_k(x) − F_k(x)|`` (SPEC §1):

* ``random`` search: ``trials`` uniform failure sets (byzantine values drawn in
  [a, b], a quarter at a, a quarter at b), every one on every input; the
  statistics run over all (set × input) pairs;
* ``worst`` search: every candidate neuron (synapse) fails alone in one batched
  pass on a few inputs; the top sets by that impact seed a greedy construction and
  ``trials`` swap proposals; byzantine values take the extreme (a or b) with the
  larger measured impact. The statistics run over the inputs for the worst set.

A measured error above ``bound·(1 + 1e-5) + 1e-6·max(1, max_x ‖F(x)‖∞)`` — the
bound plus a float32 margin — is a violation (SPEC §5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info, settings_for
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound, TightBound, tight_or_paper, tight_unavailable
from robaudit.bounds.results import BoundResult, LayerBound, ModelInfo, Settings
from robaudit.errors import OptionError
from robaudit.graph.network import Network, NetworkOptions
from robaudit.inject.instrument import FaultBatch, FaultSite, instrument, neuron_site, synapse_site
from robaudit.inject.sandbox import Limits, open_evaluator
from robaudit.inputs import check_inputs, check_labels, outside_domain, sample_inputs

SEARCHES = ("random", "worst")
#: Violation margin: relative to the bound, and absolute relative to the output scale (float32).
MARGIN_RELATIVE = 1e-5
MARGIN_ABSOLUTE = 1e-6
#: Worst search: inputs used for ranking and search (the final sets are measured on all inputs).
SEARCH_INPUTS = 8
#: Worst search: single-failure evaluations (candidates × inputs) for ranking, shared by the sites,
#: for a model of REFERENCE_MACS multiply-adds per input (LeNet); scaled down for costlier models.
RANK_BUDGET = 2**15
REFERENCE_MACS = 4e5
MIN_RANK_BUDGET = 2**11
#: Worst search: greedy construction only when the vector fails at most this many elements.
GREEDY_LIMIT = 16
#: Fault sets kept per vector for the report (replayable).
KEEP_WORST = 5

#: ``progress(phase, done, total)``: called by the campaign as work completes.
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- options and results


@dataclass(frozen=True)
class FailureVector:
    """Failures per hidden layer: neurons (crash/byzantine per the failure model) and synapses."""

    #: Failed neurons per hidden layer l = 1..L.
    neurons: tuple[int, ...]
    #: Failed incoming synapses per hidden layer (dense layers only); empty means none.
    synapses: tuple[int, ...] = ()

    def synapse_counts(self) -> tuple[int, ...]:
        """Synapse counts with one entry per hidden layer."""
        return self.synapses or (0,) * len(self.neurons)


@dataclass(frozen=True)
class InjectOptions:
    """Everything an injection campaign needs besides the network (SPEC §5)."""

    #: What a failed neuron (synapse) sends: crash 0, byzantine a value in [a, b].
    failure: FailureModel = FailureModel.crash()
    #: Failure vectors to measure; empty: the vector of ``failures``/``synapses``, or else one
    #: failed neuron in every hidden layer.
    vectors: tuple[FailureVector, ...] = ()
    #: Shortcut for one vector, as in BoundOptions: failed neurons (and synapses) per hidden
    #: layer; a single count applies to every hidden layer (synapses: every dense one).
    failures: tuple[int, ...] | None = None
    synapses: tuple[int, ...] | None = None
    #: ε, for the ``max_failures`` column of the layers (SPEC §6).
    epsilon: float = 0.1
    #: Bound set beside the measurement: ``tight`` (min of both methods) or ``paper``.
    method: str = "tight"
    #: ``random`` or ``worst``.
    search: str = "random"
    #: random: failure sets drawn; worst: swap proposals after the greedy phase.
    trials: int = 200
    seed: int = 0
    #: Inputs [M, *input shape] (float); None: ``samples`` draws from the input domain.
    inputs: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: Class labels [M] for accuracy under failures (needs ``inputs``).
    labels: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: Where the inputs came from, for the report.
    inputs_source: str = ""
    samples: int = 64
    #: Byzantine capacity C as given by the user (report only).
    capacity: float | None = None
    #: Run onnxruntime in a contained child process (False: in this process).
    isolate: bool = True
    limits: Limits = Limits()

    def check(self) -> None:
        """Refuse nonsense values before any work is done."""
        if self.search not in SEARCHES:
            raise OptionError(f"--search must be one of {', '.join(SEARCHES)}, got '{self.search}'")
        if self.trials < 1:
            raise OptionError(f"--trials must be at least 1, got {self.trials}")
        if self.samples < 1:
            raise OptionError(f"--samples must be at least 1, got {self.samples}")
        if self.seed < 0:
            raise OptionError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.labels is not None and self.inputs is None:
            raise OptionError("--labels needs --inputs (labels of sampled inputs are unknown)")
        if not self.limits.timeout_s > 0:
            raise OptionError(f"--timeout must be positive, got {self.limits.timeout_s}")
        if self.vectors and (self.failures is not None or self.synapses is not None):
            raise OptionError("give failure vectors either as vectors or as failures/synapses, not both")


@dataclass(frozen=True)
class ErrorStats:
    """Distribution of the measured error err(x) (SPEC §1)."""

    max: float
    mean: float
    #: 95th percentile (numpy's linear interpolation).
    p95: float


@dataclass(frozen=True)
class LayerFaults:
    """The failed elements of one layer in one fault set (replayable)."""

    layer: str
    #: Failed neurons: flat indices into the layer's output (C order over [C, H, W] or [N]).
    neurons: tuple[int, ...] = ()
    #: The values they sent (0 for crash).
    values: tuple[float, ...] = ()
    #: Failed synapses as (source neuron i of the layer input, destination neuron j).
    synapses: tuple[tuple[int, int], ...] = ()
    synapse_values: tuple[float, ...] = ()


@dataclass(frozen=True)
class FaultSet:
    """One evaluated fault configuration with its largest error and the input reaching it."""

    faults: tuple[LayerFaults, ...]
    error: float
    #: Index (into the inputs) of the input with the largest error.
    input_index: int


@dataclass(frozen=True)
class VectorResult:
    """Measurement and bound for one failure vector (SPEC §5–6)."""

    #: Failed neurons and synapses per hidden layer.
    failures: tuple[int, ...]
    synapses: tuple[int, ...]
    measured: ErrorStats
    #: Fraction of evaluated (set, input) pairs whose arg-max output changed.
    flip_rate: float
    #: Accuracy under failures with labels (None without labels).
    accuracy: float | None
    #: Bound of the selected method for exactly this vector, and both methods' values.
    bound: float
    fep_paper: float
    fep_tight: float
    #: measured max / bound (None when the bound is 0 and nothing was measured).
    ratio: float | None
    #: measured max > bound plus the float32 margin.
    violation: bool
    #: Fault sets evaluated and (set × input) evaluations made.
    configurations: int
    evaluations: int
    #: The worst fault sets found, largest error first.
    worst: tuple[FaultSet, ...]


@dataclass(frozen=True)
class InputsInfo:
    """The inputs a campaign ran on."""

    source: str
    count: int
    #: Fraction of input elements outside the input domain (the bound assumes 0).
    outside_domain: float
    has_labels: bool
    #: Accuracy of the clean model on the inputs (with labels).
    clean_accuracy: float | None


@dataclass(frozen=True)
class InjectResult:
    """Output of ``robaudit inject``."""

    model: ModelInfo
    settings: Settings
    #: Per hidden layer figures of the bound (SPEC §6 ``layers``).
    layers: tuple[LayerBound, ...]
    vectors: tuple[VectorResult, ...]
    inputs: InputsInfo
    search: str
    trials: int
    seed: int
    #: Whether configurations × inputs shared onnxruntime runs (False: one row per run).
    batched: bool
    #: The violation margin: relative to the bound, absolute (already scaled to the output).
    margin_relative: float
    margin_absolute: float
    notes: tuple[str, ...] = ()

    @property
    def violation(self) -> bool:
        """Whether any vector measured an error above its bound."""
        return any(v.violation for v in self.vectors)

    @property
    def headline(self) -> VectorResult:
        """The vector closest to (or furthest beyond) its bound."""
        return max(self.vectors, key=lambda v: -1.0 if v.ratio is None else v.ratio)


# --------------------------------------------------------------------------- entry points


def inject_model(
    path: str | Path,
    options: InjectOptions,
    network_options: NetworkOptions = NetworkOptions(),
    include_output_layer: bool = False,
    progress: Progress | None = None,
) -> InjectResult:
    """Load a model file and run :func:`run_injection` on it."""
    loaded, network = load_network(path, network_options, include_output_layer)
    return run_injection(network, options, model_info(loaded), progress)


def run_injection(
    network: Network, options: InjectOptions, model: ModelInfo, progress: Progress | None = None
) -> InjectResult:
    """Measure the output error of the failure vectors in ``options`` on the real model (SPEC §5).

    The model is instrumented once; onnxruntime evaluates many (fault set × input)
    pairs per run in a contained child process (``options.isolate``). Each vector's
    result carries the measured max/mean/p95 error, arg-max flip rate, accuracy
    (with labels), the Fep bound of the same vector (paper, tight and the selected
    ``options.method``) and a ``violation`` flag. ``progress(phase, done, total)`` is
    called as work completes. Raises :class:`~robaudit.errors.RobauditError`
    subclasses for bad options or inputs, :class:`InjectionRuntimeError` when
    onnxruntime fails.
    """
    options.check()
    hidden = network.hidden_layers
    if not hidden:
        raise OptionError("the model has no hidden layer (only the output layer); nothing can fail")
    vectors = options.vectors
    if not vectors and (options.failures is not None or options.synapses is not None):
        vectors = (failure_vector(network, options.failures or (0,), options.synapses),)
    vectors = _checked_vectors(network, vectors)
    rng = np.random.default_rng(options.seed)
    inputs, labels, source = _inputs(network, options, rng)
    first = vectors[0]
    bound_options = BoundOptions(
        epsilon=options.epsilon,
        failure=options.failure,
        method=options.method,
        failures=first.neurons,
        synapses=first.synapse_counts(),
    )
    layers = bound_network(network, bound_options, model, options.capacity).layers
    sites = _sites(network, vectors)
    sends_values = options.failure.failure_range != (0.0, 0.0)
    spec = instrument(network, sites, model.opset, sends_values)
    campaign = _Campaign(network, spec.sites, options, inputs, labels, rng, progress)
    evaluator = open_evaluator(spec, inputs, options.limits, options.isolate)
    try:
        campaign.start(evaluator)
        results = tuple(campaign.measure(vector) for vector in vectors)
    finally:
        evaluator.close()
    notes = list(spec.notes if evaluator.clean_run.batched else ()) + list(evaluator.clean_run.notes)
    if options.method == "tight" and (reason := tight_unavailable(network)) is not None:
        notes.append(reason + "; the bound shown is the paper bound")
    fraction = outside_domain(inputs, network.input_range)
    if fraction > 0:
        notes.append(
            f"{fraction:.1%} of the input elements lie outside the input range {list(network.input_range)}; "
            "the bound assumes inputs inside it"
        )
    return InjectResult(
        model=model,
        settings=settings_for(bound_options, network, options.capacity),
        layers=layers,
        vectors=results,
        inputs=InputsInfo(source, len(inputs), fraction, labels is not None, campaign.clean_accuracy()),
        search=options.search,
        trials=options.trials,
        seed=options.seed,
        batched=evaluator.clean_run.batched,
        margin_relative=MARGIN_RELATIVE,
        margin_absolute=campaign.margin_absolute,
        notes=tuple(notes),
    )


def failure_vector(
    network: Network,
    neurons: Sequence[int] | None,
    synapses: Sequence[int] | None = None,
    layers: Sequence[str] = (),
) -> FailureVector:
    """The vector of ``--crash``/``--byzantine``/``--synapse`` counts, restricted to ``layers``.

    A single count applies to every selected layer (for synapses: every selected dense
    layer); a list gives one count per selected layer (per hidden layer without ``layers``).
    """
    hidden = network.hidden_layers
    chosen = [network.layer(name).index - 1 for name in layers] if layers else list(range(len(hidden)))
    if len(set(chosen)) != len(chosen):
        raise OptionError("--layer names a layer twice")
    dense = [i for i in chosen if _synapse_capable(hidden[i])]

    def spread(counts: Sequence[int] | None, flag: str, single_targets: list[int]) -> tuple[int, ...]:
        vector = [0] * len(hidden)
        if counts is None:
            return tuple(vector)
        counts = list(counts)
        if len(counts) == 1:
            for i in single_targets:
                vector[i] = counts[0]
        elif len(counts) == len(chosen):
            for i, count in zip(chosen, counts, strict=True):
                vector[i] = count
        else:
            what = "selected layers" if layers else "hidden layers"
            raise OptionError(f"{flag} gives {len(counts)} counts but there are {len(chosen)} {what}")
        return tuple(vector)

    synapse_vector = spread(synapses, "--synapse", dense)
    if synapses is not None and len(list(synapses)) == 1 and not dense and synapses[0] > 0:
        raise OptionError("--synapse needs a dense layer with a [batch, features] input among the selected layers")
    return FailureVector(spread(neurons, "the failure count", chosen), synapse_vector if any(synapse_vector) else ())


def _synapse_capable(layer) -> bool:
    return layer.kind == "dense" and len(layer.in_shape) == 2 and len(layer.out_shape) == 2 and layer.in_shape[0] == 1


def _checked_vectors(network: Network, vectors: Sequence[FailureVector]) -> list[FailureVector]:
    hidden = network.hidden_layers
    vectors = list(vectors) or [FailureVector((1,) * len(hidden))]
    for vector in vectors:
        if len(vector.neurons) != len(hidden) or len(vector.synapse_counts()) != len(hidden):
            raise OptionError(f"a failure vector needs one count per hidden layer ({len(hidden)})")
        for layer, f, s in zip(hidden, vector.neurons, vector.synapse_counts(), strict=True):
            if f < 0 or s < 0:
                raise OptionError(f"failure counts must be ≥ 0, got {f} neurons and {s} synapses in '{layer.name}'")
            if f > layer.neurons:
                raise OptionError(f"cannot fail {f} neurons in layer '{layer.name}', which has {layer.neurons}")
            if s > layer.neurons * layer.fan_in:
                raise OptionError(
                    f"cannot fail {s} synapses in layer '{layer.name}', which has {layer.neurons * layer.fan_in}"
                )
    return vectors


def _sites(network: Network, vectors: list[FailureVector]) -> tuple[FaultSite, ...]:
    sites = []
    for i, layer in enumerate(network.hidden_layers):
        if any(v.neurons[i] for v in vectors):
            sites.append(neuron_site(layer, i))
        if any(v.synapse_counts()[i] for v in vectors):
            sites.append(synapse_site(layer, i))
    return tuple(sites)


def _inputs(network: Network, options: InjectOptions, rng: np.random.Generator):
    sample_shape = tuple(network.input_shape[1:])
    if options.inputs is None:
        lo, hi = network.input_range
        inputs = sample_inputs(options.samples, sample_shape, network.input_range, rng)
        return inputs, None, f"{options.samples} samples uniform in [{lo:g}, {hi:g}] (seed {options.seed})"
    inputs = check_inputs(np.asarray(options.inputs), sample_shape, "given")
    labels = None
    if options.labels is not None:
        classes = int(np.prod(network.clean[network.output_name].shape[1:]))
        labels = check_labels(options.labels, len(inputs), classes, "given")
    return inputs, labels, options.inputs_source or f"{len(inputs)} given inputs"


# --------------------------------------------------------------------------- the campaign


@dataclass
class _Tally:
    configurations: int = 0
    evaluations: int = 0


class _Campaign:
    """Searches fault sets for each vector with one evaluator."""

    def __init__(self, network, sites, options: InjectOptions, inputs, labels, rng, progress):
        self.network, self.sites, self.options = network, sites, options
        self.inputs, self.labels, self.rng = inputs, labels, rng
        self.progress = progress or (lambda phase, done, total: None)
        self.failure = options.failure
        self._impact: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bounds: dict[tuple[int, ...], tuple[PaperBound, TightBound]] = {}

    def start(self, evaluator) -> None:
        """Attach the evaluator and derive the clean-output figures."""
        self.evaluator = evaluator
        clean = evaluator.clean_run.outputs
        self.clean_argmax = clean.argmax(axis=-1)
        self.margin_absolute = MARGIN_ABSOLUTE * max(1.0, float(np.abs(clean).max(initial=0.0)))
        rows = max(1, evaluator.clean_run.rows_per_run)
        self.request_rows = 32 * rows  # a few runs per request: pipe round trips stay negligible

    def clean_accuracy(self) -> float | None:
        """Accuracy of the clean model with labels."""
        if self.labels is None:
            return None
        return float(np.mean(self.clean_argmax == self.labels))

    # ---- evaluation helpers

    def _evaluate(self, batch: FaultBatch, index: np.ndarray | None, tally: _Tally, phase: str):
        """Evaluate a batch in requests sized to keep the child busy; report progress."""
        m = len(self.inputs) if index is None else len(index)
        per_request = max(1, self.request_rows // max(m, 1))
        errors, argmax = [], []
        for start in range(0, batch.count, per_request):
            part = batch.take(slice(start, start + per_request))
            result = self.evaluator.evaluate(part, index)
            errors.append(result.errors)
            argmax.append(result.argmax)
            self.progress(phase, min(start + per_request, batch.count), batch.count)
        tally.configurations += batch.count
        tally.evaluations += batch.count * m
        return np.concatenate(errors), np.concatenate(argmax)

    def _counts(self, vector: FailureVector) -> list[int]:
        synapses = vector.synapse_counts()
        return [vector.neurons[s.hidden_index] if s.kind == "neuron" else synapses[s.hidden_index] for s in self.sites]

    def _methods(self, synapses: tuple[int, ...]) -> tuple[PaperBound, TightBound]:
        """Both bounds for a synapse-failure vector, built once."""
        if synapses not in self._bounds:
            analysis = Analysis(self.network, self.failure, list(synapses))
            paper = PaperBound(analysis)
            self._bounds[synapses] = (paper, tight_or_paper(analysis, paper)[0])
        return self._bounds[synapses]

    def _bound(self, vector: FailureVector) -> tuple[float, float]:
        """(fep_paper, fep_tight = min(tight, paper)) for exactly this vector (SPEC §3)."""
        paper_method, tight_method = self._methods(vector.synapse_counts())
        paper = paper_method.fep(vector.neurons)
        return paper, min(tight_method.fep(vector.neurons), paper)

    # ---- one vector

    def measure(self, vector: FailureVector) -> VectorResult:
        """Search fault sets for ``vector`` and set the measurement beside its bound."""
        counts = self._counts(vector)
        tally = _Tally()
        if self.options.search == "random":
            errors, argmax, sets = self._random(counts, tally)
        else:
            errors, argmax, sets = self._worst(counts, tally)
        paper, tight = self._bound(vector)
        bound = paper if self.options.method == "paper" else tight
        stats = ErrorStats(float(errors.max()), float(errors.mean()), float(np.percentile(errors, 95)))
        limit = bound * (1 + MARGIN_RELATIVE) + self.margin_absolute
        ratio = stats.max / bound if bound > 0 else (None if stats.max == 0 else float("inf"))
        accuracy = None if self.labels is None else float(np.mean(argmax == self.labels[None, :]))
        return VectorResult(
            failures=tuple(vector.neurons),
            synapses=tuple(vector.synapse_counts()),
            measured=stats,
            flip_rate=float(np.mean(argmax != self.clean_argmax[None, :])),
            accuracy=accuracy,
            bound=bound,
            fep_paper=paper,
            fep_tight=tight,
            ratio=ratio,
            violation=bool(stats.max > limit),
            configurations=tally.configurations,
            evaluations=tally.evaluations,
            worst=sets,
        )

    # ---- random search

    def _random(self, counts: list[int], tally: _Tally):
        drawn = [self._random_set(counts) for _ in range(self.options.trials)]
        errors, argmax = self._evaluate(_stack(drawn, self.sites, counts), None, tally, "random fault sets")
        order = np.argsort(-errors.max(axis=1), kind="stable")[:KEEP_WORST]
        sets = tuple(self._fault_set(drawn[int(c)], errors[c]) for c in order)
        return errors, argmax, sets

    def _random_set(self, counts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        chosen = []
        for site, count in zip(self.sites, counts, strict=True):
            size = site.neurons if site.kind == "neuron" else site.neurons * site.fan_in
            ids = np.sort(self.rng.choice(size, count, replace=False)) if count else np.zeros(0, np.int64)
            chosen.append((ids.astype(np.int64), self._random_values(count)))
        return chosen

    def _random_values(self, count: int) -> np.ndarray:
        a, b = self.failure.failure_range
        if self.failure.mode == "crash" or count == 0:
            return np.zeros(count)
        u = self.rng.random(count)
        drawn = self.rng.uniform(a, b, count)
        return np.where(u < 0.25, a, np.where(u < 0.5, b, drawn))

    # ---- worst search

    def _worst(self, counts: list[int], tally: _Tally):
        m = len(self.inputs)
        search_index = np.sort(self.rng.choice(m, min(m, SEARCH_INPUTS), replace=False))
        budget = self._rank_budget() // max(1, sum(1 for c in counts if c))
        for s, count in enumerate(counts):
            if count and s not in self._impact:
                self._impact[s] = self._rank(s, search_index, tally, budget)
        seed = self._top_set(counts)
        objective = _Objective(self, counts, search_index, tally)
        found = [seed]
        if 0 < sum(counts) <= GREEDY_LIMIT:
            found.append(self._greedy(counts, objective))
        best = max(found, key=objective.score)
        found.append(self._swaps(best, counts, objective))
        finals = _unique(found)
        batch = _stack(finals, self.sites, counts)
        errors, argmax = self._evaluate(batch, None, tally, "worst sets on all inputs")
        pick = int(np.argmax(errors.max(axis=1)))
        order = np.argsort(-errors.max(axis=1), kind="stable")[:KEEP_WORST]
        sets = tuple(self._fault_set(finals[int(c)], errors[c]) for c in order)
        return errors[pick : pick + 1], argmax[pick : pick + 1], sets

    def _rank_budget(self) -> int:
        """RANK_BUDGET scaled by the model's cost: Σ_l N_l·fan-in_l multiply-adds per input."""
        macs = sum(layer.neurons * layer.fan_in for layer in self.network.layers)
        scaled = RANK_BUDGET * min(1.0, REFERENCE_MACS / max(macs, 1))
        return int(max(MIN_RANK_BUDGET, scaled))

    def _extremes(self) -> np.ndarray:
        a, b = self.failure.failure_range
        return np.array([0.0]) if self.failure.mode == "crash" else np.array(sorted({a, b}))

    def _rank(self, s: int, search_index: np.ndarray, tally: _Tally, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Impact score and best value per candidate of site s (single failures, one batched pass).

        When the site has more candidates than ``budget`` evaluations allow, the ones the
        tight bound weighs most (max_k P[k, i]·δ_i) are measured; the others keep that
        prior order behind every measured candidate.
        """
        site = self.sites[s]
        if site.kind == "synapse":
            return self._rank_synapses(s, search_index, tally, budget)
        n, values = site.neurons, self._extremes()
        inputs = search_index[: int(np.clip(budget // (n * len(values)), 1, len(search_index)))]
        measured = min(n, max(1, budget // (len(inputs) * len(values))))
        prior = self._prior(site)
        chosen = np.arange(n) if measured == n else np.sort(np.argsort(-prior, kind="stable")[:measured])
        ids = np.tile(chosen, len(values))
        sent = np.repeat(values, len(chosen))
        counts = [1 if k == s else 0 for k in range(len(self.sites))]
        batch = _stack_arrays({s: (ids[:, None], sent[:, None])}, len(ids), self.sites, counts)
        errors, _ = self._evaluate(batch, inputs, tally, f"ranking {site.layer}")
        impact = errors.max(axis=1).reshape(len(values), len(chosen))
        score = prior / (prior.max() + 1.0) - 1.0
        score[chosen] = impact.max(axis=0)
        best = np.full(n, values[-1])
        best[chosen] = values[impact.argmax(axis=0)]
        return score, best

    def _prior(self, site: FaultSite) -> np.ndarray:
        """max_k P[k, i]·δ_i of the tight bound: how much neuron i may move the output."""
        _, tight = self._methods((0,) * len(self.network.hidden_layers))
        if not isinstance(tight, TightBound):  # not computed (memory): no prior, every neuron measured alike
            return np.ones(site.neurons)
        return tight.weighted[site.hidden_index].max(axis=0)

    def _rank_synapses(self, s: int, search_index: np.ndarray, tally: _Tally, budget: int):
        """Synapse impact: measure the heaviest synapse into each neuron, scale by |w_ji|·max|y_i|."""
        site = self.sites[s]
        out, fan_in = site.weight.shape
        magnitude = np.abs(site.weight) * self.network.clean[site.source].abs_max().reshape(1, -1)
        heaviest = magnitude.argmax(axis=1)
        values = self._extremes()
        inputs = search_index[: int(np.clip(budget // (out * len(values)), 1, len(search_index)))]
        ids = np.tile(np.arange(out) * fan_in + heaviest, len(values))
        sent = np.repeat(values, out)
        counts = [1 if k == s else 0 for k in range(len(self.sites))]
        batch = _stack_arrays({s: (ids[:, None], sent[:, None])}, len(ids), self.sites, counts)
        errors, _ = self._evaluate(batch, inputs, tally, f"ranking {site.layer} synapses")
        impact = errors.max(axis=1).reshape(len(values), out)
        per_neuron = impact.max(axis=0)
        top = magnitude[np.arange(out), heaviest]
        scale = np.divide(magnitude, top[:, None], out=np.zeros_like(magnitude), where=top[:, None] > 0)
        score = (per_neuron[:, None] * scale).reshape(-1)
        value = np.repeat(values[impact.argmax(axis=0)], fan_in)
        return score, value

    def _pool(self, s: int, count: int) -> np.ndarray:
        """The best candidates of site s by impact (stable order)."""
        score = self._impact[s][0]
        size = min(len(score), 2 * count + 8)
        return np.argsort(-score, kind="stable")[:size]

    def _top_set(self, counts: list[int]) -> list:
        chosen = []
        for s, count in enumerate(counts):
            if not count:
                chosen.append((np.zeros(0, np.int64), np.zeros(0)))
                continue
            ids = np.sort(self._pool(s, count)[:count])
            chosen.append((ids, self._impact[s][1][ids]))
        return chosen

    def _greedy(self, counts: list[int], objective: _Objective) -> list:
        """Add, one at a time, the candidate that raises the search objective most."""
        current = [(np.zeros(0, np.int64), np.zeros(0)) for _ in counts]
        for _ in range(sum(counts)):
            proposals = []
            for s, count in enumerate(counts):
                if len(current[s][0]) >= count:
                    continue
                for c in self._pool(s, count):
                    if c not in current[s][0]:
                        proposals.append(_with(current, s, int(c), self._impact[s][1][c]))
            scores = objective.scores(proposals, grouped=True)
            current = proposals[int(np.argmax(scores))]
        return current

    def _swaps(self, start: list, counts: list[int], objective: _Objective) -> list:
        """Swap members for pool candidates (byzantine: also flip values); keep improvements."""
        best, best_score = start, objective.score(start)
        budget, stale = self.options.trials, 0
        active = [s for s, c in enumerate(counts) if c]
        values = self._extremes()
        while budget > 0 and active and stale < 3:
            proposals = []
            for _ in range(min(32, budget)):
                s = active[int(self.rng.integers(len(active)))]
                proposals.append(self._neighbour(best, s, counts[s], values))
            budget -= len(proposals)
            scores = objective.scores(proposals)
            top = int(np.argmax(scores))
            if scores[top] > best_score:
                best, best_score, stale = proposals[top], float(scores[top]), 0
            else:
                stale += 1
        return best

    def _neighbour(self, current: list, s: int, count: int, values: np.ndarray) -> list:
        ids, sent = current[s]
        position = int(self.rng.integers(len(ids)))
        pool = [int(c) for c in self._pool(s, count) if c not in ids]
        if len(values) > 1 and (not pool or self.rng.random() < 0.25):
            flipped = sent.copy()
            flipped[position] = values[1] if sent[position] == values[0] else values[0]
            return _replace(current, s, ids, flipped)
        if not pool:
            return current
        new = pool[int(self.rng.integers(len(pool)))]
        ids2, sent2 = ids.copy(), sent.copy()
        ids2[position], sent2[position] = new, self._impact[s][1][new]
        order = np.argsort(ids2)
        return _replace(current, s, ids2[order], sent2[order])

    # ---- reporting

    def _fault_set(self, chosen: list, errors: np.ndarray) -> FaultSet:
        faults = []
        for site, (ids, sent) in zip(self.sites, chosen, strict=True):
            if not len(ids):
                continue
            values = tuple(float(v) for v in sent)
            if site.kind == "neuron":
                faults.append(LayerFaults(site.layer, neurons=tuple(int(i) for i in ids), values=values))
            else:
                pairs = tuple((int(i % site.fan_in), int(i // site.fan_in)) for i in ids)
                faults.append(LayerFaults(site.layer, synapses=pairs, synapse_values=values))
        return FaultSet(tuple(faults), float(errors.max()), int(np.argmax(errors)))


class _Objective:
    """The worst search's objective: the largest error over the search inputs."""

    def __init__(self, campaign: _Campaign, counts, index, tally):
        self.campaign, self.counts, self.index, self.tally = campaign, counts, index, tally

    def scores(self, sets: list, grouped: bool = False) -> np.ndarray:
        """Objective of each set; ``grouped``: sets may differ in their counts per site."""
        if not sets:
            return np.zeros(0)
        out = np.zeros(len(sets))
        keys = [tuple(len(ids) for ids, _ in chosen) for chosen in sets] if grouped else [None] * len(sets)
        for key in dict.fromkeys(keys):
            members = [i for i, k in enumerate(keys) if k == key]
            counts = list(key) if key is not None else self.counts
            batch = _stack([sets[i] for i in members], self.campaign.sites, counts)
            errors, _ = self.campaign._evaluate(batch, self.index, self.tally, "worst-case search")
            out[members] = errors.max(axis=1)
        return out

    def score(self, chosen: list) -> float:
        """Objective of one set."""
        return float(self.scores([chosen], grouped=True)[0])


# --------------------------------------------------------------------------- fault-set plumbing


def _with(current: list, s: int, candidate: int, value: float) -> list:
    ids, sent = current[s]
    ids2 = np.append(ids, candidate)
    sent2 = np.append(sent, value)
    order = np.argsort(ids2)
    return _replace(current, s, ids2[order], sent2[order])


def _replace(current: list, s: int, ids: np.ndarray, sent: np.ndarray) -> list:
    copy = list(current)
    copy[s] = (ids, sent)
    return copy


def _unique(sets: list) -> list:
    seen, out = set(), []
    for chosen in sets:
        key = tuple((tuple(ids.tolist()), tuple(sent.tolist())) for ids, sent in chosen)
        if key not in seen:
            seen.add(key)
            out.append(chosen)
    return out


def _stack(sets: list, sites: tuple[FaultSite, ...], counts: list[int]) -> FaultBatch:
    """A batch from fault sets (per site: ids, values) that share ``counts``."""
    arrays = {}
    for s, count in enumerate(counts):
        if count:
            ids = np.stack([chosen[s][0] for chosen in sets]).astype(np.int64)
            sent = np.stack([chosen[s][1] for chosen in sets]).astype(np.float64)
            arrays[s] = (ids, sent)
    return _stack_arrays(arrays, len(sets), sites, counts)


def _stack_arrays(arrays: dict, count: int, sites: tuple[FaultSite, ...], counts: list[int]) -> FaultBatch:
    neurons, synapses = {}, {}
    for s, (ids, sent) in arrays.items():
        if sites[s].kind == "neuron":
            neurons[s] = (ids, sent)
        else:
            fan_in = sites[s].fan_in
            synapses[s] = (ids % fan_in, ids // fan_in, sent)
    return FaultBatch(count, neurons, synapses)


# --------------------------------------------------------------------------- bound --empirical


def empirical_bound(
    path: str | Path,
    bound_options: BoundOptions,
    result: BoundResult,
    inputs: np.ndarray | None = None,
    inputs_source: str = "",
    samples: int = 64,
    seed: int = 0,
    trials: int = 50,
    isolate: bool = True,
    limits: Limits = Limits(),
    progress: Progress | None = None,
) -> BoundResult:
    """``bound --empirical``: the worst-case search at each layer's ``max_failures`` m and m + 1.

    Each hidden layer fails alone. ``result.empirical[layer]`` gets ``summary`` (for the
    table), and per count the measured error, the bound and the violation flag.
    """
    _, network = load_network(path, bound_options.network, bound_options.include_output_layer)
    hidden = network.hidden_layers
    vectors, owners = [], []
    for i, layer in enumerate(result.layers):
        tolerated = max(layer.max_failures, 0)
        for count in sorted({tolerated, min(tolerated + 1, hidden[i].neurons)}):
            neurons = [0] * len(hidden)
            neurons[i] = count
            vectors.append(FailureVector(tuple(neurons)))
            owners.append((layer.name, count))
    options = InjectOptions(
        failure=bound_options.failure,
        vectors=tuple(vectors),
        epsilon=bound_options.epsilon,
        method=bound_options.method,
        search="worst",
        trials=trials,
        seed=seed,
        inputs=inputs,
        inputs_source=inputs_source,
        samples=samples,
        isolate=isolate,
        limits=limits,
    )
    measured = run_injection(network, options, result.model, progress)
    empirical: dict[str, dict] = {}
    for (name, count), vector in zip(owners, measured.vectors, strict=True):
        entry = empirical.setdefault(name, {"summary": "", "counts": []})
        entry["counts"].append(
            {"failures": count, "measured": vector.measured.max, "bound": vector.bound, "violation": vector.violation}
        )
    for entry in empirical.values():
        entry["summary"] = " · ".join(f"{c['measured']:.4g} @{c['failures']}" for c in entry["counts"])
    note = (
        f"measured: worst-case search (seed {seed}, {trials} swap proposals) on {measured.inputs.source}, "
        "each layer failing alone at max_failures and one more"
    )
    return replace(result, empirical=empirical, notes=result.notes + (note,) + measured.notes)
