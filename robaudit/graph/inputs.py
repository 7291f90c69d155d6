"""The input domain of the audited model: one box per input (docs/method.md §12).

Every graph input gets an :class:`InputSpec`: its name, shape at batch size 1, its box
and its kind — ``float`` (a box over real values), ``token`` (an integer input: every id
of the embedding table it indexes) or ``constant`` (held at a given value, a point).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from robaudit.errors import InputDataError, ModelStructureError, OptionError, UnsupportedModelError
from robaudit.graph.endpoints import FLOAT_TYPES, input_shape_of
from robaudit.graph.onnx_graph import Graph, ValueInfo
from robaudit.graph.ops.base import Interval

#: ONNX integer element types read as token ids.
INT_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}
FLOAT, TOKEN, CONSTANT = "float", "token", "constant"


@dataclass(frozen=True)
class InputDomain:
    """What the user said about the inputs (``--input-range``, ``--input-range-file``, ``--input-value``)."""

    #: [LO, HI] for every element of every float input without a more specific domain.
    default: tuple[float, float] = (0.0, 1.0)
    #: Per input name: [LO, HI] for its elements.
    named: tuple[tuple[str, float, float], ...] = ()
    #: An .npz of per-element bounds: ``lo``/``hi`` (one input) or ``NAME.lo``/``NAME.hi``.
    range_file: str | None = None
    #: Per input name: an .npy file holding the value the input is fixed at.
    values: tuple[tuple[str, str], ...] = ()


@dataclass
class InputSpec:
    """One model input as the audit sees it."""

    name: str
    #: Shape at batch size 1.
    shape: tuple[int, ...]
    #: Elementwise box of the input (a point for a constant input; ids for a token input).
    box: Interval
    #: ``float``, ``token`` or ``constant``.
    kind: str = FLOAT
    #: Where the box came from, in words (for the report's settings).
    source: str = ""
    #: ONNX element type of the input.
    elem_type: int = 1
    #: The fixed value of a constant input (shape ``shape``).
    value: np.ndarray | None = field(default=None, repr=False)

    @property
    def hull(self) -> tuple[float, float]:
        """[min lo, max hi] over the elements."""
        return float(self.box.lo.min()), float(self.box.hi.max())

    def describe(self) -> dict:
        """The report's description of this input."""
        lo, hi = self.hull
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "range": [lo, hi],
            "source": self.source,
        }


def tensor_inputs(graph: Graph) -> list[ValueInfo]:
    """The graph's tensor inputs (initializers listed as inputs excluded)."""
    return [i for i in graph.inputs if i.is_tensor and i.name not in graph.initializers]


def input_specs(
    graph: Graph, domain: InputDomain, shape: tuple[int, ...] | None, needed: set[str] | None = None
) -> list[InputSpec]:
    """One spec per input the audited output reads (``needed``), in graph order.

    Raises:
        ModelStructureError: an input name is declared twice.
        OptionError: a name given in the domain is not an input, or a domain is not LO < HI.
        InputDataError: a range or value file cannot be read or does not fit the input.
        UnsupportedModelError: an input is neither float nor integer.
    """
    declared = [i.name for i in graph.inputs]
    twice = sorted({name for name in declared if declared.count(name) > 1})
    if twice:
        raise ModelStructureError(f"graph input '{twice[0]}' is declared more than once")
    infos = [i for i in tensor_inputs(graph) if needed is None or i.name in needed]
    if not infos:  # read only inside subgraphs (If/Loop bodies): their ops are refused by name later
        infos = tensor_inputs(graph)
    names = {i.name for i in tensor_inputs(graph)}
    for name in [n for n, _, _ in domain.named] + [n for n, _ in domain.values]:
        if name not in names:
            listed = ", ".join(f"'{n}'" for n in sorted(names))
            raise OptionError(f"'{name}' is not an input of the model (inputs: {listed})")
    if not infos:
        raise UnsupportedModelError("the audited output does not depend on any model input")
    files = _range_file(domain.range_file, [i.name for i in infos])
    specs = []
    for info in infos:
        given = shape if len(infos) == 1 else None
        specs.append(_spec(graph, info, input_shape_of(info, given), domain, files))
    if all(s.kind == CONSTANT for s in specs):
        raise OptionError("every input is held at a value (--input-value): nothing varies")
    return specs


def _spec(graph: Graph, info: ValueInfo, shape: tuple[int, ...], domain: InputDomain, files: dict) -> InputSpec:
    values = dict(domain.values)
    if info.name in values:
        value = _read_value(values[info.name], info.name, shape)
        return InputSpec(info.name, shape, Interval.point(value), CONSTANT, values[info.name], info.elem_type, value)
    if info.elem_type in INT_TYPES:
        ids = vocabulary(graph, info.name)
        box = Interval(np.zeros(shape), np.full(shape, float(ids - 1)))
        return InputSpec(info.name, shape, box, TOKEN, f"every id 0..{ids - 1}", info.elem_type)
    if info.elem_type not in FLOAT_TYPES:
        raise UnsupportedModelError(f"input '{info.name}' is neither a float nor an integer tensor")
    if info.name in files:
        lo, hi = _fit(files[info.name][0], files[info.name][1], info.name, shape)
        return InputSpec(info.name, shape, Interval(lo, hi), FLOAT, files[info.name][2], info.elem_type)
    named = {n: (low, high) for n, low, high in domain.named}
    low, high = named.get(info.name, domain.default)
    source = "--input-range NAME=LO,HI" if info.name in named else "--input-range"
    box = Interval(np.full(shape, float(low)), np.full(shape, float(high)))
    return InputSpec(info.name, shape, box, FLOAT, source, info.elem_type)


def vocabulary(graph: Graph, name: str) -> int:
    """Number of ids of an integer input: the rows of the constant table every reader gathers from.

    Raises:
        UnsupportedModelError: the input is read by anything but ``Gather`` (axis 0) from a constant table.
    """
    rows = set()
    for node in graph.nodes:
        if name not in node.inputs:
            continue
        table = node.inputs[0] if node.inputs else ""
        if node.op_type != "Gather" or node.inputs[1:2] != [name] or table not in graph.initializers:
            raise UnsupportedModelError(
                f"integer input '{name}' is read by node '{node.name}' ({node.op_type}); robaudit audits an "
                "integer input only as the ids of an embedding lookup (Gather from a constant table)"
            )
        if node.attr("axis", 0) != 0:
            raise UnsupportedModelError(f"embedding lookup '{node.name}' gathers along axis {node.attr('axis')}, not 0")
        rows.add(int(np.shape(graph.initializers[table])[0]))
    if not rows:
        raise UnsupportedModelError(f"integer input '{name}' is not read by any node")
    return min(rows)


def _read_value(path: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        value = np.load(os.fspath(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputDataError(f"--input-value {name}: cannot read '{path}' as .npy ({exc})") from None
    value = np.asarray(value)
    if value.shape == tuple(shape[1:]):
        value = value[None]
    if value.shape != tuple(shape) or value.dtype.kind not in "fiub":
        raise InputDataError(
            f"--input-value {name}: '{path}' holds {value.dtype} {list(value.shape)}, the input is {list(shape)}"
        )
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise InputDataError(f"--input-value {name}: '{path}' contains NaN or Inf")
    return value


def _range_file(path: str | None, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Per input name: (lo, hi, source) from the .npz (docs/method.md §12.1)."""
    if path is None:
        return {}
    try:
        archive = np.load(os.fspath(path), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive of named arrays")
        with archive:
            arrays = {key: np.asarray(archive[key], np.float64) for key in archive.files}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputDataError(f"--input-range-file: cannot read '{path}' as .npz ({exc})") from None
    found = {}
    for name in names:
        keys = (f"{name}.lo", f"{name}.hi")
        if all(k in arrays for k in keys):
            found[name] = (arrays[keys[0]], arrays[keys[1]], f"{path}: {keys[0]}, {keys[1]}")
        elif len(names) == 1 and "lo" in arrays and "hi" in arrays:
            found[name] = (arrays["lo"], arrays["hi"], f"{path}: lo, hi")
    if not found:
        want = "'lo' and 'hi'" if len(names) == 1 else "'NAME.lo' and 'NAME.hi' for an input NAME"
        raise InputDataError(f"--input-range-file '{path}' has no arrays {want} (has: {', '.join(arrays)})")
    for name, (lo, hi, _) in found.items():
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
            raise InputDataError(f"--input-range-file '{path}': bounds of '{name}' are not finite with lo ≤ hi")
    return found


def _fit(lo: np.ndarray, hi: np.ndarray, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-element bounds broadcast to the input's shape (batch 1 included).

    Raises:
        InputDataError: they do not broadcast.
    """
    try:
        return (np.broadcast_to(lo, shape).astype(np.float64), np.broadcast_to(hi, shape).astype(np.float64))
    except ValueError:
        raise InputDataError(
            f"--input-range-file: bounds of shape {list(np.shape(lo))} do not fit input '{name}' {list(shape)}"
        ) from None


def sample_feed(specs: list[InputSpec], count: int, rng: np.random.Generator, packed: bool) -> np.ndarray:
    """``count`` inputs drawn uniformly from every variable input's box (token inputs: uniform ids), float32.

    Shapes: one float input → [count, *shape[1:]]; ``packed`` → [count, Σ elements] with the
    inputs flattened and concatenated in graph order (docs/method.md §12.3).
    """
    if count < 1:
        raise InputDataError(f"--samples must be at least 1, got {count}")
    parts = []
    for spec in specs:
        if spec.kind == CONSTANT:
            continue
        lo, hi = spec.box.lo[0], spec.box.hi[0]
        if spec.kind == TOKEN:
            values = rng.integers(np.ceil(lo).astype(np.int64), np.floor(hi).astype(np.int64) + 1, (count, *lo.shape))
        else:
            values = np.clip(rng.uniform(lo, hi, size=(count, *lo.shape)), lo, hi)
        parts.append(values.reshape(count, -1) if packed else values)
    if packed:
        return np.concatenate(parts, axis=1).astype(np.float32)
    return parts[0].astype(np.float32)


def split_feed(specs: list[InputSpec], x: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of every model input from packed vectors [M, Σ elements] (the layout of :func:`sample_feed`,
    docs/method.md §12.3): each varying input cut out and reshaped (token ids rounded to their integer
    type), each held input repeated along the batch. One float input: {name: x}.

    Raises:
        InputDataError: the vectors are not as long as the varying inputs together.
    """
    varying = [s for s in specs if s.kind != CONSTANT]
    if len(specs) == 1 and varying and varying[0].kind == FLOAT:
        return {varying[0].name: x}
    count = len(x)
    flat = x.reshape(count, -1)
    sizes = [int(np.prod(s.shape[1:], dtype=np.int64)) for s in varying]
    if flat.shape[1] != sum(sizes):
        raise InputDataError(f"packed inputs hold {flat.shape[1]} values per sample; the inputs need {sum(sizes)}")
    feeds, offset = {}, 0
    for spec, size in zip(varying, sizes, strict=True):
        part = flat[:, offset : offset + size].reshape((count, *spec.shape[1:]))
        feeds[spec.name] = np.rint(part).astype(_numpy_type(spec.elem_type)) if spec.kind == TOKEN else part
        offset += size
    for spec in specs:
        if spec.kind == CONSTANT and spec.value is not None:
            value = np.asarray(spec.value).astype(_numpy_type(spec.elem_type))
            feeds[spec.name] = np.repeat(value.reshape(spec.shape), count, axis=0)
    return feeds


def _numpy_type(elem_type: int) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def feed_box(specs: list[InputSpec], packed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-element [lo, hi] of one fed sample (the layout of :func:`sample_feed`)."""
    variable = [s for s in specs if s.kind != CONSTANT]
    if not packed:
        return variable[0].box.lo[0], variable[0].box.hi[0]
    return (
        np.concatenate([s.box.lo.reshape(-1) for s in variable]),
        np.concatenate([s.box.hi.reshape(-1) for s in variable]),
    )
