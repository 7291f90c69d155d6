"""The rich terminal table: one renderer per result type, registered with ``render_table``."""

from __future__ import annotations

from functools import singledispatch

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from robaudit.bounds.fep import STORED_MODES
from robaudit.bounds.results import Settings
from robaudit.formats.report import load_renderers


@singledispatch
def render_table(result: object, console: Console) -> None:
    """Print ``result`` as tables on ``console``; each result type registers its renderer."""
    if load_renderers():
        return render_table(result, console)
    raise TypeError(f"no table renderer for {type(result).__name__}")


def fmt_num(value: float | None) -> str:
    """Four significant digits, '-' for None, 'unbounded' for +inf."""
    if value is None:
        return "-"
    if value == float("inf"):
        return "unbounded"
    return f"{value:.4g}"


def fmt_error(value: float | None) -> str:
    """A measured error: :func:`fmt_num`, but 'inf' for +inf (a flipped exponent bit's ±Inf or NaN, as the reports
    write it; 'unbounded' is for bounds)."""
    return "inf" if value == float("inf") else fmt_num(value)


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
    if settings.mode in STORED_MODES:
        stuck = f" at {settings.stuck}" if settings.stuck is not None else ""
        failure += f"{stuck} ({'bit ' + str(settings.bit) if settings.bit is not None else 'any bit'})"
    parts = [f"mode {failure}", f"method {settings.method}", f"ranges {settings.ranges}"]
    if settings.inputs:
        parts += [input_phrase(item) for item in settings.inputs]
    else:
        parts.append(f"input range [{settings.input_range[0]:g}, {settings.input_range[1]:g}]")
        if settings.input_shape:
            parts.append(f"input shape {'×'.join(str(d) for d in settings.input_shape)}")
    parts.append(f"output '{settings.output}'")
    if settings.activation_bound is not None:
        parts.append(f"|y| ≤ {settings.activation_bound:g}")
    if settings.float16:
        parts.append("float16 arithmetic (every op's result rounded)")
    return "settings: " + ", ".join(parts)


#: The widest a cell is kept whole; longer ones fold onto more lines.
MAX_WHOLE_CELL = 48


def fit_table(table: Table, console: Console, drop: tuple[str, ...] = ()) -> Table:
    """Make ``table`` fit the console without cutting a name or number.

    A table wider than the console gets, per column, the width of its longest cell (up to
    ``MAX_WHOLE_CELL`` characters; longer cells fold, never end in "…"), and headers wrap
    instead; when that is still too wide, the columns named in ``drop`` are removed, least
    important first.
    """
    if _width(table, console, "maximum") <= console.width:
        return table
    for column in table.columns:
        cells = [Text.from_markup(cell).cell_len if isinstance(cell, str) else 1 for cell in column._cells]
        words = [Text(word).cell_len for word in str(column.header).split()] or [1]
        column.width = min(max(cells + words), MAX_WHOLE_CELL)
        column.overflow = "fold"
    for name in drop:
        if _width(table, console, "minimum") <= console.width:
            break
        table.columns[:] = [column for column in table.columns if column.header != name]
    return table


def _width(table: Table, console: Console, which: str) -> int:
    wide = console.options.update(width=100_000, max_width=100_000)  # measure without the console's cap
    return getattr(Measurement.get(console, wide, table), which)
