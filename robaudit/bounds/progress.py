"""Progress of the long passes of ``bound`` (the tight sensitivities, a chunk of outputs at a time),
reported to whoever set a reporter for the current context: the command line's progress bar on a
terminal. The passes sit several calls below ``bound_network`` (and below ``check`` and the
applications); a context variable reaches them without a parameter on every function between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: update(phase, done, total), as the command line's :func:`~robaudit.cli.consoles.progress_bar` gives.
Update = Callable[[str, int, int], None]

_REPORTER: ContextVar[Update | None] = ContextVar("robaudit_bound_progress", default=None)

#: The phase of the tight sensitivity pass (docs/method.md §4.4).
SENSITIVITIES = "tight sensitivities (chunks of outputs)"


@contextmanager
def reporting(update: Update | None) -> Iterator[None]:
    """Within the block, :func:`report` calls ``update`` (None: nothing is reported)."""
    token = _REPORTER.set(update)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def report(phase: str, done: int, total: int) -> None:
    """``done`` of ``total`` steps of ``phase`` are finished (called from the thread that set the reporter)."""
    update = _REPORTER.get()
    if update is not None:
        update(phase, done, total)


@contextmanager
def counted_from(before: int, total: int) -> Iterator[None]:
    """Within the block, a report of ``done`` steps is passed on as ``before + done`` of ``total``: a pass run in
    parts (the tight pass's probe, then its other chunks: docs/method.md §4.4, "Dominated outputs") shows one count."""
    update = _REPORTER.get()
    if update is None:
        yield
        return
    with reporting(lambda phase, done, _: update(phase, before + done, total)):
        yield
