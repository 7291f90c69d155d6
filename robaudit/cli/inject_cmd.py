"""``robaudit inject``: fault injection with onnxruntime, set beside the bound (docs/method.md §8)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.markup import escape

from robaudit.bounds.audit import BoundOptions, load_network, model_info
from robaudit.cli import app, error_line
from robaudit.cli.commands import (
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
from robaudit.cli.common import (
    RANGES,
    check_samples,
    emit,
    failure_model,
    flags_given,
    network_options,
    parse_counts,
    resolve_mode,
    resolve_stored,
    split_output,
    stderr,
)
from robaudit.cli.consoles import progress_bar
from robaudit.cli.plots import check_png, plot_inject
from robaudit.errors import ExitCode, InputDataError, OptionError
from robaudit.formats import OutputFormat
from robaudit.graph.network import Network
from robaudit.injection.campaign import failure_vector, run_injection, synapse_spread_note
from robaudit.injection.instrument import load_feed
from robaudit.injection.results import InjectOptions, InjectResult
from robaudit.injection.sandbox import Limits, default_memory_bytes
from robaudit.injection.workers import Runner, parse_shard
from robaudit.inputs import chance_note, load_labels
from robaudit.options import DEFAULT_TRIALS, Method, Search

INPUTS = typer.Option(
    None, "--inputs", help="Inputs: a .npy file, or .npz (array 'x', or FILE.npz:NAME). Default: --samples draws."
)
LABELS = typer.Option(None, "--labels", help="Class labels (.npy, or .npz array 'labels') for accuracy.")
SAMPLES = typer.Option(64, "--samples", help="Inputs drawn uniformly from --input-range when --inputs is not given.")
SEED = typer.Option(0, "--seed", min=0, help="Random seed: the same seed gives the same report.")
WORKERS = typer.Option(1, "--workers", help="Evaluate fault sets in N processes (Ray: N actors); same report.")
BACKEND = typer.Option("local", "--backend", help="local (processes here) or ray (pip install 'robaudit[ray]').")
ADDRESS = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray).")


def report_violations(result: InjectResult, table_shown: bool = True, network: Network | None = None) -> None:
    """A loud warning on stderr for every vector measured above its bound (never silenced).

    With inputs outside the input domain the bound does not apply: that is said once (the
    report's note, on stderr only when the table is not printed), with the range to pass.
    """
    outside = result.inputs.outside_domain > 0
    if outside and not table_shown:
        for note in result.notes:
            if "outside the input range" in note:
                stderr.print(f"robaudit: warning: {note}", markup=False, highlight=False)
    for vector in result.vectors:
        if vector.violation and not vector.outside_only:  # on inputs outside: one line, exit 2 (inject_exit_code)
            stderr.print(
                f"[bold red]robaudit: WARNING: measured error {vector.measured.max:.6g} exceeds the "
                f"{result.settings.method} bound {vector.bound:.6g} for failures {list(vector.failures)}"
                + (f", synapses {list(vector.synapses)}" if any(vector.synapses) else "")
                + f" — a defect, or a violated assumption{_assumed(result, network)}[/]"
            )


def _assumed(result: InjectResult, network: Network | None) -> str:
    """The assumption a violation most likely breaks, when the network shows one: ``--activation-bound`` Y below
    the clean range a hidden layer may reach over the input range (its computed box, docs/method.md §5)."""
    bound = result.settings.activation_bound
    if bound is None or network is None:
        return ""
    reach = [(float(network.clean[la.output_value].abs_max().max()), la.name) for la in network.hidden_layers]
    above = [(r, name) for r, name in reach if r > bound]
    if not above:
        return ""
    largest, name = max(above)
    return (
        f" (--activation-bound {bound:g} assumes |y| ≤ {bound:g} in every hidden layer; '{name}' may reach "
        f"{largest:.4g} over the input range: check the activations the inputs give, or drop the flag)"
    )


#: What ``inject --replay`` takes from the command line; every other setting comes from the report.
REPLAY_KEEPS = {"model", "replay", "inputs", "include_output_layer", "in_process", "timeout", "quiet", "fmt", "output",
                "report"}


def inject_exit_code(result: InjectResult) -> int:
    """0; 1 for a measured error above the bound (README "Exit codes": the audit found a problem); 2 when every
    such error was measured only on inputs outside the input domain, where the bound makes no claim (no defect
    of the model or of the bound: unusable input for the comparison), said in one line with the
    ``--input-range`` that covers the data."""
    if not result.violation:
        return ExitCode.OK
    if not result.outside_only:
        return ExitCode.AUDIT_FAILED
    covering = result.inputs.suggested_range
    fix = f"rerun with --input-range {covering[0]:g},{covering[1]:g}" if covering else "pass inputs inside it"
    lo, hi = result.settings.input_range
    error_line(
        f"measured error above the bound on inputs outside --input-range [{lo:g}, {hi:g}] "
        f"({result.inputs.outside_domain:.1%} of their elements), where the bound makes no claim: {fix}"
    )
    return ExitCode.USAGE_ERROR


@app.command()
def inject(
    ctx: typer.Context,
    model: Path = MODEL,
    crash: str | None = typer.Option(None, "--crash", help="Crashed neurons per layer: N or N1,N2,... (default 1)."),
    byzantine: str | None = typer.Option(None, "--byzantine", help="Byzantine neurons per layer: N or N1,N2,..."),
    capacity: float | None = typer.Option(None, "--capacity", help="Byzantine values lie in [-C, C]."),
    failure_range: str | None = typer.Option(None, "--failure-range", help="Byzantine values lie in [A, B]."),
    synapse: str | None = typer.Option(None, "--synapse", help="Failed synapses into each dense layer: N or N1,..."),
    bit_flip: str | None = BIT_FLIP,
    bit: int | None = typer.Option(None, "--bit", help="Bit position, 0 = least significant (default: searched)."),
    stuck_at: int | None = STUCK_AT,
    layer: list[str] = typer.Option([], "--layer", help="Fail only this layer (name or index); repeatable."),
    mode: str | None = typer.Option(
        None, "--mode", help="crash, byzantine, bit_flip or stuck_at (implied by the flags above)."
    ),
    search: str = typer.Option(Search.RANDOM, "--search", help="random (uniform failure sets) or worst (directed)."),
    trials: int | None = typer.Option(
        None, "--trials", help="random: failure sets drawn (default 200); worst: swap proposals after the greedy phase."
    ),
    seed: int = SEED,
    inputs: str | None = INPUTS,
    labels: str | None = LABELS,
    samples: int = SAMPLES,
    epsilon: float = typer.Option(
        0.1, "--epsilon", "-e",
        help="ε: the vectors whose error exceeds it (status), the failure rate, the layers' max_failures.",
    ),
    method: str = typer.Option(
        Method.TIGHT, "--method", help="Bound beside the measurement: tight (default) or paper."
    ),
    ranges: str = RANGES,
    input_range: list[str] | None = INPUT_RANGE,
    input_range_file: str | None = INPUT_RANGE_FILE,
    input_value: list[str] | None = INPUT_VALUE,
    activation_bound: float | None = typer.Option(None, "--activation-bound", help="Assume |y| ≤ Y everywhere."),
    input_shape: str | None = INPUT_SHAPE,
    include_output_layer: bool = typer.Option(False, "--include-output-layer", help="Let the output layer fail."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds one onnxruntime request may take."),
    in_process: bool = typer.Option(
        False, "--in-process", help="Run onnxruntime in this process (faster start, no crash containment)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr (warnings still appear)."),
    workers: int = WORKERS,
    backend: str = BACKEND,
    address: str | None = ADDRESS,
    shard: str | None = typer.Option(
        None, "--shard", help="I/N: evaluate only the I-th (0-based) of N slices of a random campaign; see merge."
    ),
    margin: float | None = typer.Option(
        None, "--margin", help="Size a random campaign so the failure rate is known to ±E (e.g. 0.01)."
    ),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of --margin and of the rate's interval."),
    output: str | None = OUTPUT,
    report: Path | None = REPORT,
    output_tensor: str | None = TENSOR,
    fmt: OutputFormat = FORMAT,
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: Fep curves per layer with measured points."),
    radius: float | None = typer.Option(
        None, "--radius", help="worst: move each input within this ∞-norm radius (default: the whole domain)."
    ),
    replay: Path | None = typer.Option(
        None,
        "--replay",
        help="Run again the fault sets of an earlier inject report (YAML/JSON), with its settings and inputs.",
    ),
) -> None:
    """Inject failures with onnxruntime and set the measured error beside the Fep bound."""
    check_png(plot)
    report, tensor = split_output(output, report, output_tensor)
    if replay is not None:
        refused = flags_given(ctx, REPLAY_KEEPS)
        if tensor is not None and "--output-tensor" not in refused:  # a tensor name given as -o NAME
            refused.append(f"--output {tensor}")
        if refused:
            raise OptionError(f"--replay takes the failures and settings from the report; drop {', '.join(refused)}")
        _replay(model, replay, inputs, include_output_layer, in_process, timeout, fmt, report)
        return
    check_samples(ctx, inputs)
    if margin is not None and trials is not None:
        raise OptionError("--margin chooses the number of fault sets; drop --trials")
    runner = Runner(workers, backend, address, parse_shard(shard))
    asked = mode
    mode, counts = resolve_mode(mode, crash, byzantine, capacity, failure_range)
    explicit = crash is not None or byzantine is not None
    mode, counts = resolve_stored(mode, counts, bit_flip, stuck_at, explicit, bit, asked)
    synapses = parse_counts(synapse, "--synapse")
    failure = failure_model(mode, capacity, failure_range, activation_bound, bit, stuck_at)
    loaded, network = load_network(
        model,
        network_options(input_range, input_shape, tensor, input_range_file, input_value, ranges),
        include_output_layer,
    )
    if counts is None:
        counts = None if synapses is not None else (1,)
    vector = failure_vector(network, counts, synapses, layer, failure.count_flag)
    x = source = y = None
    if labels is not None and inputs is None:
        raise OptionError("--labels needs --inputs (labels of sampled inputs are unknown)")
    if inputs is not None:
        x, source = load_feed(inputs, network)
        if labels is not None:
            classes = int(_output_size(network))
            y, _ = load_labels(labels, len(x), classes)
    options = InjectOptions(
        failure=failure,
        vectors=(vector,),
        epsilon=epsilon,
        method=method,
        search=search,
        trials=DEFAULT_TRIALS if trials is None else trials,
        seed=seed,
        inputs=x,
        labels=y,
        inputs_source=source or "",
        samples=samples,
        capacity=capacity,
        radius=radius,
        isolate=not in_process,
        limits=Limits(memory_bytes=default_memory_bytes(), timeout_s=timeout),
        runner=runner,
        margin=margin,
        confidence=confidence,
    )
    with progress_bar(quiet) as progress:
        result = run_injection(network, options, model_info(loaded), progress)
    chance = chance_note(result.inputs.clean_accuracy, y)
    result = replace(
        result, notes=(*result.notes, *synapse_spread_note(network, synapses, (vector,)), *([chance] if chance else []))
    )
    emit(result, fmt, report)
    if plot is not None:
        bound_options = BoundOptions(epsilon=epsilon, failure=failure, method=method)
        for note in plot_inject(network, bound_options, result, plot):
            stderr.print(escape(note))
    report_violations(result, fmt == OutputFormat.table, network)
    code = inject_exit_code(result)
    if code != ExitCode.OK:
        raise typer.Exit(code)


def _replay(
    model: Path,
    source: Path,
    inputs: str | None,
    include_output_layer: bool,
    in_process: bool,
    timeout: float,
    fmt: OutputFormat,
    report: Path | None,
) -> None:
    """``inject --replay``: the recorded fault sets, run again (exit 1 when one is above its bound)."""
    from robaudit.bounds.audit import network_of
    from robaudit.graph.loader import load_model
    from robaudit.injection.replay import (
        check_same_model,
        load_report,
        other_inputs,
        read_recording,
        recorded_inputs_file,
        replay,
    )

    recording = read_recording(load_report(source), f"'{source}'")
    loaded = load_model(model)
    check_same_model(recording, str(model), loaded.sha256)
    network = network_of(loaded, recording.network, include_output_layer)
    x, where = (None, "")
    file = recorded_inputs_file(recording)
    if inputs is None and file is not None:  # the report's own file, as it named it (relative to its cwd)
        try:
            x, where = load_feed(file, network)
        except InputDataError as exc:
            raise InputDataError(f"--replay: the report ran on {file}, which cannot be read here ({exc}); "
                                 "pass it with --inputs FILE") from None
    elif inputs is not None:
        x, where = load_feed(inputs, network)
    limits = Limits(memory_bytes=default_memory_bytes(), timeout_s=timeout)
    result = replay(network, recording, model_info(loaded), str(source), x, where, not in_process, limits)
    emit(result, fmt, report)
    elsewhere = other_inputs(recording, result.inputs.source)  # said once, in the report's note
    for replayed in result.sets:
        recorded = replayed.recorded
        if replayed.violation:
            stderr.print(
                f"[bold red]robaudit: WARNING: replayed error {replayed.error:.6g} exceeds the "
                f"{result.settings.method} bound {replayed.bound:.6g} — a defect, or a violated assumption[/]"
            )
        elif not replayed.reproduced and not elsewhere:
            stderr.print(
                f"[yellow]robaudit: warning: a fault set recorded with error {recorded.error:.6g} gives "
                f"{replayed.error:.6g} now on the report's inputs (another onnxruntime, or an edited inputs file?)[/]"
            )
    if result.violation:
        raise typer.Exit(ExitCode.AUDIT_FAILED)


def _output_size(network) -> int:
    shape = network.clean[network.output_name].shape
    size = 1
    for dim in shape[1:]:
        size *= dim
    return size


