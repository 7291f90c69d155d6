"""The ``robaudit`` console script and ``python -m robaudit``.

A Ctrl-C while the command line loads (Typer, numpy, onnx, the command's modules: most of the first second)
printed a KeyboardInterrupt traceback, or, landing in one of the import system's callbacks, was lost with an
"Exception ignored" one. So the loading runs with SIGINT blocked: a Ctrl-C meanwhile waits, and reaches the
process when the command starts (:func:`release_interrupts`, called by :func:`robaudit.cli.main`), where it
ends as any later one does — ``robaudit: interrupted``, exit 130. This module imports nothing heavy.
"""

from __future__ import annotations

import signal
import sys

from robaudit.errors import ExitCode

#: Exit code after a Ctrl-C, as :func:`robaudit.cli.main` returns (errors imports nothing heavy).
INTERRUPTED = int(ExitCode.INTERRUPTED)

#: The signal mask before :func:`run` blocked SIGINT (None: not blocked here, or already released).
_held: set[int | signal.Signals] | None = None


def run() -> None:
    """Run the command line with ``sys.argv``; exits the process."""
    global _held
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        _held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        from robaudit.cli import run as run_command_line

        run_command_line()
    except KeyboardInterrupt:
        sys.stderr.write("robaudit: interrupted\n")
        sys.exit(INTERRUPTED)


def release_interrupts() -> None:
    """Unblock SIGINT if :func:`run` blocked it (a Ctrl-C that waited is raised here, as KeyboardInterrupt)."""
    global _held
    if _held is not None:
        previous, _held = _held, None
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
