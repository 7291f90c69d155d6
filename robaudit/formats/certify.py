"""Report dict and rich table for ``certify`` (README "certify": per input ``bound``/``certified``,
``max_bound``, ``certified_fraction``, ``certified_accuracy``, per layer ``max_failures_certified``)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robaudit.bounds.certify import CertifyResult
from robaudit.bounds.results import ModelInfo
from robaudit.formats.report import header, report_dict
from robaudit.formats.table import fmt_count, fmt_num, render_table, settings_line

#: Inputs listed in the terminal table (the report lists them all).
SHOWN_INPUTS = 10


@report_dict.register
def _certify_dict(result: CertifyResult) -> dict:
    out = header("certify", result.model, result.settings)  # type: ignore[arg-type]
    out["inputs_file"] = result.inputs_file
    out["radius"] = result.radius
    out["max_bound"] = result.max_bound
    out["certified_fraction"] = result.certified_fraction
    out["certified_accuracy"] = result.certified_accuracy
    out["classes"] = result.classes
    out["layers"] = [
        {
            "name": la.name,
            "kind": la.kind,
            "neurons": la.neurons,
            "max_weight": la.max_weight,
            "lipschitz": la.lipschitz,
            "delta": la.delta,
            "failures": la.failures,
            # certify's tolerated count is the one at the given inputs (docs/method.md §7.5)
            "max_failures": la.max_failures_certified,
            "max_failures_certified": la.max_failures_certified,
        }
        for la in result.layers
    ]
    out["inputs"] = [
        {
            "index": c.index,
            "bound": c.bound,
            "certified": c.certified,
            "predicted": c.predicted,
            "label": c.label,
            "margin": c.margin,
            "margin_slack": c.margin_slack,
        }
        for c in result.inputs
    ]
    out["notes"] = list(result.notes)
    return out


@render_table.register
def _certify_table(result: CertifyResult, console: Console) -> None:
    if isinstance(result.model, ModelInfo):  # the title line of every command's table
        console.print(f"{escape(result.model.path)} — certificates under failures", highlight=False)
    if result.settings is not None:
        console.print(escape(settings_line(result.settings)))  # type: ignore[arg-type]
    where = "the inputs" if result.radius is None else f"every input within {result.radius:g} (∞-norm) of each"
    console.print(f"certificates at {where} of {escape(result.inputs_file or 'the given file')}")
    if not result.classes:
        console.print(f"no classes: an input is certified when its bound is at most ε = {result.epsilon:g}")
    layers = Table(title="failures per layer", title_justify="left")
    for column in ("layer", "neurons", "failures", "max_failures_certified"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    for la in result.layers:
        searched = la.max_failures_certified
        count = "not searched" if searched is None else fmt_count(searched, la.neurons)
        layers.add_row(escape(la.name), str(la.neurons), str(la.failures), count)
    console.print(layers)
    shown = min(SHOWN_INPUTS, len(result.inputs))
    table = Table(title=f"inputs (first {shown} of {len(result.inputs)})", title_justify="left")
    # over a radius the clean margin is a lower bound too (interval ranges of the box), not the margin at the input
    clean = "smallest margin" if result.radius is None else "smallest margin ≥"
    for column in ("input", "bound", "certified", "predicted", "label", clean, "margin under failures ≥"):
        table.add_column(column, justify="right")
    for c in result.inputs[:SHOWN_INPUTS]:
        table.add_row(
            str(c.index),
            fmt_num(c.bound),
            "yes" if c.certified else "NO",
            "-" if c.predicted is None else str(c.predicted),
            "-" if c.label is None else str(c.label),
            fmt_num(c.margin),
            fmt_num(c.margin_slack),
        )
    console.print(table)
    line = f"max bound {fmt_num(result.max_bound)}, certified {result.certified_fraction:.1%}"
    if result.certified_accuracy is not None:
        line += f", certified accuracy {result.certified_accuracy:.1%}"
    console.print(line)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
