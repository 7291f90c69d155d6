"""Inputs for fault injection (docs/method.md §8): ``.npy``/``.npz`` files, labels, uniform samples.

Files are read with ``allow_pickle=False`` (an ``.npy`` may otherwise run code), from
regular files only, under a size cap. Every problem — a missing file, an unknown
array name, NaN/Inf, a shape that does not fit the model's input, a non-float
dtype, labels out of range — is an :class:`~robaudit.errors.InputDataError`
(exit code 2) naming the file, the rule and what came.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from robaudit.errors import InputDataError
from robaudit.graph.inputs import TOKEN
from robaudit.limits import max_inputs_bytes

if TYPE_CHECKING:
    from robaudit.graph.network import Network

#: Array names tried, in order, when an ``.npz`` holds several arrays and none is named.
INPUT_KEYS = ("x", "inputs", "input", "X", "data")
LABEL_KEYS = ("labels", "label", "y", "targets", "target")
#: Relative slack of the input-domain check (inputs are float32, the domain float64).
DOMAIN_SLACK = 1e-6


def split_name(text: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``file.npz:name`` → (file.npz, name); a plain path → (path, None)."""
    text = str(text)
    if not Path(text).exists() and ":" in text:
        path, name = text.rsplit(":", 1)
        if name and Path(path).suffix.lower() == ".npz":
            return Path(path), name
    return Path(text), None


def _check_file(path: Path, what: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputDataError(f"{what} file '{path}' does not exist") from None
    except OSError as exc:
        raise InputDataError(f"cannot access {what} file '{path}': {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputDataError(f"{what} file '{path}' is not a regular file")
    limit = max_inputs_bytes()
    if info.st_size > limit:
        raise InputDataError(f"{what} file '{path}' is {info.st_size} bytes, more than the limit of {limit}")


def _check_numpy_magic(file: Path, what: str) -> None:
    """A .npy starts with \\x93NUMPY and a .npz is a zip; name anything else by what it is."""
    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise InputDataError(f"cannot read {what} file '{file}': {exc.strerror}") from None
    if head.startswith(b"\x93NUMPY") or head.startswith(b"PK"):
        return
    kind = "a text file" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not numpy data"
    raise InputDataError(
        f"{what} file '{file}' is {kind}, not a .npy or .npz file (save arrays with numpy.save or numpy.savez)"
    )


def read_array(path: str | os.PathLike[str], what: str, keys: tuple[str, ...]) -> tuple[np.ndarray, str]:
    """Read one array from ``.npy`` or ``.npz`` (``file.npz:name`` picks an array); (array, description)."""
    file, name = split_name(path)
    _check_file(file, what)
    _check_numpy_magic(file, what)
    try:
        loaded = np.load(file, allow_pickle=False)
    except ValueError as exc:
        reason = "it holds Python objects (pickles are refused)" if "pickle" in str(exc) else str(exc).split("\n")[0]
        raise InputDataError(f"{what} file '{file}' cannot be read: {reason}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputDataError(f"{what} file '{file}' is not a .npy or .npz file ({type(exc).__name__})") from None
    if isinstance(loaded, np.ndarray):
        if name is not None:
            raise InputDataError(f"{what} file '{file}' is a .npy file; ':{name}' applies to .npz files only")
        return loaded, f"{file}"
    with loaded:
        names = list(loaded.files)
        chosen = _choose_key(names, name, keys, file, what)
        try:
            array = loaded[chosen]
        except ValueError:
            raise InputDataError(f"{what} array '{chosen}' in '{file}' holds Python objects (refused)") from None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputDataError(f"{what} array '{chosen}' in '{file}' is unreadable ({type(exc).__name__})") from None
    return array, f"{file}:{chosen}"


def _choose_key(names: list[str], name: str | None, keys: tuple[str, ...], file: Path, what: str) -> str:
    listed = ", ".join(names) or "none"
    if name is not None:
        if name not in names:
            raise InputDataError(f"{what} file '{file}' has no array '{name}' (arrays: {listed})")
        return name
    if len(names) == 1:
        kinds: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {
            INPUT_KEYS: (LABEL_KEYS, "labels"),
            LABEL_KEYS: (INPUT_KEYS, "inputs"),
        }
        other = kinds.get(keys)
        if other is not None and names[0] in other[0]:  # a labels file given as the inputs, or the other way round
            raise InputDataError(
                f"{what} file '{file}' holds only '{names[0]}', a name for {other[1]}; if it holds the {what}, "
                f"name the array: '{file}:{names[0]}'"
            )
        return names[0]
    for key in keys:
        if key in names:
            return key
    if not names:
        raise InputDataError(f"{what} file '{file}' holds no array")
    raise InputDataError(f"{what} file '{file}' holds several arrays ({listed}); pick one with '{file}:NAME'")


def check_inputs(array: np.ndarray, sample_shape: tuple[int, ...], where: str) -> np.ndarray:
    """A finite float array [M, *sample_shape] (a single sample is accepted too), as float32."""
    if array.dtype.kind != "f":
        raise InputDataError(
            f"inputs {where} have dtype {array.dtype}; robaudit expects floating-point inputs "
            "(convert them, scaled to the input range)"
        )
    shape = tuple(array.shape)
    if shape == tuple(sample_shape):
        array = array[None]
    elif shape[1:] != tuple(sample_shape) or len(shape) != len(sample_shape) + 1:
        raise InputDataError(
            f"inputs {where} have shape {list(shape)}; the model's input needs [N, {', '.join(map(str, sample_shape))}]"
        )
    if array.shape[0] == 0:
        raise InputDataError(f"inputs {where} hold no samples")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(np.argwhere(~finite.reshape(len(array), -1).all(axis=1))[0, 0])
        raise InputDataError(f"inputs {where} contain NaN or Inf values (first in sample {bad})")
    return np.ascontiguousarray(array, dtype=np.float32)


def check_labels(array: np.ndarray, count: int, classes: int, where: str) -> np.ndarray:
    """Integer class labels [M] in [0, classes), one per input."""
    labels = np.asarray(array)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputDataError(f"labels {where} have shape {list(array.shape)}; expected one label per input [N]")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise InputDataError(f"labels {where} are not whole numbers")
    elif labels.dtype.kind not in "iu":
        raise InputDataError(f"labels {where} have dtype {labels.dtype}; expected integer class indices")
    if len(labels) != count:
        raise InputDataError(f"labels {where} hold {len(labels)} labels for {count} inputs")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        hint = (
            ": one output has no arg-max to compare with a label (a binary classifier needs its two scores as "
            "outputs for accuracy; without --labels the output change is still measured)" if classes == 1 else ""
        )
        raise InputDataError(
            f"labels {where} range over [{labels.min()}, {labels.max()}]; the model has {classes} outputs{hint}"
        )
    return labels


def load_inputs(path: str | os.PathLike[str], sample_shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Inputs from a file, checked against the model's per-sample input shape."""
    array, where = read_array(path, "inputs", INPUT_KEYS)
    return check_inputs(array, sample_shape, f"'{where}'"), where


def load_labels(path: str | os.PathLike[str], count: int, classes: int) -> tuple[np.ndarray, str]:
    """Labels from a file, one per input, each in [0, classes)."""
    array, where = read_array(path, "labels", LABEL_KEYS)
    return check_labels(array, count, classes, f"'{where}'"), where


def chance_note(accuracy: float | None, labels: np.ndarray | None) -> str | None:
    """A note when the clean accuracy on ``labels`` is no better than always answering their most common class
    (at least 20 labels, no class holding half of them): labels in another order than the inputs, or of another
    task — a shuffled labels file otherwise passes without a word (a new user's trial)."""
    if accuracy is None or labels is None or len(labels) < 20:
        return None
    majority = float(np.bincount(np.asarray(labels, np.int64).reshape(-1)).max()) / len(labels)
    if majority >= 0.5 or accuracy > 1.5 * majority:
        return None
    return (f"the clean accuracy on these labels, {accuracy:.1%}, is about what always answering the most common "
            f"label gives ({majority:.1%}): are the labels in the same order as the inputs?")


def sample_inputs(
    count: int, sample_shape: tuple[int, ...], input_range: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """``count`` inputs drawn uniformly from the input domain [LO, HI] (docs/method.md §2.4), float32."""
    lo, hi = input_range
    if count < 1:
        raise InputDataError(f"--samples must be at least 1, got {count}")
    values = rng.uniform(lo, hi, size=(count, *sample_shape))
    return np.clip(values, lo, hi).astype(np.float32)


def suggested_range(inputs: np.ndarray) -> tuple[float, float]:
    """An ``--input-range`` that covers the data: its min and max, widened to whole numbers."""
    return float(np.floor(np.min(inputs))), float(np.ceil(np.max(inputs)))


def outside_domain(inputs: np.ndarray, input_range: tuple[float, float] | tuple[np.ndarray, np.ndarray]) -> float:
    """Fraction of input elements outside [LO, HI] (scalars, or per-element arrays of one sample; float32 slack)."""
    return float(_outside(inputs, input_range).mean())


def inside_domain(inputs: np.ndarray, input_range: tuple[float, float] | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per sample (axis 0 of ``inputs``), whether every element lies in [LO, HI] (as :func:`outside_domain`), [M]."""
    outside = np.asarray(_outside(inputs, input_range))
    return np.logical_not(outside.reshape(len(outside), -1).any(axis=1))


def _outside(inputs: np.ndarray, input_range) -> np.ndarray:
    """Per element of ``inputs``, whether it lies outside [LO, HI] beyond float32 slack."""
    lo, hi = input_range
    slack = DOMAIN_SLACK * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
    return (inputs < lo - slack) | (inputs > hi + slack)


def refuse_outside_domain(network: Network, inputs: np.ndarray, consequence: str) -> None:
    """Refuse inputs with values outside the input domain, or token ids that are not whole numbers (exit 2), with
    the range that covers them and ``consequence`` (why the command needs them inside, docs/method.md §2.4).

    ``inputs`` [M, *sample shape], or for several or token inputs [M, Σ elements] packed in graph order
    (docs/method.md §12.3); a tolerance of 10⁻⁶ relative to the bounds (float32 files of float64 ranges).

    Raises:
        InputDataError: a value outside its input's range (or a fractional token id).
    """
    flat = np.asarray(inputs, np.float64).reshape(len(inputs), -1)
    offset = 0
    for spec in network.variable_inputs:
        size = int(np.prod(spec.shape[1:], dtype=np.int64))
        part, offset = flat[:, offset : offset + size], offset + size
        lo, hi = spec.box.lo.reshape(1, -1), spec.box.hi.reshape(1, -1)
        token = spec.kind == TOKEN
        what = "" if not network.packed else f" of input '{spec.name}'"
        if token and not np.array_equal(part, np.round(part)):
            raise InputDataError(f"--inputs: the values{what} are token ids and must be whole numbers")
        slack = 0.0 if token else 1e-6 * np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi)))
        outside = (part < lo - slack) | (part > hi + slack)
        if outside.any():
            first = int(np.argwhere(outside.any(axis=1))[0, 0])
            low, high = spec.hull
            named = f"{spec.name}=" if network.packed else ""  # several inputs: the range of this one
            cover = "" if token else " (--input-range {}{:g},{:g} covers them)".format(named, *suggested_range(part))
            raise InputDataError(
                f"--inputs: {outside.mean():.2%} of the values{what} lie outside the input range [{low:g}, {high:g}] "
                f"(first in sample {first}); {consequence}{cover}"
            )
