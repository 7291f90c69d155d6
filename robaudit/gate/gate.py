"""``robaudit check``: evaluate every model of a policy against its requirements (README "Commands").

One model file is loaded once; the bound (docs/method.md §3.1) is computed once per failure mode
the policy uses, and every requirement is read off it: ``uniform`` against the largest
uniform count, ``layer`` against that layer's largest count when it fails alone,
``total`` against the largest total budget. An unmet requirement gets weight targets
that would meet it (:mod:`robaudit.gate.remedy`). The baseline and the empirical
requirement add one verdict each.
"""

from __future__ import annotations

import re
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
from robaudit.bounds.bound import Bound, CombinedBound, PaperMethod, make_bounds, vectors_within
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.results import BoundResult, ModelInfo, Reportable
from robaudit.errors import InputDataError, PolicyError, RobauditError
from robaudit.gate.baseline import BoundView, compare_model, load_baseline, view_of
from robaudit.gate.policy import ModelPolicy, Policy, Requirement, display_path, per_layer
from robaudit.gate.remedy import Remedy, remedy, try_remedies
from robaudit.graph.network import Network, NetworkOptions
from robaudit.options import Method

if TYPE_CHECKING:
    from robaudit.gate.empirical import EmpiricalOutcome

#: Verdict states.
PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one requirement for one model."""

    #: The policy key of the requirement (``require.crash``, ``require.layers.fc1``, ``baseline``, ...).
    key: str
    #: ``uniform``, ``layer``, ``total``, ``baseline`` or ``empirical``.
    kind: str
    #: Failure mode it was evaluated in.
    mode: str
    #: ``pass``, ``fail`` or ``skip`` (nothing to compare: not met, fails the check unless skips are allowed).
    status: str
    #: What the policy asks: a failure count (an error for ``empirical``); None for ``baseline``.
    required: int | float | None
    #: What the model achieves, in the same unit; None when not applicable.
    achieved: int | float | None
    #: One line for people: what was compared and why it passed or failed.
    detail: str = ""
    #: For an unmet bound requirement: the weights that would meet it.
    remedy: Remedy | None = None
    #: Neurons the count is capped at (a layer's N_l; for uniform the largest N_l), for display.
    limit: int | None = None
    #: What a passing requirement's reader must know (its inputs lie outside the input range), or "".
    warning: str = ""
    #: Whether the entry's ε decides it (not for certificates of an output with classes: the class kept does).
    epsilon_used: bool = True


@dataclass(frozen=True)
class ModelCheck:
    """One model file checked against one policy entry."""

    model: ModelInfo
    #: The policy entry's path or glob that matched the file.
    pattern: str
    #: The bound in each failure mode used; the entry's own mode first.
    bounds: tuple[BoundResult, ...]
    verdicts: tuple[Verdict, ...]
    #: Seconds spent reading the model and building its layer graph.
    load_seconds: float
    #: Seconds spent on the whole model (load included).
    seconds: float
    #: Why the model (or an inputs file of its entry) is unusable, in one line; None when it was checked.
    #: Such a model has no bounds and no verdicts, and makes ``check`` exit 2 after reporting the others.
    error: str | None = None

    @property
    def passed(self) -> bool:
        """True when the model was checked and no requirement failed."""
        return self.error is None and all(v.status != FAIL for v in self.verdicts)


@dataclass(frozen=True)
class CheckResult(Reportable):
    """Output of ``robaudit check``."""

    #: Where the policy came from.
    source: str
    models: tuple[ModelCheck, ...]
    #: The baseline report compared with, if any.
    baseline: str | None = None
    #: Whether a skipped requirement may pass the check (``--allow-skipped``); otherwise it is not met.
    allow_skipped: bool = False

    @property
    def passed(self) -> bool:
        """True when every model meets its policy (a skipped requirement counts only with ``allow_skipped``)."""
        return all(m.passed for m in self.models) and (self.allow_skipped or not self.skipped())

    def skipped(self) -> list[tuple[ModelCheck, Verdict]]:
        """Every requirement that could not be evaluated, with its model."""
        return [(m, v) for m in self.models for v in m.verdicts if v.status == SKIP]

    def failed(self) -> list[tuple[ModelCheck, Verdict]]:
        """Every unmet requirement with its model."""
        return [(m, v) for m in self.models for v in m.verdicts if v.status == FAIL]

    def unusable(self) -> list[ModelCheck]:
        """Every model that could not be checked (its :attr:`ModelCheck.error` says why)."""
        return [m for m in self.models if m.error is not None]


# --------------------------------------------------------------------------- options


def network_options(entry: ModelPolicy) -> NetworkOptions:
    """How to read the entry's models."""
    return NetworkOptions(
        input_shape=entry.input_shape, output=entry.output, input_range=entry.input_range, ranges=entry.ranges
    )


def bound_options(entry: ModelPolicy, mode: str) -> BoundOptions:
    """The bound options of the entry in one failure mode (docs/method.md §2.1)."""
    if mode == "crash":
        failure = FailureModel.crash(entry.activation_bound)
    elif mode == "bit_flip":
        failure = FailureModel.bit_flip(entry.bit, entry.activation_bound)
    elif mode == "stuck_at":
        assert entry.stuck_at is not None  # the policy reader refuses stuck-at bits without their value
        failure = FailureModel.stuck_at(entry.stuck_at, entry.bit, entry.activation_bound)
    else:
        failure = FailureModel.byzantine(entry.capacity, entry.failure_range, entry.activation_bound)
    return BoundOptions(epsilon=entry.epsilon, failure=failure, method=entry.method, network=network_options(entry))


def find_layer(network: Network, key: str, model: str) -> int:
    """0-based hidden-layer position of a layer given by name or 1-based index."""
    hidden = network.hidden_layers
    for position, layer in enumerate(hidden):
        if layer.name == key:
            return position
    if key.isdigit() and 1 <= int(key) <= len(hidden):
        return int(key) - 1
    names = ", ".join(f"{la.index} {la.name}" for la in hidden)
    raise PolicyError(f"'require.layers.{key}': model '{model}' has no hidden layer '{key}' (hidden layers: {names})")


# --------------------------------------------------------------------------- verdicts


def _figure(requirement: Requirement, network: Network, bound: BoundResult) -> tuple[int, int, int | None, str]:
    """(achieved count, neurons it is capped at, 0-based layer for ``layer``, what is asked in words)."""
    hidden = network.hidden_layers
    count, mode = requirement.count, requirement.mode
    if requirement.kind == "uniform":
        return bound.uniform, max(la.neurons for la in hidden), None, f"{count} {mode} failure(s) in every hidden layer"
    if requirement.kind == "layer":
        index = find_layer(network, requirement.layer or "", bound.model.path)
        what = f"{count} {mode} failure(s) in layer '{hidden[index].name}' alone"
        return bound.layers[index].max_failures, hidden[index].neurons, index, what
    return bound.total, sum(la.neurons for la in hidden), None, f"any {count} {mode} failure(s) anywhere"


@dataclass(frozen=True)
class RemedyInputs:
    """What an unmet requirement's remedies are tried on (docs/method.md §9.2): the model file and
    the policy's inputs (None: samples of the domain, no ``harden``) with their labels."""

    path: str
    inputs: Path | None = None
    #: A labels file (``FILE`` or ``FILE.npz:key``); None: no accuracy figures.
    labels: str | None = None


def requirement_verdict(
    requirement: Requirement,
    network: Network,
    bound: BoundResult,
    options: BoundOptions,
    with_remedy: bool = True,
    trial: RemedyInputs | None = None,
    method: Bound | None = None,
) -> Verdict:
    """Compare a requirement with the bound's inverse-problem figures (docs/method.md §6); weight targets if
    unmet, tried on ``trial``'s inputs beside range restriction when given (docs/method.md §9.2). ``method``: the
    bound ``bound`` was computed with, for a uniform count the searched figure does not show (each vector below
    it then refined: :func:`~robaudit.bounds.bound.vectors_within`)."""
    achieved, limit, index, what = _figure(requirement, network, bound)
    met = achieved >= requirement.count
    keeps = "keeps" if met else "is not shown to keep"
    notes = [f"{what} {keeps} Fep ≤ ε = {bound.settings.epsilon:g} ({bound.settings.method} bound)"]
    epsilon = bound.settings.epsilon
    if not met and method is not None and requirement.kind == "uniform" and requirement.count <= limit:
        assert epsilon is not None  # a policy's entry always has its ε
        met, note = _uniform_by_vectors(method, requirement.count, epsilon, achieved)
        achieved = requirement.count if met else achieved  # at least the count asked, shown vector by vector
        notes = [f"{what} {'keeps' if met else keeps} Fep ≤ ε = {epsilon:g} ({bound.settings.method} bound{note})"]
    if requirement.kind == "total" and not bound.total_exact:
        notes.append(f"the budget search stopped at {achieved}; the true budget may be larger")
    if requirement.count > limit:
        notes.append(f"only {limit} neurons can fail")
    fix = None
    if not met and with_remedy and requirement.count <= limit:
        fix = remedy(network, options, requirement.kind, requirement.count, index)
        if trial is not None and not fix.unscalable:  # unbounded: harden's figure still helps
            fix = try_remedies(fix, trial.path, network, options, (requirement.kind, requirement.count, index),
                               trial.inputs, trial.labels)
    status = PASS if met else FAIL
    return Verdict(
        requirement.key,
        requirement.kind,
        requirement.mode,
        status,
        requirement.count,
        achieved,
        "; ".join(notes),
        fix,
        limit,
    )


def _uniform_by_vectors(method: Bound, count: int, epsilon: float, searched: int) -> tuple[bool, str]:
    """(met, what to add to the verdict's line) when the searched uniform count ``searched`` is below ``count``:
    every vector ≤ (count, …, count) with its own refined bound (docs/method.md §6.2)."""
    shown, refined = vectors_within(method, count, epsilon)
    if shown is None:
        return False, f"; too many vectors below it to refine each, the searched uniform count is {searched}"
    if shown:
        return True, f": every vector below it within ε with its own bound, {refined} refined one by one; " \
            f"the searched uniform count, {searched}, reads bounds that never decrease as a count grows"
    return False, ""


def baseline_verdict(baseline: tuple[BoundView, ...], bounds: tuple[BoundResult, ...], mode: str) -> Verdict:
    """Fail when a tolerated-failure figure is lower than in the baseline report."""
    result = compare_model(baseline, [view_of(b) for b in bounds])
    if not result.compared:
        return Verdict("baseline", "baseline", mode, SKIP, None, None, result.note)
    if result.drops:
        drops = "; ".join(f"{d.what} {d.before} → {d.after}" for d in result.drops)
        detail = f"tolerated failures dropped: {drops}"
    else:
        detail = f"no drop in {result.figures} tolerated-failure figures" if result.figures else ""
    if result.note:
        detail = f"{detail}; {result.note}" if detail else result.note
    return Verdict("baseline", "baseline", mode, FAIL if result.drops else PASS, None, len(result.drops), detail)


def empirical_verdicts(outcome: EmpiricalOutcome, mode: str) -> list[Verdict]:
    """The measured worst error against ``max_error`` (a measurement above the bound always fails),
    and the accuracy under failures against ``min_accuracy`` when one is asked (docs/method.md §8)."""
    vector = list(outcome.failures)
    where = f"an input moved in the domain from {outcome.source}" if outcome.moved else outcome.source
    detail = (
        f"largest measured error {outcome.max_error:.4g} for failures {vector} on {where} "
        f"({outcome.search} search, {outcome.configurations} fault sets); bound {outcome.bound:.4g}"
    )
    if outcome.violation:
        detail += "; MEASURED ERROR ABOVE THE BOUND: a defect, or inputs outside the input range"
    detail = "; ".join([detail, *outcome.notes])
    exceeds = outcome.max_error > outcome.allowed_error  # the comparison of inject's exceeds_epsilon
    if exceeds:
        limit = "ε" if outcome.allowed_error == outcome.epsilon else "max_error"
        detail += f"; exceeds {limit} = {outcome.allowed_error:g}"
        if outcome.max_error > outcome.epsilon:  # under a max_error below ε the model may still be ε-robust
            detail += ": not ε-robust for these failures"
    error_ok = not exceeds and not outcome.violation
    verdicts = [
        Verdict(
            "empirical.max_error",
            "empirical",
            mode,
            PASS if error_ok else FAIL,
            outcome.allowed_error,
            outcome.max_error,
            detail,
            warning=outcome.outside,
        )
    ]
    if outcome.min_accuracy is not None and outcome.accuracy is not None:
        accuracy_ok = outcome.accuracy >= outcome.min_accuracy
        verdicts.append(
            Verdict(
                "empirical.min_accuracy",
                "accuracy",
                mode,
                PASS if accuracy_ok else FAIL,
                outcome.min_accuracy,
                outcome.accuracy,
                f"accuracy {outcome.accuracy:.4g} under failures {vector} on {outcome.source} "
                f"({_accuracy_search(outcome)})",
            )
        )
    return verdicts


def _accuracy_search(outcome: EmpiricalOutcome) -> str:
    """Which fault sets the accuracy is over: the worst search's are the bad ones, not typical failures (a new user
    read 0.18 under a worst search against a clean 0.45 without being told)."""
    if outcome.search == "worst":
        return "over the worst search's fault sets, bad ones by design; search: random for typical failures"
    return f"{outcome.search} search, {outcome.configurations} fault sets"


def certified_verdict(entry: ModelPolicy, network: Network, workers: int = 1) -> Verdict:
    """The fraction of the entry's inputs certified (docs/method.md §7) against ``min_fraction``.

    ``workers`` > 1 certifies the inputs in that many processes (the same verdict).
    """
    from robaudit.bounds.certify import certify_inputs, output_has_classes
    from robaudit.injection.instrument import load_feed
    from robaudit.inputs import load_labels

    req = entry.certified
    assert req is not None and entry.inputs is not None
    x, where = load_feed(display_path(entry.inputs), network)  # named as the models are
    labels = None
    classes = output_has_classes(network) if req.classes is None else req.classes
    if entry.labels is not None and classes:  # labels of an output without classes serve the empirical check only
        labels, _ = load_labels(entry.labels, len(x), int(network.clean[network.tail_start].lo.size))
    failure = bound_options(entry, req.mode).failure
    hidden = network.hidden_layers
    asked = per_layer(req.counts, [la.name for la in hidden], f"require.certified.{req.mode}")
    counts = [min(c, la.neurons) for c, la in zip(asked, hidden, strict=True)]
    result = certify_inputs(
        network, failure, x, counts, entry.epsilon, req.radius, labels, layer_counts=False, workers=workers,
        classes=classes,
    )
    met = result.certified_fraction >= req.min_fraction
    around = "" if req.radius is None else f" (every input within {req.radius:g})"
    detail = (
        f"{result.certified_fraction:.1%} of {len(x)} inputs of {where}{around} certified under "
        f"{_per_layer(req.counts, req.mode)}; largest certificate {result.max_bound:.4g}"
    )
    if result.certified_accuracy is not None:
        detail += f"; certified accuracy {result.certified_accuracy:.1%}"
    if classes:
        detail += "; certified: the predicted class cannot change (ε is not used)"
    return Verdict(
        "require.certified", "certified", req.mode, PASS if met else FAIL, req.min_fraction,
        result.certified_fraction, detail, epsilon_used=not classes,
    )


# --------------------------------------------------------------------------- the check


def check_model(
    path: str,
    entry: ModelPolicy,
    baseline: tuple[BoundView, ...] | None = None,
    with_remedy: bool = True,
    workers: int = 1,
) -> ModelCheck:
    """Load one model and evaluate every requirement of its policy entry (certificates in ``workers`` processes).

    Raises:
        RobauditError: the model (or an inputs file of its entry) is unusable; the message names the model, which a
            policy's glob does not (:func:`_naming`).
    """
    with _naming(path):
        return _check_model(path, entry, baseline, with_remedy, workers)


@contextmanager
def _naming(path: str) -> Iterator[None]:
    """Prefix the message of a :class:`RobauditError` raised in the block with ``path`` (unless it names it already):
    with several models, 'unsupported op Sign at node /Sign' alone does not say which export broke."""
    try:
        yield
    except RobauditError as exc:
        if exc.args and isinstance(exc.args[0], str):
            message = policy_terms(exc.args[0])
            exc.args = (message if path in message else f"{path}: {message}", *exc.args[1:])
        raise


#: The flags the readers' messages name, and the policy keys that set the same (a check reads both).
POLICY_KEYS = {"--input-shape": "input_shape", "--input-range": "input_range", "--inputs": "inputs"}


def policy_terms(message: str) -> str:
    """A reader's message in a policy's terms too: '--input-range 0,16 covers them' → 'input_range: [0, 16] (or
    --input-range 0,16) covers them', a flag → "'key' (--flag)" (a new-user trial read '--input-shape gives 32'
    about a policy's 'input_shape')."""
    message = re.sub(r"--input-range (-?[\d.e+-]+),(-?[\d.e+-]+) covers them",
                     r"input_range: [\1, \2] (or --input-range \1,\2) covers them", message)
    for flag, key in POLICY_KEYS.items():
        # a flag with its value after it is a command to type: left as it is
        message = re.sub(rf"(?<![\w(-]){re.escape(flag)}(?![\w-]| -?\d)", f"'{key}' ({flag})", message, count=1)
    return message


def _check_model(
    path: str, entry: ModelPolicy, baseline: tuple[BoundView, ...] | None, with_remedy: bool, workers: int
) -> ModelCheck:
    start = time.perf_counter()
    loaded, network = load_network(path, network_options(entry))
    load_seconds = time.perf_counter() - start
    info = model_info(loaded)
    options = {mode: bound_options(entry, mode) for mode in entry.modes}
    built: dict[str, Bound] = {}
    bounds = {
        mode: bound_network(network, opts, info, entry.capacity if mode == "byzantine" else None,
                            _keeping(built, mode, opts))
        for mode, opts in options.items()
    }
    trial = _remedy_inputs(path, entry) if with_remedy else None
    verdicts = [
        requirement_verdict(req, network, bounds[req.mode], options[req.mode], with_remedy, trial, built[req.mode])
        for req in entry.requirements
    ]
    if baseline is not None:
        verdicts.append(baseline_verdict(baseline, tuple(bounds.values()), entry.mode))
    if entry.certified is not None:
        verdicts.append(certified_verdict(entry, network, workers))
    if entry.empirical is not None:
        from robaudit.gate.empirical import measure  # onnxruntime: imported only when a policy asks

        capacity = entry.capacity if entry.mode == "byzantine" else None
        outcome = measure(entry.empirical, network, options[entry.mode], info, capacity)
        verdicts += empirical_verdicts(outcome, entry.mode)
    seconds = time.perf_counter() - start
    return ModelCheck(info, entry.pattern, tuple(bounds.values()), tuple(verdicts), load_seconds, seconds)


def _keeping(built: dict[str, Bound], mode: str, options: BoundOptions) -> Callable[[Analysis], tuple]:
    """The bounds' factory of :func:`bound_network`, keeping the selected method's bound in ``built[mode]``."""

    def build(analysis: Analysis) -> tuple[PaperMethod, CombinedBound]:
        paper, tight = make_bounds(analysis)
        built[mode] = tight if options.method is Method.TIGHT else paper
        return paper, tight

    return build


def _remedy_inputs(path: str, entry: ModelPolicy) -> RemedyInputs:
    """The entry's inputs (``inputs``, else ``empirical.inputs``) and labels (``labels``, or a labels
    array of the ``.npz``), for trying the remedies of unmet requirements."""
    from robaudit.inputs import LABEL_KEYS

    inputs, labels_file = entry.inputs, entry.labels
    if inputs is None and entry.empirical is not None:
        inputs, labels_file = entry.empirical.inputs, entry.empirical.labels
    if inputs is None:
        return RemedyInputs(path)
    source: str | None = str(labels_file) if labels_file is not None else None
    if source is None and inputs.suffix.lower() == ".npz":
        try:
            with np.load(inputs, allow_pickle=False) as archive:
                key = next((k for k in LABEL_KEYS if k in archive.files), None)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputDataError(f"inputs file '{inputs}' is not a readable .npz file ({type(exc).__name__})") from None
        source = None if key is None else f"{inputs}:{key}"
    return RemedyInputs(path, inputs, source)


def run_check(
    policy: Policy,
    baseline: Path | None = None,
    with_remedy: bool = True,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
    allow_skipped: bool = False,
) -> CheckResult:
    """Check every model of the policy; ``progress`` is told each model path before it starts.

    ``workers`` > 1 checks the models in that many processes (same result, same order); with
    fewer models than workers, each model's certificates get the workers left over.
    """
    views = load_baseline(baseline) if baseline is not None else None
    paths = [(path, entry) for entry in policy.models for path in entry.paths]
    inner = max(1, workers // max(1, len(paths)))
    jobs = [(path, entry, views, with_remedy, inner) for path, entry in paths]
    if workers > 1:  # models in parallel processes; the results keep the policy's order
        from robaudit.injection.workers import map_in_processes

        for path, *_ in jobs:
            if progress is not None:
                progress(path)
        checks = map_in_processes(_check_job, jobs, workers)
    else:
        checks = []
        for job in jobs:
            if progress is not None:
                progress(job[0])
            checks.append(_check_job(job))
    return CheckResult(policy.source, tuple(checks), None if baseline is None else str(baseline), allow_skipped)


def _check_job(job: tuple) -> ModelCheck:
    """:func:`check_model` on one (path, entry, baseline, with_remedy, workers) tuple (picklable for workers); an
    unusable model becomes a :class:`ModelCheck` with its error, so the other models are still checked and
    reported (a CI job uploads the report whatever the exit code)."""
    path, entry = job[0], job[1]
    start = time.perf_counter()
    try:
        return check_model(*job)
    except RobauditError as exc:
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        return ModelCheck(ModelInfo(path, _sha256_or_empty(path), "", 0), entry.pattern, (), (),
                          0.0, time.perf_counter() - start, error=message)


def _sha256_or_empty(path: str) -> str:
    """The file's SHA-256, or "" when it cannot be read (a missing or unreadable model)."""
    import hashlib

    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return ""


def _per_layer(counts: tuple[int, ...], mode: str) -> str:
    """"1 crash failure(s) in every hidden layer" for one count, "crash failures [0, 0, 1] per hidden layer"."""
    return f"{counts[0]} {mode} failure(s) in every hidden layer" if len(counts) == 1 else \
        f"{mode} failures {list(counts)} per hidden layer"
