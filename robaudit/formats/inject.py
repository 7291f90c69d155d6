"""Report dict and rich table for ``inject`` (README "Reports": ``measured`` and ``bound``)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robaudit.bounds.fep import STORED_MODES
from robaudit.formats.report import header, report_dict
from robaudit.formats.table import fit_table, fmt_error, fmt_num, render_table, settings_line
from robaudit.graph.layers import layer_label
from robaudit.injection.replay import ReplayedSet, ReplayResult
from robaudit.injection.results import FaultSet, InjectResult, Sizing, VectorResult, exceeds_epsilon
from robaudit.injection.shards import rate_dict, shard_dict

#: Failed elements listed per layer in the terminal table (the report lists them all).
SHOWN_ELEMENTS = 8


def _bits(values) -> list[int]:
    """Bit positions of bit-flip faults, whose values are 2^B (docs/method.md §2.3)."""
    return [int(round(math.log2(v))) for v in values]


def _fault_set_dict(fault_set: FaultSet, stored: bool = False) -> dict:
    faults = []
    for layer in fault_set.faults:
        entry: dict = {"layer": layer.layer}
        if layer.neurons:
            entry["neurons"] = list(layer.neurons)
            entry["values"] = list(layer.values)
            if stored:
                entry["bits"] = _bits(layer.values)
        if layer.synapses:
            entry["synapses"] = [list(pair) for pair in layer.synapses]
            entry["synapse_values"] = list(layer.synapse_values)
        faults.append(entry)
    return {"error": fault_set.error, "input_index": fault_set.input_index, "faults": faults}


def _finite(value: float | None) -> float | None:
    """A bound, or None (JSON null) when there is no finite one (docs/method.md §2.3)."""
    return None if value is None or value == math.inf else value


def _vector_dict(vector: VectorResult, stored: bool = False) -> dict:
    return {
        "failures": list(vector.failures),
        "synapses": list(vector.synapses),
        "measured": asdict(vector.measured),
        "bound": _finite(vector.bound),
        "fep_paper": _finite(vector.fep_paper),
        "fep_tight": _finite(vector.fep_tight),
        "ratio": vector.ratio,
        "violation": vector.violation,
        "outside_only": vector.outside_only,
        "exceeds_epsilon": vector.exceeds_epsilon,
        "flip_rate": vector.flip_rate,
        "accuracy": vector.accuracy,
        "configurations": vector.configurations,
        "evaluations": vector.evaluations,
        "worst": [_fault_set_dict(s, stored) for s in vector.worst],
        "moved_input": _moved_dict(vector, stored),
        "bracket": {"best_found": vector.best_found, "bound": _finite(vector.bound)},
        "failure_rate": None if vector.failure_rate is None else rate_dict(vector.failure_rate),
    } | ({} if vector.shard_data is None else {"shard": shard_dict(vector.shard_data)})


def _moved_dict(vector: VectorResult, stored: bool = False) -> dict | None:
    moved = vector.moved
    if moved is None:
        return None
    return {
        "error": moved.error,
        "start": moved.start,
        "radius": moved.radius,
        "input": list(moved.input),
        **{k: v for k, v in _fault_set_dict(moved.faults, stored).items() if k == "faults"},
    }


@report_dict.register
def _inject_dict(result: InjectResult) -> dict:
    out = header("inject", result.model, result.settings)
    out["layers"] = [asdict(layer) for layer in result.layers]
    head = _vector_dict(result.headline)
    for key in ("failures", "synapses", "measured", "bound", "fep_paper", "fep_tight", "ratio", "bracket"):
        out[key] = head[key]
    out["flip_rate"] = head["flip_rate"]
    out["accuracy"] = head["accuracy"]
    out["failure_rate"] = head["failure_rate"]
    out["violation"] = result.violation
    out["outside_only"] = result.outside_only
    out["exceeds_epsilon"] = result.exceeds_epsilon
    out["margin"] = {"relative": result.margin_relative, "absolute": result.margin_absolute}
    out["search"] = {"method": result.search, "trials": result.trials, "seed": result.seed, "batched": result.batched}
    if result.sizing is not None:
        out["search"]["sizing"] = _sizing_dict(result.sizing)
    out["inputs"] = asdict(result.inputs)
    stored = result.settings.mode in STORED_MODES
    out["vectors"] = [_vector_dict(v, stored) for v in result.vectors]
    out["notes"] = list(result.notes)
    if result.shard is not None:
        out["shard"] = {"index": result.shard[0], "count": result.shard[1]}
    return out


def _sizing_dict(sizing: Sizing) -> dict:
    """Statistical sizing; populations as exact decimal strings (they may have thousands of digits)."""
    return {
        "margin": sizing.margin,
        "confidence": sizing.confidence,
        "populations": ["infinite" if n is None else str(n) for n in sizing.populations],
        "trials": sizing.trials,
    }


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _fmt_fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def neuron_label(index: int, shape: tuple[int, ...]) -> str:
    """A neuron by its flat index, or as (channel, y, x) in a conv layer's [C, H, W] output."""
    if len(shape) < 2 or not 0 <= index < int(np.prod(shape)):
        return str(index)
    return "(" + ",".join(str(int(i)) for i in np.unravel_index(index, shape)) + ")"


def _faults_line(fault_set: FaultSet, stored: bool = False) -> str:
    parts = []
    for layer in fault_set.faults:
        labels = [neuron_label(i, layer.shape) for i in layer.neurons]
        if stored:
            labels = [f"{label} bit {b}" for label, b in zip(labels, _bits(layer.values), strict=True)]
        items = labels + [f"{i}→{j}" for i, j in layer.synapses]
        more = f", … ({len(items)} in all)" if len(items) > SHOWN_ELEMENTS else ""
        shown = ", ".join(items[:SHOWN_ELEMENTS]) + more
        kind = "synapses" if layer.synapses and not layer.neurons else "neurons"
        where = "(channel,y,x) " if len(layer.shape) == 3 and layer.neurons else ""
        parts.append(f"{layer_label(layer.index, escape(layer.layer))} {kind} {where}[{shown}]")
    return "; ".join(parts) or "none"


@render_table.register
def _inject_table(result: InjectResult, console: Console) -> None:
    settings = result.settings
    synapses = any(any(v.synapses) for v in result.vectors)
    neurons = any(any(v.failures) for v in result.vectors)
    failing = settings.mode if neurons or not synapses else f"{settings.mode} synapses"  # no neuron fails
    title = (
        f"{escape(result.model.path)} — fault injection at ε = {settings.epsilon:g} "
        f"({result.search} search, {failing})"
    )
    table = Table(title=title, title_justify="left")
    columns = ["failures"] + (["synapses"] if synapses else []) + ["max", "mean", "p95", "flips"]
    columns += (["accuracy"] if result.inputs.has_labels else []) + ["bound", "best/bound", "status"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("failures", "synapses", "status") else "right")
    for vector in result.vectors:
        row = [str(list(vector.failures))] + ([str(list(vector.synapses))] if synapses else [])
        row += [fmt_error(vector.measured.max), fmt_error(vector.measured.mean), fmt_error(vector.measured.p95)]
        row.append(_fmt_fraction(vector.flip_rate))
        if result.inputs.has_labels:
            row.append(_fmt_fraction(vector.accuracy))
        row += [fmt_num(vector.bound), _fmt_ratio(vector.ratio)]
        row.append(_status(vector, result.settings.epsilon))
        table.add_row(*row)
    console.print(fit_table(table, console, ("mean", "p95", "flips", "best/bound")))
    console.print(COLUMNS_LEGEND + (WORST_LEGEND if result.search == "worst" else ""))
    console.print(STATUS_LEGEND)
    if any("(moved input)" in _status(v, result.settings.epsilon) for v in result.vectors):
        console.print(MOVED_LEGEND)
    console.print(settings_line(settings))
    inputs = result.inputs
    line = f"inputs: {escape(inputs.source)} ({_inputs_count(inputs.count)})"
    if inputs.clean_accuracy is not None:
        line += f", clean accuracy {inputs.clean_accuracy:.1%}"
    console.print(line)
    head = result.headline
    console.print(
        f"search: {result.search}, {head.configurations} fault sets, {head.evaluations} evaluations, "
        f"seed {result.seed}" + ("" if result.batched else " (one row per onnxruntime run)")
    )
    console.print(
        f"bound ({settings.method}): paper {fmt_num(head.fep_paper)}, tight {fmt_num(head.fep_tight)}; "
        f"violation above bound·(1+{result.margin_relative:g}) + {result.margin_absolute:.3g}"
    )
    if head.failure_rate is not None:
        rate = head.failure_rate
        console.print(
            f"failure rate (error > ε = {settings.epsilon:g}): {rate.failing}/{rate.sets} = {rate.rate:.2%}, "
            f"{rate.confidence:.0%} Wilson interval [{rate.low:.2%}, {rate.high:.2%}]"
        )
    if result.sizing is not None:
        console.print(
            f"sized for ±{result.sizing.margin:g} at {result.sizing.confidence:.0%} confidence: "
            f"{result.sizing.trials} fault sets (Leveugle et al., DATE 2009)"
        )
    if result.shard is not None:
        console.print(f"shard {result.shard[0]}/{result.shard[1]}: merge every shard with robaudit merge")
    if head.worst:
        worst = head.worst[0]
        console.print(
            f"worst fault set (error {fmt_error(worst.error)} on input {worst.input_index}): "
            f"{_faults_line(worst, settings.mode in STORED_MODES)}"
        )
    if head.moved is not None:
        moved = head.moved
        where = "the domain" if moved.radius is None else f"radius {moved.radius:g} of the inputs"
        below = (f"; below the {fmt_error(head.measured.max)} of the given inputs, which stays the best found"
                 if moved.error <= head.measured.max else "")
        console.print(
            f"moving the input too (within {where}, from {escape(moved.start)}): error {fmt_error(moved.error)} "
            f"(the input is in the report{below})"
        )
        console.print(f"  with {_faults_line(moved.faults, settings.mode in STORED_MODES)}")
        caveat = (
            " (measured on inputs partly outside the domain, where the bound makes no claim: a lower end of the "
            "domain's true worst only if it came from inputs inside it)"
            if result.inputs.outside_domain > 0
            else ""
        )
        console.print(
            f"bracket: best found {fmt_error(head.best_found)} ≤ true worst ≤ bound {fmt_num(head.bound)}{caveat}"
        )
    console.print(epsilon_line(result))
    for note in result.notes:
        console.print(f"note: {escape(note)}")


#: The legend printed under the inject table.
STATUS_LEGEND = (
    "status: ok: measured ≤ ε; > ε: measured above ε (not ε-robust); "
    "VIOLATION: measured above the bound (a defect or a violated assumption)"
)
#: Added under the legend when a row's status is '> ε (moved input)'.
MOVED_LEGEND = "'> ε (moved input)': only on the input the worst search moved (the max column is within ε)"

#: What the measured columns are over (``max`` and ``best/bound`` differ when the worst search moved the input).
COLUMNS_LEGEND = (
    "legend: max, mean, p95: over the fault sets and the inputs given or drawn; best/bound: the largest error "
    "found (on the moved input too) over the bound"
)

#: With ``--search worst`` the fault sets are those the search tried, chosen to be bad: the mean, p95, flips and
#: accuracy over them are not what a random failure does (a new-user trial read them as typical rates).
WORST_LEGEND = "; here over the sets the worst search tried: bad failures, not typical ones (--search random)"


def _status(vector: VectorResult, epsilon: float | None) -> str:
    if vector.violation:
        return "[yellow]above bound (inputs outside range)[/]" if vector.outside_only else "[bold red]VIOLATION[/]"
    if not vector.exceeds_epsilon:
        return "ok"
    # the max column (the given inputs) stays within ε where only the moved input exceeds it
    given = epsilon is None or exceeds_epsilon(vector.measured.max, epsilon)
    return "[yellow]> ε[/]" if given else "[yellow]> ε (moved input)[/]"


def epsilon_line(result: InjectResult) -> str:
    """One line: how the largest errors found compare with ε (docs/method.md §8.2).

    Each vector is quoted by its best found error — with ``--search worst`` that may be the
    configuration found by moving the input, which the line then says.
    """
    epsilon = result.settings.epsilon
    over = [v for v in result.vectors if v.exceeds_epsilon]
    if not over:
        worst = max(result.vectors, key=lambda v: v.best_found)
        return f"ε = {epsilon:g}: every measured error ≤ ε (largest {_found(worst)})"
    shown = ", ".join(f"{_vector(v)} (measured {_found(v)})" for v in over[:4])
    return (
        f"ε = {epsilon:g}: {len(over)} of {len(result.vectors)} failure vector(s) exceed ε — the model is "
        f"not ε-robust for {shown}"
    )


def _vector(vector: VectorResult) -> str:
    """The failure vector as the table shows it: neuron counts, and the synapse counts when any."""
    synapses = f", synapses {list(vector.synapses)}" if any(vector.synapses) else ""
    return f"{list(vector.failures)}{synapses}"


def _found(vector: VectorResult) -> str:
    """The best found error of a vector and, when the worst search moved the input, on which inputs."""
    if vector.moved is None:
        return fmt_error(vector.best_found)
    if vector.moved.error > vector.measured.max:
        return f"{fmt_error(vector.best_found)} on the moved input"
    return f"{fmt_error(vector.best_found)} on the campaign's inputs"


# --------------------------------------------------------------------------- inject --replay


def _replayed_dict(replayed: ReplayedSet, stored: bool) -> dict:
    recorded = replayed.recorded
    fault_set = FaultSet(recorded.faults, recorded.error, recorded.input_index)
    return {
        "failures": list(recorded.vector.neurons),
        "synapses": list(recorded.vector.synapse_counts()),
        "faults": _fault_set_dict(fault_set, stored)["faults"],
        "recorded": {"error": recorded.error, "input_index": recorded.input_index},
        "measured": {"max": replayed.error, "input_index": replayed.input_index},
        "reproduced": replayed.reproduced,
        "bound": replayed.bound,
        "fep_paper": replayed.fep_paper,
        "fep_tight": replayed.fep_tight,
        "violation": replayed.violation,
    }


@report_dict.register
def _replay_dict(result: ReplayResult) -> dict:
    out = header("inject", result.model, result.settings)
    out["layers"] = [asdict(layer) for layer in result.layers]
    out["replay"] = {"report": result.report, "reproduced": result.reproduced}
    out["measured"] = {"max": max(s.error for s in result.sets)}
    out["violation"] = result.violation
    out["margin"] = {"relative": result.margin_relative, "absolute": result.margin_absolute}
    out["inputs"] = asdict(result.inputs)
    stored = result.settings.mode in STORED_MODES
    out["sets"] = [_replayed_dict(s, stored) for s in result.sets]
    out["notes"] = list(result.notes)
    return out


def _at(index: int) -> str:
    """Where an error was measured: @N for the campaign's input N, '@moved' for the input the worst search
    moved (index −1 in the report)."""
    return "@moved" if index < 0 else f"@{index}"


@render_table.register
def _replay_table(result: ReplayResult, console: Console) -> None:
    title = f"{escape(result.model.path)} — fault sets of {escape(result.report)}, run again"
    table = Table(title=title, title_justify="left")
    for column in ("failures", "fault set", "recorded", "replayed", "bound", "status"):
        table.add_column(column, justify="left" if column in ("failures", "fault set", "status") else "right")
    for replayed in result.sets:
        recorded = replayed.recorded
        faults = FaultSet(recorded.faults, recorded.error, recorded.input_index)
        status = _replayed_status(replayed, result.settings.epsilon)
        if not replayed.reproduced:
            status += " [yellow](differs)[/]"
        table.add_row(
            str(list(recorded.vector.neurons)),
            _faults_line(faults, result.settings.mode in STORED_MODES),
            f"{fmt_error(recorded.error)} {_at(recorded.input_index)}",
            f"{fmt_error(replayed.error)} {_at(replayed.input_index)}",
            fmt_num(replayed.bound),
            status,
        )
    console.print(fit_table(table, console, ()))
    console.print(REPLAY_STATUS_LEGEND, markup=False, highlight=False)
    console.print(settings_line(result.settings))
    console.print(f"inputs: {escape(result.inputs.source)} ({_inputs_count(result.inputs.count)})")
    verdict = "every recorded error reproduced" if result.reproduced else "some recorded errors differ"
    console.print(f"{verdict}; violation above bound·(1+{result.margin_relative:g}) + {result.margin_absolute:.3g}")
    for note in result.notes:
        console.print(f"note: {escape(note)}")


#: The legend under the replay table: the statuses of inject's own table (a new-user trial read a replay's 'ok'
#: for an error above ε, which there meant "within the bound").
REPLAY_STATUS_LEGEND = (
    "status: ok: replayed ≤ ε; > ε: replayed above ε (not ε-robust); VIOLATION: replayed above the bound; "
    "(differs): not the recorded error"
)


def _replayed_status(replayed: ReplayedSet, epsilon: float | None) -> str:
    """inject's status of one replayed set: VIOLATION, > ε or ok."""
    if replayed.violation:
        return "[bold red]VIOLATION[/]"
    return "[yellow]> ε[/]" if epsilon is not None and exceeds_epsilon(replayed.error, epsilon) else "ok"


def _inputs_count(count: int) -> str:
    """"1 input", "20 inputs"."""
    return f"{count} input" if count == 1 else f"{count} inputs"
