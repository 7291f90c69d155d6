"""A plain, checked view of an ONNX graph: nodes in topological order, constants as numpy.

This is the only module that walks ONNX protobufs; everything downstream sees
:class:`Graph` and :class:`Node`.

Speed (README "Speed": ``bound`` within 1.5× a bare ``onnx.load``): plain little-endian
``raw_data`` initializers become read-only views of the model file's bytes (found by
:func:`robaudit.graph.loader.initializer_spans`) instead of copies out of the message, and
attribute types are checked against the static tables of the op rules
(:attr:`robaudit.graph.ops.base.OpRule.attributes`) instead of ``onnx.defs.get_schema``,
whose first call loads the whole schema registry. Views may be unaligned; nothing
downstream writes into a constant (``numpy_helper.to_array`` arrays were read-only
already).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from robaudit.errors import ModelStructureError

#: Largest number of elements in one constant tensor (guards against hostile dims).
MAX_TENSOR_ELEMENTS = 2**28


@dataclass
class Node:
    """One ONNX node with its attributes decoded to Python values."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    #: The original NodeProto (for constant folding).
    proto: Any = None
    #: Exporter metadata (e.g. PyTorch's ``pkg.torch.onnx.name_scopes``).
    metadata: dict[str, str] = field(default_factory=dict)
    #: Default-domain opset of the model (set when the network is built).
    opset: int = 0
    #: The opset whose semantics the node follows where that is not the model's: a contrib op translated to a
    #: default-domain one carries its own ``opset`` attribute here (QLinearSoftmax → Softmax); 0: the model's.
    own_opset: int = 0

    def semantics_opset(self) -> int:
        """The opset that defines what the node computes: :attr:`own_opset`, else the model's."""
        return self.own_opset or self.opset

    def attr(self, key: str, default: Any = None) -> Any:
        """The attribute ``key`` or ``default`` when the node does not set it."""
        return self.attrs.get(key, default)

    def describe(self) -> str:
        """``'name' (OpType)`` for error messages."""
        return f"'{self.name}' ({self.op_type})"


@dataclass
class ValueInfo:
    """A graph input or output: name, ONNX element type and dims (str for symbolic)."""

    name: str
    elem_type: int
    dims: list[int | str] | None
    is_tensor: bool = True


@dataclass
class Graph:
    """The top-level graph of a model, checked and topologically sorted."""

    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    producer: dict[str, Node]

    def consumers(self, value: str) -> list[Node]:
        """Nodes that read ``value``."""
        return [node for node in self.nodes if value in node.inputs]


#: ONNX element types whose ``raw_data`` numpy reads as it lies (little-endian, one
#: element per ``itemsize`` bytes), exactly as ``numpy_helper.to_array`` does.
_PLAIN_RAW_DTYPES: dict[int, np.dtype] = {
    data_type: np.dtype(numpy_type)
    for data_type, numpy_type in (
        (onnx.TensorProto.FLOAT, np.float32),
        (onnx.TensorProto.DOUBLE, np.float64),
        (onnx.TensorProto.FLOAT16, np.float16),
        (onnx.TensorProto.INT8, np.int8),
        (onnx.TensorProto.UINT8, np.uint8),
        (onnx.TensorProto.INT16, np.int16),
        (onnx.TensorProto.UINT16, np.uint16),
        (onnx.TensorProto.INT32, np.int32),
        (onnx.TensorProto.UINT32, np.uint32),
        (onnx.TensorProto.INT64, np.int64),
        (onnx.TensorProto.UINT64, np.uint64),
        (onnx.TensorProto.BOOL, np.bool_),
    )
}


def readers_of(nodes: Sequence[Node]) -> dict[str, list[Node]]:
    """Value name → the nodes among ``nodes`` that read it, in order (the pattern fusers' index)."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            readers.setdefault(value, []).append(node)
    return readers


def tensor_to_array(tensor: onnx.TensorProto, where: str, raw: memoryview | None = None) -> np.ndarray:
    """Convert a TensorProto to numpy, refusing malformed or huge tensors.

    ``raw``, when given, is the tensor's ``raw_data`` as it lies in the model file's
    bytes (:attr:`robaudit.graph.loader.LoadedModel.initializer_bytes`): a plain
    little-endian tensor whose length is exactly count × itemsize becomes a read-only
    view of it (no copy; ``numpy_helper.to_array`` also returns a read-only array);
    anything else goes through ``numpy_helper.to_array`` and its checks.
    """
    if any(dim < 0 for dim in tensor.dims):
        raise ModelStructureError(f"{where}: tensor has a negative dimension {list(tensor.dims)}")
    count = int(np.prod(np.array(tensor.dims, dtype=np.float64))) if tensor.dims else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise ModelStructureError(f"{where}: tensor of {count} elements exceeds the size limit")
    if raw is not None:
        view = _raw_view(tensor, raw, count)
        if view is not None:
            return view
        tensor = _with_raw_data(tensor, raw)
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises many types for malformed tensors
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelStructureError(f"{where}: unreadable tensor data ({reason})") from None
    if array.size != count:
        raise ModelStructureError(
            f"{where}: tensor data holds {array.size} values but its dims {list(tensor.dims)} need {count}"
        )
    return array


def _with_raw_data(tensor: onnx.TensorProto, raw: memoryview) -> onnx.TensorProto:
    """A copy of ``tensor`` holding ``raw`` as its ``raw_data`` (a loader skeleton's tensor holds none)."""
    whole = onnx.TensorProto()
    whole.CopyFrom(tensor)
    whole.raw_data = bytes(raw)
    return whole


def _raw_view(tensor: onnx.TensorProto, raw: memoryview, count: int) -> np.ndarray | None:
    """``raw`` as an array of the tensor's dtype and dims, or None when that is not exactly right."""
    dtype = _PLAIN_RAW_DTYPES.get(tensor.data_type)
    if (
        dtype is None
        or count == 0
        or sys.byteorder != "little"
        or tensor.data_location != onnx.TensorProto.DEFAULT
        or not tensor.HasField("raw_data")
        or len(raw) != count * dtype.itemsize
    ):
        return None
    return np.frombuffer(raw, dtype, count).reshape(tuple(tensor.dims))


def _decode_attr(attr: onnx.AttributeProto, where: str) -> Any:
    kind = attr.type
    if kind == onnx.AttributeProto.TENSOR:
        return tensor_to_array(attr.t, f"{where} attribute '{attr.name}'")
    if kind in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return "<subgraph>"
    if kind == onnx.AttributeProto.SPARSE_TENSOR:
        return "<sparse>"
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


def _value_info(info: onnx.ValueInfoProto) -> ValueInfo:
    if not info.type.HasField("tensor_type"):
        return ValueInfo(info.name, 0, None, is_tensor=False)
    tensor_type = info.type.tensor_type
    dims: list[int | str] | None = None
    if tensor_type.HasField("shape"):
        dims = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or "?")
    return ValueInfo(info.name, int(tensor_type.elem_type), dims)


_A = onnx.AttributeProto


def _check_attr_types(proto: onnx.NodeProto, where: str) -> None:
    """Each attribute has a type, and the type ONNX declares for it (a FLOAT ``alpha``, INTS ``strides``).

    Hostile files may send a string where a number is expected; refusing that here keeps
    the op rules free of type checks. The types are declared by each op's rule
    (:attr:`robaudit.graph.ops.base.OpRule.attributes`); ops without one (custom domains,
    ops without a rule) are left to the rules, which refuse unknown ops anyway, and to
    constant folding, which refuses what it cannot evaluate.
    """
    from robaudit.graph.ops import base  # the rules import this module: resolved at first use

    declared = base.attribute_types(proto.domain, proto.op_type)
    for attr in proto.attribute:
        if attr.type == _A.UNDEFINED:
            raise ModelStructureError(f"{where}: attribute '{attr.name}' has no type")
        expected = declared.get(attr.name)
        if expected is None:
            continue
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if attr.type not in allowed:
            wanted = " or ".join(_A.AttributeType.Name(t) for t in allowed)
            got = _A.AttributeType.Name(attr.type) if attr.type in _A.AttributeType.values() else str(attr.type)
            raise ModelStructureError(f"{where}: attribute '{attr.name}' must be {wanted}, got {got}")


def _decode_node(index: int, proto: onnx.NodeProto) -> Node:
    name = proto.name or f"{proto.op_type}_{index}"
    where = f"node '{name}' ({proto.op_type})"
    _check_attr_types(proto, where)
    attrs = {attr.name: _decode_attr(attr, where) for attr in proto.attribute}
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    return Node(name, proto.op_type, proto.domain, list(proto.input), list(proto.output), attrs, proto, metadata)


def decode_node(proto: onnx.NodeProto, index: int = 0) -> Node:
    """A :class:`Node` for ``proto`` (its attributes checked and decoded); ``index`` names an unnamed node."""
    return _decode_node(index, proto)


def _topological_order(nodes: list[Node], available: set[str]) -> list[Node]:
    """Kahn's algorithm; raises on undefined inputs and cycles."""
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.outputs:
            if not out:
                continue
            if out in producer or out in available:
                raise ModelStructureError(
                    f"value '{out}' is defined twice (node {node.describe()}); names must be unique"
                )
            producer[out] = index
    waiting = []
    dependents: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for index, node in enumerate(nodes):
        needed = set()
        for name in node.inputs:
            if not name or name in available:
                continue
            if name not in producer:
                raise ModelStructureError(
                    f"node {node.describe()} reads '{name}', which no node, input or initializer defines"
                )
            needed.add(producer[name])
        waiting.append(len(needed))
        for source in needed:
            dependents[source].append(index)
    ready = deque(i for i, count in enumerate(waiting) if count == 0)
    order: list[int] = []
    while ready:
        index = ready.popleft()
        order.append(index)
        for dep in dependents[index]:
            waiting[dep] -= 1
            if waiting[dep] == 0:
                ready.append(dep)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(waiting) if count > 0)
        raise ModelStructureError(f"the graph has a cycle through node {stuck.describe()}")
    return [nodes[i] for i in order]


def build_graph(model: onnx.ModelProto, initializer_bytes: Sequence[memoryview | None] | None = None) -> Graph:
    """Decode and check the top-level graph of ``model``.

    ``initializer_bytes`` (:attr:`robaudit.graph.loader.LoadedModel.initializer_bytes`, one
    entry per ``model.graph.initializer``) lets plain ``raw_data`` weights be viewed in
    the file's bytes instead of copied out of the message (see :func:`tensor_to_array`);
    ``model`` may then be the loader's skeleton, whose viewed tensors hold no bytes of their own.
    """
    graph = model.graph
    initializers: dict[str, np.ndarray] = {}
    raws = initializer_bytes or None
    if raws is not None and len(raws) != len(graph.initializer):
        raise ValueError(f"{len(raws)} initializer byte views for {len(graph.initializer)} initializers")
    for index, tensor in enumerate(graph.initializer):
        if tensor.name in initializers:
            raise ModelStructureError(f"initializer '{tensor.name}' is defined twice")
        raw = raws[index] if raws is not None else None
        initializers[tensor.name] = tensor_to_array(tensor, f"initializer '{tensor.name}'", raw)
    inputs = [_value_info(i) for i in graph.input if i.name not in initializers]
    outputs = [_value_info(o) for o in graph.output]
    if not outputs:
        raise ModelStructureError("the graph declares no outputs")
    nodes = [_decode_node(i, n) for i, n in enumerate(graph.node)]
    available = set(initializers) | {i.name for i in inputs}
    ordered = _topological_order(nodes, available)
    producer = {out: node for node in ordered for out in node.outputs if out}
    for out in outputs:
        if out.name not in producer and out.name not in available:
            raise ModelStructureError(f"graph output '{out.name}' is produced by no node")
    return Graph(ordered, initializers, inputs, outputs, producer)
