"""The ``check`` policy: which models must tolerate how many failures (README "Commands").

A policy comes from ``robaudit.yaml``, from ``[tool.robaudit]`` in ``pyproject.toml``
(read with :mod:`tomllib`), or from ``--policy FILE``; command-line flags build the
same structure without a file and win over it. Paths and globs are relative to the
file that names them (to the working directory for models given on the command line).

Every key is checked, as black checks ``[tool.black]``: an unknown key, a wrong type
or a value out of its domain is a :class:`~robaudit.errors.PolicyError` naming the
key and the reason.

Layout (top-level settings are defaults for every entry of ``models``)::

    epsilon: 0.05
    models:
      - path: exports/*.onnx
        mode: crash            # or byzantine, with capacity: C or failure_range: [a, b]
        method: tight          # or paper
        ranges: crown          # or ibp (cheaper neuron ranges)
        input_range: [0, 1]
        require: {crash: 1, layers: {fc1: 3}, total: 2}
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from robaudit.errors import PolicyError
from robaudit.options import DEFAULT_TRIALS, Method, Mode, Search

#: Files searched in the working directory when no ``--policy`` is given, in this order.
POLICY_FILE = "robaudit.yaml"
PYPROJECT_FILE = "pyproject.toml"
MODES = Mode.values()
METHODS = Method.values()
SEARCHES = Search.values()
RANGE_METHODS = ("ibp", "crown")  # robaudit.bounds.ranges.RANGE_METHODS, without importing the bounds here


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Requirement:
    """One minimum a model must tolerate, evaluated with the bound (docs/method.md §6 inverse problem)."""

    #: The policy key it comes from, e.g. ``require.crash`` or ``require.layers.fc1``.
    key: str
    #: ``uniform`` (the same count in every hidden layer at once), ``layer`` (that layer
    #: failing alone) or ``total`` (any distribution of that many failures).
    kind: str
    #: Failure mode the count is evaluated in: ``crash`` or ``byzantine``.
    mode: str
    #: Minimum number of tolerated failures.
    count: int
    #: Layer name or 1-based hidden-layer index (``layer`` requirements only).
    layer: str | None = None


@dataclass(frozen=True)
class EmpiricalRequirement:
    """Fault injection on real inputs must stay within ``max_error`` (docs/method.md §8)."""

    #: ``.npy``/``.npz`` file of inputs (resolved path).
    inputs: Path
    #: Failed neurons per hidden layer: one count for every layer, or one per layer.
    failures: tuple[int, ...]
    #: Largest measured output error allowed; None: the entry's ε.
    max_error: float | None = None
    #: Smallest accuracy under failures allowed (needs labels); None: not checked.
    min_accuracy: float | None = None
    #: Labels file; None: the ``labels`` array of an ``.npz`` inputs file.
    labels: Path | None = None
    #: ``random`` failure sets or the directed ``worst`` search.
    search: str = "worst"
    #: Fault configurations tried per input (as ``inject --trials``).
    trials: int = DEFAULT_TRIALS
    #: Seed of the random choices.
    seed: int = 0
    #: The worst search moves each input within this ∞-norm radius (None: anywhere in the input range).
    radius: float | None = None


@dataclass(frozen=True)
class CertifiedRequirement:
    """Per-input certificates on the entry's ``inputs`` (docs/method.md §7): at least
    ``min_fraction`` of them certified under ``counts`` failures per hidden layer."""

    #: ``crash`` or ``byzantine`` (with the entry's capacity or failure range).
    mode: str
    #: Failed neurons: one count for every hidden layer (capped at each layer's neurons), or one per hidden layer.
    counts: tuple[int, ...]
    #: Smallest fraction of the inputs that must be certified.
    min_fraction: float = 1.0
    #: ∞-norm radius around each input (None: the inputs themselves).
    radius: float | None = None
    #: Whether the output's elements are class scores (None: read from its shape, docs/method.md §7.4).
    classes: bool | None = None


@dataclass(frozen=True)
class ModelPolicy:
    """The settings and requirements that apply to the models one ``path`` matches."""

    #: The path or glob as written.
    pattern: str
    #: The model files it matched (relative to the working directory when inside it).
    paths: tuple[str, ...]
    #: Tolerance ε on the output's ∞-norm deviation (docs/method.md §1.1).
    epsilon: float
    #: Failure mode of the ``layers`` and ``total`` requirements (and of the report).
    mode: str = "crash"
    #: ``tight`` or ``paper``: the bound that decides.
    method: str = "tight"
    #: ``crown`` or ``ibp``: how neuron ranges are computed (docs/method.md §5).
    ranges: str = "crown"
    #: Input domain [LO, HI].
    input_range: tuple[float, float] = (0.0, 1.0)
    #: Byzantine capacity C (failure range [−C, C]).
    capacity: float | None = None
    #: Byzantine failure range [a, b].
    failure_range: tuple[float, float] | None = None
    #: |y| ≤ Y for every neuron output, replacing the computed ranges.
    activation_bound: float | None = None
    #: ``bit_flip``/``stuck_at``: the bit position (None: any bit) and the stuck value.
    bit: int | None = None
    stuck_at: int | None = None
    #: Input shape when the model's is symbolic.
    input_shape: tuple[int, ...] | None = None
    #: Name of the tensor to audit (default: the model's output).
    output: str | None = None
    #: What the model must tolerate.
    requirements: tuple[Requirement, ...] = ()
    #: Optional fault-injection requirement.
    empirical: EmpiricalRequirement | None = None
    #: Inputs (and labels) of the model, for ``require.certified``.
    inputs: Path | None = None
    labels: Path | None = None
    #: Optional per-input certificate requirement.
    certified: CertifiedRequirement | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        """The failure modes to bound: the entry's mode first, then any other a requirement uses."""
        extra = [r.mode for r in self.requirements if r.mode != self.mode]
        return (self.mode, *dict.fromkeys(extra))


@dataclass(frozen=True)
class Policy:
    """A whole policy: where it came from and its model entries."""

    #: ``robaudit.yaml``, ``pyproject.toml [tool.robaudit]`` or ``command line``.
    source: str
    models: tuple[ModelPolicy, ...]
    #: What the reader should know about where the policy came from (a second policy left unread).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overrides:
    """Command-line flags of ``check``; every value that is set wins over the policy file."""

    #: Models (paths or globs, relative to the working directory) replacing the file's list.
    models: tuple[str, ...] = ()
    epsilon: float | None = None
    mode: str | None = None
    method: str | None = None
    ranges: str | None = None
    input_range: tuple[float, float] | None = None
    capacity: float | None = None
    failure_range: tuple[float, float] | None = None
    activation_bound: float | None = None
    input_shape: tuple[int, ...] | None = None
    output: str | None = None
    #: ``--bit`` (the bit position of bit flips and stuck-at bits) and ``--stuck-at`` (the value a bit is stuck at).
    bit: int | None = None
    stuck_at: int | None = None
    #: ``--require-crash``, ``--require-byzantine``, ``--require-bit-flip``, ``--require-stuck-at``,
    #: ``--require-total``.
    require_crash: int | None = None
    require_byzantine: int | None = None
    require_bit_flip: int | None = None
    require_stuck_at: int | None = None
    require_total: int | None = None
    #: ``--require-layer NAME=N`` pairs.
    require_layers: tuple[tuple[str, int], ...] = ()
    #: True when a baseline is compared (a model may then have no other requirement).
    has_baseline: bool = False
    #: ``--inputs`` / ``--labels``: every model's ``inputs`` / ``labels`` (relative to the working directory).
    inputs: str | None = None
    labels: str | None = None

    def given(self) -> bool:
        """Whether a flag sets a model, a setting, a requirement or a file (the policy's source then says
        '+ command line'; a baseline is not the policy's)."""
        return replace(self, has_baseline=False) != Overrides()

    def settings(self) -> dict[str, Any]:
        """The settings the flags set, by policy key, checked (messages name the flag)."""
        flags = {
            "epsilon": ("--epsilon", _positive),
            "mode": ("--mode", _choice(MODES)),
            "method": ("--method", _choice(METHODS)),
            "ranges": ("--ranges", _choice(RANGE_METHODS)),
            "input_range": ("--input-range", _range),
            "capacity": ("--capacity", _positive),
            "failure_range": ("--failure-range", _range),
            "activation_bound": ("--activation-bound", _positive),
            "input_shape": ("--input-shape", _shape),
            "output": ("--output-tensor", _text),
            "bit": ("--bit", _count),
            "stuck_at": ("--stuck-at", _bit_value),
        }
        return {
            key: _checked(check, getattr(self, key), flag, "")
            for key, (flag, check) in flags.items()
            if getattr(self, key) is not None
        }

    def require(self) -> dict[str, Any]:
        """The requirements the flags set, in the policy's ``require`` layout."""
        out: dict[str, Any] = {}
        for key in ("crash", "byzantine", "bit_flip", "stuck_at", "total"):
            value = getattr(self, f"require_{key}")
            if value is not None:
                out[key] = _checked(_count, value, f"--require-{key.replace('_', '-')}", "")
        if self.require_layers:
            out["layers"] = {
                name: _checked(_count, n, f"--require-layer {name}", "") for name, n in self.require_layers
            }
        return out


# --------------------------------------------------------------------------- value checks


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_hint(value: Any) -> str:
    """Why a number came as text: quotes, or YAML 1.1 reading ``1e-3`` (no dot) as a string."""
    try:
        float(value)
    except (TypeError, ValueError):
        return ""
    return " (it is text: write it unquoted, and exponents with a dot, e.g. 1.0e-3)" if isinstance(value, str) else ""


def _positive(value: Any) -> float:
    if not _is_number(value):
        raise ValueError("must be a number" + _number_hint(value))
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a positive finite number")
    return float(value)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("must be an integer count")
    if value < 0:
        raise ValueError("must be ≥ 0")
    return value


def _bit_value(value: Any) -> int:
    if value not in (0, 1) or isinstance(value, bool):
        raise ValueError("must be 0 or 1")
    return int(value)


def _fraction(value: Any) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError("must be a number between 0 and 1")
    return float(value)


def _range(value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ValueError("must be a list of two numbers [LO, HI]")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError("must be finite with LO ≤ HI")
    return lo, hi


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be a list of positive integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError("must be a list of positive integers")
    return tuple(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _counts(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (_count(value),)
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be a count or a list of counts (one per hidden layer)")
    return tuple(_count(v) for v in value)


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return check


def _checked(check: Callable[[Any], Any], value: Any, key: str, source: str) -> Any:
    """``check(value)`` with its complaint turned into a PolicyError naming the key."""
    try:
        return check(value)
    except ValueError as exc:
        where = f"{source}: " if source else ""
        raise PolicyError(f"{where}invalid value for '{key}': {exc}, got {value!r}") from None


#: Settings a model entry (or the top level, as defaults) may set, with their checks.
_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "epsilon": _positive,
    "mode": _choice(MODES),
    "method": _choice(METHODS),
    "ranges": _choice(RANGE_METHODS),
    "input_range": _range,
    "capacity": _positive,
    "failure_range": _range,
    "activation_bound": _positive,
    "bit": _count,
    "stuck_at": _bit_value,
    "input_shape": _shape,
    "output": _text,
}
_ENTRY_KEYS = ("path", *_SETTINGS, "require", "empirical", "inputs", "labels")
_TOP_KEYS = ("models", *_SETTINGS, "require", "empirical")
_REQUIRE_KEYS = ("crash", "byzantine", "bit_flip", "stuck_at", "layers", "total", "certified")
_CERTIFIED_KEYS = ("crash", "byzantine", "bit_flip", "stuck_at", "min_fraction", "radius", "classes")
_EMPIRICAL_KEYS = ("inputs", "failures", "max_error", "min_accuracy", "labels", "search", "trials", "seed", "radius")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Source:
    """Where raw policy data came from: a name for messages and the base of relative paths."""

    name: str
    base: Path


def find_policy(directory: Path) -> Path | None:
    """The policy of ``directory``: its ``robaudit.yaml``, else its ``pyproject.toml`` if it has ``[tool.robaudit]``,
    else its parent's, and so on up to the first folder holding ``.git`` (the repository's root) or the file
    system's root — as ruff and pytest find theirs, so that ``check`` run from a subfolder reads the project's."""
    for folder in (directory.resolve(), *directory.resolve().parents):
        candidate = folder / POLICY_FILE
        if candidate.is_file():
            return candidate
        pyproject = folder / PYPROJECT_FILE
        if pyproject.is_file() and "robaudit" in _read_toml(pyproject).get("tool", {}):
            return pyproject
        if (folder / ".git").exists():
            return None
    return None


def read_policy_file(path: Path, cwd: Path | None = None) -> tuple[dict[str, Any], str]:
    """The raw policy mapping of a YAML file or of a TOML file's ``[tool.robaudit]``, and its name for messages."""
    shown = display_path(path, cwd or Path.cwd())
    if not path.is_file():
        raise PolicyError(f"policy file '{path}' does not exist or is not a file")
    if path.suffix.lower() == ".toml":
        table = _read_toml(path).get("tool", {}).get("robaudit")
        if table is None:
            raise PolicyError(f"policy file '{shown}' has no [tool.robaudit] table")
        return table, f"{shown} [tool.robaudit]"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"policy file '{shown}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file '{shown}': {exc}") from None
    if data is None:
        raise PolicyError(f"policy file '{shown}' is empty: it must hold a mapping with a 'models' list")
    if not isinstance(data, dict):
        raise PolicyError(f"policy file '{shown}' must hold a mapping with a 'models' list, got {type(data).__name__}")
    return data, shown


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"'{path}' is not valid TOML: {exc}") from None
    except OSError as exc:
        raise PolicyError(f"cannot read '{path}': {exc.strerror}") from None


def load_policy(policy_file: Path | None, overrides: Overrides = Overrides(), cwd: Path | None = None) -> Policy:
    """Read and check the policy, apply the command-line overrides (README "Commands").

    ``policy_file`` None searches the working directory and its parents (``robaudit.yaml``, then
    ``pyproject.toml``: :func:`find_policy`). Models given on the command line replace the file's ``models``
    list: each model file takes the settings of every entry whose path or glob names it
    (:func:`_command_line_entries`), one that none names the top-level settings.
    """
    cwd = Path.cwd() if cwd is None else cwd
    path = policy_file if policy_file is not None else find_policy(cwd)
    raw, name = read_policy_file(path, cwd) if path is not None else ({}, "command line")
    file_source = _Source(name, (path.parent if path is not None else cwd).resolve())
    _refuse_unknown(raw, _TOP_KEYS, "", file_source)
    defaults = {key: value for key, value in raw.items() if key != "models"}
    notes: list[str] = []
    if overrides.models:
        entries = _command_line_entries(overrides.models, raw, file_source, cwd, notes)
    else:
        entries = [
            _Entry(entry, file_source, f"models[{index}].") for index, entry in enumerate(_entry_list(raw, file_source))
        ]
    files = {key: str((cwd / value).resolve()) for key, value in (("inputs", overrides.inputs),
                                                                 ("labels", overrides.labels)) if value is not None}
    if files:
        entries = [_Entry({**e.raw, **files}, e.source, e.prefix, e.paths) for e in entries]
    models = tuple(_model_policy(entry, defaults, file_source, overrides, cwd) for entry in entries)
    source = name if not overrides.given() or path is None else f"{name} + command line"
    beside = path is not None and path.name == POLICY_FILE and _has_table(path.parent / PYPROJECT_FILE)
    if policy_file is None and beside:
        notes.append(f"[tool.robaudit] in {PYPROJECT_FILE} is not read: {POLICY_FILE} comes first")
    return Policy(source, models, tuple(notes))


@dataclass(frozen=True)
class _Entry:
    """One model entry before it is checked: its raw mapping, the file its paths are relative to, the
    prefix its keys are named with in messages (``models[2].``; empty for a command-line model) and,
    for a command-line model taking a file entry's settings, the model files it applies to."""

    raw: dict[str, Any]
    source: _Source
    prefix: str
    paths: tuple[str, ...] | None = None


def _command_line_entries(
    models: Sequence[str], raw: dict[str, Any], file_source: _Source, cwd: Path, notes: list[str]
) -> list[_Entry]:
    """The entries of models named on the command line: each file a model path or glob names is checked
    under every file entry whose path or glob names that file (as ``check`` without models would check it,
    so that ``check exports/a.onnx`` agrees with the policy on that model); a file no entry names takes
    the top-level settings. Says in ``notes`` which entry each file took."""
    command_line = _Source("command line", cwd.resolve())
    file_entries = _file_entries(raw, file_source)
    entries: list[_Entry] = []
    for model in models:
        paths = _resolve_models(model, command_line, "path", cwd)
        taken: set[str] = set()
        for index, (entry, named) in enumerate(file_entries):
            matched = tuple(p for p in paths if (cwd / p).resolve() in named)
            if matched:
                entries.append(_Entry({**entry, "path": model}, file_source, f"models[{index}].", matched))
                notes.append(f"{', '.join(matched)}: the settings of {file_source.name} models[{index}] "
                             f"(path '{entry['path']}')")
                taken.update(matched)
        rest = tuple(p for p in paths if p not in taken)
        if rest and file_entries:
            unnamed = _Source(f"command line (named by no entry of {file_source.name})", command_line.base)
            entries.append(_Entry({"path": model}, unnamed, "", rest))
            notes.append(f"{', '.join(rest)}: named by no entry of {file_source.name}; its top-level settings")
        elif rest:
            entries.append(_Entry({"path": model}, command_line, "", rest))
    return entries


def _file_entries(raw: dict[str, Any], source: _Source) -> list[tuple[dict[str, Any], set[Path]]]:
    """The policy file's model entries (none when it has no ``models`` list) with the files each names;
    an entry naming no file or with no usable path names none (it is checked when it is used)."""
    if "models" not in raw:
        return []
    named = []
    for entry in _entry_list(raw, source):
        pattern = entry.get("path")
        found = _named_files(pattern, source.base) if isinstance(pattern, str) else []
        named.append((entry, {Path(p).resolve() for p in found if os.path.isfile(p)}))
    return named


def _has_table(pyproject: Path) -> bool:
    """Whether ``pyproject`` exists and holds a ``[tool.robaudit]`` table (an unreadable one: no)."""
    try:
        return pyproject.is_file() and "robaudit" in _read_toml(pyproject).get("tool", {})
    except PolicyError:
        return False


def _entry_list(raw: dict[str, Any], source: _Source) -> list[dict[str, Any]]:
    if "models" not in raw:
        if source.name == "command line":
            raise PolicyError(
                f"no policy: no {POLICY_FILE} or [tool.robaudit] in {PYPROJECT_FILE} here and no model given; "
                "name models on the command line or pass --policy FILE"
            )
        raise PolicyError(f"{source.name}: missing key 'models' (a list of model entries with a 'path')")
    models = raw["models"]
    if not isinstance(models, list) or not models:
        raise PolicyError(f"{source.name}: invalid value for 'models': must be a non-empty list, got {models!r}")
    entries = []
    for index, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise PolicyError(
                f"{source.name}: invalid value for 'models[{index}]': must be a path or a mapping, got {entry!r}"
            )
        entries.append(entry)
    return entries


def _refuse_unknown(raw: Mapping[str, Any], allowed: Sequence[str], prefix: str, source: _Source) -> None:
    """Black-style: every unknown key at this level in one message, with a suggestion."""
    unknown = [str(key) for key in raw if key not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hints.append(f"'{prefix}{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    plural = "s" if len(unknown) > 1 else ""
    raise PolicyError(
        f"{source.name}: invalid policy key{plural} detected: {', '.join(hints)}; allowed: {', '.join(allowed)}"
    )


def _settings(raw: Mapping[str, Any], prefix: str, source: _Source) -> dict[str, Any]:
    """Checked and converted settings of one mapping level."""
    return {key: _checked(check, raw[key], prefix + key, source.name) for key, check in _SETTINGS.items() if key in raw}


def _model_policy(
    item: _Entry, defaults: dict[str, Any], file_source: _Source, overrides: Overrides, cwd: Path
) -> ModelPolicy:
    """One entry: defaults ← entry ← flags, checked, paths resolved."""
    entry, source, prefix = item.raw, item.source, item.prefix
    _refuse_unknown(entry, _ENTRY_KEYS, prefix, source)
    pattern = _checked(_text, entry.get("path"), prefix + "path", source.name)
    settings = {**_settings(defaults, "", file_source), **_settings(entry, prefix, source), **overrides.settings()}
    where = f"{source.name}: {prefix.rstrip('.')}" if prefix else f"{source.name}: model '{pattern}'"
    if "epsilon" not in settings:
        hint = "" if file_source.name != "command line" else (
            f"; no {POLICY_FILE} or [tool.robaudit] in {PYPROJECT_FILE} was found here to give it"
        )
        raise PolicyError(f"{where}: missing key 'epsilon' (the tolerance ε; or pass --epsilon){hint}")
    require = _merge_require(defaults.get("require"), entry.get("require"), overrides, prefix, file_source, source)
    mode = settings.get("mode", _sole_mode(require))
    requirements = _requirements(require, mode)
    certified = require.get("certified")
    files: dict[str, Any] = {}
    for key in ("inputs", "labels"):
        if key in entry:
            text = _checked(_text, entry[key], prefix + key, source.name)
            files[key] = _existing_file(source.base / text, prefix + key, source)
    empirical_raw = entry.get("empirical", defaults.get("empirical"))
    empirical_source = source if "empirical" in entry else file_source
    empirical = None
    if empirical_raw is not None:
        empirical = _empirical(empirical_raw, prefix + "empirical.", empirical_source)
    policy = ModelPolicy(
        pattern=pattern,
        paths=item.paths if item.paths is not None else _resolve_models(pattern, source, prefix + "path", cwd),
        mode=mode,
        requirements=requirements,
        empirical=empirical,
        certified=certified,
        **files,
        **{key: value for key, value in settings.items() if key != "mode"},
    )
    _check_consistent(policy, where, overrides.has_baseline)
    _check_stored(policy, where, overrides)
    return policy


def _merge_require(
    top: Any, entry: Any, overrides: Overrides, prefix: str, file_source: _Source, source: _Source
) -> dict[str, Any]:
    """require: top-level ← entry ← flags; ``layers`` maps merge key by key."""
    merged: dict[str, Any] = {}
    for raw, where, src in ((top, "require.", file_source), (entry, prefix + "require.", source)):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise PolicyError(f"{src.name}: invalid value for '{where[:-1]}': must be a mapping, got {raw!r}")
        _refuse_unknown(raw, _REQUIRE_KEYS, where, src)
        for key, value in raw.items():
            if key == "layers":
                merged["layers"] = {**merged.get("layers", {}), **_layer_counts(value, where + "layers", src)}
            elif key == "certified":
                merged["certified"] = _certified(value, where + "certified", src)
            else:
                merged[key] = _checked(_count, value, where + key, src.name)
    for key, value in overrides.require().items():
        merged[key] = {**merged.get("layers", {}), **value} if key == "layers" else value
    return merged


def _sole_mode(require: dict[str, Any]) -> str:
    """The mode of an entry that names none: that of its one uniform requirement when nothing else needs a mode
    (no layer or total requirement; the report's settings then describe the bound that decides), else crash."""
    uniform = [m for m in MODES if m in require]
    return uniform[0] if len(uniform) == 1 and "layers" not in require and "total" not in require else "crash"


def _layer_counts(value: Any, key: str, source: _Source) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise PolicyError(
            f"{source.name}: invalid value for '{key}': must be a mapping of layer name or index to a count, "
            f"got {value!r}"
        )
    return {str(name): _checked(_count, count, f"{key}.{name}", source.name) for name, count in value.items()}


def per_layer(counts: tuple[int, ...], layer_names: Sequence[str], key: str) -> list[int]:
    """A policy's failure ``counts`` — one for every hidden layer, or one per hidden layer — as one per layer.

    Raises:
        PolicyError: another number of counts (one line naming the model's hidden layers).
    """
    if len(counts) == 1:
        return list(counts) * len(layer_names)
    if len(counts) != len(layer_names):
        raise PolicyError(
            f"'{key}' {list(counts)}: the model has {len(layer_names)} hidden layers ({', '.join(layer_names)}); "
            "give one count for every layer or one per hidden layer"
        )
    return list(counts)


def _certified(value: Any, key: str, source: _Source) -> CertifiedRequirement:
    """``require.certified``: exactly one of crash/byzantine/bit_flip/stuck_at (a count, or a list of one per hidden
    layer), min_fraction, radius,
    classes."""
    if not isinstance(value, dict):
        raise PolicyError(f"{source.name}: invalid value for '{key}': must be a mapping, got {value!r}")
    _refuse_unknown(value, _CERTIFIED_KEYS, key + ".", source)
    modes = [m for m in MODES if m in value]
    if len(modes) != 1:
        raise PolicyError(
            f"{source.name}: '{key}' needs exactly one of 'crash: N', 'byzantine: N', 'bit_flip: N' or 'stuck_at: N'"
        )
    mode = modes[0]
    counts = _checked(_counts, value[mode], f"{key}.{mode}", source.name)
    fraction = _checked(_fraction, value.get("min_fraction", 1.0), f"{key}.min_fraction", source.name)
    radius = value.get("radius")
    if radius is not None:
        radius = _checked(_positive, radius, f"{key}.radius", source.name)
    classes = value.get("classes")
    if classes is not None and not isinstance(classes, bool):
        raise PolicyError(f"{source.name}: invalid value for '{key}.classes': must be true or false, got {classes!r}")
    return CertifiedRequirement(mode, counts, fraction, radius, classes)


def _requirements(require: dict[str, Any], mode: str) -> tuple[Requirement, ...]:
    """The normalized requirement list: uniform per mode, then layers, then total."""
    out = [Requirement(f"require.{m}", "uniform", m, require[m]) for m in MODES if m in require]
    for layer, count in require.get("layers", {}).items():
        out.append(Requirement(f"require.layers.{layer}", "layer", mode, count, layer))
    if "total" in require:
        out.append(Requirement("require.total", "total", mode, require["total"]))
    return tuple(out)


def _empirical(raw: Any, prefix: str, source: _Source) -> EmpiricalRequirement:
    if not isinstance(raw, dict):
        raise PolicyError(f"{source.name}: invalid value for '{prefix[:-1]}': must be a mapping, got {raw!r}")
    _refuse_unknown(raw, _EMPIRICAL_KEYS, prefix, source)
    for key in ("inputs", "failures"):
        if key not in raw:
            raise PolicyError(f"{source.name}: missing key '{prefix}{key}'")
    checks: dict[str, Callable[[Any], Any]] = {
        "failures": _counts,
        "max_error": _positive,
        "min_accuracy": _fraction,
        "search": _choice(SEARCHES),
        "trials": _positive_int,
        "seed": _count,
        "radius": _positive,
    }
    values = {key: _checked(check, raw[key], prefix + key, source.name) for key, check in checks.items() if key in raw}
    if "radius" in values and values.get("search", "worst") != "worst":
        raise PolicyError(f"{source.name}: '{prefix}radius' is how far the worst search moves each input: "
                          f"set '{prefix}search: worst' or drop it")
    for key in ("inputs", "labels"):
        if key in raw:
            text = _checked(_text, raw[key], prefix + key, source.name)
            values[key] = _existing_file(source.base / text, prefix + key, source)
    return EmpiricalRequirement(**values)


def _positive_int(value: Any) -> int:
    if _count(value) == 0:
        raise ValueError("must be ≥ 1")
    return value


def _existing_file(path: Path, key: str, source: _Source) -> Path:
    if not path.is_file():
        raise PolicyError(f"{source.name}: '{key}': file '{display_path(path)}' does not exist")
    return path


def _resolve_models(pattern: str, source: _Source, key: str, cwd: Path) -> tuple[str, ...]:
    """The files a path or glob names, relative to the file that names it."""
    where = f"{source.name}: " + (f"'{key}': " if key != "path" else "")
    found = _named_files(pattern, source.base)
    if not found and _is_glob(pattern):
        raise PolicyError(f"{where}the glob '{pattern}' matches no file (relative to {source.base})")
    if not found:
        raise PolicyError(f"{where}model file '{pattern}' does not exist (relative to {source.base})")
    return tuple(display_path(Path(p), cwd) for p in found)


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def _named_files(pattern: str, base: Path) -> list[str]:
    """What a path or glob relative to ``base`` names: the files a glob matches (sorted), or the path itself
    when it exists; [] when nothing."""
    full = base / pattern
    if _is_glob(pattern):
        return sorted(p for p in glob.glob(str(full), recursive=True) if os.path.isfile(p))
    return [str(full)] if full.exists() else []


def display_path(path: Path, cwd: Path | None = None) -> str:
    """Relative to the working directory (``cwd``, default the process's) when inside it (stable across CI
    checkouts), else absolute."""
    resolved, base = path.resolve(), (Path.cwd() if cwd is None else cwd).resolve()
    return str(resolved.relative_to(base)) if resolved.is_relative_to(base) else str(resolved)


def _check_stored(policy: ModelPolicy, where: str, overrides: Overrides) -> None:
    """Stuck-at bits need the value they are stuck at (it decides the bound: the sign stuck at 0 cannot move a
    ReLU output, at 1 it negates it); ``--bit`` / ``--stuck-at`` given where nothing uses them are refused."""
    modes = {policy.mode} | {r.mode for r in policy.requirements}
    if policy.certified is not None:
        modes.add(policy.certified.mode)
    if "stuck_at" in modes and policy.stuck_at is None:
        raise PolicyError(
            f"{where}: stuck-at bits need the value they are stuck at: 'stuck_at: 0' or 'stuck_at: 1' (--stuck-at)"
        )
    if overrides.bit is not None and not modes & {"bit_flip", "stuck_at"}:
        raise PolicyError(f"{where}: --bit applies to bit flips and stuck-at bits (--require-bit-flip N, "
                          "--require-stuck-at N or --mode bit_flip|stuck_at)")
    if overrides.stuck_at is not None and "stuck_at" not in modes:
        raise PolicyError(f"{where}: --stuck-at applies to stuck-at bits (--require-stuck-at N or --mode stuck_at)")


def _check_consistent(policy: ModelPolicy, where: str, has_baseline: bool) -> None:
    """Cross-key rules: byzantine needs a range, crash takes none, something must be required."""
    byzantine = policy.mode == "byzantine" or any(r.mode == "byzantine" for r in policy.requirements)
    byzantine = byzantine or (policy.certified is not None and policy.certified.mode == "byzantine")
    if byzantine and policy.capacity is None and policy.failure_range is None:
        raise PolicyError(
            f"{where}: byzantine failures need 'capacity' or 'failure_range' (--capacity/--failure-range)"
        )
    if not byzantine and (policy.capacity is not None or policy.failure_range is not None):
        raise PolicyError(
            f"{where}: 'capacity'/'failure_range' apply to byzantine failures; set mode: byzantine or require.byzantine"
        )
    if policy.capacity is not None and policy.failure_range is not None:
        raise PolicyError(f"{where}: give either 'capacity' or 'failure_range', not both")
    if policy.certified is not None and policy.inputs is None:
        raise PolicyError(f"{where}: 'require.certified' needs the model's 'inputs' (a .npy/.npz file)")
    if not policy.requirements and policy.empirical is None and policy.certified is None and not has_baseline:
        raise PolicyError(
            f"{where}: nothing is required; add 'require' ({', '.join(_REQUIRE_KEYS)}) or 'empirical', "
            "or pass --require-crash N / --baseline FILE"
        )
