"""Option parsing shared by the commands, and report output."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from robaudit.bounds.fep import STORED_MODES, FailureModel
from robaudit.cli.consoles import stderr, stdout
from robaudit.errors import OptionError
from robaudit.formats import OutputFormat, format_for_path, render_text, write_report
from robaudit.formats.table import render_table
from robaudit.graph.network import NetworkOptions
from robaudit.options import Mode

_REPORT_SUFFIXES = (".yaml", ".yml", ".json")
#: Suffixes of files that are not reports: ``--output out.txt`` is a mistake, not a tensor name.
_FILE_SUFFIXES = frozenset(
    ".txt .csv .tsv .xml .html .htm .md .log .out .png .jpg .jpeg .svg .pdf .toml .ini .onnx .npy .npz "
    ".pkl .pt .pth .yaml~ .xlsx .junit .sarif".split()
)


def parse_counts(text: str | None, flag: str) -> tuple[int, ...] | None:
    """'5' or '2,1,0' → non-negative integers."""
    if text is None:
        return None
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise OptionError(f"{flag} takes a count or a comma-separated list of counts, got '{text}'") from None
    if any(c < 0 for c in counts):
        raise OptionError(f"{flag} counts must be ≥ 0, got '{text}'")
    return counts


def on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` (its parameter name) was written on the command line (not its default)."""
    source = ctx.get_parameter_source(name)  # Typer's own copy of click's ParameterSource: compared by name
    return source is not None and source.name == "COMMANDLINE"


def flags_given(ctx: typer.Context, keep: set[str]) -> list[str]:
    """The long flags of the options written on the command line, except those whose parameter names are in
    ``keep`` (in the command's order)."""
    return [
        max(param.opts, key=len)
        for param in ctx.command.params
        if param.name is not None and param.name not in keep and param.opts and on_command_line(ctx, param.name)
    ]


def check_samples(ctx: typer.Context, inputs: object, measuring: str | None = None) -> None:
    """--samples draws the measured inputs where --inputs is not given; given where it would be ignored (beside
    --inputs, or without the flag ``measuring`` that measures at all), it is a usage error, not silently dropped.

    Raises:
        OptionError: --samples given beside --inputs, or without ``measuring``.
    """
    if not on_command_line(ctx, "samples"):
        return
    if inputs is not None:
        raise OptionError("--samples draws inputs when --inputs is not given; drop one of them")
    if measuring is not None:
        raise OptionError(f"--samples draws the inputs of {measuring}; add {measuring}")


def parse_pair(text: str | None, flag: str) -> tuple[float, float] | None:
    """'A,B' → two finite floats."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise OptionError(f"{flag} takes two finite numbers A,B, got '{text}'")
    return values[0], values[1]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'3,224,224' → dims."""
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise OptionError(f"--input-shape takes comma-separated positive integers, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise OptionError(f"--input-shape takes positive integers, got '{text}'")
    return dims


def split_output(value: str | None, report: Path | None, tensor: str | None) -> tuple[Path | None, str | None]:
    """``--output`` is a report file when it ends in .yaml/.yml/.json, else a tensor name."""
    if value is not None:
        if Path(value).suffix.lower() in _FILE_SUFFIXES:
            raise OptionError(
                f"--output '{value}': a report file ends in .yaml, .yml or .json "
                "(the format is taken from the suffix); to audit a tensor, use --output-tensor NAME"
            )
        if value.lower().endswith(_REPORT_SUFFIXES):
            if report is not None:
                raise OptionError("give the report file once (--output FILE or --report FILE)")
            report = Path(value)
        else:
            if tensor is not None:
                raise OptionError("give the audited tensor once (--output NAME or --output-tensor NAME)")
            tensor = value
    return report, tensor


def failure_model(
    mode: str,
    capacity: float | None,
    failure_range: str | None,
    activation_bound: float | None,
    bit: int | None = None,
    stuck_at: int | None = None,
) -> FailureModel:
    """Build the failure model from the mode flags (docs/method.md §2.1)."""
    rng = parse_pair(failure_range, "--failure-range")
    if (bit is not None or stuck_at is not None) and mode not in STORED_MODES:
        raise OptionError("--bit and --stuck-at apply to stored-value faults; add --bit-flip N")
    if mode in STORED_MODES:
        if capacity is not None or rng is not None:
            raise OptionError("--capacity and --failure-range apply to byzantine failures, not to --bit-flip")
        if stuck_at is not None:
            return FailureModel.stuck_at(stuck_at, bit, activation_bound)
        if mode == "stuck_at":
            raise OptionError("--mode stuck_at needs --stuck-at 0|1, the value the bit is stuck at")
        return FailureModel.bit_flip(bit, activation_bound)
    if mode == Mode.CRASH:
        if capacity is not None or rng is not None:
            raise OptionError(
                "--capacity and --failure-range apply to byzantine failures; add --byzantine N or --mode byzantine"
            )
        return FailureModel.crash(activation_bound)
    if mode == Mode.BYZANTINE:
        if capacity is not None and rng is not None:
            raise OptionError("give either --capacity C or --failure-range A,B, not both")
        return FailureModel.byzantine(capacity, rng, activation_bound)
    raise OptionError(f"--mode must be {' or '.join(Mode.values())}, got '{mode}'")


def resolve_stored(
    mode: str,
    counts: tuple[int, ...] | None,
    bit_flip: str | None,
    stuck_at: int | None,
    explicit: bool,
    bit: int | None = None,
    asked: str | None = None,
) -> tuple[str, tuple[int, ...] | None]:
    """Mode and counts once --bit-flip N / --stuck-at V / --bit B are known (docs/method.md §2.3): --stuck-at or
    --bit alone imply the stored-value mode and one such fault per layer, as --capacity implies byzantine (not
    beside --crash, --byzantine or ``asked``, a --mode other than bit_flip: the failure model then refuses --bit)."""
    if bit_flip is None and stuck_at is None:
        if bit is not None and not explicit and asked in (None, "bit_flip") and mode != Mode.BYZANTINE:
            return "bit_flip", (1,)
        return mode, counts
    if explicit:
        raise OptionError("give either --bit-flip (with --stuck-at) or --crash/--byzantine, not both")
    flips = parse_counts(bit_flip, "--bit-flip") if bit_flip is not None else (1,)
    return ("stuck_at" if stuck_at is not None else "bit_flip"), flips


def resolve_mode(
    mode: str | None, crash: str | None, byzantine: str | None, capacity: float | None, failure_range: str | None
) -> tuple[str, tuple[int, ...] | None]:
    """Mode and explicit counts from --mode/--crash/--byzantine (byzantine implied by --capacity)."""
    if crash is not None and byzantine is not None:
        raise OptionError("give either --crash or --byzantine, not both")
    counts = parse_counts(crash, "--crash") if crash is not None else parse_counts(byzantine, "--byzantine")
    if byzantine is not None:
        implied = Mode.BYZANTINE
    elif crash is not None:
        implied = Mode.CRASH
    else:
        implied = Mode.BYZANTINE if (capacity is not None or failure_range is not None) else Mode.CRASH
    if mode is not None and mode != implied and (crash is not None or byzantine is not None):
        raise OptionError(f"--mode {mode} contradicts --{implied}")
    return mode or implied, counts


#: ``--ranges``: how neuron ranges are computed (docs/method.md §5).
RANGES = typer.Option(
    "crown", "--ranges", help="Neuron ranges: crown (default: IBP tightened by back-substitution) or ibp (cheaper)."
)



def network_options(
    input_range: str | list[str] | None,
    input_shape: str | None,
    tensor: str | None,
    input_range_file: str | None = None,
    input_value: list[str] | None = None,
    ranges: str = "crown",
) -> NetworkOptions:
    """The model-reading options: shape, audited tensor and the input domain (docs/method.md §12.1)."""
    given = [input_range] if isinstance(input_range, str) else list(input_range or [])
    default: tuple[float, float] = (0.0, 1.0)
    named: list[tuple[str, float, float]] = []
    plain = [g for g in given if "=" not in g]
    if len(plain) > 1:
        raise OptionError("give the plain --input-range LO,HI once (use NAME=LO,HI for one input)")
    for text in given:
        name, _, pair = text.rpartition("=") if "=" in text else ("", "", text)
        rng = parse_pair(pair, "--input-range")
        if rng is None:
            raise OptionError("--input-range takes two finite numbers LO,HI")
        if name:
            named.append((name, *rng))
        else:
            default = rng
    values = []
    for text in input_value or []:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise OptionError(f"--input-value takes NAME=FILE.npy, got '{text}'")
        values.append((name, path))
    return NetworkOptions(
        input_shape=parse_shape(input_shape),
        output=tensor,
        input_range=default,
        named_ranges=tuple(named),
        input_range_file=input_range_file,
        input_values=tuple(values),
        ranges=ranges,
    )


def emit(result: object, fmt: OutputFormat, report: Path | None) -> None:
    """Print the result (table or YAML/JSON on stdout) and write the report file if asked."""
    if report is not None:
        format_for_path(report)
        write_report(result, report)
        wrote("report", report)
    if fmt == OutputFormat.table:
        render_table(result, stdout)
    else:
        typer.echo(render_text(result, fmt), nl=False)


def wrote(what: str, path: Path) -> None:
    """Say on stderr where a file was written (stdout stays the report)."""
    stderr.print(f"robaudit: wrote {what} to {path}", markup=False, highlight=False)
