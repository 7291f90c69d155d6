"""The shared dict builder for YAML/JSON reports (README "Reports")."""

from __future__ import annotations

from dataclasses import asdict
from functools import singledispatch

from robaudit import __version__
from robaudit.bounds.results import ModelInfo, Settings

#: Version of the report layout; bump on incompatible changes.
SCHEMA_VERSION = 1


#: Renderer modules of the commands besides inspect/bound. They import fault injection,
#: the CI gate and the applications, so they are imported on the first result no
#: renderer is registered for, not at start-up (see :func:`load_renderers`).
_LAZY_RENDERERS = (
    "robaudit.formats.inject",
    "robaudit.formats.check",
    "robaudit.formats.apps",
    "robaudit.formats.certify",
)


def load_renderers() -> bool:
    """Import the lazily registered renderer modules; True when one was not imported yet."""
    import importlib
    import sys

    missing = [name for name in _LAZY_RENDERERS if name not in sys.modules]
    for name in missing:
        importlib.import_module(name)
    return bool(missing)


@singledispatch
def report_dict(result: object) -> dict:
    """The report mapping of a result; each result type registers its builder."""
    if load_renderers():
        return report_dict(result)
    raise TypeError(f"no report builder for {type(result).__name__}")


def header(command: str, model: ModelInfo | None, settings: Settings | None) -> dict:
    """The keys every report starts with."""
    out: dict = {"schema_version": SCHEMA_VERSION, "robaudit_version": __version__, "command": command}
    if model is not None:
        out["model"] = asdict(model)
    if settings is not None:
        out["settings"] = settings_dict(settings)
    return out


def settings_dict(settings: Settings) -> dict:
    """``settings`` with ranges as lists."""
    data = asdict(settings)
    data["input_range"] = list(settings.input_range)
    data["failure_range"] = list(settings.failure_range)
    data["input_shape"] = list(settings.input_shape)
    if settings.inputs:
        data["inputs"] = [dict(item) for item in settings.inputs]
    else:
        del data["inputs"]
    if not settings.float16:
        del data["float16"]
    return data
