"""Shards of a random campaign and ``robaudit merge`` (docs/method.md §8.3).

A shard report (``inject --shard I/N``) is an ordinary inject report plus, per vector, the
raw per-(set, input) errors and arg-max changes of its slice, stored exactly (float64 bytes,
zlib, base64). :func:`merge_reports` checks that the shards come from the same model,
settings and seed, that each of the N shards is present exactly once and that their slices
tile the campaign, then recomputes every figure from the concatenated raw data with the
same functions a single run uses, so the merged report is the single run's report.
"""

from __future__ import annotations

import base64
import copy
import zlib
from typing import Any

import numpy as np

from robaudit.errors import InputDataError
from robaudit.injection.results import ShardData, best_found, exceeds_epsilon
from robaudit.injection.search import KEEP_WORST, error_stats, exceeding, judge
from robaudit.injection.statistics import failure_rate

#: Report keys that must agree between shards, with what a mismatch means.
_SAME = (
    ("model", "another model"),
    ("settings", "other settings"),
    ("layers", "other settings"),
    ("search", "another search, number of fault sets or seed"),
    ("inputs", "other inputs"),
    ("margin", "other settings"),
)


class ShardError(InputDataError):
    """Shard reports that cannot be merged (different campaigns, a missing or repeated shard)."""


def encode_array(array: np.ndarray) -> str:
    """Exact text form of an array's bytes (zlib, then base64); dtype and shape are stored beside it."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), 6)).decode("ascii")


def decode_array(text: str, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Inverse of :func:`encode_array`; raises :class:`ShardError` for damaged data."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
        array = np.frombuffer(raw, dtype=np.dtype(dtype))
        return array.reshape(shape).copy()
    except (ValueError, TypeError, AttributeError, zlib.error):
        raise ShardError(f"{where}: the shard data is damaged (cannot decode it)") from None


def shard_dict(data: ShardData) -> dict:
    """The ``shard`` entry of one vector in a shard report."""
    out: dict = {
        "sets": [data.start, data.stop],
        "shape": list(data.errors.shape),
        "errors": encode_array(data.errors.astype(np.float64)),
        "flips": encode_array(data.flips.astype(np.bool_)),
        "correct": None if data.correct is None else encode_array(data.correct.astype(np.bool_)),
    }
    return out


def _raw(entry: dict, where: str) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        start, stop = (int(v) for v in entry["sets"])
        shape = tuple(int(v) for v in entry["shape"])
        errors = decode_array(entry["errors"], "float64", shape, where)
        flips = decode_array(entry["flips"], "bool", shape, where)
        correct = None if entry.get("correct") is None else decode_array(entry["correct"], "bool", shape, where)
    except (KeyError, TypeError, ValueError):
        raise ShardError(f"{where}: the shard data is incomplete") from None
    if shape[0] != stop - start:
        raise ShardError(f"{where}: the shard holds {shape[0]} fault sets but claims sets {start}..{stop}")
    return start, stop, errors, flips, correct


def _ordered(reports: list[tuple[str, Any]]) -> list[tuple[str, dict]]:
    """The reports by shard index, after checking each of 0..N−1 appears exactly once."""
    seen: dict[int, str] = {}
    counts = set()
    for name, report in reports:
        if not isinstance(report, dict) or report.get("command") != "inject":
            raise ShardError(f"'{name}' is not an inject report")
        shard = report.get("shard")
        if not isinstance(shard, dict) or "index" not in shard or "count" not in shard:
            raise ShardError(f"'{name}' is not a shard report (run inject with --shard I/N)")
        index, count = int(shard["index"]), int(shard["count"])
        counts.add(count)
        if index in seen:
            raise ShardError(f"shard {index}/{count} is given twice ('{seen[index]}' and '{name}')")
        seen[index] = name
    if len(counts) != 1:
        raise ShardError(f"the reports come from splits into different numbers of shards ({sorted(counts)})")
    (count,) = counts
    missing = [str(i) for i in range(count) if i not in seen]
    if missing:
        raise ShardError(f"shard {', '.join(f'{i}/{count}' for i in missing)} missing (every shard is needed once)")
    if len(seen) != count:
        raise ShardError(f"shard indices must lie in 0..{count - 1}")
    by_index = {int(r["shard"]["index"]): (n, r) for n, r in reports}
    return [by_index[i] for i in range(count)]


def _check_same(ordered: list[tuple[str, dict]]) -> None:
    first_name, first = ordered[0]
    for name, report in ordered[1:]:
        for key, meaning in _SAME:
            if report.get(key) != first.get(key):
                raise ShardError(f"'{name}' comes from {meaning} than '{first_name}' ('{key}' differs)")
        if len(report.get("vectors", [])) != len(first.get("vectors", [])):
            raise ShardError(f"'{name}' measures other failure vectors than '{first_name}'")
        for a, b in zip(report["vectors"], first["vectors"], strict=True):
            if (a.get("failures"), a.get("synapses")) != (b.get("failures"), b.get("synapses")):
                raise ShardError(f"'{name}' measures other failure vectors than '{first_name}'")


def merge_reports(reports: list[tuple[str, Any]]) -> dict:
    """The report a single run would have written, from N shard reports (name, parsed report).

    Raises :class:`ShardError` (exit 2) for reports of different models, settings or seeds,
    a missing or repeated shard, slices that do not tile the campaign, or damaged data.
    """
    if not reports:
        raise ShardError("merge needs the shard reports")
    try:
        return _merge(reports)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        detail = f"key {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:120]
        raise ShardError(f"the shard reports are incomplete or edited ({detail})") from None


def _merge(reports: list[tuple[str, Any]]) -> dict:
    ordered = _ordered(reports)
    _check_same(ordered)
    merged = copy.deepcopy(ordered[0][1])
    trials = int(merged["search"]["trials"])
    margin_absolute = float(merged["margin"]["absolute"])
    epsilon = float(merged["settings"]["epsilon"])
    for v, vector in enumerate(merged["vectors"]):
        parts = [(name, report["vectors"][v]) for name, report in ordered]
        _merge_vector(vector, parts, trials, margin_absolute, epsilon)
    head = max(merged["vectors"], key=lambda vec: -1.0 if vec["ratio"] is None else vec["ratio"])
    for key in ("failures", "synapses", "measured", "bound", "fep_paper", "fep_tight", "ratio", "bracket", "flip_rate"):
        merged[key] = head[key]
    for key in ("accuracy", "failure_rate"):
        if key in merged:
            merged[key] = head[key]
    merged["violation"] = any(vec["violation"] for vec in merged["vectors"])
    violating = [vec for vec in merged["vectors"] if vec["violation"]]
    merged["outside_only"] = bool(violating) and all(vec["outside_only"] for vec in violating)
    if "exceeds_epsilon" in merged:
        merged["exceeds_epsilon"] = any(vec["exceeds_epsilon"] for vec in merged["vectors"])
    del merged["shard"]
    return merged


def _merge_vector(vector: dict, parts: list[tuple[str, dict]], trials: int, margin: float, epsilon: float) -> None:
    """Recompute one vector's figures from the shards' raw data, in place."""
    raws, expected = [], 0
    for name, part in parts:
        if "shard" not in part:
            raise ShardError(f"'{name}' has no shard data for failures {part.get('failures')}")
        start, stop, errors, flips, correct = _raw(part["shard"], f"'{name}'")
        if start != expected:
            raise ShardError(f"'{name}' holds fault sets {start}..{stop}, expected them to start at {expected}")
        expected = stop
        raws.append((errors, flips, correct))
    if expected != trials:
        raise ShardError(f"the shards hold {expected} fault sets, the campaign asked for {trials}")
    errors = np.concatenate([r[0] for r in raws])
    flips = np.concatenate([r[1] for r in raws])
    stats = error_stats(errors)
    vector["measured"] = {"max": stats.max, "mean": stats.mean, "p95": stats.p95}
    _judge_vector(vector, stats.max, margin, epsilon)
    # the campaign's best inside the domain is under the bound iff every shard's is (the same bound and margin)
    violating = [part for _, part in parts if part["violation"]]
    vector["outside_only"] = vector["violation"] and bool(violating) and all(p.get("outside_only") for p in violating)
    vector["flip_rate"] = None if any(p.get("flip_rate") is None for _, p in parts) else float(np.mean(flips))
    if all(r[2] is not None for r in raws):
        vector["accuracy"] = float(np.mean(np.concatenate([r[2] for r in raws])))
    vector["configurations"] = sum(int(p["configurations"]) for _, p in parts)
    vector["evaluations"] = sum(int(p["evaluations"]) for _, p in parts)
    worst = sorted((s for _, p in parts for s in p["worst"]), key=lambda s: -float(s["error"]))  # stable: set order
    seen: set[str] = set()
    vector["worst"] = []
    for found in worst:  # a set two shards drew is listed once, as one campaign lists it
        if repr(found["faults"]) not in seen and len(vector["worst"]) < KEEP_WORST:
            seen.add(repr(found["faults"]))
            vector["worst"].append(found)
    if vector.get("failure_rate") is not None:
        rate = failure_rate(exceeding(errors, epsilon), len(errors), float(vector["failure_rate"]["confidence"]))
        vector["failure_rate"] = rate_dict(rate)
    del vector["shard"]


def _judge_vector(vector: dict, measured_max: float, margin: float, epsilon: float) -> None:
    """Set the figures a run derives from the best error found (bracket, ratio, violation, ε), in place.

    They use the run's own formulas (:func:`best_found`, :func:`judge`, :func:`exceeds_epsilon`), so the
    merged report's bracket is the whole campaign's, not the first shard's.
    """
    moved = vector.get("moved_input")
    found = best_found(measured_max, None if moved is None else float(moved["error"]))
    bound = float("inf") if vector["bound"] is None else float(vector["bound"])  # None: unbounded
    vector["ratio"], vector["violation"] = judge(found, bound, margin)
    if "exceeds_epsilon" in vector:  # measured above ε: the model is not ε-robust for this vector
        vector["exceeds_epsilon"] = exceeds_epsilon(found, epsilon)
    vector["bracket"] = {"best_found": found, "bound": vector["bound"]}


def rate_dict(rate: Any) -> dict:
    """The report form of a :class:`~robaudit.injection.statistics.FailureRate`."""
    return {
        "exceeding": rate.failing,
        "sets": rate.sets,
        "rate": rate.rate,
        "low": rate.low,
        "high": rate.high,
        "confidence": rate.confidence,
    }
