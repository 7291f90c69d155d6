"""Baseline mode of ``check``: tolerated failures must not drop from one export to the next.

A baseline is an earlier ``robaudit check --report`` (or ``robaudit bound --report``)
file, YAML or JSON. A model is compared with the baseline entry of the same path, else
of the same file name; figures are compared only between results computed with the
same settings (mode, ε, method, input range, failure range, activation bound, output),
since tolerated failures at another ε are a different quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from robaudit.bounds.results import BoundResult
from robaudit.errors import OptionError
from robaudit.formats.serial import read_report_file

_COMPARED_SETTINGS = ("mode", "epsilon", "method", "input_range", "failure_range", "activation_bound", "output")


@dataclass(frozen=True)
class BoundView:
    """The tolerated-failure figures of one model under one set of settings."""

    #: Model path as the report wrote it.
    path: str
    #: The settings that make two results comparable, in ``_COMPARED_SETTINGS`` order.
    settings: tuple
    #: Largest tolerated failures per hidden layer (that layer failing alone), by layer name.
    layers: tuple[tuple[str, int], ...]
    #: Largest uniform count.
    uniform: int
    #: Largest total budget.
    total: int
    #: Why the baseline run could not check the model (a ``check`` report's error entry); None when it did.
    error: str | None = None


@dataclass(frozen=True)
class Drop:
    """One figure that is lower than in the baseline."""

    #: ``layer NAME``, ``uniform`` or ``total``, with the mode.
    what: str
    #: The baseline's value.
    before: int
    #: The value now.
    after: int


@dataclass(frozen=True)
class Comparison:
    """The baseline verdict of one model."""

    #: False when nothing was comparable (no entry for the model, or other settings).
    compared: bool
    #: Figures that dropped.
    drops: tuple[Drop, ...] = ()
    #: Figures compared.
    figures: int = 0
    #: Why nothing or not everything was compared.
    note: str = ""


# --------------------------------------------------------------------------- views


def _settings_key(settings: dict[str, Any]) -> tuple:
    """Comparable settings, floats rounded to 12 significant digits (YAML/JSON round trip)."""

    def norm(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(norm(v) for v in value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(f"{float(value):.12g}") if math.isfinite(value) else str(value)
        return value

    return tuple(norm(settings.get(key)) for key in _COMPARED_SETTINGS)


def view_of(bound: BoundResult) -> BoundView:
    """The view of a result computed now."""
    settings = bound.settings
    key = _settings_key({name: getattr(settings, name) for name in _COMPARED_SETTINGS})
    layers = tuple((layer.name, layer.max_failures) for layer in bound.layers)
    return BoundView(bound.model.path, key, layers, bound.uniform, bound.total)


def _view_from_dict(data: dict[str, Any], where: str) -> BoundView:
    """The view of one bound block of a report (``settings``, ``layers``, ``uniform``, ``total``)."""
    try:
        layers = tuple((str(layer["name"]), int(layer["max_failures"])) for layer in data["layers"])
        return BoundView(
            str(data["model"]["path"]),
            _settings_key(data["settings"]),
            layers,
            int(data["uniform"]["max_failures"]),
            int(data["total"]["max_failures"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"--baseline: {where} is not a robaudit bound result (bad or missing {exc})") from None


def load_baseline(path: Path) -> tuple[BoundView, ...]:
    """Every bound result of a ``check`` or ``bound`` report file (YAML or JSON)."""
    data = read_report_file(path, "--baseline", OptionError)
    command = data.get("command") if isinstance(data, dict) else None
    if command == "bound":
        return (_view_from_dict(data, f"'{path}'"),)
    if command != "check" or not isinstance(data.get("models"), list):
        raise OptionError(f"--baseline: '{path}' is not a report of 'robaudit check' or 'robaudit bound'")
    views = []
    for index, entry in enumerate(data["models"]):
        where = f"'{path}' models[{index}]"
        if not isinstance(entry, dict):
            raise OptionError(f"--baseline: {where} is not a mapping")
        if "error" in entry:  # a model that could not be checked then: no figures, nothing to drop from
            model = entry.get("model")
            path = model.get("path", "") if isinstance(model, dict) else entry.get("name", "")
            views.append(BoundView(str(path), (), (), 0, 0, error=str(entry["error"])))
            continue
        views.append(_view_from_dict(entry, where))
        for other in entry.get("other_modes", []):
            views.append(_view_from_dict({**other, "model": entry.get("model")}, where + " other_modes"))
    return tuple(views)


# --------------------------------------------------------------------------- comparison


def compare_views(before: BoundView, after: BoundView) -> tuple[list[Drop], int, list[str]]:
    """Drops per layer (by name), uniform and total; the count of figures compared; layers gone."""
    mode = after.settings[0]
    now = dict(after.layers)
    drops, compared, gone = [], 0, []
    for name, old in before.layers:
        if name not in now:
            gone.append(name)
            continue
        compared += 1
        if now[name] < old:
            drops.append(Drop(f"layer {name} ({mode})", old, now[name]))
    for what, old, new in (("uniform", before.uniform, after.uniform), ("total", before.total, after.total)):
        compared += 1
        if new < old:
            drops.append(Drop(f"{what} ({mode})", old, new))
    return drops, compared, gone


def _changes(entries: list[BoundView], current: list[BoundView]) -> str:
    """The settings in which the closest baseline entry differs from now: 'epsilon 110 → 100' (the entry that
    differs from the first current view in the fewest settings)."""
    now = current[0].settings

    def differing(view: BoundView) -> list[str]:
        pairs = zip(_COMPARED_SETTINGS, view.settings, now, strict=True)
        return [f"{name} {_shown(old)} → {_shown(new)}" for name, old, new in pairs if old != new]

    fewest: list[str] = min((differing(view) for view in entries), key=len)
    return "; ".join(fewest) or "the same compared settings"


def _shown(value: Any) -> str:
    """A setting as a user wrote it: 110 rather than 110.0, [0, 1] rather than (0.0, 1.0)."""
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def compare_model(baseline: tuple[BoundView, ...], current: list[BoundView]) -> Comparison:
    """Compare the results of one model with its baseline entry (same path, else same file name)."""
    path = current[0].path
    entries = [v for v in baseline if v.path == path] or [
        v for v in baseline if PurePath(v.path).name == PurePath(path).name
    ]
    if not entries:
        return Comparison(False, note=f"no baseline entry for '{path}'")
    if all(v.error is not None for v in entries):  # it works now where it did not: no figure can have dropped
        return Comparison(True, note=f"the baseline run could not check '{path}' ({entries[0].error}): nothing to "
                                     "drop from")
    drops, figures, notes = [], 0, []
    for view in current:
        old = next((v for v in entries if v.settings == view.settings), None)
        if old is None:
            continue
        found, count, gone = compare_views(old, view)
        drops += found
        figures += count
        if gone:
            notes.append(f"layers not in the model any more: {', '.join(gone)}")
    if not figures:
        changed = _changes(entries, current)
        return Comparison(False, note=f"the baseline entry was computed with other settings ({changed})")
    return Comparison(True, tuple(drops), figures, "; ".join(notes))
