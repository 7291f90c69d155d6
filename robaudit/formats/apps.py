"""Report dicts and rich tables for ``precision``, ``wait`` and ``design`` (docs/method.md §9.1, README "Reports")."""

from __future__ import annotations

import math
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from robaudit.applications import (
    DesignResult,
    PrecisionResult,
    SimulationCheck,
    WaitResult,
)
from robaudit.applications.harden import HardenResult
from robaudit.bounds.results import Settings
from robaudit.formats.report import header, report_dict
from robaudit.formats.table import fit_table, fmt_count, fmt_num, render_table, settings_line

# --------------------------------------------------------------------------- report dicts



def written_form(settings: Settings | None) -> str:
    """What a model ``design`` writes is, when it is not the input's form: a float16 model is written as the
    float32 arithmetic robaudit read, with every rounding explicit (docs/method.md §1.2)."""
    if not _float16(settings):
        return ""
    return " (in float32 with a Cast to float16 and back after every rounded op: what the float16 model computes)"

def _float16(settings: Settings | None) -> bool:
    return settings is not None and settings.float16


def _check_dict(check: SimulationCheck | None) -> dict | None:
    if check is None:
        return None
    return {
        "ok": check.ok,
        "inputs": check.inputs,
        "source": check.source,
        "tolerance": check.tolerance,
        "runs": [
            {"config": r.config, "bound": r.bound, "measured": {"max": r.max, "mean": r.mean}, "ok": r.ok}
            for r in check.runs
        ],
        "notes": list(check.notes),
    }


@report_dict.register
def _harden_dict(result: HardenResult) -> dict:
    data = asdict(result)
    del data["model"], data["settings"]
    return {**header("harden", result.model, result.settings), **data}


def _unbounded_or(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.4g}"


def _calibration_note(result: HardenResult) -> str:
    """Where every Clip is the range seen (no --margin): the check ran on the very inputs the ranges came from,
    which no Clip can change; say so, and what tells more (a new user read 100 % as a verdict on unseen data)."""
    exact = all(la.low == la.seen_low and la.high == la.seen_high for la in result.layers)
    if not exact or not result.layers:
        return ""
    return " (the very inputs the ranges came from; unseen ones beyond a range get clipped)"


@render_table.register
def _harden_table(result: HardenResult, console: Console) -> None:
    if result.settings is not None:
        console.print(settings_line(result.settings), markup=False, highlight=False)
    for layer in result.layers:
        seen = f"[{layer.seen_low:.4g}, {layer.seen_high:.4g}]"
        clip = f"Clip [{layer.low:.4g}, {layer.high:.4g}]"
        if layer.channel_low is not None and layer.channel_high is not None:
            widths = [hi - lo for lo, hi in zip(layer.channel_low, layer.channel_high, strict=True)]
            clip = (
                f"{len(widths)} ranges within [{layer.low:.4g}, {layer.high:.4g}], "
                f"widths {min(widths):.4g} to {max(widths):.4g}"
            )
        console.print(f"{layer.name}: seen {seen} -> {clip}", markup=False, highlight=False)
    lines = [
        f"wrote {result.output}{' (in float16, as the model computes)' if _float16(result.settings) else ''}",
        f"on {result.inputs} inputs: max output change {result.max_output_change:.3g}, "
        f"arg-max agreement {result.agreement:.1%}" + _calibration_note(result),
    ]
    if result.accuracy_before is not None and result.accuracy_after is not None:
        lines.append(f"accuracy: {result.accuracy_before:.2%} before, {result.accuracy_after:.2%} after")
    lines += [
        f"crash, 1 per layer: Fep {_unbounded_or(result.fep_before)} before, {_unbounded_or(result.fep_after)} after; "
        f"tolerated in every layer at ε = {result.epsilon:g}: {result.uniform_before} before, "
        f"{result.uniform_after} after",
        f"bit flip, 1 per layer: Fep {_unbounded_or(result.bit_flip_before)} before, "
        f"{_unbounded_or(result.bit_flip_after)} after",
        "(Fep here: the tight bound of the searches, the same rule on both models; `bound --crash 1` refines it "
        "for that one vector, docs/method.md §4.1)",
    ]
    worse = _worse_after(result)
    if worse:
        lines.insert(-1, worse)
    if result.alone_before:
        pairs = ", ".join(
            f"{layer.name} {b}→{a}"
            for layer, b, a in zip(result.layers, result.alone_before, result.alone_after, strict=True)
        )
        lines.insert(-1, f"crash failures tolerated alone at ε = {result.epsilon:g}, before→after: {pairs}")
    for line in lines:
        console.print(line, markup=False, highlight=False)


def _worse_after(result: HardenResult) -> str:
    """The line saying the crash bound grew with the restrictions, or "" (a new-user trial saw 51.09 → 63.28 pass
    without a word)."""
    before, after = result.fep_before, result.fep_after
    if before is None or after is None or after <= before * (1 + 1e-9):
        return ""
    return (f"note: the crash bound is higher after ({after:.4g} > {before:.4g}): the Clips do not narrow what the "
            "layers reach on the input range here; keep the original, or try a smaller --margin or --per-channel")


@report_dict.register
def _precision_dict(result: PrecisionResult) -> dict:
    out = header("precision", result.model, result.settings)
    out["quantize"] = result.quantize
    out["layers"] = [asdict(la) for la in result.layers]  # tuples become lists in formats/serial.py
    out["uniform_bits"] = result.uniform_bits
    out["fep_uniform"] = result.fep_uniform
    out["together"] = {
        "bits": [la.bits_together for la in result.layers],
        "fep": result.fep_together,
        "memory_bits": result.memory_together,
    }
    out["memory_bits_uniform"] = result.memory_uniform
    out["formats"] = {
        f.name: {"kind": f.kind, "error_model": f.error_model, "bound": f.bound, "safe": f.safe, "reason": f.reason}
        for f in result.formats
    }
    if result.check is not None:
        out["check"] = _check_dict(result.check)
    out["notes"] = list(result.notes)
    return out


@report_dict.register
def _wait_dict(result: WaitResult) -> dict:
    out = header("wait", result.model, result.settings)
    out["layers"] = [asdict(la) for la in result.layers]  # tuples become lists in formats/serial.py
    out["together"] = {
        "wait_for": [la.wait_for_together for la in result.layers],
        "fep": result.fep_together,
    }
    if result.check is not None:
        out["check"] = _check_dict(result.check)
    out["notes"] = list(result.notes)
    return out


@report_dict.register
def _design_dict(result: DesignResult) -> dict:
    out = header("design", result.model, result.settings)
    out["layers"] = [asdict(la) for la in result.layers]  # tuples become lists in formats/serial.py
    out["output_layer"] = None if result.output_layer is None else asdict(result.output_layer)
    out["tolerate"] = list(result.tolerate)
    out["fep"] = result.fep
    out["shrink_factor"] = result.shrink_factor
    out["fep_scaled"] = result.fep_scaled
    if result.written is not None:
        out["written"] = result.written
    if result.check is not None:
        check = asdict(result.check)
        check["max_failures"] = list(result.check.max_failures)
        out["check"] = check
    out["notes"] = list(result.notes)
    return out


# --------------------------------------------------------------------------- tables


def _range(pair: tuple[float, float]) -> str:
    return f"[{fmt_num(pair[0])}, {fmt_num(pair[1])}]"


def _factor(value: float | None) -> str:
    if value is None:
        return "none"
    if math.isinf(value):
        return "any"
    return fmt_num(value)


def _bits(value: int | None) -> str:
    return "> 64" if value is None else str(value)


def _print_check(check: SimulationCheck | None, console: Console) -> None:
    if check is None:
        return
    table = Table(title="--check: measured in onnxruntime", title_justify="left")
    for column in ("configuration", "bound", "measured max", "mean", "≤ bound"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for run in check.runs:
        table.add_row(run.config, fmt_num(run.bound), fmt_num(run.max), fmt_num(run.mean), "yes" if run.ok else "NO")
    console.print(fit_table(table, console, ("mean",)))
    console.print(f"inputs: {check.source}")
    if check.ok:
        console.print(f"check: every measured error is within its bound (float32 tolerance {check.tolerance:.2g})")
    else:
        console.print("[bold red]check FAILED: a measured error is above its bound[/bold red]")
    for note in check.notes:
        console.print(f"note: {note}")


def _verdict_line(result: PrecisionResult) -> str:
    eps = math.inf if result.settings.epsilon is None else result.settings.epsilon  # precision always sets ε
    parts = []
    measured = {run.site: run for run in result.check.runs} if result.check is not None else {}
    for f in result.formats:
        # A bound above ε proves nothing either way; an overflow or a measured error above ε is a real failure.
        run = measured.get(f.name)
        failed = bool(f.reason) or (run is not None and run.max > eps)
        word = "safe" if f.safe else ("NOT safe" if failed else "not proven safe")
        why = f"; {f.reason}" if f.reason else ""
        seen = f"; measured {fmt_num(run.max)}{' > ε' if run is not None and run.max > eps else ''}" if run else ""
        parts.append(f"{f.name} {word} (bound {fmt_num(f.bound)} {'≤' if f.bound <= eps else '>'} ε{seen}{why})")
    line = "at a glance: " + ", ".join(parts)
    # a calibrated int8 model's grid is finer: say which one this is
    if result.quantize == "outputs" and any(f.name == "int8" and not f.safe for f in result.formats):
        line += "; int8's grid spans each layer's range column (the whole input domain), not a calibration set's"
    return line


@render_table.register
def _precision_table(result: PrecisionResult, console: Console) -> None:
    settings = result.settings
    what = "weights" if result.quantize == "weights" else "layer outputs"
    table = Table(title=f"{result.model.path} — bits for {what} at ε = {settings.epsilon:g}", title_justify="left")
    columns = ["#", "layer", "kind", "values", "range", "gain", "bits", "bound", "together"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "kind", "range") else "right")
    for la in result.layers:
        table.add_row(
            "out" if la.is_output else str(la.index),
            la.name,
            la.kind,
            str(la.values),
            _range(la.range),
            fmt_num(la.gain),
            str(la.bits),
            fmt_num(la.bound_at_bits),
            _bits(la.bits_together),
        )
    console.print(fit_table(table, console, ("kind", "values", "gain")))
    console.print(settings_line(settings))
    console.print("bits: this layer alone rounded; together: every layer rounded at once (fewest stored bits)")
    if result.uniform_bits is None:
        console.print("uniform bits (same count everywhere): more than 64")
    else:
        console.print(
            f"uniform bits (same count everywhere): {result.uniform_bits}  (bound {fmt_num(result.fep_uniform)}, "
            f"{result.memory_uniform} bits stored; together: {result.memory_together} bits, "
            f"bound {fmt_num(result.fep_together)})"
        )
    console.print(_verdict_line(result))
    for note in result.notes:
        console.print(f"note: {note}")
    _print_check(result.check, console)


@render_table.register
def _wait_table(result: WaitResult, console: Console) -> None:
    settings = result.settings
    table = Table(
        title=f"{result.model.path} — signals each neuron must wait for at ε = {settings.epsilon:g}",
        title_justify="left",
    )
    columns = ["#", "layer", "kind", "neurons", "fan-in", "d", "bound per signal", "may ignore", "wait for", "together"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for la in result.layers:
        table.add_row(
            str(la.index),
            la.name,
            la.kind,
            str(la.neurons),
            str(la.fan_in),
            fmt_num(la.synapse_delta),
            fmt_num(la.cost_per_signal),
            str(la.ignore),
            f"{la.wait_for} of {la.fan_in}",
            f"{la.wait_for_together} of {la.fan_in}",
        )
    console.print(fit_table(table, console, ("kind", "d", "neurons")))
    together = (
        f"every layer ignoring its share at once (bound {fmt_num(result.fep_together)})"
        if any(la.wait_for_together < la.fan_in for la in result.layers)
        else "every layer at once (none may be ignored there: nothing to bound)"
    )
    console.print(
        "legend: d: the most one missing signal changes a neuron's pre-activation; bound per signal: the bound for "
        "one missing signal per neuron of this layer alone; may ignore: signals per neuron this layer may miss "
        f"alone within ε; wait for: the fan-in less what it may ignore; together: {together}"
    )
    console.print(settings_line(settings))
    for note in result.notes:
        console.print(f"note: {note}")
    _print_check(result.check, console)


@render_table.register
def _design_table(result: DesignResult, console: Console) -> None:
    settings = result.settings
    table = Table(
        title=f"{result.model.path} — weights for tolerating {list(result.tolerate)} failures at ε = "
        f"{settings.epsilon:g}",
        title_justify="left",
    )
    columns = ["#", "layer", "kind", "neurons", "tolerate", "max |w|", "max |w| allowed", "factor", "max failures now"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for la in result.layers:
        table.add_row(
            str(la.index),
            la.name,
            la.kind,
            str(la.neurons),
            str(la.tolerate),
            fmt_num(la.max_weight),
            _factor(la.max_weight_allowed),
            _factor(la.weight_factor),
            fmt_count(la.max_failures, la.neurons),
        )
    out = result.output_layer
    if out is not None:
        table.add_row(
            "out",
            out.name,
            "output",
            "",
            "",
            fmt_num(out.max_weight),
            _factor(out.max_weight_allowed),
            _factor(out.weight_factor),
            "",
        )
    console.print(fit_table(table, console, ("kind", "neurons", "max |w|")))
    console.print(settings_line(settings))
    none = any(la.max_weight_allowed is None for la in result.layers)
    console.print(
        "max |w| allowed: this layer's weights alone change (other weights and all value ranges fixed)"
        + ("; none: even at 0 this layer's weights leave the bound above ε (the failures of this layer and of later "
           "ones do not pass through them)" if none else "")
    )
    now = "unbounded" if result.fep is None else fmt_num(result.fep)
    console.print(f"bound of up to the required failures now: {now} (every vector of at most these "
                  "counts; `bound` of exactly these counts may be lower)")
    shrink = result.shrink_factor
    if shrink is not None and math.isfinite(shrink):
        verb = "shrink every weight by" if shrink < 1 else "every weight may grow by up to"
        console.print(
            f"shrink factor: {fmt_num(shrink)}  ({verb} ×{fmt_num(shrink)}, biases unchanged; "
            f"bound after scaling {fmt_num(result.fep_scaled)}, ranges recomputed)"
        )
    else:
        console.print(f"shrink factor: {_factor(shrink)}")
    if result.written is not None:
        console.print(f"scaled model written to {result.written}{written_form(result.settings)}")
    for note in result.notes:
        console.print(f"note: {note}")
    check = result.check
    if check is not None:
        changed = ": the scaled model changes predictions (below)" if check.predictions_changed else ""
        state = "confirmed" if check.ok else "[bold red]NOT confirmed[/bold red]" + changed
        console.print(
            f"check: bound on {check.path}: Fep {fmt_num(check.fep)} for {list(result.tolerate)}, "
            f"uniform {fmt_count(check.uniform)}, per layer {list(check.max_failures)} — {state}"
        )
        if check.inputs:
            accuracy = (
                f", accuracy {check.accuracy_before:.1%} → {check.accuracy_after:.1%}"
                if check.accuracy_before is not None and check.accuracy_after is not None
                else ""
            )
            console.print(
                f"check against the model ({check.source}) — predictions unchanged on {check.agreement:.1%}, "
                f"largest output change {fmt_num(check.max_output_change)}{accuracy}"
            )
            if check.agreement < 1.0:
                console.print(
                    "note: scaling the weights changed the model's predictions; range restriction keeps them "
                    "(`robaudit harden MODEL --inputs FILE -o OUT.onnx` prints its bound before and after)"
                )

