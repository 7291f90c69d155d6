"""The rich terminal table: one renderer per result type, registered with ``render_table``."""

from __future__ import annotations

from functools import singledispatch

from rich.console import Console

from robaudit.bounds.results import Settings
from robaudit.formats.report import load_renderers


@singledispatch
def render_table(result: object, console: Console) -> None:
    """Print ``result`` as tables on ``console``; each result type registers its renderer."""
    if load_renderers():
        return render_table(result, console)
    raise TypeError(f"no table renderer for {type(result).__name__}")


def fmt_num(value: float | None) -> str:
    """Four significant digits, or '-' for None."""
    if value is None:
        return "-"
    return f"{value:.4g}"


def fmt_count(value: int, limit: int | None = None) -> str:
    """A tolerated-failure count: 'none' for −1, 'all N' when every neuron may fail."""
    if value < 0:
        return "none"
    if limit is not None and value >= limit:
        return f"all {limit}"
    return str(value)


def input_phrase(item: dict) -> str:
    """One input's domain in words: 'input 'x' float [0, 1] (--input-range)'."""
    lo, hi = item["range"]
    return f"input '{item['name']}' {item['kind']} [{lo:g}, {hi:g}] ({item['source']})"


def settings_line(settings: Settings) -> str:
    """One line with the assumptions every bound depends on."""
    failure = settings.mode
    if settings.mode == "byzantine":
        failure += f" in [{settings.failure_range[0]:g}, {settings.failure_range[1]:g}]"
    parts = [f"mode {failure}", f"method {settings.method}"]
    if settings.inputs:
        parts += [input_phrase(item) for item in settings.inputs]
    else:
        parts.append(f"input range [{settings.input_range[0]:g}, {settings.input_range[1]:g}]")
    parts.append(f"output '{settings.output}'")
    if settings.activation_bound is not None:
        parts.append(f"|y| ≤ {settings.activation_bound:g}")
    return "settings: " + ", ".join(parts)
