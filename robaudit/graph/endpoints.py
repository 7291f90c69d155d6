"""The audited input and output of a model: which tensors, their shapes at batch size 1, and the nodes between them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from robaudit.errors import ShapeError, UnsupportedModelError
from robaudit.graph.onnx_graph import Graph, Node, ValueInfo

FLOAT_TYPES = {1, 10, 11, 16}


MAX_INPUT_ELEMENTS = 2**24


def choose_input(graph: Graph) -> ValueInfo:
    candidates = [i for i in graph.inputs if i.is_tensor]
    if len(candidates) != 1:
        names = ", ".join(f"'{i.name}'" for i in graph.inputs) or "none"
        raise UnsupportedModelError(
            f"the model has {len(candidates)} tensor inputs ({names}); robaudit audits models with exactly one input"
        )
    if candidates[0].elem_type not in FLOAT_TYPES:
        raise UnsupportedModelError(f"input '{candidates[0].name}' is not a float tensor")
    return candidates[0]


def _shape_example(dims: Sequence[int | str]) -> str:
    """The non-batch dims as an ``--input-shape`` value: known sizes as numbers, symbolic ones by name."""
    parts = []
    for axis, dim in enumerate(dims[1:], start=1):
        if isinstance(dim, int) and dim > 0:
            parts.append(str(dim))
        else:
            name = str(dim) if isinstance(dim, str) and dim.isidentifier() and len(dim) <= 12 else f"D{axis}"
            parts.append(name.upper())
    return ",".join(parts)


def input_shape_of(info: ValueInfo, given: tuple[int, ...] | None) -> tuple[int, ...]:
    dims = info.dims
    if given is not None:
        shape = tuple(given)
        if dims is not None and len(shape) == len(dims) - 1:
            shape = (1,) + shape
        if dims is not None and len(shape) != len(dims):
            raise ShapeError(
                f"--input-shape {list(given)} has rank {len(given)}, the input '{info.name}' has rank {len(dims)}"
            )
        if dims is not None and len(given) == len(dims) and shape[0] not in (1, dims[0]):
            raise ShapeError(
                f"--input-shape gives {shape[0]} for axis 0 of '{info.name}', its batch: robaudit analyses one sample "
                f"at a time; give 1 there or leave the batch out ({','.join(map(str, shape[1:]))})"
            )
        if dims is not None:
            for axis, (want, have) in enumerate(zip(dims, shape, strict=True)):
                if isinstance(want, int) and axis > 0 and want != have:
                    raise ShapeError(
                        f"--input-shape gives {have} for axis {axis} of '{info.name}', the model fixes {want}"
                    )
    else:
        if dims is None:
            raise ShapeError(f"input '{info.name}' has no shape; give it with --input-shape")
        sizes: list[int] = []
        for axis, dim in enumerate(dims):
            if axis == 0:
                sizes.append(1)
            elif isinstance(dim, int) and dim > 0:
                sizes.append(dim)
            else:
                raise ShapeError(
                    f"input '{info.name}' has a symbolic dimension '{dim}' at axis {axis}; "
                    f"give the shape with --input-shape {_shape_example(dims)} (the dimensions after the batch, "
                    "with numbers for the symbolic ones)"
                )
        shape = tuple(sizes)
    if any(d <= 0 for d in shape) or np.prod(shape, dtype=np.float64) > MAX_INPUT_ELEMENTS:
        raise ShapeError(f"input shape {list(shape)} has a non-positive dimension or is too large")
    return (1,) + tuple(shape[1:])


def choose_output(graph: Graph, requested: str | None) -> str:
    """The tensor to audit: ``--output NAME``, else the first float graph output.

    Classifier tails are skipped: integer labels are not float, and a ``ZipMap``
    (sequence of maps) is replaced by the float probabilities it reads.
    """
    if requested:
        if requested not in graph.producer:
            outputs = ", ".join(f"'{o.name}'" for o in graph.outputs)
            raise UnsupportedModelError(
                f"audited tensor '{requested}' (--output-tensor) is not produced by any node; the model's outputs: "
                f"{outputs}"
            )
        return requested
    for out in graph.outputs:
        if out.is_tensor and out.elem_type in FLOAT_TYPES:
            return out.name
        node = graph.producer.get(out.name)
        if not out.is_tensor and node is not None and node.op_type == "ZipMap":
            return node.inputs[0]
    names = ", ".join(f"'{o.name}'" for o in graph.outputs)
    raise UnsupportedModelError(f"no float tensor among the outputs ({names}); name one with --output-tensor")


def audited_nodes(graph: Graph, output: str) -> list[Node]:
    needed: set[str] = set()
    stack = [output]
    while stack:
        value = stack.pop()
        node = graph.producer.get(value)
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(v for v in node.inputs if v)
    return [node for node in graph.nodes if node.name in needed]
