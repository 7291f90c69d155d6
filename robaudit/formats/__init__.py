"""Rendering of results: one formatter per output format, one dict builder per result.

``report_dict`` (in ``formats/report.py`` and the per-command modules) turns a result
into the plain mapping that YAML and JSON share; ``render_table`` draws it with rich.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from robaudit.errors import OptionError
from robaudit.formats import bound as _bound  # noqa: F401  (registers renderers)
from robaudit.formats.report import report_dict
from robaudit.formats.serial import to_json, to_yaml


class OutputFormat(StrEnum):
    """``--format`` choices."""

    table = "table"
    yaml = "yaml"
    json = "json"


_SERIALIZERS = {OutputFormat.yaml: to_yaml, OutputFormat.json: to_json}
_SUFFIXES = {".yaml": OutputFormat.yaml, ".yml": OutputFormat.yaml, ".json": OutputFormat.json}


def render_text(result: object, fmt: OutputFormat) -> str:
    """The machine-readable report of ``result`` as YAML or JSON text."""
    return _SERIALIZERS[fmt](report_dict(result))


def format_for_path(path: Path) -> OutputFormat:
    """The format implied by a report file's suffix."""
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        tensor = f"; a tensor to audit is named with --output-tensor {path.name}" if not path.suffix else ""
        raise OptionError(
            f"report file '{path}': cannot tell the format from the suffix '{path.suffix}' (use .yaml, .yml or "
            f".json){tensor}"
        ) from None


def write_report(result: object, path: Path) -> None:
    """Write the report to ``path`` in the format its suffix names."""
    fmt = format_for_path(path)
    try:
        path.write_text(render_text(result, fmt), encoding="utf-8")
    except OSError as exc:
        raise OptionError(f"cannot write report '{path}': {exc.strerror}") from None
