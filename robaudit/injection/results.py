"""Options and typed results of a fault-injection campaign (docs/method.md §8)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from robaudit.bounds.fep import FailureModel
from robaudit.bounds.results import LayerBound, ModelInfo, Reportable, Settings
from robaudit.errors import OptionError
from robaudit.injection.sandbox import Limits
from robaudit.injection.statistics import FailureRate
from robaudit.injection.workers import Runner
from robaudit.options import Method, Search

SEARCHES = Search.values()


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
    """Everything an injection campaign needs besides the network (docs/method.md §8.3)."""

    #: What a failed neuron (synapse) sends: crash 0, byzantine a value in [a, b].
    failure: FailureModel = FailureModel.crash()
    #: Failure vectors to measure; empty: the vector of ``failures``/``synapses``, or else one
    #: failed neuron in every hidden layer.
    vectors: tuple[FailureVector, ...] = ()
    #: Shortcut for one vector, as in BoundOptions: failed neurons (and synapses) per hidden
    #: layer; a single count applies to every hidden layer (synapses: every dense one).
    failures: tuple[int, ...] | None = None
    synapses: tuple[int, ...] | None = None
    #: ε, for the ``max_failures`` column of the layers (README "Reports").
    epsilon: float = 0.1
    #: Bound set beside the measurement: ``tight`` (min of both methods) or ``paper``.
    method: Method | str = Method.TIGHT
    #: ``random`` or ``worst``.
    search: Search | str = Search.RANDOM
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
    #: Worker processes, Ray, or one shard of the campaign (docs/method.md §8.3).
    runner: Runner = Runner()
    #: Statistical sizing: the failure rate to ±``margin`` at ``confidence`` sets ``trials``
    #: (random search; None: ``trials`` as given). ``confidence`` also sets the rate's interval.
    margin: float | None = None
    confidence: float = 0.95
    #: worst: move the input within this ∞-norm radius of the given inputs (None: the whole domain).
    radius: float | None = None
    #: worst: also search the input jointly with the fault set (docs/method.md §8.2).
    move_inputs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method.coerce(self.method))
        object.__setattr__(self, "search", Search.coerce(self.search))

    def check(self) -> None:
        """Refuse nonsense values before any work is done."""
        Search.parse(self.search, "--search")
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
        if self.radius is not None and not (self.radius > 0 and np.isfinite(self.radius)):
            raise OptionError(f"--radius must be a positive finite number, got {self.radius}")
        if self.vectors and (self.failures is not None or self.synapses is not None):
            raise OptionError("give failure vectors either as vectors or as failures/synapses, not both")
        self.runner.check(self.isolate)
        if not 0.0 < self.confidence < 1.0:
            raise OptionError(f"--confidence must lie strictly between 0 and 1, got {self.confidence:g}")
        if self.search != "random" and (self.margin is not None or self.runner.shard is not None):
            named = " and ".join(flag for flag, value in (("--margin", self.margin), ("--shard", self.runner.shard))
                                 if value is not None)
            verb = "apply" if " and " in named else "applies"
            raise OptionError(f"{named} {verb} to the random search only (the worst search is sequential)")
        if self.search == "random" and self.radius is not None:
            raise OptionError("--radius is how far the worst search moves each input: add --search worst")


@dataclass(frozen=True)
class ErrorStats:
    """Distribution of the measured error err(x) (docs/method.md §1.1)."""

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
    #: For display: the layer's 1-based hidden index (0: unknown) and output shape of one sample.
    index: int = 0
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class FaultSet:
    """One evaluated fault configuration with its largest error and the input reaching it."""

    faults: tuple[LayerFaults, ...]
    error: float
    #: Index (into the inputs) of the input with the largest error.
    input_index: int


@dataclass(frozen=True)
class VectorResult:
    """Measurement and bound for one failure vector (docs/method.md §8, README "Reports")."""

    #: Failed neurons and synapses per hidden layer.
    failures: tuple[int, ...]
    synapses: tuple[int, ...]
    measured: ErrorStats
    #: Fraction of evaluated (set, input) pairs whose arg-max output changed; None when the output has no
    #: classes (one element, an image, a sequence: :attr:`~robaudit.graph.network.Network.has_classes`).
    flip_rate: float | None
    #: Accuracy under failures with labels (None without labels).
    accuracy: float | None
    #: Bound of the selected method for exactly this vector, and both methods' values.
    bound: float
    fep_paper: float
    fep_tight: float
    #: measured max / bound (None when the bound is 0 and nothing was measured).
    ratio: float | None
    #: measured max > bound plus the float32 margin: a defect (or inputs outside the domain).
    violation: bool
    #: Fault sets evaluated and (set × input) evaluations made.
    configurations: int
    evaluations: int
    #: The worst fault sets found, largest error first.
    worst: tuple[FaultSet, ...]
    #: measured max > ε: the model is not ε-robust for this vector (not a defect; docs/method.md §8).
    exceeds_epsilon: bool = False
    #: random search: fault sets whose largest error exceeds ε, with a Wilson interval.
    failure_rate: FailureRate | None = None
    #: A shard's raw per-set figures, for ``robaudit merge`` (None outside ``--shard``).
    shard_data: ShardData | None = None
    #: worst search: the configuration found by also moving the input (replayable), if searched.
    moved: MovedInput | None = None
    #: The violation was measured only on inputs outside the input domain, where the bound makes no claim
    #: (docs/method.md §10.2): no defect; ``inject`` exits 2. False whenever one is measured on an input inside it
    #: (the moved input is), and where unknown (merged shards, replays, ``check``): there a violation counts.
    outside_only: bool = False

    @property
    def best_found(self) -> float:
        """The largest error of a configuration really evaluated: best found ≤ true worst ≤ bound."""
        return best_found(self.measured.max, None if self.moved is None else self.moved.error)


@dataclass(frozen=True)
class ShardData:
    """The per-set figures of one shard of a random campaign, enough to merge shards exactly."""

    #: The shard's fault sets are sets [start, stop) of the full campaign.
    start: int
    stop: int
    #: err per (set, input), float64 [stop − start, M].
    errors: np.ndarray = field(repr=False)
    #: Arg-max changed per (set, input), bool [stop − start, M].
    flips: np.ndarray = field(repr=False)
    #: Faulty arg-max equals the label per (set, input) (None without labels).
    correct: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class MovedInput:
    """A configuration of the joint search over fault sets, values and inputs (docs/method.md §8.2)."""

    #: Error measured by onnxruntime on this input with this fault set.
    error: float
    #: The input found (flattened, float32 values), within the domain or the radius.
    input: tuple[float, ...]
    #: The fault set (``input_index`` −1: the input is ``input``, not one of the campaign's).
    faults: FaultSet
    #: Where the search started (``given input i``, ``random point``, ``corner``).
    start: str
    #: The ∞-norm radius it moved within around a given input (None: the whole domain).
    radius: float | None = None


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
    #: When inputs lie outside the domain: an input range covering them (smallest and largest value).
    suggested_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class InjectResult(Reportable):
    """Output of ``robaudit inject``."""

    model: ModelInfo
    settings: Settings
    #: Per hidden layer figures of the bound (README "Reports" ``layers``).
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
    #: Statistical sizing used, if any (docs/method.md §8.3).
    sizing: Sizing | None = None
    #: (I, N) when this is one shard of a campaign.
    shard: tuple[int, int] | None = None

    @property
    def violation(self) -> bool:
        """Whether any vector measured an error above its bound."""
        return any(v.violation for v in self.vectors)

    @property
    def outside_only(self) -> bool:
        """Whether every error above its bound was measured on inputs outside the domain only (docs/method.md
        §10.2): no defect, where the bound makes no claim."""
        violating = [v for v in self.vectors if v.violation]
        return bool(violating) and all(v.outside_only for v in violating)

    @property
    def exceeds_epsilon(self) -> bool:
        """Whether any vector measured an error above ε (the model is not ε-robust for it)."""
        return any(v.exceeds_epsilon for v in self.vectors)

    @property
    def headline(self) -> VectorResult:
        """The vector closest to (or furthest beyond) its bound."""
        return max(self.vectors, key=lambda v: -1.0 if v.ratio is None else v.ratio)


@dataclass(frozen=True)
class Sizing:
    """How a statistical campaign chose its number of fault sets (Leveugle et al., DATE 2009)."""

    margin: float
    confidence: float
    #: Possible fault sets N per vector (None: infinite, byzantine values are continuous).
    populations: tuple[int | None, ...]
    #: Fault sets drawn per vector (the largest n over the vectors).
    trials: int


#: ``progress(phase, done, total)``: called by the campaign as work completes.
Progress = Callable[[str, int, int], None]


def best_found(measured_max: float, moved_error: float | None) -> float:
    """The bracket's lower end: the campaign's largest error or the moved input's, if larger (docs/method.md §8.2).

    ``inject`` (``bracket.best_found``, ratio, violation, ε) and ``robaudit merge`` use this one
    formula, so a merged report equals the single run's.
    """
    return max(measured_max, moved_error if moved_error is not None else 0.0)


def exceeds_epsilon(measured: float, epsilon: float) -> bool:
    """Whether a measured error shows the model is not ε-robust (strictly above ε; docs/method.md §8).

    ``inject`` (``exceeds_epsilon`` per vector) and ``check``'s empirical requirement use this
    one comparison, so the two commands always agree.
    """
    return bool(measured > epsilon)
