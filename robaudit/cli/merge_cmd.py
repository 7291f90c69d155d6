"""``robaudit merge``: shard reports of one campaign into the report a single run writes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from robaudit.cli import app
from robaudit.cli.common import wrote
from robaudit.errors import OptionError, ReportError
from robaudit.formats import OutputFormat, format_for_path
from robaudit.formats.serial import read_report_file, to_json, to_yaml
from robaudit.injection.shards import merge_reports


def _load(path: Path) -> object:
    """A JSON report with the JSON parser (YAML 1.1 reads '1e-05' as text), anything else as YAML."""
    if path.suffix.lower() != ".json":
        return read_report_file(path, "merge", ReportError)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"merge: file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"merge: cannot read '{path}' as JSON: {exc}") from None


@app.command()
def merge(
    reports: list[Path] = typer.Argument(..., help="Shard reports (YAML/JSON) of inject --shard I/N, every I once."),
    report: Path | None = typer.Option(None, "--report", "--output", "-o", help="Write the merged report to FILE."),
    fmt: OutputFormat = typer.Option(OutputFormat.yaml, "--format", "-f", help="yaml or json on stdout."),
) -> None:
    """Merge the shard reports of one random campaign (same model, settings and seed)."""
    if fmt == OutputFormat.table:
        raise OptionError("merge writes a report: --format yaml or json")
    loaded = [(str(path), _load(path)) for path in reports]
    merged = merge_reports(loaded)
    if report is not None:
        text = to_json(merged) if format_for_path(report) == OutputFormat.json else to_yaml(merged)
        try:
            report.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OptionError(f"cannot write report '{report}': {exc.strerror}") from None
        wrote("merged report", report)
    typer.echo(to_json(merged) if fmt == OutputFormat.json else to_yaml(merged), nl=False)
