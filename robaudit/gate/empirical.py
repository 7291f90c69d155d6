"""The empirical requirement of ``check``: fault injection on the policy's inputs (docs/method.md §8).

The required failure vector is injected into the real model with
:func:`robaudit.injection.campaign.run_injection` (worst-case search by default); the largest
measured error must stay ≤ ``max_error`` (default ε) and, with labels, the accuracy
under failures ≥ ``min_accuracy``. A measured error above the bound is a defect
(docs/method.md §8) and fails the requirement whatever ``max_error`` says.

Imported only when a policy asks for it (onnxruntime is a heavy import).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robaudit.bounds.audit import BoundOptions
from robaudit.bounds.results import ModelInfo
from robaudit.errors import InputDataError, PolicyError
from robaudit.gate.policy import EmpiricalRequirement, display_path, per_layer
from robaudit.graph.network import Network
from robaudit.injection.campaign import failure_vector, run_injection
from robaudit.injection.instrument import load_feed
from robaudit.injection.results import InjectOptions, InjectResult
from robaudit.injection.sandbox import Limits, default_memory_bytes
from robaudit.inputs import LABEL_KEYS, load_labels


@dataclass(frozen=True)
class EmpiricalOutcome:
    """What one injection campaign measured for the empirical requirement."""

    #: Failed neurons per hidden layer.
    failures: tuple[int, ...]
    #: Largest error err(x) (docs/method.md §1.1) found: over the inputs and fault sets tried and,
    #: for the worst search, the input it moved (the best found of inject's bracket, docs/method.md §8.2).
    max_error: float
    #: Allowed largest error (the policy's ``max_error``, default ε).
    allowed_error: float
    #: ε of the policy entry.
    epsilon: float
    #: Bound of the selected method for the same failure vector.
    bound: float
    #: Measured error above the bound (plus the float32 margin): a defect.
    violation: bool
    #: Accuracy under failures (None without labels) and the floor asked for.
    accuracy: float | None
    min_accuracy: float | None
    #: Inputs, search and campaign size, for the report.
    source: str
    search: str
    configurations: int
    notes: tuple[str, ...] = ()
    #: Whether ``max_error`` was reached on an input the worst search moved (not one of ``source``).
    moved: bool = False
    #: When some input elements lie outside the input range (where the bound makes no claim): what to do.
    outside: str = ""


def _labels(requirement: EmpiricalRequirement, count: int, classes: int) -> np.ndarray | None:
    """Labels from ``labels:`` or from a ``labels`` array in the ``.npz`` inputs; needed for ``min_accuracy``."""
    if requirement.labels is not None:
        return load_labels(requirement.labels, count, classes)[0]
    if requirement.min_accuracy is None:
        return None
    if requirement.inputs.suffix.lower() == ".npz":
        with np.load(requirement.inputs, allow_pickle=False) as archive:
            key = next((k for k in LABEL_KEYS if k in archive.files), None)
        if key is not None:
            return load_labels(f"{requirement.inputs}:{key}", count, classes)[0]
    raise PolicyError(
        f"'empirical.min_accuracy' needs labels: add 'empirical.labels' or a 'labels' array to '{requirement.inputs}'"
    )


def measure(
    requirement: EmpiricalRequirement, network: Network, options: BoundOptions, model: ModelInfo, capacity: float | None
) -> EmpiricalOutcome:
    """Inject the required failures into the real model and measure the worst error (docs/method.md §8.2)."""
    inputs, source = load_feed(display_path(requirement.inputs), network)  # named as the models are
    classes = int(np.prod(network.clean[network.output_name].shape[1:]))
    labels = _labels(requirement, len(inputs), classes)
    per_layer(requirement.failures, [la.name for la in network.hidden_layers], "empirical.failures")
    vector = failure_vector(network, requirement.failures)
    inject = InjectOptions(
        failure=options.failure,
        vectors=(vector,),
        epsilon=options.epsilon,
        method=options.method,
        search=requirement.search,
        trials=requirement.trials,
        seed=requirement.seed,
        radius=requirement.radius,
        inputs=inputs,
        labels=labels,
        inputs_source=source,
        capacity=capacity,
        limits=Limits(memory_bytes=default_memory_bytes()),
    )
    result = run_injection(network, inject, model)
    measured = result.vectors[0]
    if measured.violation and measured.outside_only:  # as inject's exit 2 (README "Exit codes")
        lo, hi = network.input_range
        fix = _covering_fix(result)
        raise InputDataError(
            f"'empirical.inputs' {source}: error {measured.best_found:.4g} measured above the bound "
            f"{measured.bound:.4g} on inputs outside the input range [{lo:g}, {hi:g}] "
            f"({result.inputs.outside_domain:.1%} of their elements), where the bound makes no claim: {fix}"
        )
    return EmpiricalOutcome(
        failures=measured.failures,
        max_error=measured.best_found,
        allowed_error=options.epsilon if requirement.max_error is None else requirement.max_error,
        epsilon=options.epsilon,
        bound=measured.bound,
        violation=measured.violation,
        accuracy=measured.accuracy,
        min_accuracy=requirement.min_accuracy,
        source=result.inputs.source,
        search=result.search,
        configurations=measured.configurations,
        notes=result.notes,
        moved=measured.moved is not None and measured.moved.error > measured.measured.max,
        outside=_outside_note(result, network, source),
    )


def _outside_note(result: InjectResult, network: Network, source: str) -> str:
    """What to do when the inputs leave the input range, or "" (docs/method.md §10.2: the bound is for inputs
    inside it; inject and certify say so too)."""
    if result.inputs.outside_domain <= 0:
        return ""
    lo, hi = network.input_range
    fix = _covering_fix(result)
    return (
        f"{result.inputs.outside_domain:.1%} of the elements of {source} lie outside the input range "
        f"[{lo:g}, {hi:g}], where the bound makes no claim: {fix}"
    )


def _covering_fix(result: InjectResult) -> str:
    """What makes the policy cover inputs outside its input range: the ``input_range`` that holds them."""
    covering = result.inputs.suggested_range
    return f"set input_range: [{covering[0]:g}, {covering[1]:g}]" if covering else "give inputs inside it"
