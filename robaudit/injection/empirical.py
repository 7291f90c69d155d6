"""``bound --empirical``: the worst-case search at each layer's tolerated count and one more (docs/method.md §8.2)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from robaudit.bounds.audit import BoundOptions
from robaudit.bounds.results import BoundResult, EmpiricalCount, EmpiricalLayer
from robaudit.graph.network import Network
from robaudit.injection.campaign import run_injection  # noqa
from robaudit.injection.results import FailureVector, InjectOptions, Progress
from robaudit.injection.sandbox import Limits


def empirical_bound(
    network: Network,
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
    """``bound --empirical``: the worst-case search at each layer's ``max_failures`` m and m + 1, each hidden
    layer failing alone, on the network ``result`` was computed for (docs/method.md §8.2).

    Returns ``result`` with ``empirical`` (layer name → :class:`EmpiricalLayer`) and a note on what was
    measured. Raises what :func:`~robaudit.injection.campaign.run_injection` raises.
    """
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
    counts: dict[str, list[EmpiricalCount]] = {}
    for (name, count), vector in zip(owners, measured.vectors, strict=True):
        counts.setdefault(name, []).append(EmpiricalCount(count, vector.measured.max, vector.bound, vector.violation))
    note = (
        f"measured: worst-case search (seed {seed}, {trials} swap proposals) on {measured.inputs.source}, "
        "each layer failing alone at max_failures and one more"
    )
    empirical = {name: EmpiricalLayer(tuple(entries)) for name, entries in counts.items()}
    return replace(result, empirical=empirical, notes=result.notes + (note,) + measured.notes)
