"""The ``robaudit`` command: a thin Typer layer over the library.

Only this package imports Typer, prints, and calls ``sys.exit``. Every user error is
a :class:`~robaudit.errors.RobauditError` (or a click usage error) and becomes one
line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, cast

import typer

from robaudit import __version__
from robaudit.console import INTERRUPTED, release_interrupts
from robaudit.errors import ExitCode, RobauditError

# One BLAS thread unless the user chose otherwise — set before numpy is first imported (nothing
# imported above loads it). The bounds run many small matrix products, and OpenBLAS's threads on
# them cost far more than they give whenever another process shares the cores (a CI runner,
# parallel jobs): measured on the 2-core development machine under load, `bound` on the MobileNet
# sample took 14.3 s with two threads and 1.2 s with one (README "Speed").
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

app = typer.Typer(
    name="robaudit",
    help="How many neurons of each layer may fail before the output moves by more than ε? "
    "Bounds (El Mhamdi & Guerraoui, IPDPS 2017) and fault injection for ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"robaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """robaudit: fault-tolerance audits of ONNX neural networks."""


#: The module that defines each command (imported only when that command runs).
_COMMAND_MODULES = {
    "inspect": "commands",
    "bound": "commands",
    "inject": "inject_cmd",
    "merge": "merge_cmd",
    "check": "check_cmd",
    "certify": "certify_cmd",
    "precision": "apps_cmd",
    "wait": "apps_cmd",
    "design": "apps_cmd",
    "harden": "apps_cmd",
}


def _register_commands(argv: list[str] | None = None) -> None:
    """Import the command modules (each registers its commands with ``app``).

    When ``argv`` names a command, only that command's module is imported: the others
    pull in fault injection, the CI gate and the applications, ~30 ms of start-up that a
    ``bound`` does not need; ``--version`` alone needs none. Help and unknown commands get
    all of them.
    """
    args = argv or []
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command is None and "--version" in args and "--help" not in args:
        return  # the version needs no command
    wanted = [_COMMAND_MODULES[command]] if command in _COMMAND_MODULES else sorted(set(_COMMAND_MODULES.values()))
    for name in wanted:
        __import__(f"robaudit.cli.{name}")


def error_line(message: str) -> None:
    """Print one ``robaudit: ...`` line on stderr.

    Names inside the message come from the model file: control characters (terminal
    escape sequences, NUL) are shown escaped and the line is cut at 2000 characters.
    """
    first = " ".join(str(message).split())
    first = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in first)
    if len(first) > 2000:
        first = first[:2000] + "…"
    sys.stderr.write(f"robaudit: {first}\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    from robaudit.cli.consoles import fit_consoles
    from robaudit.cli.process import retain_freed_memory

    retain_freed_memory()
    fit_consoles()
    if not os.environ.get("ROBAUDIT_DEBUG"):  # an overflow to inf is a bound robaudit reports as unbounded
        # (numpy's own reductions, ``a.sum()``, warn from numpy's modules, not from the caller's)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"(robaudit|numpy)\.")
    _register_commands(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    from robaudit.cli.helptext import polish

    polish(command)
    try:
        release_interrupts()  # the command line is loaded: a Ctrl-C that waited stops it here
        result = command.main(args=argv, prog_name="robaudit", standalone_mode=False)
    except RobauditError as exc:
        error_line(str(exc))
        return ExitCode.USAGE_ERROR
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        error_line("aborted")
        return ExitCode.USAGE_ERROR
    except (MemoryError, RecursionError) as exc:
        error_line(f"the model is too large or too deep to analyse ({type(exc).__name__})")
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        error_line("interrupted")
        return INTERRUPTED
    except Exception as exc:  # a bug in robaudit: still one line, traceback on request
        if _is_usage_error(exc):
            return _usage_error(exc, command, argv if argv is not None else sys.argv[1:])
        if os.environ.get("ROBAUDIT_DEBUG"):
            raise
        error_line(
            f"internal error ({type(exc).__name__}: {exc}); rerun with ROBAUDIT_DEBUG=1 "
            "for the traceback and please report it"
        )
        return ExitCode.USAGE_ERROR
    if result == INTERRUPTED:  # Typer returns a Ctrl-C in a command as this code (no command returns it)
        error_line("interrupted")
    return int(result or 0)


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors (Typer vendors click, so match by shape, not by class)."""
    return hasattr(exc, "format_message") and hasattr(exc, "exit_code")


def _usage_error(exc: Exception, group: Any, argv: list[str]) -> int:
    message: str = cast(Any, exc).format_message()  # a click usage error (see _is_usage_error)
    if type(exc).__name__ == "NoArgsIsHelpError":
        sys.stdout.write(message + "\n")
        return ExitCode.OK
    command = getattr(getattr(exc, "ctx", None), "command_path", None) or "robaudit"
    if command == "robaudit":  # an option's missing value is raised without the subcommand's context
        named = next((word for word in argv if not word.startswith("-")), None)
        if named in getattr(group, "commands", {}):
            command = f"robaudit {named}"
    error_line(f"{message} (see '{command} --help')")
    return ExitCode.USAGE_ERROR


def run() -> None:  # pragma: no cover - console script
    """The console script's command line (:func:`robaudit.console.run` calls it): its own process, so large
    blocks from the heap too (:func:`~robaudit.cli.process.serve_large_blocks_from_heap`)."""
    from robaudit.cli.process import serve_large_blocks_from_heap

    serve_large_blocks_from_heap()
    sys.exit(main())
