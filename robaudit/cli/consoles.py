"""The two consoles of the command line (the report on stdout, notes on stderr) and their width."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

#: Width of a console that is neither a terminal nor given one by ``COLUMNS`` (a pipe, a file, a CI
#: log): wide tables are not squeezed to rich's 80 columns there.
PIPED_WIDTH = 160

stdout = Console(soft_wrap=False, emoji=False)  # ":x:" in a file name stays text
stderr = Console(stderr=True, soft_wrap=False, emoji=False)


def fit_consoles() -> None:
    """Size :data:`stdout` and :data:`stderr` for the command about to run: the width ``COLUMNS``
    gives, else the terminal's, else :data:`PIPED_WIDTH`.

    ``robaudit.cli.main`` calls it for every command, so that a process that runs several (the
    tests, a notebook) gives each the width of its own environment, not the first one's.
    """
    columns = os.environ.get("COLUMNS", "").strip()
    for console in (stdout, stderr):
        if columns.isdigit():
            console.width = int(columns)
        elif console.is_terminal:
            console.width = None  # type: ignore[assignment]  # rich then follows the terminal's size
        else:
            console.width = PIPED_WIDTH


fit_consoles()


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr (only when stderr is a terminal and not --quiet)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(escape(phase), total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update
