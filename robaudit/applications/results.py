"""Result dataclasses of ``precision``, ``wait`` and ``design``."""

from __future__ import annotations

from dataclasses import dataclass

from robaudit.bounds.results import ModelInfo, Settings


@dataclass(frozen=True)
class AppLayer:
    """The columns every application report has per hidden layer (README "Reports")."""

    name: str
    #: 1-based hidden-layer index (0 for the output layer).
    index: int
    kind: str
    neurons: int
    #: w_m^{(l)}: largest absolute effective weight.
    max_weight: float
    #: K_l.
    lipschitz: float
    #: δ_l of the failure model (crash unless ``design`` is asked otherwise); None: unbounded (a float's exponent
    #: bit, docs/method.md §2.3).
    delta: float | None
    #: Largest f_l with the bound ≤ ε when only this layer fails (selected method).
    max_failures: int


@dataclass(frozen=True)
class FormatVerdict:
    """Is a standard number format safe at ε? (``precision``)."""

    name: str
    #: ``float`` or ``fixed``.
    kind: str
    #: How the error was modelled, e.g. ``relative 2^-11`` or ``8 bits over each layer's range``.
    error_model: str
    #: The bound on the output error with every site stored in this format.
    bound: float
    safe: bool
    #: Why it is unsafe beyond the bound, e.g. an overflow.
    reason: str = ""


@dataclass(frozen=True)
class CheckRun:
    """One simulated configuration of ``--check``: the bound beside the error measured in onnxruntime."""

    #: What was simulated, e.g. ``fc1 alone at 6 bits``.
    config: str
    bound: float
    #: Largest and mean error max_k |F̃_k − F_k| over the inputs (and random trials).
    max: float
    mean: float
    #: measured ≤ bound (+ float32 tolerance).
    ok: bool
    #: For plots: the site simulated alone (or ``all`` for the uniform run) and its bits / ignored count.
    site: str = ""
    setting: int | None = None


@dataclass(frozen=True)
class SimulationCheck:
    """The ``--check`` of ``precision`` and ``wait``."""

    #: Number of inputs and where they came from.
    inputs: int
    source: str
    runs: tuple[CheckRun, ...]
    #: Allowance for float32 arithmetic: measured may exceed the bound by this much.
    tolerance: float
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no measured error is above its bound."""
        return all(run.ok for run in self.runs)


@dataclass(frozen=True)
class PrecisionLayer(AppLayer):
    """One site of ``precision``: the range it is quantized over and the bits it needs."""

    #: [lo, hi] the values are rounded over: the layer's output range (outputs) or weight range (weights).
    range: tuple[float, float]
    #: How many values the site stores: N_l (outputs) or the weight count (weights).
    values: int
    #: Fep per unit rounding error q of this site alone: Fep = gain·q.
    gain: float
    #: Fewest bits with the bound ≤ ε when only this site is rounded (README "Reports" ``bits``).
    bits: int
    #: Bits when every site is rounded at once (greedy: fewest stored bits in total).
    bits_together: int | None
    #: The bound at ``bits`` with only this site rounded.
    bound_at_bits: float
    #: Whether this is the output layer (only for ``--weights``).
    is_output: bool = False


@dataclass(frozen=True)
class PrecisionResult:
    """Output of ``robaudit precision``."""

    model: ModelInfo
    settings: Settings
    #: ``outputs`` (neuron values) or ``weights``.
    quantize: str
    layers: tuple[PrecisionLayer, ...]
    #: Fewest bits that, in every site at once, keep the bound ≤ ε (README "Reports" ``uniform_bits``).
    uniform_bits: int | None
    fep_uniform: float | None
    fep_together: float | None
    #: (b, bound) with the same b at every site, for plots.
    uniform_curve: tuple[tuple[int, float], ...]
    #: Stored bits in total: Σ values·bits, with the uniform and with the per-site allocation.
    memory_uniform: int | None
    memory_together: int | None
    formats: tuple[FormatVerdict, ...]
    check: SimulationCheck | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WaitLayer(AppLayer):
    """One hidden layer of ``wait``."""

    #: Incoming signals per neuron.
    fan_in: int
    #: d_l = w_m^{(l)}·Y_{l−1}: the most one missing signal changes a pre-activation.
    synapse_delta: float
    #: Fep per missing signal per neuron in this layer alone: g_l·K_l·d_l.
    cost_per_signal: float
    #: r_l: signals each neuron may ignore, this layer alone.
    ignore: int
    #: fan-in − r_l: signals each neuron must wait for (README "Reports" ``wait_for``).
    wait_for: int
    #: The same when every layer ignores signals at once (ε shared equally).
    wait_for_together: int


@dataclass(frozen=True)
class WaitResult:
    """Output of ``robaudit wait``."""

    model: ModelInfo
    settings: Settings
    layers: tuple[WaitLayer, ...]
    #: The bound with every layer ignoring its ``fan_in − wait_for_together`` signals at once.
    fep_together: float
    check: SimulationCheck | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DesignLayer(AppLayer):
    """One layer of ``design``."""

    #: f_l: failures this layer must tolerate.
    tolerate: int
    #: Largest max-|weight| this layer may have, other weights and all ranges fixed
    #: (README "Reports" ``max_weight_allowed``); inf: any, None: no value reaches ε.
    max_weight_allowed: float | None
    #: max_weight_allowed / max_weight: the factor for this layer's weights alone.
    weight_factor: float | None


@dataclass(frozen=True)
class OutputLayerDesign:
    """The output layer L+1 in ``design``: its weights scale Fep directly."""

    name: str
    max_weight: float
    max_weight_allowed: float | None
    weight_factor: float | None


@dataclass(frozen=True)
class DesignCheck:
    """``design --check``: ``bound`` re-run on the written, scaled model."""

    path: str
    #: Fep of the required failures on the written model (selected method).
    fep: float
    #: Largest uniform count and per-layer counts ``bound`` reports for the written model.
    uniform: int
    max_failures: tuple[int, ...]
    #: Fep ≤ ε and the scaled model predicts what the original does on every checked input.
    ok: bool
    #: Inputs the two models were compared on, and where they came from.
    inputs: int = 0
    source: str = ""
    #: Fraction of those inputs whose arg-max is unchanged, and the largest |output change|.
    agreement: float = 1.0
    max_output_change: float = 0.0
    #: Accuracy of the original and the scaled model (with labels).
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def predictions_changed(self) -> bool:
        """Whether the comparison ran and some prediction changed (what alone makes ``ok`` false when the bound
        holds: :func:`~robaudit.applications.analysis.compare_predictions`)."""
        return self.inputs > 0 and self.agreement < 1.0


@dataclass(frozen=True)
class DesignResult:
    """Output of ``robaudit design``."""

    model: ModelInfo
    settings: Settings
    layers: tuple[DesignLayer, ...]
    output_layer: OutputLayerDesign | None
    #: f per hidden layer the model must tolerate (any count up to it).
    tolerate: tuple[int, ...]
    #: The bound of ``tolerate`` now; None: unbounded (docs/method.md §2.3).
    fep: float | None
    #: s: multiply every weight (not the biases) by s and ``bound`` reports Fep ≤ ε for
    #: ``tolerate`` (README "Reports" ``shrink_factor``); ≥ 1 is headroom, inf: any scale works,
    #: None: no s reaches ε.
    shrink_factor: float | None
    #: The bound of ``tolerate`` on the scaled model (ranges recomputed).
    fep_scaled: float | None
    #: Where the scaled copy was written (``--write``).
    written: str | None = None
    check: DesignCheck | None = None
    notes: tuple[str, ...] = ()
