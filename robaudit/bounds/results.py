"""Result dataclasses of the core: plain values, rendered by ``robaudit.formats``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Reportable:
    """A result that has a report: ``to_dict()`` is the mapping ``--format yaml|json`` prints."""

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (dicts, lists, str, float, int, bool, None)."""
        import json

        from robaudit.formats import OutputFormat, render_text

        return json.loads(render_text(self, OutputFormat.json))


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the audited model file (README "Reports" ``model``)."""

    #: Path as given by the user.
    path: str
    #: SHA-256 of the model file.
    sha256: str
    #: Exporter name and version.
    producer: str
    #: Default-domain opset.
    opset: int


@dataclass(frozen=True)
class Settings:
    """The settings an audit ran with (README "Reports" ``settings``)."""

    #: ``crash`` or ``byzantine``.
    mode: str
    #: Tolerance ε on the output's ∞-norm deviation (None for ``inspect``).
    epsilon: float | None
    #: ``paper`` or ``tight``.
    method: str
    #: Input domain [LO, HI].
    input_range: tuple[float, float]
    #: Byzantine capacity C, if given.
    capacity: float | None = None
    #: Failure range [a, b] used.
    failure_range: tuple[float, float] = (0.0, 0.0)
    #: ``--activation-bound`` Y, if given.
    activation_bound: float | None = None
    #: Audited output tensor.
    output: str = ""
    #: Input shape used (batch 1).
    input_shape: tuple[int, ...] = ()
    #: Per input (several inputs, token ids, held values, per-element ranges): name, kind, shape,
    #: range [min, max] and source; empty for one float input with the plain --input-range.
    inputs: tuple[dict, ...] = ()
    #: ``bit_flip``/``stuck_at``: the bit position, None for any bit.
    bit: int | None = None
    #: ``stuck_at``: the value the bit is stuck at.
    stuck: int | None = None
    #: How neuron ranges were computed: ``crown`` or ``ibp`` (docs/method.md §5).
    ranges: str = "crown"
    #: The model computes in float16, each op's result rounded (docs/method.md §1.2); in reports only when true.
    float16: bool = False


@dataclass(frozen=True)
class LayerInfo:
    """One layer as ``inspect`` shows it."""

    name: str
    #: 1-based hidden-layer index, 0 for the output layer.
    index: int
    kind: str
    neurons: int
    fan_in: int
    fanout: int
    #: w_m: largest absolute effective weight.
    max_weight: float
    activation: str | None
    lipschitz: float
    #: Clean output range [lo, hi] from the activation or interval propagation.
    output_range: tuple[float, float]
    #: ONNX nodes grouped into this layer.
    nodes: tuple[str, ...]
    #: Names of the layers/ops whose outputs feed this layer (graph structure).
    inputs_from: tuple[str, ...]
    is_output: bool = False
    #: δ_l for crash failures and the crash ``max_failures`` at the report's ε (hidden layers only).
    delta: float | None = None
    max_failures: int | None = None
    #: An affine op summed into a later layer's pre-activation: not a failure site (docs/method.md §1.4).
    part: bool = False
    #: The range a range restriction (a Clip after the layer, ``harden``'s guard) keeps its output in, [lo, hi]
    #: (per channel: the widest); None without one (docs/method.md §1.3).
    restricted_to: tuple[float, float] | None = None
    #: A sum layer's two affine ops (parts), by name; empty for every other layer.
    summands: tuple[str, ...] = ()


@dataclass(frozen=True)
class BranchInfo:
    """A merge point of the graph (``Add``/``Concat``/``Mul`` of two variable tensors)."""

    node: str
    op_type: str
    #: The layers or ops that feed it.
    inputs_from: tuple[str, ...]


@dataclass(frozen=True)
class InspectResult(Reportable):
    """Output of ``robaudit inspect``."""

    model: ModelInfo
    settings: Settings
    layers: tuple[LayerInfo, ...]
    branches: tuple[BranchInfo, ...]
    is_chain: bool
    #: Op types on the audited path that are not part of a layer.
    other_ops: tuple[str, ...]
    #: [lo, hi] the audited output lies in whatever the failures (Softmax, Sigmoid, Tanh, Clip, a QDQ pair's
    #: codes), None if unbounded: what ``bound`` caps every bound at (docs/method.md §3.4).
    output_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class LayerBound:
    """Per hidden layer figures of ``robaudit bound`` (README "Reports" ``layers``)."""

    name: str
    index: int
    kind: str
    neurons: int
    #: w_m^{(l)}.
    max_weight: float
    #: K_l.
    lipschitz: float
    #: δ_l of the paper method (layer-wide); None when unbounded (a float bit flip).
    delta: float | None
    #: Largest f_l with bound ≤ ε when only this layer fails, with the selected method.
    max_failures: int
    #: The same with each method.
    max_failures_paper: int
    max_failures_tight: int
    fanout: int
    fan_in: int
    #: d_l for synapse failures.
    synapse_delta: float
    #: The explicit failure count for this layer, when one was given.
    failures: int | None = None
    #: Failed synapses into this layer.
    synapses: int = 0


@dataclass(frozen=True)
class EmpiricalCount:
    """``bound --empirical``: one layer failing alone at ``failures`` neurons (docs/method.md §8.2)."""

    failures: int
    #: Largest max_k |F̃_k − F_k| the worst-case search found (output units).
    measured: float
    #: The bound of the same vector (the method's).
    bound: float
    #: True when ``measured`` exceeds ``bound`` beyond the float32 margin.
    violation: bool


@dataclass(frozen=True)
class EmpiricalLayer:
    """``bound --empirical`` for one layer: its tolerated count and one more."""

    counts: tuple[EmpiricalCount, ...]

    @property
    def violated(self) -> bool:
        """Whether any measured error exceeds its bound."""
        return any(count.violation for count in self.counts)


@dataclass(frozen=True)
class BoundResult(Reportable):
    """Output of ``robaudit bound``."""

    model: ModelInfo
    settings: Settings
    layers: tuple[LayerBound, ...]
    #: Largest uniform count (same f in every hidden layer), selected method and each.
    uniform: int
    uniform_paper: int
    uniform_tight: int
    #: Largest total budget F over all distributions, selected method and each.
    total: int
    total_paper: int
    total_tight: int
    #: False when the paper DP stopped at its search cap (the true budget is at least ``total``).
    total_exact: bool = True
    #: Explicit failure vector (per hidden layer) and its bounds.
    failures: tuple[int, ...] | None = None
    fep: float | None = None
    fep_paper: float | None = None
    fep_tight: float | None = None
    #: Measured worst errors from ``--empirical``, per layer name (docs/method.md §8.2).
    empirical: dict[str, EmpiricalLayer] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: [lo, hi] the audited output lies in (Softmax, Sigmoid, Tanh, Clip), None if unbounded;
    #: every bound is capped at hi − lo (docs/method.md §3.4).
    output_range: tuple[float, float] | None = None
    #: True when that cap is what binds: ``fep`` reached it, or hi − lo ≤ ε (everything tolerated).
    capped: bool = False
    #: Advice when every tolerated count is 0: what dominates the bound, what would help.
    hints: tuple[str, ...] = ()
