"""Ops that only move, copy or select elements: deviations pass through unchanged.

Their intervals and adjoints are computed by running the op on numpy arrays
(for the adjoint: on an index map, so every output element knows its source).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from robaudit.graph.ops.base import (
    FLOAT,
    INT,
    INTS,
    STRING,
    Interval,
    OpRule,
    check_size,
    reduce_to_shape,
    register,
    replication,
    unsupported,
)


def _apply(node, x: np.ndarray, consts: list) -> np.ndarray:
    """Run a data-movement op on a numpy array ``x`` of full shape (batch included)."""
    op = node.op_type
    if op in ("Identity", "Dropout", "Cast"):
        return x
    if op == "Flatten":
        axis = node.attr("axis", 1)
        if not -x.ndim <= axis <= x.ndim:
            raise ValueError(f"Flatten axis {axis} is out of range for rank {x.ndim}")
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Reshape":
        shape = [int(s) for s in np.asarray(consts[1]).reshape(-1)]
        if not node.attr("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Transpose":
        return np.transpose(x, node.attr("perm", list(range(x.ndim))[::-1]))
    if op in ("Squeeze", "Unsqueeze"):
        axes = node.attr("axes")
        if axes is None and len(consts) > 1 and consts[1] is not None:
            axes = [int(a) for a in np.asarray(consts[1]).reshape(-1)]
        if op == "Squeeze":
            axes = axes if axes is not None else [i for i, s in enumerate(x.shape) if s == 1]
            return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
        rank = x.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = np.expand_dims(x, axis)
        return x
    if op == "Slice":
        return _slice(node, x, consts)
    if op == "Gather":
        indices = np.asarray(consts[1]).astype(np.int64)
        return np.take(x, indices, axis=node.attr("axis", 0))
    if op == "Pad":
        return _pad(node, x, consts)
    if op == "GatherND":
        return _gather_nd(node, x, consts[1])
    raise unsupported(node, "no data-movement rule")


def _gather_nd(node, x: np.ndarray, indices) -> np.ndarray:
    """ONNX GatherND with constant indices: each index tuple selects one slice of ``x``."""
    if indices is None:
        raise unsupported(node, "GatherND is supported only with constant indices")
    batch_dims = int(node.attr("batch_dims", 0))
    indices = np.asarray(indices).astype(np.int64)
    depth = indices.shape[-1]
    if batch_dims:
        if batch_dims >= indices.ndim or x.shape[:batch_dims] != indices.shape[:batch_dims]:
            raise unsupported(node, f"GatherND batch_dims={batch_dims} does not fit the input shapes")
        parts = [_gather_nd_plain(x[b], indices[b]) for b in np.ndindex(*x.shape[:batch_dims])]
        return np.stack(parts).reshape(indices.shape[:-1] + x.shape[batch_dims + depth :])
    return _gather_nd_plain(x, indices)


def _gather_nd_plain(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    depth = indices.shape[-1]
    if depth > x.ndim or np.any(indices >= np.array(x.shape[:depth])) or np.any(indices < -np.array(x.shape[:depth])):
        raise ValueError(f"GatherND indices do not fit the data shape {list(x.shape)}")
    return x[tuple(np.moveaxis(indices, -1, 0))]


def _slice(node, x, consts):
    if len(consts) > 1:
        starts, ends = (np.asarray(c).reshape(-1).astype(np.int64) for c in consts[1:3])
        axes = consts[3] if len(consts) > 3 and consts[3] is not None else range(len(starts))
        steps = consts[4] if len(consts) > 4 and consts[4] is not None else [1] * len(starts)
    else:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes, steps = node.attr("axes", list(range(len(starts)))), [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(
        starts, ends, np.asarray(axes).reshape(-1), np.asarray(steps).reshape(-1), strict=True
    ):
        index[int(axis) % x.ndim] = slice(int(start), int(max(min(end, 2**62), -(2**62))), int(step))
    return x[tuple(index)]


#: ONNX Pad modes → numpy's: each output element is a constant or a copy of one input element.
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _pad(node, x, consts):
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise unsupported(node, f"Pad mode '{mode}' is not supported (constant, reflect, edge, wrap)")
    pads = consts[1] if len(consts) > 1 and consts[1] is not None else node.attr("pads")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if any(p < 0 for p in pads):
        raise unsupported(node, "negative pads (cropping) are not supported")
    rank = x.ndim
    if len(consts) > 3 and consts[3] is not None:
        axes = [int(a) % rank for a in np.asarray(consts[3]).reshape(-1)]
    else:
        axes = list(range(rank))
    width = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        width[axis] = (pads[i], pads[i + len(axes)])
    value = node.attr("value", 0.0)
    if len(consts) > 2 and consts[2] is not None and np.size(consts[2]):
        value = float(np.asarray(consts[2]).reshape(-1)[0])
    check_size(node, [dim + before + after for dim, (before, after) in zip(x.shape, width, strict=True)])
    if mode == "constant":
        return np.pad(x, width, constant_values=value)
    # numpy reflects/wraps again when a pad is longer than its axis; ONNX leaves that undefined
    limit = {"reflect": lambda dim: dim - 1, "wrap": lambda dim: dim, "edge": lambda dim: 2**62}[mode]
    if any(max(before, after) > limit(dim) for dim, (before, after) in zip(x.shape, width, strict=True)):
        raise unsupported(node, f"Pad mode '{mode}' with pads longer than the padded axis")
    return np.pad(x, width, mode=_PAD_MODES[mode])


def is_lookup(args: list) -> bool:
    """Whether a Gather reads variable ids from a constant table (an embedding lookup)."""
    return len(args) > 1 and isinstance(args[1], Interval) and not isinstance(args[0], Interval)


def embedding_interval(node, table: np.ndarray, ids: Interval) -> Interval:
    """Range of ``table[ids]`` over every id in the ids' box: per column, min/max over those rows
    (exactly the row read for an element whose box is a point of a valid id).

    Shapes: table [V, *row], ids [*idx] → [*idx, *row] (docs/method.md §12.2).

    Raises:
        UnsupportedModelError: the lookup is not along axis 0 or the table is empty.
    """
    if node.attr("axis", 0) != 0 or table.ndim < 1 or table.shape[0] == 0:
        raise unsupported(node, "an embedding lookup must gather rows (axis 0) of a non-empty constant table")
    rows = table.shape[0]
    if np.array_equal(ids.lo, ids.hi) and np.all((ids.lo >= 0) & (ids.lo < rows)):
        # given ids (a point box, e.g. a certified input): exactly their rows
        rows_read = np.asarray(table, np.float64)[ids.lo.astype(np.int64)]
        check_size(node, rows_read.shape)
        return Interval(rows_read, rows_read.copy())
    first = int(np.clip(np.floor(ids.lo.min()), 0, rows - 1))
    last = int(np.clip(np.ceil(ids.hi.max()), first, rows - 1))
    used = np.asarray(table[first : last + 1], np.float64)
    shape = tuple(ids.shape) + tuple(table.shape[1:])
    check_size(node, shape)
    lo = np.broadcast_to(used.min(axis=0), shape).copy()
    hi = np.broadcast_to(used.max(axis=0), shape).copy()
    # ids given as points (a sample held at a point beside a box, as the batch-axis probe does): their rows
    fixed = (ids.lo == ids.hi) & (ids.lo >= 0) & (ids.lo < rows)
    if np.any(fixed):
        read = np.asarray(table, np.float64)[ids.lo[fixed].astype(np.int64)]
        lo[fixed], hi[fixed] = read, read
    return Interval(lo, hi)


def _consts(args) -> list:
    return [None if isinstance(a, Interval) else a for a in args]


@register
class DataMovement(OpRule):
    op_types = (
        "Identity",
        "Dropout",
        "Cast",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Gather",
        "GatherND",
        "Pad",
    )
    attributes = {
        "Identity": {},
        "Dropout": {"consumed_inputs": INTS, "is_test": INT, "ratio": FLOAT, "seed": INT},
        "Cast": {"round_mode": STRING, "saturate": INT, "to": (INT, STRING)},
        "Flatten": {"axis": INT},
        "Reshape": {"allowzero": INT, "consumed_inputs": INTS, "shape": INTS},
        "Transpose": {"perm": INTS},
        "Squeeze": {"axes": INTS},
        "Unsqueeze": {"axes": INTS},
        "Slice": {"axes": INTS, "ends": INTS, "starts": INTS},
        "Gather": {"axis": INT},
        "GatherND": {"batch_dims": INT},
        "Pad": {"mode": STRING, "paddings": INTS, "pads": INTS, "value": FLOAT},
    }

    def interval(self, node, args):
        x = args[0]
        if node.op_type == "Gather" and is_lookup(args):
            return [embedding_interval(node, np.asarray(x), args[1])]
        if not isinstance(x, Interval) or any(isinstance(a, Interval) for a in args[1:]):
            raise unsupported(node, "shape/index operands must be constants")
        if node.op_type == "Cast" and node.attr("to") in (10, 16):
            reason = "a Cast to float16/bfloat16 is supported only when cast straight back (no narrow-float arithmetic)"
            raise unsupported(node, reason)
        if node.op_type == "Cast" and node.attr("to") not in (1, 11):
            raise unsupported(node, "Cast to a non-float type on the audited path")
        if node.op_type == "Dropout":
            _check_inference_dropout(node, args)
        lo = _apply(node, x.lo, _consts(args))
        hi = lo if x.hi is x.lo else _apply(node, x.hi, _consts(args))  # a point (the worst search's forward): once
        outs = [Interval(lo, hi)]
        ones = np.ones_like(outs[0].lo)
        return outs + [Interval(ones, ones)] * (len(node.outputs) - 1)  # Dropout's mask: all kept

    def _index_map(self, node, ctx) -> np.ndarray:
        """Per output element (flat), the flat index of the input element it copies, −1 for a padded constant."""
        return self._node_sources(node, ctx).indices

    @staticmethod
    def _node_sources(node, ctx) -> _Sources:
        """:func:`_sources` of ``node`` with its input shape and constant operands read from ``ctx``."""
        in_shape = tuple(int(d) for d in ctx.shape(node.inputs[0]))
        return _sources(node, in_shape, [None] + [ctx.constants.get(v) if v else None for v in node.inputs[1:]])

    def backward(self, node, cot, ctx):
        if not ctx.is_variable(node.inputs[0]):  # an embedding lookup: its ids carry no error
            return [None, np.zeros((cot[0].shape[0],) + ctx.shape(node.inputs[1]))]
        in_shape = tuple(int(d) for d in ctx.shape(node.inputs[0]))
        found = self._node_sources(node, ctx)
        k = cot[0].shape[0]
        flat = cot[0].reshape(k, -1)
        grad = np.zeros((k, int(np.prod(in_shape))))
        if found.distinct:  # each input element copied at most once: its adjoint is that one output's entry
            grad[:, found.kept] = flat[:, found.keep]
        else:
            np.add.at(grad.T, found.kept, flat[:, found.keep].T)
        return [grad.reshape((k,) + in_shape)] + [None] * (len(node.inputs) - 1)

    def paper(self, node, errs, ctx):
        if not ctx.is_variable(node.inputs[0]):  # an embedding lookup: its ids carry no error
            return [0.0]
        sources = self._index_map(node, ctx).reshape(-1)
        sources = sources[sources >= 0]
        copies = int(np.bincount(sources).max()) if sources.size else 0
        return [errs[0] * copies] + [0.0] * (len(node.outputs) - 1)  # Dropout's mask does not move


class _Sources(NamedTuple):
    """Where a data-movement op's output elements come from (:func:`_sources`)."""

    #: [outputs] the flat input index each output element copies, −1 for a padded constant (read-only)
    indices: np.ndarray
    #: [outputs] the elements that copy an input element
    keep: np.ndarray
    #: their input indices, ``indices[keep]``
    kept: np.ndarray
    #: whether no input element is copied twice (Slice, Transpose, Reshape; not Pad reflect/edge/wrap, Gather)
    distinct: bool


def _sources(node, in_shape: tuple[int, ...], consts: list) -> _Sources:
    """The op run on an index map of its input (the module doc), remembered for the op's content: its type,
    attributes, input shape and constant operands (a worst search back-propagates through the same node a
    thousand times); an attribute that is an array is not remembered."""
    attrs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in node.attrs.items()))
    if any(isinstance(v, np.ndarray) for _, v in attrs):
        return _computed_sources(node, in_shape, consts)
    operands = tuple(None if c is None else (np.asarray(c).dtype.str, np.shape(c), np.asarray(c).tobytes())
                     for c in consts)
    key = (node.op_type, attrs, in_shape, operands)
    with _SOURCES_LOCK:  # the tight pass back-propagates chunks in several threads
        found = _SOURCES.get(key)
    if found is not None:
        return found
    found = _computed_sources(node, in_shape, consts)
    size = _nbytes(found)
    if size <= _SOURCES_BYTES // 4:
        with _SOURCES_LOCK:
            while _SOURCES and sum(_nbytes(f) for f in _SOURCES.values()) + size > _SOURCES_BYTES:
                _SOURCES.pop(next(iter(_SOURCES)))  # the oldest first
            _SOURCES[key] = found
    return found


def _nbytes(found: _Sources) -> int:
    return found.indices.nbytes + found.keep.nbytes + found.kept.nbytes


def _computed_sources(node, in_shape: tuple[int, ...], consts: list) -> _Sources:
    ids = np.arange(int(np.prod(in_shape)), dtype=np.float64).reshape(in_shape)
    if node.op_type == "Pad":  # −1 as the padding value; opset ≤ 10 gives the pads as an attribute (one input)
        consts = [*consts, None][: max(2, len(consts))]
        consts = consts[:2] + [np.array([-1.0])] + consts[3:]
    indices = _apply(node, ids, consts).astype(np.int64).reshape(-1)
    keep = indices >= 0
    kept = indices[keep]
    distinct = bool(np.unique(kept).size == kept.size)
    for array in (indices, keep, kept):
        array.setflags(write=False)
    return _Sources(indices, keep, kept, distinct)


#: :func:`_sources` remembered, the oldest dropped past ``_SOURCES_BYTES`` bytes of maps.
_SOURCES: dict[tuple, _Sources] = {}
_SOURCES_BYTES = 32 * 2**20
_SOURCES_LOCK = threading.Lock()


def _check_inference_dropout(node, args) -> None:
    """Refuse a Dropout that drops: ``training_mode`` true (opset 12+) or ``is_test=0`` (opset < 7)."""
    training = args[2] if len(args) > 2 else None
    if isinstance(training, Interval) or (training is not None and bool(np.any(training))):
        raise unsupported(node, "Dropout with training_mode=1 (training form) is not supported")
    if node.opset < 7 and node.attr("is_test", 0 if node.opset else 1) == 0:  # before opset 7 is_test defaults to 0
        raise unsupported(node, "Dropout with is_test=0 (training form) is not supported")


@register
class Concat(OpRule):
    op_types = ("Concat",)
    attributes = {"Concat": {"axis": INT}}

    def interval(self, node, args):
        axis = node.attr("axis")
        if axis is None:  # before opset 4 the axis defaulted to 1 (np.concatenate would flatten everything)
            raise unsupported(node, "a Concat without its axis attribute (opset < 4) is not supported")
        parts = [a if isinstance(a, Interval) else Interval.point(a) for a in args]
        return [Interval(np.concatenate([p.lo for p in parts], axis), np.concatenate([p.hi for p in parts], axis))]

    def backward(self, node, cot, ctx):
        shapes = [ctx.shape(v) for v in node.inputs]
        axis = node.attr("axis") % len(shapes[0])
        bounds = np.cumsum([s[axis] for s in shapes])[:-1]
        pieces = np.split(cot[0], bounds, axis=axis + 1)
        return [p if ctx.is_variable(v) else None for p, v in zip(pieces, node.inputs, strict=True)]

    def paper(self, node, errs, ctx):
        return [sum(e for e in errs if e is not None)]


@register
class Split(OpRule):
    op_types = ("Split",)
    attributes = {"Split": {"axis": INT, "num_outputs": INT, "split": INTS}}

    def _sizes(self, node, shape, consts) -> list[int]:
        """The parts' lengths along the axis: the ``split`` input or attribute, else equal parts — or, where the length
        does not divide (opset 18's ``num_outputs``), parts of ⌈d/n⌉ with a smaller last one, as ONNX's reference and
        onnxruntime cut them."""
        axis = node.attr("axis", 0) % len(shape)
        split = consts[1] if len(consts) > 1 and consts[1] is not None else node.attr("split")
        if split is None:
            n, length = len(node.outputs), int(shape[axis])
            part = -(-length // n)
            return [part] * (n - 1) + [length - part * (n - 1)]
        return [int(s) for s in np.asarray(split).reshape(-1)]

    def interval(self, node, args):
        x = args[0]
        axis = node.attr("axis", 0) % len(x.shape)
        bounds = np.cumsum(self._sizes(node, x.shape, _consts(args)))[:-1]
        return [
            Interval(lo, hi) for lo, hi in zip(np.split(x.lo, bounds, axis), np.split(x.hi, bounds, axis), strict=True)
        ]

    def backward(self, node, cot, ctx):
        in_shape = ctx.shape(node.inputs[0])
        k = next(c.shape[0] for c in cot if c is not None)
        pieces = [c if c is not None else np.zeros((k,) + ctx.shape(o)) for c, o in zip(cot, node.outputs, strict=True)]
        axis = node.attr("axis", 0) % len(in_shape)
        return [np.concatenate(pieces, axis=axis + 1)] + [None] * (len(node.inputs) - 1)

    def paper(self, node, errs, ctx):
        return [errs[0]] * len(node.outputs)


@register
class Expand(OpRule):
    op_types = ("Expand",)
    attributes = {"Expand": {}}

    def interval(self, node, args):
        x, shape = args[:2]
        target = np.broadcast_shapes(x.shape, tuple(int(s) for s in np.asarray(shape).reshape(-1)))
        check_size(node, target)
        return [Interval(np.broadcast_to(x.lo, target).copy(), np.broadcast_to(x.hi, target).copy())]

    def backward(self, node, cot, ctx):
        return [reduce_to_shape(cot[0], ctx.shape(node.inputs[0])), None]

    def paper(self, node, errs, ctx):
        return [errs[0] * replication(ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0]))]
