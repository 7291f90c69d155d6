"""``robaudit certify``: per-input certificates (docs/method.md §7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import typer

from robaudit.bounds.audit import certify_settings, check_counts_fit, expand_counts, load_network, model_info
from robaudit.bounds.certify import CertifyResult, certify_inputs
from robaudit.cli import app
from robaudit.cli.commands import (
    BIT,
    BIT_FLIP,
    FORMAT,
    INPUT_RANGE,
    INPUT_RANGE_FILE,
    INPUT_SHAPE,
    INPUT_VALUE,
    MODEL,
    OUTPUT,
    REPORT,
    STUCK_AT,
    TENSOR,
)
from robaudit.cli.common import emit, failure_model, network_options, resolve_mode, resolve_stored, split_output
from robaudit.cli.consoles import progress_bar
from robaudit.cli.inject_cmd import LABELS
from robaudit.errors import OptionError
from robaudit.formats import OutputFormat
from robaudit.injection.instrument import load_feed
from robaudit.inputs import chance_note, load_labels

#: ε of an output without classes when ``-e`` is not given.
DEFAULT_EPSILON = 0.1


@app.command()
def certify(
    model: Path = MODEL,
    inputs: str = typer.Option(
        ...,
        "--inputs",
        help="Inputs to certify: .npy, or .npz (array 'x', or FILE.npz:NAME); several inputs packed as for inject.",
    ),
    labels: str | None = LABELS,
    crash: str | None = typer.Option(None, "--crash", help="Crashed neurons per hidden layer: N or N1,N2,..."),
    byzantine: str | None = typer.Option(None, "--byzantine", help="Byzantine neurons per hidden layer: N or N1,..."),
    capacity: float | None = typer.Option(None, "--capacity", help="Byzantine values lie in [-C, C]."),
    failure_range: str | None = typer.Option(None, "--failure-range", help="Byzantine values lie in [A, B]."),
    bit_flip: str | None = BIT_FLIP,
    bit: int | None = BIT,
    stuck_at: int | None = STUCK_AT,
    mode: str | None = typer.Option(
        None, "--mode", help="crash, byzantine, bit_flip or stuck_at (implied by the flags above)."
    ),
    epsilon: float | None = typer.Option(
        None, "--epsilon", "-e", help="ε for outputs without classes: certified means bound ≤ ε (default 0.1)."
    ),
    classes: bool | None = typer.Option(
        None,
        "--classes/--no-classes",
        help="Whether the output's elements are class scores (default: a vector output has classes; one "
        "element, an image or a sequence has none).",
    ),
    radius: float | None = typer.Option(
        None, "--radius", help="Certify every input within this ∞-norm distance of each given input (clipped)."
    ),
    no_layer_counts: bool = typer.Option(
        False, "--no-layer-counts", help="Skip the per-layer max_failures_certified search."
    ),
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    input_shape: str | None = INPUT_SHAPE,
    include_output_layer: bool = typer.Option(False, "--include-output-layer", help="Let the output layer fail."),
    workers: int = typer.Option(
        1, "--workers", help="Certify the inputs in N processes (contiguous slices); same report."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr."),
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
) -> None:
    """Certificates at given inputs: the largest output change the failures can cause there, and
    whether the predicted class can change."""
    report, tensor = split_output(output, report, output_tensor)
    asked_epsilon, epsilon = epsilon, DEFAULT_EPSILON if epsilon is None else epsilon
    if not (epsilon > 0 and epsilon < float("inf")):
        raise OptionError(f"--epsilon must be a positive finite number, got {epsilon}")
    if radius is not None and not radius > 0:
        raise OptionError(f"--radius must be > 0, got {radius:g}")
    if workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    asked = mode
    mode, counts = resolve_mode(mode, crash, byzantine, capacity, failure_range)
    explicit = crash is not None or byzantine is not None
    mode, counts = resolve_stored(mode, counts, bit_flip, stuck_at, explicit, bit, asked)
    failure = failure_model(mode, capacity, failure_range, None, bit, stuck_at)
    options = network_options(input_range, input_shape, tensor, input_range_file, input_value)
    loaded, network = load_network(model, options, include_output_layer)
    hidden = network.hidden_layers
    flag = failure.count_flag if failure.stored else "--crash" if mode == "crash" else "--byzantine"
    failures = expand_counts(counts or (1,), len(hidden), flag)
    assert failures is not None
    check_counts_fit(failures, hidden, flag)
    x, source = load_feed(inputs, network)
    y = None
    if labels is not None:
        outputs = int(network.clean[network.tail_start].lo.size)
        y, _ = load_labels(labels, len(x), outputs)
    with progress_bar(quiet) as progress:
        result = certify_inputs(
            network, failure, x, failures, epsilon, radius, y, progress, not no_layer_counts, workers, classes
        )
    settings = certify_settings(network, failure, epsilon, capacity)
    notes = _label_notes(result, y) + _unused_epsilon_note(result, asked_epsilon)
    result = dataclasses.replace(
        result, model=model_info(loaded), settings=settings, inputs_file=source, notes=[*result.notes, *notes]
    )
    emit(result, fmt, report)


def _label_notes(result: CertifyResult, labels: np.ndarray | None) -> list[str]:
    """inject's note on labels no better than the most common one (likely in another order than the inputs)."""
    if labels is None or not result.classes:
        return []
    clean = float(np.mean([r.predicted == r.label for r in result.inputs]))
    chance = chance_note(clean, labels)
    return [chance] if chance else []


def _unused_epsilon_note(result: CertifyResult, asked: float | None) -> list[str]:
    """A note when ``-e`` was given for an output with classes, where it decides nothing (a new-user trial saw
    ``-e 30`` ignored without a word)."""
    if asked is None or not result.classes:
        return []
    return [f"ε = {asked:g} decides nothing here: with classes, certified means the predicted class cannot change "
            "(--no-classes certifies bound ≤ ε instead)"]
