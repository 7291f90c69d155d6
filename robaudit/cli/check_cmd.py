"""``robaudit check``: the CI gate on model exports (exit 0 policy holds, 1 violated, 2 unusable input)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from robaudit.cli import app, error_line
from robaudit.cli.common import emit, parse_pair, parse_shape, wrote
from robaudit.cli.consoles import progress_bar, stderr
from robaudit.errors import ExitCode, OptionError
from robaudit.formats import OutputFormat
from robaudit.formats.check import junit_xml, markdown_summary
from robaudit.gate.gate import run_check
from robaudit.gate.policy import Overrides, load_policy

#: Environment variable GitHub Actions sets to the job summary file.
STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def parse_layer_requirements(items: list[str]) -> tuple[tuple[str, int], ...]:
    """``NAME=N`` (NAME a layer name or 1-based index) → (NAME, N) pairs."""
    pairs = []
    for item in items:
        name, sep, count = item.rpartition("=")
        try:
            number = int(count)
        except ValueError:
            number = -1
        if not sep or not name or number < 0:
            raise OptionError(f"--require-layer takes NAME=N (layer name or index, N ≥ 0), got '{item}'")
        pairs.append((name, number))
    return tuple(pairs)


def _write_text(path: Path, text: str, what: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OptionError(f"cannot write {what} '{path}': {exc.strerror}") from None


def _append_step_summary(markdown: str) -> None:
    """Append to ``$GITHUB_STEP_SUMMARY`` when set; a failure to write is a warning, not a verdict."""
    summary = os.environ.get(STEP_SUMMARY)
    if not summary:
        return
    try:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    except OSError as exc:
        stderr.print(f"robaudit: warning: cannot append to ${STEP_SUMMARY} '{summary}': {exc.strerror}", markup=False)


@app.command()
def check(
    models: list[str] | None = typer.Argument(
        None, help="Models (paths or globs) to check instead of the policy's list: each under the policy's entries "
        "that name it, else its top-level settings."
    ),
    policy: Path | None = typer.Option(
        None,
        "--policy",
        help="Policy file (YAML, or TOML with [tool.robaudit]). Default: ./robaudit.yaml, "
        "else [tool.robaudit] in ./pyproject.toml.",
    ),
    epsilon: float | None = typer.Option(None, "--epsilon", "-e", help="Tolerance ε on the output (∞-norm)."),
    mode: str | None = typer.Option(
        None, "--mode", help="crash, byzantine, bit_flip or stuck_at: the mode of layer and total requirements."
    ),
    method: str | None = typer.Option(None, "--method", help="tight or paper: the bound that decides."),
    ranges: str | None = typer.Option(None, "--ranges", help="Neuron ranges: crown (default) or ibp (cheaper)."),
    input_range: str | None = typer.Option(None, "--input-range", help="Input domain LO,HI."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Input shape when the model's is symbolic."),
    output_tensor: str | None = typer.Option(None, "--output-tensor", help="Audit this tensor."),
    capacity: float | None = typer.Option(None, "--capacity", help="Byzantine values lie in [-C, C]."),
    failure_range: str | None = typer.Option(None, "--failure-range", help="Byzantine values lie in [A, B]."),
    activation_bound: float | None = typer.Option(
        None, "--activation-bound", help="Assume |y| ≤ Y for every neuron output."
    ),
    require_crash: int | None = typer.Option(
        None, "--require-crash", help="Tolerate N crashed neurons in every hidden layer at once."
    ),
    require_byzantine: int | None = typer.Option(
        None, "--require-byzantine", help="Tolerate N byzantine neurons in every hidden layer (needs --capacity)."
    ),
    bit: int | None = typer.Option(
        None, "--bit", help="Bit position of bit flips and stuck-at bits, 0 = least significant (default any)."
    ),
    stuck_at: int | None = typer.Option(None, "--stuck-at", help="The value (0 or 1) stuck-at bits are stuck at."),
    require_bit_flip: int | None = typer.Option(
        None, "--require-bit-flip", help="Tolerate N neurons with a flipped bit in every hidden layer at once."
    ),
    require_stuck_at: int | None = typer.Option(
        None, "--require-stuck-at", help="Tolerate N neurons with a stuck bit in every hidden layer (--stuck-at)."
    ),
    require_total: int | None = typer.Option(None, "--require-total", help="Tolerate any N failures anywhere."),
    require_layer: list[str] | None = typer.Option(
        None, "--require-layer", help="NAME=N: layer NAME (or 1-based index) alone tolerates N failures. Repeatable."
    ),
    baseline: Path | None = typer.Option(
        None, "--baseline", help="Earlier check/bound report: fail when tolerated failures drop."
    ),
    report: Path | None = typer.Option(
        None, "--report", "--output", "-o", help="Write the report to FILE (.yaml/.yml/.json)."
    ),
    junit: Path | None = typer.Option(None, "--junit", help="Write JUnit XML to FILE."),
    allow_skipped: bool = typer.Option(
        False, "--allow-skipped", help="Let a requirement that could not be evaluated (skipped) pass the check."
    ),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, yaml or json on stdout."),
    workers: int = typer.Option(1, "--workers", help="Check the models in N processes (same report)."),
    inputs: str | None = typer.Option(
        None, "--inputs", help="Every model's inputs (.npy/.npz): remedies are tried on them, certificates use them."
    ),
    labels: str | None = typer.Option(None, "--labels", help="Every model's labels (.npy/.npz), for accuracies."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr."),
) -> None:
    """Gate a model export on a fault-tolerance policy: exit 0 if it holds, 1 if not, 2 on bad input."""
    overrides = Overrides(
        models=tuple(models or ()),
        epsilon=epsilon,
        mode=mode,
        method=method,
        ranges=ranges,
        input_range=parse_pair(input_range, "--input-range"),
        capacity=capacity,
        failure_range=parse_pair(failure_range, "--failure-range"),
        activation_bound=activation_bound,
        input_shape=parse_shape(input_shape),
        output=output_tensor,
        require_crash=require_crash,
        require_byzantine=require_byzantine,
        require_bit_flip=require_bit_flip,
        require_stuck_at=require_stuck_at,
        bit=bit,
        stuck_at=stuck_at,
        require_total=require_total,
        require_layers=parse_layer_requirements(require_layer or []),
        has_baseline=baseline is not None,
        inputs=inputs,
        labels=labels,
    )
    if workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    loaded = load_policy(policy, overrides)
    for note in loaded.notes:
        stderr.print(f"robaudit: note: {note}", markup=False, highlight=False)
    total = sum(len(entry.paths) for entry in loaded.models)
    with progress_bar(quiet) as bar:
        started: list[str] = []

        def told(path: object) -> None:  # run_check names each model before it starts
            started.append(str(path))
            if bar is not None:
                bar("models", len(started) - 1, total)

        result = run_check(loaded, baseline, progress=told, workers=workers, allow_skipped=allow_skipped)
        if bar is not None:
            bar("models", total, total)
    if junit is not None:
        _write_text(junit, junit_xml(result), "JUnit file")
        wrote("JUnit XML", junit)
    _append_step_summary(markdown_summary(result))
    emit(result, fmt, report)
    unusable = result.unusable()
    for model in unusable:  # the others are reported above (and in --report/--junit): CI keeps their results
        error_line(str(model.error))
    if unusable:
        raise typer.Exit(ExitCode.USAGE_ERROR)
    if not result.passed:
        raise typer.Exit(ExitCode.AUDIT_FAILED)
