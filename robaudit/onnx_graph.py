"""A plain, checked view of an ONNX graph: nodes in topological order, constants as numpy.

This is the only module that walks ONNX protobufs; everything downstream sees
:class:`Graph` and :class:`Node`.
"""

from __future__ import annotations

from collections import deque
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


def tensor_to_array(tensor: onnx.TensorProto, where: str) -> np.ndarray:
    """Convert a TensorProto to numpy, refusing malformed or huge tensors."""
    if any(dim < 0 for dim in tensor.dims):
        raise ModelStructureError(f"{where}: tensor has a negative dimension {list(tensor.dims)}")
    count = int(np.prod(np.array(tensor.dims, dtype=np.float64))) if tensor.dims else 1
    if count > MAX_TENSOR_ELEMENTS:
        raise ModelStructureError(f"{where}: tensor of {count} elements exceeds the size limit")
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


def _check_attr_types(proto: onnx.NodeProto, opsets: dict[str, int], where: str) -> None:
    """Each attribute has the type the op's schema declares (a FLOAT ``alpha``, INTS ``strides``).

    Hostile files may send a string where a number is expected; refusing that here keeps
    the op rules free of type checks. Ops without a schema (custom domains) are left to
    the rules, which refuse unknown ops anyway.
    """
    domain = "" if proto.domain in ("", "ai.onnx") else proto.domain
    try:
        schema = onnx.defs.get_schema(proto.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        schema = None
    for attr in proto.attribute:
        if attr.type == onnx.AttributeProto.UNDEFINED:
            raise ModelStructureError(f"{where}: attribute '{attr.name}' has no type")
        declared = schema.attributes.get(attr.name) if schema is not None else None
        if declared is not None and int(declared.type) != int(attr.type):
            expected = onnx.AttributeProto.AttributeType.Name(int(declared.type))
            got = onnx.AttributeProto.AttributeType.Name(attr.type) if attr.type in range(15) else str(attr.type)
            raise ModelStructureError(f"{where}: attribute '{attr.name}' must be {expected}, got {got}")


def _decode_node(index: int, proto: onnx.NodeProto, opsets: dict[str, int]) -> Node:
    name = proto.name or f"{proto.op_type}_{index}"
    where = f"node '{name}' ({proto.op_type})"
    _check_attr_types(proto, opsets, where)
    attrs = {attr.name: _decode_attr(attr, where) for attr in proto.attribute}
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    return Node(name, proto.op_type, proto.domain, list(proto.input), list(proto.output), attrs, proto, metadata)


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


def build_graph(model: onnx.ModelProto) -> Graph:
    """Decode and check the top-level graph of ``model``."""
    graph = model.graph
    initializers: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if tensor.name in initializers:
            raise ModelStructureError(f"initializer '{tensor.name}' is defined twice")
        initializers[tensor.name] = tensor_to_array(tensor, f"initializer '{tensor.name}'")
    inputs = [_value_info(i) for i in graph.input if i.name not in initializers]
    outputs = [_value_info(o) for o in graph.output]
    if not outputs:
        raise ModelStructureError("the graph declares no outputs")
    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
    nodes = [_decode_node(i, n, opsets) for i, n in enumerate(graph.node)]
    available = set(initializers) | {i.name for i in inputs}
    ordered = _topological_order(nodes, available)
    producer = {out: node for node in ordered for out in node.outputs if out}
    for out in outputs:
        if out.name not in producer and out.name not in available:
            raise ModelStructureError(f"graph output '{out.name}' is produced by no node")
    return Graph(ordered, initializers, inputs, outputs, producer)
