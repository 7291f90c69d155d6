"""User-facing errors: one type per kind of bad input, all mapped to exit code 2.

Every message is one sentence that names the thing, the rule, and what came
instead (see STYLE.md); the CLI prints it as ``robaudit: <message>``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``robaudit`` command."""

    #: The command ran and found nothing wrong (``check``: every policy holds).
    OK = 0
    #: The audit found a problem: a policy is violated, or ``inject`` measured an
    #: error above the bound.
    AUDIT_FAILED = 1
    #: Bad usage or unusable input: missing file, not ONNX, unsupported op, bad flag.
    USAGE_ERROR = 2
    #: Interrupted (Ctrl-C): 128 + SIGINT, what shells report.
    INTERRUPTED = 130


class RobauditError(Exception):
    """Base of every error caused by the user's input; never a bug in robaudit."""


class ModelFileError(RobauditError):
    """The model file is missing, unreadable, too large or not a valid ONNX protobuf."""


class ExternalDataError(ModelFileError):
    """A tensor's external data points outside the model directory or is malformed."""


class ModelStructureError(RobauditError):
    """The ONNX graph is malformed: undefined inputs, cycles, duplicate names, bad dims."""


class UnsupportedModelError(RobauditError):
    """The model uses an op or a structure whose error propagation robaudit cannot bound."""

    def __init__(self, message: str, op_type: str = "", node: str = "") -> None:
        super().__init__(message)
        #: The ONNX op type that was refused, if any.
        self.op_type = op_type
        #: The name of the node that holds it, if any.
        self.node = node


class RoundingOverflowError(UnsupportedModelError):
    """A value may exceed the largest finite value of its float type — a narrow float the model rounds to
    (float16, bfloat16), or float32 under failures — and overflow to ±inf."""


class ShapeError(RobauditError):
    """A dimension is symbolic or inconsistent and ``--input-shape`` is needed."""


class OptionError(RobauditError):
    """A command-line option or API argument is out of its domain."""


class InputDataError(RobauditError):
    """An inputs or labels file is missing, malformed, or has NaN/Inf or a wrong shape."""


class PolicyError(RobauditError):
    """A ``check`` policy file is invalid (unknown key, wrong type, bad value)."""


class ReportError(RobauditError):
    """A report given back to robaudit (``inject --replay``) is unreadable or does not fit the model."""


class PlotError(RobauditError):
    """A plot was requested but cannot be produced (e.g. matplotlib is missing)."""


class InjectionRuntimeError(RobauditError):
    """onnxruntime failed (or crashed) while running the instrumented model."""
