"""The paper's applications (docs/method.md §9.1): memory cost (``precision``), boosting (``wait``)
and robustness vs learning cost (``design``).

All three rest on one observation: rounding a layer's outputs, rounding its weights,
or letting its neurons ignore some incoming signals perturbs *every* neuron of the
layer by at most some σ_l, and the perturbation keeps propagating. The paper
recursion of docs/method.md §3.1 then reads

    E_l = N_l·σ_l + min(fanout_l, N_l)·K_l·w_m^{(l)}·E_{l−1},   Fep = K_{L+1}·w_m^{(L+1)}·E_L

which is linear in σ: Fep = Σ_l g_l·σ_l with one *gain* g_l per layer. The tight
method gives |ΔF_k| ≤ Σ_l σ_l·Σ_i P[k, i] with the sensitivities P of docs/method.md §4.1.

The pure formulas (numbers in, numbers out) come first, then the gains of a
:class:`~robaudit.graph.network.Network`, then the three analyses. ONNX rewriting and the
onnxruntime simulations of ``--check`` live in :mod:`robaudit.applications.check`.
"""

from robaudit.applications.analysis import (
    CheckOptions,
    compute_design,
    compute_precision,
    compute_wait,
    design_analysis,
    design_check,
    design_fep,
    failure_curves,
    largest_layer_weights,
    layer_columns,
    network_gains,
    paper_gains,
    precision_analysis,
    precision_curves,
    select_method,
    tight_gains,
    tolerance_vector,
    wait_analysis,
)
from robaudit.applications.formulas import (
    BF16,
    FP16,
    INT4,
    INT8,
    MAX_BITS,
    SLACK,
    Gains,
    NumberFormat,
    bits_needed,
    chain_source_fep,
    fewest_bits_together,
    fewest_uniform_bits,
    float_growth,
    float_sigma,
    largest_scale,
    max_ignored,
    rounding_error,
    source_layer_error,
    wait_sigma,
    weight_rounding_sigma,
)
from robaudit.applications.results import (
    AppLayer,
    CheckRun,
    DesignCheck,
    DesignLayer,
    DesignResult,
    FormatVerdict,
    OutputLayerDesign,
    PrecisionLayer,
    PrecisionResult,
    SimulationCheck,
    WaitLayer,
    WaitResult,
)

__all__ = [
    "AppLayer",
    "BF16",
    "CheckOptions",
    "CheckRun",
    "DesignCheck",
    "DesignLayer",
    "DesignResult",
    "FP16",
    "FormatVerdict",
    "Gains",
    "INT4",
    "INT8",
    "MAX_BITS",
    "NumberFormat",
    "OutputLayerDesign",
    "PrecisionLayer",
    "PrecisionResult",
    "SLACK",
    "SimulationCheck",
    "WaitLayer",
    "WaitResult",
    "bits_needed",
    "chain_source_fep",
    "compute_design",
    "compute_precision",
    "compute_wait",
    "design_analysis",
    "design_check",
    "design_fep",
    "failure_curves",
    "fewest_bits_together",
    "fewest_uniform_bits",
    "float_growth",
    "float_sigma",
    "largest_layer_weights",
    "largest_scale",
    "layer_columns",
    "max_ignored",
    "network_gains",
    "paper_gains",
    "precision_analysis",
    "precision_curves",
    "rounding_error",
    "select_method",
    "source_layer_error",
    "tight_gains",
    "tolerance_vector",
    "wait_analysis",
    "wait_sigma",
    "weight_rounding_sigma",
]
