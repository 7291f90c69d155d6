"""Report dict, rich table, JUnit XML and Markdown summary of ``robaudit check``."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import PurePath

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robaudit.formats.report import header, report_dict
from robaudit.formats.table import fit_table, fmt_count, fmt_num, render_table
from robaudit.gate.gate import FAIL, PASS, SKIP, CheckResult, ModelCheck, Verdict
from robaudit.gate.remedy import ProposedModel, Remedy

_HEADER_KEYS = ("schema_version", "robaudit_version", "command")
_MARKS = {PASS: "✅ pass", FAIL: "❌ fail", SKIP: "⏭ skipped"}
_RICH_MARKS = {PASS: "[green]pass[/]", FAIL: "[bold red]FAIL[/]", SKIP: "[yellow]skipped[/]"}


# --------------------------------------------------------------------------- shared texts


def required_text(verdict: Verdict) -> str:
    """What the requirement asks, e.g. '≥ 3' failures or 'error ≤ 0.05'."""
    if verdict.kind == "baseline":
        return "no drop"
    if verdict.kind == "empirical":
        return f"error ≤ {fmt_num(verdict.required)}"
    if verdict.kind == "accuracy":
        return f"accuracy ≥ {fmt_num(verdict.required)}"
    if verdict.kind == "certified":  # a fraction of the inputs: 1 reads as a count
        return f"certified ≥ {float(verdict.required or 0):.1%}"
    return f"≥ {verdict.required}"


def achieved_text(verdict: Verdict) -> str:
    """What the model achieves, in the same unit."""
    if verdict.achieved is None:
        return "-"
    if verdict.kind == "baseline":
        drops = int(verdict.achieved)
        return "no drop" if drops == 0 else f"{drops} drop{'s' if drops > 1 else ''}"
    if verdict.kind == "certified":
        return f"{float(verdict.achieved):.1%}"
    if verdict.kind in ("empirical", "accuracy"):
        return fmt_num(verdict.achieved)
    return fmt_count(int(verdict.achieved), verdict.limit)


def remedy_text(remedy: Remedy | None) -> str:
    """'fc2 max|w| ≤ 0.25 (now 0.5); or all weights × 0.71' (docs/method.md §9.1 design)."""
    if remedy is None:
        return ""
    if remedy.unbounded:
        layers = ", ".join(remedy.unbounded)
        tried = "" if remedy.hardened is None else f" ({proposed_text(remedy.hardened)})"
        return f"float layers {layers}: no finite bound; robaudit harden restricts their range{tried}; or int8"
    if remedy.unscalable:
        return f"no weight targets: {remedy.unscalable}"
    parts = []
    for target in remedy.layers:
        if target.max_weight_allowed is None:
            parts.append(f"{target.layer}: no weight scale alone suffices")
        else:
            parts.append(
                f"{target.layer} max|w| ≤ {fmt_num(target.max_weight_allowed)} (now {fmt_num(target.max_weight)})"
            )
    if remedy.shrink_factor is None:
        parts.append("no uniform weight shrink suffices")
    else:
        scaled = "" if remedy.scaled is None else f" ({proposed_text(remedy.scaled)})"
        parts.append(f"{'or ' if parts else ''}all weights × {remedy.shrink_factor:.3g}{scaled}")
    hardened = remedy.hardened
    parts.append("or robaudit harden" + ("" if hardened is None else f" ({proposed_text(hardened)})"))
    return "; ".join(parts)


def proposed_text(model: ProposedModel) -> str:
    """What a remedy's model does on the inputs: 'changes 89% of predictions on 200 inputs, accuracy
    97.2% → 11.3%: NOT a fix' or 'predictions kept on 200 inputs, tolerates 2' (docs/method.md §9.2)."""
    accuracy = ""
    if model.accuracy_before is not None and model.accuracy_after is not None:
        accuracy = f", accuracy {model.accuracy_before:.1%} → {model.accuracy_after:.1%}"
    reach = "" if model.achieved is None else f", tolerates {model.achieved}"
    where = f"{model.inputs} {'samples of the domain' if ' samples ' in model.source else 'inputs'}"
    if model.changes_predictions:
        return f"changes {1 - model.agreement:.1%} of predictions on {where}{accuracy}{reach}: not a drop-in fix"
    if model.meets is False:
        return f"predictions kept on {where}{reach}: not enough alone"
    return f"predictions kept on {where}, max output change {model.max_output_change:.3g}{reach}"


def summary_line(result: CheckResult) -> str:
    """One sentence: passed, how many requirements failed, how many models could not be checked."""
    total = sum(len(m.verdicts) for m in result.models)
    failed = result.failed()
    skipped = sum(1 for m in result.models for v in m.verdicts if v.status == SKIP)
    models = len({m.model.path for m in result.models})  # a model several entries name is one model
    tail = f" ({skipped} skipped)" if skipped else ""
    unusable = len({m.model.path for m in result.unusable()})
    if unusable:
        unmet = f"; {len(failed)} of {total} requirement(s) unmet in the others" if failed else ""
        return f"check FAILED: {unusable} of {models} model(s) could not be checked (unusable input){unmet}{tail}"
    if not failed and result.passed:
        return f"check passed: {models} model(s), {total - skipped} requirement(s) met{tail}"
    if not failed:
        return (
            f"check FAILED: {skipped} of {total} requirement(s) skipped, which is not met "
            "(--allow-skipped accepts skipped requirements)"
        )
    bad = len({m.model.path for m, _ in failed})
    return f"check FAILED: {len(failed)} of {total} requirement(s) unmet in {bad} of {models} model(s){tail}"


# --------------------------------------------------------------------------- report dict


def _bound_body(bound) -> dict:
    return {k: v for k, v in report_dict(bound).items() if k not in _HEADER_KEYS}


def _model_dict(check: ModelCheck) -> dict:
    entry = {"name": PurePath(check.model.path).name, "pattern": check.pattern, "passed": check.passed}
    if check.error is not None:
        return entry | {"model": asdict(check.model), "error": check.error, "requirements": []}
    primary, *others = check.bounds
    entry.update(_bound_body(primary))
    entry["requirements"] = [asdict(v) for v in check.verdicts]
    if others:
        entry["other_modes"] = [{k: v for k, v in _bound_body(b).items() if k != "model"} for b in others]
    return entry


@report_dict.register
def _check_dict(result: CheckResult) -> dict:
    out = header("check", None, None)
    out["policy"] = result.source
    out["passed"] = result.passed
    if result.baseline is not None:
        out["baseline"] = result.baseline
    verdicts = [v for m in result.models for v in m.verdicts]
    out["summary"] = {
        "models": len({m.model.path for m in result.models}),
        "requirements": len(verdicts),
        "failed": sum(v.status == FAIL for v in verdicts),
        "skipped": sum(v.status == SKIP for v in verdicts),
        "unusable": len({m.model.path for m in result.unusable()}),
    }
    out["models"] = [_model_dict(m) for m in result.models]
    return out


# --------------------------------------------------------------------------- terminal


@render_table.register
def _check_table(result: CheckResult, console: Console) -> None:
    table = Table(title=f"robaudit check — policy: {escape(result.source)}", title_justify="left")
    for column in ("model", "requirement", "mode", "ε", "required", "achieved", "result", "what it would take"):
        table.add_column(column, justify="right" if column in ("ε", "required", "achieved") else "left")
    for check in result.models:
        if check.error is not None:
            table.add_row(escape(check.model.path), "(the model)", "", "", "", "", "[bold red]ERROR[/]",
                          "unusable input (below)", end_section=True)
            continue
        epsilon = fmt_num(check.bounds[0].settings.epsilon)
        for row, verdict in enumerate(check.verdicts):
            table.add_row(
                escape(check.model.path) if row == 0 else "",
                escape(verdict.key),
                verdict.mode,
                epsilon if verdict.epsilon_used else "-",
                required_text(verdict),
                achieved_text(verdict),
                _RICH_MARKS[verdict.status],
                remedy_text(verdict.remedy),
                end_section=row == len(check.verdicts) - 1,
            )
    console.print(fit_table(table, console, ("mode", "ε")))
    for check in result.models:
        if check.error is not None:
            console.print(f"error: {check.error}", markup=False)
        for verdict in check.verdicts:
            if verdict.status != PASS:
                status = "skipped" if verdict.status == SKIP else verdict.status
                console.print(f"{status}: {check.model.path} {verdict.key}: {verdict.detail}", markup=False)
            elif verdict.warning:
                console.print(f"warning: {check.model.path} {verdict.key}: {verdict.warning}", markup=False)
    console.print(("[green]" if result.passed else "[bold red]") + summary_line(result) + "[/]")


# --------------------------------------------------------------------------- JUnit XML


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: one test suite per model, one test case per requirement, a ``<failure>`` per unmet one."""
    verdicts = [v for m in result.models for v in m.verdicts]
    root = ET.Element(
        "testsuites",
        name="robaudit check",
        tests=str(len(verdicts) + len(result.unusable())),
        failures=str(sum(v.status == FAIL for v in verdicts)),
        skipped=str(sum(v.status == SKIP for v in verdicts)),
        errors=str(len(result.unusable())),
        time=f"{sum(m.seconds for m in result.models):.3f}",
    )
    for check in result.models:
        _junit_suite(root, check)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _junit_suite(root: ET.Element, check: ModelCheck) -> None:
    if check.error is not None:  # one test case in error: the model could not be checked
        suite = ET.SubElement(root, "testsuite", name=check.model.path, tests="1", failures="0", skipped="0",
                              errors="1", time=f"{check.seconds:.3f}")
        case = ET.SubElement(suite, "testcase", classname=str(PurePath(check.model.path).with_suffix("")),
                             name="the model", file=check.model.path)
        ET.SubElement(case, "error", message=check.error, type="UnusableInput").text = check.error
        return
    suite = ET.SubElement(
        root,
        "testsuite",
        name=check.model.path,
        tests=str(len(check.verdicts)),
        failures=str(sum(v.status == FAIL for v in check.verdicts)),
        skipped=str(sum(v.status == SKIP for v in check.verdicts)),
        errors="0",
        time=f"{check.seconds:.3f}",
    )
    classname = str(PurePath(check.model.path).with_suffix(""))
    for verdict in check.verdicts:
        case = ET.SubElement(
            suite, "testcase", classname=classname, name=f"{verdict.key} ({verdict.mode})", file=check.model.path
        )
        message = f"required {required_text(verdict)}, achieved {achieved_text(verdict)}"
        if verdict.status == FAIL:
            failure = ET.SubElement(case, "failure", message=message, type="RequirementNotMet")
            fix = remedy_text(verdict.remedy)
            failure.text = verdict.detail + (f"\nwhat it would take: {fix}" if fix else "")
        elif verdict.status == SKIP:
            ET.SubElement(case, "skipped", message=verdict.detail)
        else:
            ET.SubElement(case, "system-out").text = f"{message}; {verdict.detail}"


# --------------------------------------------------------------------------- Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_summary(result: CheckResult) -> str:
    """A Markdown section with one table row per model × requirement (for ``$GITHUB_STEP_SUMMARY``)."""
    mark = "✅" if result.passed else "❌"
    lines = [
        f"### {mark} robaudit {summary_line(result)}",
        "",
        f"Policy: {_cell(result.source)}" + (f"; baseline: `{_cell(result.baseline)}`" if result.baseline else ""),
        "",
        "| model | requirement | mode | ε | required | achieved | result | what it would take |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for check in result.models:
        if check.error is not None:
            cells = [f"`{check.model.path}`", "(the model)", "", "", "", "", "❌ error", check.error]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            continue
        epsilon = fmt_num(check.bounds[0].settings.epsilon)
        for verdict in check.verdicts:
            cells = [
                f"`{check.model.path}`",
                f"`{verdict.key}`",
                verdict.mode,
                epsilon if verdict.epsilon_used else "-",
                required_text(verdict),
                achieved_text(verdict),
                _MARKS[verdict.status],
                remedy_text(verdict.remedy),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    said = [
        f"- {_MARKS[v.status] if v.status != PASS else '⚠ warning'}: `{_cell(c.model.path)}` `{v.key}`: "
        f"{_cell(v.detail if v.status != PASS else v.warning)}"
        for c in result.models
        for v in c.verdicts
        if v.status != PASS or v.warning
    ]
    return "\n".join(lines + ([""] + said if said else [])) + "\n\n"
