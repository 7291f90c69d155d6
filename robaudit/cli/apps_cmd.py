"""``robaudit precision``, ``robaudit wait`` and ``robaudit design`` (docs/method.md §9.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from robaudit.applications import (
    CheckOptions,
    PrecisionResult,
    compute_design,
    compute_precision,
    compute_wait,
    precision_curves,
)
from robaudit.applications.check import check_model_target
from robaudit.bounds.audit import BoundOptions
from robaudit.bounds.fep import FailureModel
from robaudit.cli import app
from robaudit.cli.commands import (
    BIT,
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
from robaudit.cli.common import (
    RANGES,
    check_samples,
    emit,
    failure_model,
    network_options,
    parse_counts,
    resolve_mode,
    split_output,
    wrote,
)
from robaudit.cli.consoles import stderr
from robaudit.cli.plots import check_png
from robaudit.errors import ExitCode, OptionError
from robaudit.formats import OutputFormat
from robaudit.graph.layers import layer_label
from robaudit.options import Method, Mode

EPSILON = typer.Option(0.1, "--epsilon", "-e", help="Tolerance ε on the output (∞-norm).")
METHOD = typer.Option(
    Method.TIGHT, "--method", help="tight (default, as in bound) or paper (the recursion of docs/method.md §3)."
)
ACTIVATION_BOUND = typer.Option(None, "--activation-bound", help="Assume |y| ≤ Y for every neuron output.")
CHECK = typer.Option(False, "--check", help="Simulate in onnxruntime and set the measured error beside the bound.")
INPUTS = typer.Option(None, "--inputs", help="Inputs for --check: a .npy/.npz file (array 'x'); implies --check.")
SAMPLES = typer.Option(200, "--samples", help="Inputs for --check drawn uniformly from the input range.")
SEED = typer.Option(0, "--seed", min=0, help="Random seed of --check (samples, dropped signals).")


#: ``-q`` as every command takes it: these show no progress bar, so it changes nothing here.
QUIET = typer.Option(False, "--quiet", "-q", help="No progress output on stderr (this command shows none).")


def _check_options(check: bool, inputs: Path | None, samples: int, seed: int, trials: int = 10) -> CheckOptions | None:
    if not check and inputs is None:
        return None
    if samples < 1:
        raise OptionError(f"--samples must be ≥ 1, got {samples}")
    return CheckOptions(inputs=inputs, samples=samples, trials=trials, seed=seed)


def _options(
    epsilon,
    method,
    activation_bound,
    input_range,
    input_shape,
    tensor,
    input_range_file=None,
    input_value=None,
    ranges="crown",
) -> BoundOptions:
    """The bound settings the three applications share (crash ranges, docs/method.md §9.1)."""
    return BoundOptions(
        epsilon=epsilon,
        failure=FailureModel.crash(activation_bound),
        method=method,
        network=network_options(input_range, input_shape, tensor, input_range_file, input_value, ranges),
    )


def _finish(failed: bool) -> None:
    """Exit 1 when a --check found a measured error above its bound (docs/method.md §8: reported loudly)."""
    if failed:
        raise typer.Exit(ExitCode.AUDIT_FAILED)


@app.command()
def precision(
    ctx: typer.Context,
    model: Path = MODEL,
    epsilon: float = EPSILON,
    weights: bool = typer.Option(False, "--weights", help="Round the weights instead of the layer outputs."),
    method: str = METHOD,
    ranges: str = RANGES,
    check: bool = CHECK,
    inputs: Path | None = INPUTS,
    samples: int = SAMPLES,
    seed: int = SEED,
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of the bound against bits per layer."),
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    activation_bound: float | None = ACTIVATION_BOUND,
    input_shape: str | None = INPUT_SHAPE,
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
    quiet: bool = QUIET,
) -> None:
    """Memory cost: the fewest bits per layer (and uniform) that keep the rounding bound ≤ ε."""
    report, tensor = split_output(output, report, output_tensor)
    options = _options(
        epsilon, method, activation_bound, input_range, input_shape, tensor, input_range_file, input_value, ranges
    )
    options.check()
    check_png(plot)
    check_samples(ctx, inputs, None if check else "--check")
    result = compute_precision(model, options, weights, _check_options(check, inputs, samples, seed))
    if plot is not None:
        _plot_precision(result, plot)
    emit(result, fmt, report)
    _finish(result.check is not None and not result.check.ok)


def _plot_precision(result: PrecisionResult, path: Path) -> None:
    from robaudit.formats.plot import plot_precision_curves, save_png

    labels = {la.name: layer_label(la.index, la.name) for la in result.layers}
    curves = {labels.get(name, name): curve for name, curve in precision_curves(result).items()}
    joint = "all layers (uniform)"
    curves[joint] = ([b for b, _ in result.uniform_curve], [v for _, v in result.uniform_curve])
    measured: dict[str, tuple[list, list]] = {}
    for run in result.check.runs if result.check is not None else ():
        name = joint if run.site == "all" else labels.get(run.site, run.site)
        if name and run.setting is not None:
            xs, ys = measured.setdefault(name, ([], []))
            xs.append(run.setting)
            ys.append(run.max)
    what = "weights" if result.quantize == "weights" else "layer outputs"
    title = f"{Path(result.model.path).name}: rounding {what} ({result.settings.method} method)"
    epsilon = result.settings.epsilon
    if epsilon is None:
        raise OptionError("the precision report has no epsilon to draw")
    save_png(plot_precision_curves(curves, epsilon, measured or None, title), path)
    wrote("plot", path)


@app.command()
def wait(
    ctx: typer.Context,
    model: Path = MODEL,
    epsilon: float = EPSILON,
    method: str = METHOD,
    ranges: str = RANGES,
    check: bool = CHECK,
    inputs: Path | None = INPUTS,
    samples: int = SAMPLES,
    trials: int = typer.Option(10, "--trials", help="Random choices of the ignored signals per configuration."),
    seed: int = SEED,
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    activation_bound: float | None = ACTIVATION_BOUND,
    input_shape: str | None = INPUT_SHAPE,
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
    quiet: bool = QUIET,
) -> None:
    """Boosting: per layer, the fewest incoming signals each neuron must wait for (the rest count as 0)."""
    report, tensor = split_output(output, report, output_tensor)
    if trials < 1:
        raise OptionError(f"--trials must be ≥ 1, got {trials}")
    options = _options(
        epsilon, method, activation_bound, input_range, input_shape, tensor, input_range_file, input_value, ranges
    )
    options.check()
    check_samples(ctx, inputs, None if check else "--check")
    result = compute_wait(model, options, _check_options(check, inputs, samples, seed, trials))
    emit(result, fmt, report)
    _finish(result.check is not None and not result.check.ok)


@app.command()
def design(
    model: Path = MODEL,
    epsilon: float = EPSILON,
    tolerate: str | None = typer.Option(
        None, "--tolerate", help="Failures to tolerate: N in every hidden layer, or N1,N2,... per layer."
    ),
    crash: str | None = typer.Option(
        None, "--crash", help="Tolerate N crashed neurons per layer: --tolerate N --mode crash."
    ),
    byzantine: str | None = typer.Option(
        None, "--byzantine", help="Tolerate N byzantine neurons per layer: --tolerate N --mode byzantine."
    ),
    mode: str = typer.Option(
        Mode.CRASH, "--mode",
        help="crash, byzantine, bit_flip or stuck_at (implied by --capacity/--failure-range, --bit, --stuck-at).",
    ),
    capacity: float | None = typer.Option(None, "--capacity", help="Byzantine values lie in [-C, C]."),
    failure_range: str | None = typer.Option(None, "--failure-range", help="Byzantine values lie in [A, B]."),
    bit: int | None = BIT,
    stuck_at: int | None = STUCK_AT,
    method: str = METHOD,
    ranges: str = RANGES,
    write: Path | None = typer.Option(None, "--write", help="Write the model with every weight × shrink factor."),
    check: bool = typer.Option(
        False, "--check", help="Re-run bound on the scaled copy and compare its predictions with the model's."
    ),
    inputs: Path | None = typer.Option(None, "--inputs", help="Inputs for --check (.npy/.npz); default 200 samples."),
    labels: str | None = typer.Option(None, "--labels", help="Class labels for --check's accuracy (.npy/.npz)."),
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    activation_bound: float | None = ACTIVATION_BOUND,
    input_shape: str | None = INPUT_SHAPE,
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
    quiet: bool = QUIET,
) -> None:
    """Robustness vs learning cost: weight caps per layer and one shrink factor for a required tolerance."""
    report, tensor = split_output(output, report, output_tensor)
    if (tolerate is None) == (crash is None and byzantine is None):
        raise OptionError("give the failures to tolerate once: --tolerate N (with --mode), --crash N or --byzantine N")
    explicit = mode if mode != Mode.CRASH else None
    stored = "stuck_at" if stuck_at is not None else "bit_flip" if bit is not None else None
    if explicit is None and stored is not None and crash is None and byzantine is None:
        explicit = stored  # --stuck-at or --bit alone mean that stored-value fault, as --capacity means byzantine
    mode, given = resolve_mode(explicit, crash, byzantine, capacity, failure_range)
    counts = given if tolerate is None else parse_counts(tolerate, "--tolerate")
    options = BoundOptions(
        epsilon=epsilon,
        failure=failure_model(mode, capacity, failure_range, activation_bound, bit, stuck_at),
        method=method,
        network=network_options(input_range, input_shape, tensor, input_range_file, input_value, ranges),
        failures=counts,
    )
    options.check()
    if write is not None:
        check_model_target(write, model, "--write", "the scaled copy")
    y = None
    if labels is not None:
        from robaudit.applications.check import load_inputs as check_inputs
        from robaudit.bounds.audit import load_network
        from robaudit.inputs import load_labels

        _, network = load_network(model, options.network)
        x, _, _ = check_inputs(inputs, 200, network)
        y, _ = load_labels(labels, len(x), int(np.prod(network.clean[network.output_name].shape[1:])))
    result = compute_design(model, options, capacity, write, check or inputs is not None, inputs, y)
    emit(result, fmt, report)
    _finish(result.check is not None and not result.check.ok)


@app.command()
def harden(
    model: Path = MODEL,
    inputs: str = typer.Option(..., "--inputs", help="Inputs (.npy/.npz) whose ranges each layer is restricted to."),
    out: Path = typer.Option(..., "--output", "-o", help="Where to write the hardened model (.onnx)."),
    margin: float = typer.Option(0.0, "--margin", help="Widen each range by M times its width."),
    labels: str | None = typer.Option(None, "--labels", help="Class labels (.npy/.npz) for the accuracy check."),
    per_channel: bool = typer.Option(
        False, "--per-channel", help="One range per channel of each conv layer (per neuron of a dense layer)."
    ),
    epsilon: float = EPSILON,
    input_range: list[str] | None = INPUT_RANGE,
    input_shape: str | None = INPUT_SHAPE,
    report: Path | None = REPORT,
    fmt: OutputFormat = FORMAT,
    quiet: bool = QUIET,
) -> None:
    """Range restriction: a NaN-guarded Clip after each hidden layer at its range on the inputs."""
    from robaudit.applications.harden import harden_model
    from robaudit.bounds.audit import load_network
    from robaudit.injection.instrument import load_feed
    from robaudit.inputs import chance_note, load_labels

    check_model_target(out, model, "--output", "the hardened copy")
    options = network_options(input_range, input_shape, None)
    _, network = load_network(model, options)
    x, _ = load_feed(inputs, network)  # several inputs: one packed vector per sample
    y = None
    if labels is not None:
        classes = int(np.prod(network.clean[network.output_name].shape[1:]))
        y, _ = load_labels(labels, len(x), classes)
    result = harden_model(model, x, out, margin, y, epsilon, options, per_channel)
    emit(result, fmt, report)
    chance = chance_note(result.accuracy_before, y)
    if chance is not None:
        stderr.print(f"robaudit: note: {chance}", markup=False, highlight=False)


