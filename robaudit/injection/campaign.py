"""Fault-injection campaigns (docs/method.md §8.3): measured errors set beside the Fep bound.

:func:`run_injection` instruments the model once (:mod:`robaudit.injection.instrument`),
evaluates fault configurations in batches (:mod:`robaudit.injection.sandbox`) and, per
failure vector f, reports the error ``err(x) = max_k |F̃_k(x) − F_k(x)|`` (docs/method.md §1.1):

* ``random`` search: ``trials`` uniform failure sets (byzantine values drawn in
  [a, b], a quarter at a, a quarter at b), every one on every input; the
  statistics run over all (set × input) pairs;
* ``worst`` search: every candidate neuron (synapse) fails alone in one batched
  pass on a few inputs; the top sets by that impact seed a greedy construction and
  ``trials`` swap proposals; byzantine values take the extreme (a or b) with the
  larger measured impact. The statistics run over the inputs for the worst set.

A measured error above ``bound·(1 + 1e-5) + 1e-6·max(1, max_x ‖F(x)‖∞)`` — the
bound plus a float32 margin — is a violation (docs/method.md §10.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info, settings_for
from robaudit.bounds.bound import CombinedBound, PaperMethod, make_bounds
from robaudit.bounds.fep import Analysis
from robaudit.bounds.results import ModelInfo
from robaudit.errors import OptionError
from robaudit.graph.inputs import feed_box, sample_feed
from robaudit.graph.network import Network, NetworkOptions
from robaudit.injection.instrument import FaultSite, feed_shape, instrument, neuron_site, synapse_site
from robaudit.injection.results import FailureVector, InjectOptions, InjectResult, InputsInfo, Progress, Sizing
from robaudit.injection.sandbox import open_evaluator
from robaudit.injection.search import MARGIN_RELATIVE, Campaign
from robaudit.injection.statistics import fault_set_population, sample_size
from robaudit.injection.workers import open_runner
from robaudit.inputs import check_inputs, check_labels, outside_domain, sample_inputs, suggested_range
from robaudit.limits import max_inputs_bytes

# --------------------------------------------------------------------------- options and results


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
    """Measure the output error of the failure vectors in ``options`` on the real model (docs/method.md §8).

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
    network.require_hidden_layers()
    given = options.vectors
    if not given and (options.failures is not None or options.synapses is not None):
        given = (failure_vector(network, options.failures or (0,), options.synapses, (), options.failure.count_flag),)
    vectors = _checked_vectors(network, given)
    rng = np.random.default_rng(options.seed)
    inputs, labels, source = campaign_inputs(network, options, rng)
    first = vectors[0]
    bound_options = BoundOptions(
        epsilon=options.epsilon,
        failure=options.failure,
        method=options.method,
        failures=first.neurons,
        synapses=first.synapse_counts(),
    )
    built: list[CombinedBound] = []

    def build(analysis: Analysis) -> tuple[PaperMethod, CombinedBound]:
        paper, tight = make_bounds(analysis)
        built.append(tight)
        return paper, tight

    layers = bound_network(network, bound_options, model, options.capacity, build).layers
    sites = fault_sites(network, vectors, options.failure.stored)
    sends_values = options.failure.failure_range != (0.0, 0.0)
    spec = instrument(network, sites, model.opset, sends_values, options.failure.stuck)
    options, sizing = sized(options, spec.sites, vectors, sends_values)
    campaign = Campaign(network, spec.sites, options, inputs, labels, rng, progress)
    campaign.share_bounds(built)  # the first vector's bound, computed once for the layer table and the vector
    evaluator = open_runner(spec, inputs, options.limits, options.isolate, options.runner)
    campaign.reopen = lambda x: open_evaluator(spec, x, options.limits, options.isolate)
    try:
        campaign.start(evaluator)
        results = tuple(campaign.measure(vector) for vector in vectors)
    finally:
        evaluator.close()
    notes = list(spec.notes if evaluator.clean_run.batched else ()) + list(evaluator.clean_run.notes)
    notes += [*campaign.notes, *synapse_spread_note(network, options.synapses, vectors)]
    fraction = outside_domain(inputs, feed_box(network.inputs, network.packed))
    covering = suggested_range(inputs) if fraction > 0 and not network.packed else None
    if fraction > 0 and covering is None:
        notes.append(
            f"{fraction:.1%} of the input elements lie outside the input domain {list(network.input_range)}; "
            "the bound assumes inputs inside it"
        )
    if covering is not None:
        lo, hi = network.input_range
        notes.append(
            f"{fraction:.1%} of the input elements lie outside the input range [{lo:g}, {hi:g}] (the data lies within "
            f"[{covering[0]:g}, {covering[1]:g}]); the bound assumes inputs inside it, so a measured error above "
            f"it is expected, not a defect: rerun with --input-range {covering[0]:g},{covering[1]:g}"
        )
    return InjectResult(
        model=model,
        settings=settings_for(bound_options, network, options.capacity),
        layers=layers,
        vectors=results,
        inputs=InputsInfo(source, len(inputs), fraction, labels is not None, campaign.clean_accuracy(), covering),
        search=options.search,
        trials=options.trials,
        seed=options.seed,
        batched=evaluator.clean_run.batched,
        margin_relative=MARGIN_RELATIVE,
        margin_absolute=campaign.margin_absolute,
        notes=tuple(notes),
        sizing=sizing,
        shard=options.runner.shard,
    )


def sized(
    options: InjectOptions, sites: Sequence[FaultSite], vectors: Sequence[FailureVector], sends_values: bool
) -> tuple[InjectOptions, Sizing | None]:
    """With ``options.margin``: the options with ``trials`` from the sizing formula (docs/method.md §8.3).

    N per vector is Π over fault sites of C(candidates, failing); byzantine values are
    continuous, so N is infinite there.
    """
    if options.margin is None:
        return options, None
    populations: list[int | None] = []
    for vector in vectors:
        synapses = vector.synapse_counts()
        counts = [vector.neurons[s.hidden_index] if s.kind == "neuron" else synapses[s.hidden_index] for s in sites]
        sizes = [s.neurons if s.kind == "neuron" else s.neurons * s.fan_in for s in sites]
        populations.append(None if sends_values else fault_set_population(sizes, counts))
    trials = max(sample_size(n, options.margin, options.confidence) for n in populations)
    return replace(options, trials=trials), Sizing(options.margin, options.confidence, tuple(populations), trials)


def failure_vector(
    network: Network,
    neurons: Sequence[int] | None,
    synapses: Sequence[int] | None = None,
    layers: Sequence[str] = (),
    count_flag: str = "--crash/--byzantine",
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
            raise OptionError(
                f"{len(chosen)} {what}, {len(counts)} counts given ({flag}): give one count for every layer "
                f"or one per {what[:-1]}"
            )
        return tuple(vector)

    synapse_vector = spread(synapses, "--synapse", dense)
    if synapses is not None and len(list(synapses)) == 1 and not dense and synapses[0] > 0:
        raise OptionError("--synapse needs a dense layer with a [batch, features] input among the selected layers")
    return FailureVector(spread(neurons, count_flag, chosen), synapse_vector if any(synapse_vector) else ())


def synapse_spread_note(
    network: Network, synapses: Sequence[int] | None, vectors: Sequence[FailureVector]
) -> list[str]:
    """Where one ``--synapse N`` was spread over the dense layers only, which layers took it: ``bound --synapse N``
    puts N in every hidden layer (a new-user trial compared the two figures, 5.31 and 53.13, for "--synapse 1")."""
    if synapses is None or len(list(synapses)) != 1 or not vectors or not vectors[0].synapses:
        return []
    hidden = network.hidden_layers
    counts = vectors[0].synapse_counts()
    skipped = [la.name for la, s in zip(hidden, counts, strict=True) if not s and not _synapse_capable(la)]
    if not skipped:
        return []
    vector = ",".join(str(s) for s in counts)
    return [
        f"--synapse {synapses[0]} fails synapses of the dense layers only ({vector} per hidden layer; none in "
        f"{', '.join(skipped)}): the bound shown is that vector's, as `bound --synapse {vector}` gives it"
    ]


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


def fault_sites(network: Network, vectors: list[FailureVector], stored: bool = False) -> tuple[FaultSite, ...]:
    sites = []
    for i, layer in enumerate(network.hidden_layers):
        if any(v.neurons[i] for v in vectors):
            sites.append(neuron_site(layer, i, stored, network.sample_shape(layer.output_value)))
        if any(v.synapse_counts()[i] for v in vectors):
            sites.append(synapse_site(layer, i))
    return tuple(sites)


def _check_draw_size(samples: int, sample_shape: tuple[int, ...]) -> None:
    """Refuse ``--samples`` whose draw would take more than inputs may (``ROBAUDIT_MAX_INPUTS_BYTES``, as for an inputs
    file): the float32 inputs and the float64 draw they are made from, 12 bytes per element.

    Raises OptionError naming the count, the bytes and the limit (a trial's ``--samples 1000000000`` was reported as
    a model too large to analyse)."""
    need = 12 * samples * int(np.prod(sample_shape, dtype=np.float64))
    limit = max_inputs_bytes()
    if need > limit:
        raise OptionError(
            f"--samples {samples} would draw {need / 2**30:.3g} GiB of inputs ({int(np.prod(sample_shape))} values "
            f"each), more than the {limit / 2**30:.3g} GiB inputs may take (ROBAUDIT_MAX_INPUTS_BYTES): draw fewer"
        )


def campaign_inputs(network: Network, options: InjectOptions, rng: np.random.Generator):
    """The inputs to inject on: the given ones, or samples drawn from the input domain.

    A model with several (token, held) inputs is fed one packed vector per sample
    (docs/method.md §12.3); given inputs must then be in that layout.
    """
    sample_shape = feed_shape(network)
    if options.inputs is None:
        _check_draw_size(options.samples, sample_shape)
        lo, hi = network.input_range
        if network.packed or network.inputs[0].source != "--input-range":
            inputs = sample_feed(network.inputs, options.samples, rng, network.packed)
            return inputs, None, f"{options.samples} samples uniform over the input domain (seed {options.seed})"
        inputs = sample_inputs(options.samples, sample_shape, network.input_range, rng)
        return inputs, None, f"{options.samples} samples uniform in [{lo:g}, {hi:g}] (seed {options.seed})"
    inputs = check_inputs(np.asarray(options.inputs), sample_shape, "given")
    labels = None
    if options.labels is not None:
        classes = int(np.prod(network.clean[network.output_name].shape[1:]))
        labels = check_labels(options.labels, len(inputs), classes, "given")
    return inputs, labels, options.inputs_source or f"{len(inputs)} given inputs"


# --------------------------------------------------------------------------- the campaign


# --------------------------------------------------------------------------- fault-set plumbing


# --------------------------------------------------------------------------- bound --empirical
