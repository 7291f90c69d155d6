"""Outputs whose sensitivities need not all be computed (docs/method.md §4.4, "Dominated outputs").

Where the output cut bounds every output element k by E_k whatever fails (:class:`~robaudit.bounds.tight.OutputCut`,
:class:`~robaudit.bounds.tight.BoxCut`), the tight bound of a failure vector is the largest over k of a per-output
figure that never exceeds E_k. The chunks holding the largest E_k are back-propagated first (the probe); a hidden
layer where one failure already gives some probed output a figure at least the largest E_k of the other outputs is
*saturated*: no other output can raise the bound of a vector that fails it. For the other outputs the pass then stops
once it has visited every layer after the saturated ones (the first layers of the network, whose adjoints cost most),
and their figures there are read as +∞, so that each of them is its output cut E_k.

That is always sound (+∞ is above every sensitivity, and the cut holds on its own); whether it also gives the
figures a full pass would give is checked on every figure asked (:func:`dominates`): where an unfinished output
could raise a maximum, the caller finishes the pass first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: Fewest chunks of outputs for which a probe is worth it (below, every chunk is back-propagated in full).
MIN_CHUNKS = 4


@dataclass(frozen=True)
class DominatedPlan:
    """How a sensitivity pass leaves the dominated outputs unfinished.

    ``probe``: the chunks back-propagated in full; ``probe_rows`` their output elements, ``rest_rows`` the others;
    ``skipped``: the hidden layers the others' pass does not reach (their P read as +∞); ``stop_after``: the hidden
    layer their pass ends at (None: they are not back-propagated at all)."""

    probe: tuple[int, ...]
    probe_rows: np.ndarray
    rest_rows: np.ndarray
    skipped: tuple[int, ...]
    stop_after: int | None


def chunk_indices(chunks: Sequence[slice | np.ndarray], which: Sequence[int]) -> np.ndarray:
    """The output elements of the chunks numbered ``which``, sorted, [n]."""
    parts = [np.arange(c.start, c.stop) if isinstance(c, slice) else np.asarray(c) for c in (chunks[j] for j in which)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.intp)


def other_chunks(count: int, probe: Sequence[int]) -> list[int]:
    """The numbers of the ``count`` chunks that are not in ``probe``, in order."""
    return [j for j in range(count) if j not in probe]


def probe_chunks(chunks: Sequence[slice | np.ndarray], envelope: np.ndarray, count: int) -> tuple[int, ...]:
    """The ``count`` chunks (fewer if there are fewer) that hold the largest ``envelope`` values [outputs], each chunk
    once, in order of those values."""
    owner = np.empty(envelope.shape[0], dtype=np.intp)
    for j, c in enumerate(chunks):
        owner[c] = j
    chosen: list[int] = []
    for k in np.argsort(-envelope, kind="stable"):
        if int(owner[k]) not in chosen:
            chosen.append(int(owner[k]))
            if len(chosen) == count:
                break
    return tuple(chosen)


def saturated_prefix(order: Sequence[int], reach: Callable[[int], float], ceiling: float) -> list[int]:
    """The hidden layers, first ones of ``order`` (the steps' order), each of which has ``reach(i)`` ≥ ``ceiling``:
    the longest such run from the start (a pass that ends at a layer visits every layer after it)."""
    saturated: list[int] = []
    for i in order:
        if not reach(i) >= ceiling:  # NaN is not saturated
            break
        saturated.append(i)
    return saturated


def dominates(values: np.ndarray, plan: DominatedPlan) -> bool:
    """Whether the probed outputs' maximum of ``values`` [outputs, ...] is at least the other outputs' in every column,
    so that the maximum over all outputs is the probed one (docs/method.md §4.4, "Dominated outputs")."""
    if plan.rest_rows.size == 0:
        return True
    probed = values[plan.probe_rows].max(axis=0)
    rest = values[plan.rest_rows].max(axis=0)
    return bool(np.all(probed >= rest))
