"""``robaudit inspect`` and ``robaudit bound``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from robaudit.bounds.audit import BoundOptions, bound_network, inspect_model, load_network, model_info
from robaudit.bounds.progress import reporting
from robaudit.bounds.results import BoundResult
from robaudit.cli import app
from robaudit.cli.common import (
    RANGES,
    check_samples,
    emit,
    failure_model,
    network_options,
    parse_counts,
    resolve_mode,
    resolve_stored,
    split_output,
)
from robaudit.cli.consoles import progress_bar, stderr
from robaudit.cli.plots import check_png, plot_bound
from robaudit.formats import OutputFormat
from robaudit.graph.network import Network
from robaudit.options import Method

MODEL = typer.Argument(..., help="The ONNX model file.", show_default=False)
FORMAT = typer.Option(OutputFormat.table, "--format", "-f", help="table, yaml or json on stdout.")
#: Stored-value faults (docs/method.md §2.3): ``bound``, ``certify`` and ``inject`` take them alike.
BIT_FLIP = typer.Option(
    None, "--bit-flip", help="Neurons per hidden layer with one bit of their stored value flipped: N or N1,..."
)
BIT = typer.Option(None, "--bit", help="Bit position, 0 = least significant (default any).")
STUCK_AT = typer.Option(None, "--stuck-at", help="The bit is stuck at 0 or 1 instead of flipped.")
OUTPUT = typer.Option(
    None, "--output", "-o", help="Report FILE (.yaml/.yml/.json) or, otherwise, the NAME of the tensor to audit."
)
REPORT = typer.Option(None, "--report", help="Write the report to FILE (format from the suffix).")
TENSOR = typer.Option(None, "--output-tensor", help="Audit this tensor instead of the default output.")
INPUT_RANGE = typer.Option(
    None,
    "--input-range",
    help="Input domain LO,HI of every input element (default 0,1), or NAME=LO,HI for one input; repeatable.",
)
INPUT_RANGE_FILE = typer.Option(
    None, "--input-range-file", help="Per-element input bounds: .npz with lo/hi (or NAME.lo/NAME.hi) arrays."
)
INPUT_VALUE = typer.Option(None, "--input-value", help="Hold an input at a value: NAME=FILE.npy; repeatable.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Input shape, e.g. 3,224,224, when the model's is symbolic.")


@app.command()
def inspect(
    model: Path = MODEL,
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    input_shape: str | None = INPUT_SHAPE,
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
    epsilon: float = typer.Option(0.1, "--epsilon", "-e", help="ε for the crash max_failures column."),
) -> None:
    """List the layers: neurons, fan-in/out, max weight, activation, K, output range, branches."""
    report, tensor = split_output(output, report, output_tensor)
    BoundOptions(epsilon=epsilon).check()
    result = inspect_model(
        model, network_options(input_range, input_shape, tensor, input_range_file, input_value), epsilon
    )
    emit(result, fmt, report)


@app.command()
def bound(
    ctx: typer.Context,
    model: Path = MODEL,
    epsilon: float = typer.Option(0.1, "--epsilon", "-e", help="Tolerance ε on the output (∞-norm)."),
    mode: str | None = typer.Option(
        None,
        "--mode",
        help="crash, byzantine, bit_flip or stuck_at (implied by --crash, --byzantine, --capacity, --bit-flip, "
        "--stuck-at, --bit).",
    ),
    crash: str | None = typer.Option(None, "--crash", help="Crashed neurons per hidden layer: N or N1,N2,..."),
    byzantine: str | None = typer.Option(
        None, "--byzantine", help="Byzantine neurons per hidden layer: N or N1,N2,..."
    ),
    capacity: float | None = typer.Option(None, "--capacity", help="Byzantine values lie in [-C, C]."),
    failure_range: str | None = typer.Option(None, "--failure-range", help="Byzantine values lie in [A, B]."),
    synapse: str | None = typer.Option(
        None, "--synapse", help="Failed synapses into each hidden layer: N or N1,N2,..."
    ),
    bit_flip: str | None = BIT_FLIP,
    bit: int | None = BIT,
    stuck_at: int | None = STUCK_AT,
    method: str = typer.Option(
        Method.TIGHT, "--method", help="tight (default) or paper: which bound drives max_failures."
    ),
    ranges: str = RANGES,
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    activation_bound: float | None = typer.Option(
        None, "--activation-bound", help="Assume |y| ≤ Y for every neuron output."
    ),
    input_shape: str | None = INPUT_SHAPE,
    include_output_layer: bool = typer.Option(False, "--include-output-layer", help="Let the output layer fail too."),
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
    empirical: bool = typer.Option(
        False, "--empirical", help="Also measure the worst case at each layer's max failures and one more."
    ),
    inputs: str | None = typer.Option(None, "--inputs", help="Inputs for --empirical (.npy/.npz); implies it."),
    samples: int = typer.Option(64, "--samples", help="Inputs for --empirical drawn from --input-range."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed of --empirical."),
    trials: int = typer.Option(50, "--trials", help="Swap proposals of --empirical's worst-case search."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: Fep against failures per layer (log scale)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr (as inject and certify)."),
) -> None:
    """Forward Error Propagation bound: tolerated failures per layer, uniform and in total."""
    check_png(plot)
    report, tensor = split_output(output, report, output_tensor)
    check_samples(ctx, inputs, None if empirical else "--empirical")
    asked = mode
    mode, counts = resolve_mode(mode, crash, byzantine, capacity, failure_range)
    explicit = crash is not None or byzantine is not None
    mode, counts = resolve_stored(mode, counts, bit_flip, stuck_at, explicit, bit, asked)
    options = BoundOptions(
        epsilon=epsilon,
        failure=failure_model(mode, capacity, failure_range, activation_bound, bit, stuck_at),
        method=method,
        network=network_options(input_range, input_shape, tensor, input_range_file, input_value, ranges),
        failures=counts,
        synapses=parse_counts(synapse, "--synapse"),
        include_output_layer=include_output_layer,
    )
    options.check()
    loaded, network = load_network(model, options.network, options.include_output_layer)
    with progress_bar(quiet) as progress, reporting(progress):  # a bar only on a terminal
        result = bound_network(network, options, lambda: model_info(loaded), capacity)
    violated = False
    if empirical or inputs is not None:
        result, violated = add_empirical(network, options, result, inputs, samples, seed, trials)
    emit(result, fmt, report)
    if plot is not None:
        plot_bound(network, options, result.empirical, plot)
    if violated:
        raise typer.Exit(1)  # ExitCode.AUDIT_FAILED: a measured error above the bound


def add_empirical(
    network: Network, options: BoundOptions, result: BoundResult, inputs: str | None, samples: int, seed: int,
    trials: int, quiet: bool = False,
) -> tuple[BoundResult, bool]:
    """``bound --empirical`` on the network ``result`` was computed for: (result with its measured errors,
    whether one exceeds its bound); each such error is a warning on stderr."""
    from robaudit.injection.empirical import empirical_bound  # onnxruntime: only when measuring
    from robaudit.injection.instrument import load_feed
    from robaudit.injection.sandbox import Limits, default_memory_bytes

    x, source = (None, "") if inputs is None else load_feed(inputs, network)
    limits = Limits(memory_bytes=default_memory_bytes())
    with progress_bar(quiet) as progress:
        result = empirical_bound(
            network, options, result, x, source, samples, seed, trials, limits=limits, progress=progress
        )
    for name, layer in result.empirical.items():
        for count in layer.counts:
            if count.violation:
                stderr.print(
                    f"[bold red]robaudit: WARNING: layer {escape(name)} with {count.failures} failures: measured "
                    f"error {count.measured:.6g} exceeds the bound {count.bound:.6g}[/]"
                )
    return result, any(layer.violated for layer in result.empirical.values())
