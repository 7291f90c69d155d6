"""Report dict and rich table for ``inspect`` and ``bound``."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robaudit.bounds.results import BoundResult, EmpiricalLayer, InspectResult
from robaudit.formats.report import header, report_dict
from robaudit.formats.table import (
    fit_table,
    fmt_count,
    fmt_num,
    input_phrase,
    render_table,
    settings_line,
)
from robaudit.graph.layers import layer_label


def empirical_summary(layer: EmpiricalLayer) -> str:
    """``0.123 @3 · 0.456 @4``: the worst error measured at each tested count (the table's column)."""
    return " · ".join(f"{count.measured:.4g} @{count.failures}" for count in layer.counts)


@report_dict.register
def _inspect_dict(result: InspectResult) -> dict:
    out = header("inspect", result.model, result.settings)
    out["is_chain"] = result.is_chain
    out["layers"] = [asdict(layer) for layer in result.layers]
    out["branches"] = [asdict(branch) for branch in result.branches]
    out["other_ops"] = list(result.other_ops)
    out["output_range"] = None if result.output_range is None else list(result.output_range)
    return out


@report_dict.register
def _bound_dict(result: BoundResult) -> dict:
    out = header("bound", result.model, result.settings)
    out["layers"] = [asdict(layer) for layer in result.layers]
    out["uniform"] = {"max_failures": result.uniform, "paper": result.uniform_paper, "tight": result.uniform_tight}
    out["total"] = {
        "max_failures": result.total,
        "paper": result.total_paper,
        "tight": result.total_tight,
        "exact": result.total_exact,
    }
    if result.failures is not None:
        out["failures"] = list(result.failures)
        out["fep"] = result.fep
        out["fep_paper"] = result.fep_paper
        out["fep_tight"] = result.fep_tight
    if result.empirical:
        out["empirical"] = {
            name: {"summary": empirical_summary(layer), "counts": [asdict(c) for c in layer.counts]}
            for name, layer in result.empirical.items()
        }
    out["output_range"] = None if result.output_range is None else list(result.output_range)
    out["capped"] = result.capped
    out["notes"] = list(result.notes)
    out["hints"] = list(result.hints)
    return out


def _restriction(restricted_to: tuple[float, float] | None) -> str:
    """`` → Clip [lo, hi]`` after a layer's range where a range restriction keeps its output in [lo, hi]."""
    if restricted_to is None:
        return ""
    lo, hi = restricted_to
    return f" → Clip [{fmt_num(lo)}, {fmt_num(hi)}]"


@render_table.register
def _inspect_table(result: InspectResult, console: Console) -> None:
    table = Table(title=f"{result.model.path} — layers", title_justify="left")
    for column in (
        "#",
        "layer",
        "kind",
        "neurons",
        "fan-in",
        "fan-out",
        "max |w|",
        "activation",
        "K",
        "output range",
        "input from",
    ):
        table.add_column(
            column, justify="right" if column in ("#", "neurons", "fan-in", "fan-out", "max |w|", "K") else "left"
        )
    for la in result.layers:
        index = "out" if la.is_output else "-" if la.part else str(la.index)
        lo, hi = la.output_range
        table.add_row(
            index,
            la.name,
            la.kind,
            str(la.neurons),
            str(la.fan_in),
            str(la.fanout),
            fmt_num(la.max_weight),
            la.activation or "-",
            fmt_num(la.lipschitz),
            f"[{fmt_num(lo)}, {fmt_num(hi)}]" + _restriction(la.restricted_to),
            ", ".join(la.inputs_from),
        )
    console.print(fit_table(table, console, ("fan-out", "fan-in", "input from", "max |w|", "kind", "K")))
    console.print(
        "legend: K: Lipschitz constant of the activation; fan-out: most neurons one input neuron feeds; "
        "output range: clean values over the input range (interval propagation)"
        + ("; → Clip: the range a restriction after the layer keeps what it sends in"
           if any(la.restricted_to for la in result.layers) else "")
    )
    output = f"audited output '{result.settings.output}'"
    if result.output_range is not None:  # what bound caps every bound at
        output += f" in [{fmt_num(result.output_range[0])}, {fmt_num(result.output_range[1])}] whatever fails"
    if result.settings.inputs:  # several inputs, token ids, held values: each input's own line below
        console.print(output)
    else:
        console.print(
            f"input shape {list(result.settings.input_shape)}, input range "
            f"{list(result.settings.input_range)}, {output}"
        )
    for item in result.settings.inputs:
        console.print(input_phrase(item))
    for la in result.layers:
        if la.summands:
            summed = " + ".join(escape(name) for name in la.summands)
            console.print(
                f"sum layer '{escape(la.name)}': the activation of {summed}, summed before it (those two rows, "
                "marked -, are not failure sites; fan-in, fan-out and max |w| are theirs)"
            )
    if result.branches:
        console.print(
            "merges: " + "; ".join(f"{b.op_type} '{b.node}' ← {' + '.join(b.inputs_from)}" for b in result.branches)
        )
    else:
        console.print("graph: a chain (no residual or concatenation)")
    tolerated = [
        f"{layer_label(la.index, la.name)}: {fmt_count(la.max_failures, la.neurons)}"
        for la in result.layers
        if la.max_failures is not None
    ]
    if tolerated:
        console.print(
            f"crash failures tolerated alone at ε = {result.settings.epsilon:g} (tight): " + ", ".join(tolerated)
        )
    if result.other_ops:
        console.print("other ops on the audited path: " + ", ".join(result.other_ops))


def bound_legend(result: BoundResult) -> str:
    """One line under the bound table saying what its symbols mean."""
    parts = [
        "K: Lipschitz constant",
        "δ: largest change one failed neuron sends",
        "max failures (paper, tight): most this layer tolerates alone",
    ]
    if result.failures is not None:
        parts.append("f: failures given")
    if result.empirical:
        parts.append("measured: worst error found @ failures")
    return "legend: " + "; ".join(parts)


@render_table.register
def _bound_table(result: BoundResult, console: Console) -> None:
    settings = result.settings
    table = Table(title=f"{result.model.path} — tolerated failures at ε = {settings.epsilon:g}", title_justify="left")
    columns = ["#", "layer", "kind", "neurons", "max |w|", "K", "δ", "max failures", "paper", "tight"]
    if result.failures is not None:
        columns.append("f")
    if result.empirical:
        columns.append("measured")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for la in result.layers:
        row = [
            str(la.index),
            la.name,
            la.kind,
            str(la.neurons),
            fmt_num(la.max_weight),
            fmt_num(la.lipschitz),
            fmt_num(la.delta) if la.delta is not None else "unbounded",
            fmt_count(la.max_failures, la.neurons),
            fmt_count(la.max_failures_paper, la.neurons),
            fmt_count(la.max_failures_tight, la.neurons),
        ]
        if result.failures is not None:
            row.append(str(la.failures))
        if result.empirical:
            layer = result.empirical.get(la.name)
            row.append("-" if layer is None else empirical_summary(layer))
        table.add_row(*row)
    console.print(fit_table(table, console, (settings.method, "kind", "max |w|", "K")))
    console.print(bound_legend(result))
    console.print(settings_line(settings))
    capped = ""
    if result.layers and result.uniform > min(la.neurons for la in result.layers):
        capped = "; capped at each layer's size: all of a smaller layer"  # min(f, N_l): docs/method.md §6.2
    console.print(
        f"uniform (same count in every layer): {fmt_count(result.uniform)}  "
        f"(paper {fmt_count(result.uniform_paper)}, tight {fmt_count(result.uniform_tight)}{capped})"
    )
    total = fmt_count(result.total) + ("" if result.total_exact else "+")
    console.print(
        f"total budget (any distribution): {total}  "
        f"(paper {fmt_count(result.total_paper)}, tight {fmt_count(result.total_tight)})"
    )
    synapses = [la.synapses for la in result.layers]
    if any(synapses):
        console.print(f"failed synapses per hidden layer: {synapses} (included in every figure above)")
    if result.failures is not None:
        with_synapses = f" and synapses {synapses}" if any(synapses) else ""
        console.print(
            f"Fep for failures {list(result.failures)}{with_synapses}: {_fep(result.fep)} ({settings.method}); "
            f"paper {_fep(result.fep_paper)}, tight {_fep(result.fep_tight)}"
        )
    for note in result.notes:
        console.print(f"note: {note}")
    for hint in result.hints:
        console.print(f"hint: {escape(hint)}")


def _fep(value: float | None) -> str:
    """A Fep asked for: None means no finite bound exists (docs/method.md §2.3)."""
    return "unbounded" if value is None else fmt_num(value)
