"""ONNX ``GRU`` and ``LSTM`` unrolled into plain ops over the static sequence length
(docs/method.md §14).

A recurrent node is replaced, before anything else reads the graph, by the ops it computes
step by step: ``Gather`` of the time step, ``MatMul`` by the (transposed, constant) gate
weights, ``Add`` of the biases, ``Sigmoid``/``Tanh``, ``Mul`` of two variable tensors for
the gates, and ``Concat``/``Unsqueeze`` for the outputs ``Y``, ``Y_h`` (``Y_c``). The hidden
state of every step passes through one ``MatMul`` by the identity, marked in its node
metadata: that op anchors the failure site of the recurrent layer at that step (one site,
its hidden units, failing at every step). Bounding and injection both read the unrolled
graph, so one code path serves both; onnxruntime computes it to float32 rounding of the
original op (``tests/test_recurrent.py``).

The unrolling itself (:func:`unroll_cell`) is pure: constants in, ONNX nodes and new
initializers out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from robaudit.graph.layers import Layer
from robaudit.graph.onnx_graph import Graph, Node
from robaudit.graph.ops.base import Interval, unsupported
from robaudit.graph.ops.recurrent_cell import UPDATE_KEY

#: The op types this module unrolls.
RECURRENT_OPS = ("GRU", "LSTM")
#: Node metadata on the identity ``MatMul`` of a step's hidden state: the recurrent layer's name.
SITE_KEY = "robaudit.recurrent.site"
#: Node metadata on the same node: the name the recurrent layer is reported under.
NAME_KEY = "robaudit.recurrent.name"
#: Node metadata on the same node: the processing step (0-based).
STEP_KEY = "robaudit.recurrent.step"
#: Node metadata on the gate ``MatMul`` nodes: not a failure site (the layer's name).
GATE_KEY = "robaudit.recurrent.gate"
#: Node metadata on the ``Gather`` reading one direction of an initial state: the state's value name.
STATE_KEY = "robaudit.recurrent.state"
#: Node metadata on every node of the unrolled cell: the op type it came from (``gru``, ``lstm``).
CELL_KEY = "robaudit.recurrent.cell"

_DEFAULT_ACTIVATIONS = {"GRU": ("sigmoid", "tanh"), "LSTM": ("sigmoid", "tanh", "tanh")}
_GATES = {"GRU": 3, "LSTM": 4}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


@dataclass(frozen=True)
class CellForm:
    """The attributes of one recurrent node, checked (docs/method.md §14.1)."""

    #: ``GRU`` or ``LSTM``.
    op_type: str
    #: H, the hidden units per direction.
    hidden: int
    #: ``forward``, ``reverse`` or ``bidirectional``.
    direction: str
    #: GRU only: whether R_h·h is computed before the reset gate multiplies it.
    linear_before_reset: bool = False

    @property
    def directions(self) -> int:
        """D: 2 when bidirectional, else 1."""
        return _DIRECTIONS[self.direction]

    def reversed(self, d: int) -> bool:
        """Whether direction ``d`` runs from the last time step to the first."""
        return self.direction == "reverse" or (self.direction == "bidirectional" and d == 1)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cell_form(node: Node) -> CellForm:
    """The checked form of a ``GRU``/``LSTM`` node.

    Raises:
        UnsupportedModelError: an attribute robaudit does not model (``clip``, activations
            other than the default sigmoid/tanh, ``layout=1``, coupled input and forget gates).
    """
    direction = _text(node.attr("direction", "forward"))
    if direction not in _DIRECTIONS:
        raise unsupported(node, f"direction '{direction}' is not forward, reverse or bidirectional")
    activations = node.attr("activations")
    if activations is not None:
        names = tuple(_text(a).lower() for a in activations)
        default = _DEFAULT_ACTIVATIONS[node.op_type]
        if names != default * (len(names) // len(default)) or len(names) % len(default):
            listed = ", ".join(_text(a) for a in activations)
            raise unsupported(node, f"activations [{listed}] are not supported, only the default {list(default)}")
    if node.attr("clip") is not None:
        raise unsupported(node, "the cell clip attribute is not supported")
    if node.attr("layout", 0) != 0:
        raise unsupported(node, "layout=1 (batch first) is not supported; export with the time axis first")
    if node.attr("input_forget", 0):
        raise unsupported(node, "input_forget=1 (coupled input and forget gates) is not supported")
    hidden = node.attr("hidden_size")
    if hidden is None or int(hidden) < 1:
        raise unsupported(node, "hidden_size must be given and positive")
    return CellForm(node.op_type, int(hidden), direction, bool(node.attr("linear_before_reset", 0)))


class _Builder:
    """Collects the nodes and constants of one unrolled cell; names are prefixed by the node's."""

    def __init__(self, node: Node, dtype: np.dtype) -> None:
        self.prefix = node.name
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self._count = 0
        self.metadata = {**node.metadata, CELL_KEY: node.op_type.lower()}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/unrolled/{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.initializers[name] = np.array(value, order="C")
        return name

    def floats(self, value: np.ndarray, hint: str) -> str:
        return self.const(np.asarray(value, self.dtype), hint)

    def ints(self, values, hint: str) -> str:
        return self.const(np.asarray(values, np.int64), hint)

    def op(self, op_type: str, inputs: list[str], hint: str, marks: dict[str, str] | None = None, **attrs) -> str:
        out = self.name(hint)
        proto = helper.make_node(op_type, inputs, [out], name=out, **attrs)
        for key, value in {**self.metadata, **(marks or {})}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        self.nodes.append(proto)
        return out

    def columns(self, value: str, start: int, stop: int) -> str:
        """value[:, start:stop]."""
        starts, ends, axes = self.ints([start], "start"), self.ints([stop], "end"), self.ints([1], "axis")
        return self.op("Slice", [value, starts, ends, axes], "slice")

    def affine(self, value: str, weight: np.ndarray, bias: np.ndarray | None, gate_of: str) -> str:
        """value · weightᵀ (+ bias): a gate's pre-activation part, not a failure site."""
        product = self.op("MatMul", [value, self.floats(weight.T, "weight")], "gates", {GATE_KEY: gate_of})
        if bias is None or not np.any(bias):
            return product
        return self.op("Add", [product, self.floats(bias, "bias")], "bias")

    def unsqueeze(self, value: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", [value, self.ints(axes, "axes")], "unsqueeze")

    def concat(self, values: list[str], axis: int) -> str:
        return values[0] if len(values) == 1 else self.op("Concat", values, "concat", axis=axis)


def unroll_cell(
    node: Node,
    steps: int,
    weights: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    site: str,
    peepholes: np.ndarray | None = None,
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The ONNX nodes and new constants that compute ``node``'s outputs over ``steps`` time steps.

    ``weights`` are W [D, G·H, I], R [D, G·H, H] and B [D, 2·G·H] (None: zeros), G = 3 (GRU)
    or 4 (LSTM). The node's inputs X (and initial_h, initial_c when given) are read by name;
    its outputs keep their names. The hidden state of step s (both directions side by side,
    [batch, D·H]) is a ``MatMul`` by the identity with metadata ``SITE_KEY`` = ``site`` and
    ``STEP_KEY`` = s (docs/method.md §14.1).

    Raises:
        UnsupportedModelError: the form is not supported (:func:`cell_form`), or peepholes are
            not all zero.
    """
    form = cell_form(node)
    if peepholes is not None and np.any(peepholes):
        raise unsupported(node, "LSTM peepholes (input P) are not supported")
    w, r, b = weights
    hidden, dirs, gates = form.hidden, form.directions, _GATES[node.op_type]
    if w.ndim != 3 or w.shape[:2] != (dirs, gates * hidden) or r.shape != (dirs, gates * hidden, hidden):
        raise unsupported(
            node,
            f"weights W {list(w.shape)} and R {list(r.shape)} are not [{dirs}, {gates * hidden}, features] and "
            f"[{dirs}, {gates * hidden}, {hidden}] (directions, {gates}·hidden_size, …)",
        )
    if b is not None and np.shape(b) != (dirs, 2 * gates * hidden):
        raise unsupported(node, f"bias B {list(np.shape(b))} is not [{dirs}, {2 * gates * hidden}]")
    bias = np.zeros((dirs, 2 * gates * hidden), w.dtype) if b is None else np.asarray(b)
    out = _Builder(node, w.dtype)
    x, inputs = node.inputs[0], node.inputs + [""] * (8 - len(node.inputs))
    state_h = [_initial(out, inputs[5], d, hidden) for d in range(dirs)]
    state_c = [_initial(out, inputs[6], d, hidden) for d in range(dirs)] if node.op_type == "LSTM" else []
    per_time: list[list[str]] = [[""] * dirs for _ in range(steps)]
    inputs_at = [out.op("Gather", [x, out.ints(t, "time")], "x", axis=0) for t in range(steps)]
    identity = out.floats(np.eye(dirs * hidden), "identity")
    for s in range(steps):
        news = []
        for d in range(dirs):
            t = steps - 1 - s if form.reversed(d) else s
            if node.op_type == "GRU":
                news.append(_gru_step(out, form, inputs_at[t], state_h[d], w[d], r[d], bias[d], site))
            else:
                h_new, state_c[d] = _lstm_step(
                    out, hidden, inputs_at[t], state_h[d], state_c[d], w[d], r[d], bias[d], site
                )
                news.append(h_new)
        marks = {SITE_KEY: node.name, NAME_KEY: site, STEP_KEY: str(s)}
        stacked = out.op("MatMul", [out.concat(news, axis=1), identity], "state", marks)
        for d in range(dirs):
            state_h[d] = stacked if dirs == 1 else out.columns(stacked, d * hidden, (d + 1) * hidden)
            per_time[steps - 1 - s if form.reversed(d) else s][d] = state_h[d]
    _outputs(out, node, per_time, state_h, state_c)
    return out.nodes, out.initializers


def _initial(out: _Builder, value: str, d: int, hidden: int) -> str:
    """Direction d's initial state [batch, H]: a slice of the given input, or zeros."""
    if not value:
        return out.floats(np.zeros((1, hidden)), "zeros")
    batch_first = out.op("Transpose", [value], "initial", {STATE_KEY: value}, perm=[1, 0, 2])  # axis 0 is the batch's
    return out.op("Gather", [batch_first, out.ints(d, "direction")], "initial", axis=1)


def _gru_step(out: _Builder, form: CellForm, x: str, h: str, w, r, b, site: str) -> str:
    """One GRU step (ONNX operator definition, gates z, r, h in this order)."""
    n = form.hidden
    wb, rb = b[: 3 * n], b[3 * n :]
    gx = out.affine(x, w, wb, site)
    if form.linear_before_reset:
        gh = out.affine(h, r, rb, site)
        zr = out.op("Sigmoid", [out.op("Add", [out.columns(gx, 0, 2 * n), out.columns(gh, 0, 2 * n)], "pre")], "zr")
        reset = out.columns(zr, n, 2 * n)
        hn = out.op("Mul", [reset, out.columns(gh, 2 * n, 3 * n)], "reset")
    else:
        gh = out.affine(h, r[: 2 * n], rb[: 2 * n], site)
        zr = out.op("Sigmoid", [out.op("Add", [out.columns(gx, 0, 2 * n), gh], "pre")], "zr")
        reset = out.columns(zr, n, 2 * n)
        hn = out.affine(out.op("Mul", [reset, h], "reset"), r[2 * n :], rb[2 * n :], site)
    candidate = out.op("Tanh", [out.op("Add", [out.columns(gx, 2 * n, 3 * n), hn], "pre")], "candidate")
    update = out.columns(zr, 0, n)
    keep_new = out.op("Sub", [out.floats(np.ones(1), "one"), update], "one_minus_z")
    return out.op(
        "Add",
        [out.op("Mul", [keep_new, candidate], "new_part"), out.op("Mul", [update, h], "old_part")],
        "h",
        {UPDATE_KEY: "1"},  # bounded as one convex combination (docs/method.md §14.3)
    )


def _lstm_step(out: _Builder, n: int, x: str, h: str, c: str, w, r, b, site: str) -> tuple[str, str]:
    """One LSTM step (gates i, o, f, c in this order; no peepholes): (h_t, c_t)."""
    gx = out.affine(x, w, b[: 4 * n] + b[4 * n :], site)
    pre = out.op("Add", [gx, out.affine(h, r, None, site)], "pre")
    iof = out.op("Sigmoid", [out.columns(pre, 0, 3 * n)], "iof")
    cell = out.op("Tanh", [out.columns(pre, 3 * n, 4 * n)], "candidate")
    i_gate, o_gate, f_gate = (out.columns(iof, k * n, (k + 1) * n) for k in range(3))
    c_new = out.op("Add", [out.op("Mul", [f_gate, c], "forget"), out.op("Mul", [i_gate, cell], "input")], "c")
    h_new = out.op("Mul", [o_gate, out.op("Tanh", [c_new], "cell_tanh")], "h")
    return h_new, c_new


def _outputs(out: _Builder, node: Node, per_time: list[list[str]], last_h: list[str], last_c: list[str]) -> None:
    """Y [T, D, batch, H], Y_h [D, batch, H] and (LSTM) Y_c under the node's own output names."""
    wanted = node.outputs + [""] * (3 - len(node.outputs))
    pieces = {
        0: [out.concat([out.unsqueeze(h, [0, 1]) for h in row], axis=1) for row in per_time],
        1: [out.unsqueeze(h, [0]) for h in last_h],
        2: [out.unsqueeze(c, [0]) for c in last_c],
    }
    for index, name in enumerate(wanted[:3]):
        if not name:
            continue
        made = out.concat(pieces[index], axis=0)
        out.nodes.append(helper.make_node("Identity", [made], [name], name=f"{out.prefix}/unrolled/{name}"))


#: What the unrolling needs of a recurrent node's inputs: the value of a constant input or the
#: shape of a variable one (from a pass over the nodes before it).
InputsOf = Callable[[Graph, Node], list]


def unroll_recurrent(graph: Graph, inputs_of: InputsOf, site_name: Callable[[Node], str], opset: int = 17) -> Graph:
    """``graph`` with every ``GRU``/``LSTM`` node replaced by its unrolled ops (docs/method.md §14).

    ``inputs_of(graph, node)`` gives each input of ``node`` as an ndarray (constant), an
    Interval (variable: its shape is what matters) or None (absent); ``site_name(node)`` the
    name of the recurrent layer. Nodes are unrolled one at a time in graph order, so a
    stacked cell sees its predecessor already unrolled.

    Raises:
        UnsupportedModelError: a form that is not supported (:func:`cell_form`), weights that
            are not constant, a variable or uneven ``sequence_lens``.
    """
    while (
        node := next((n for n in graph.nodes if n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx")), None)
    ) is not None:
        if opset < 13:
            raise unsupported(node, f"recurrent ops are unrolled with opset ≥ 13 ops; the model declares {opset}")
        args = inputs_of(graph, node)
        steps, weights, peepholes = _checked_inputs(node, args)
        protos, constants = unroll_cell(node, steps, weights, site_name(node), peepholes)
        graph = _replace(graph, node, protos, constants)
    return graph


def _checked_inputs(node: Node, args: list) -> tuple[int, tuple, np.ndarray | None]:
    args = args + [None] * (8 - len(args))
    x = args[0]
    if not isinstance(x, Interval) or len(x.shape) != 3:
        raise unsupported(node, "its input X must be a variable [time, batch, features] tensor")
    for index, what in ((1, "W"), (2, "R"), (3, "B")):
        if index < len(node.inputs) and node.inputs[index] and not isinstance(args[index], np.ndarray):
            raise unsupported(node, f"its weights {what} must be constants")
    if args[1] is None or args[2] is None:
        raise unsupported(node, "its weights W and R must be given")
    steps = x.shape[0]
    lens = args[4]
    if isinstance(lens, Interval):
        raise unsupported(node, "sequence_lens must be absent or a constant")
    if lens is not None and np.any(np.asarray(lens) != steps):
        raise unsupported(node, f"sequence_lens {np.asarray(lens).tolist()} differ from the sequence length {steps}")
    directions = cell_form(node).directions
    for index in (5, 6):
        state = args[index]
        if state is not None and len(np.shape(state.lo if isinstance(state, Interval) else state)) != 3:
            raise unsupported(node, "initial states must be [directions, batch, hidden] tensors")
        if isinstance(state, Interval) and state.shape[0] != directions:
            raise unsupported(
                node,
                f"the initial state '{node.inputs[index]}' of a bidirectional cell is a graph input, whose axis 0 "
                "robaudit reads as the batch; only a forward or reverse cell's state may be an input",
            )
    weights = (np.asarray(args[1]), np.asarray(args[2]), None if args[3] is None else np.asarray(args[3]))
    if not all(np.issubdtype(a.dtype, np.floating) for a in weights if a is not None):
        raise unsupported(node, "its weights must be floating point")
    peep = args[7] if node.op_type == "LSTM" else None
    if isinstance(peep, Interval):
        raise unsupported(node, "LSTM peepholes (input P) are not supported")
    return steps, weights, None if peep is None else np.asarray(peep)


def _replace(graph: Graph, node: Node, protos: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> Graph:
    """A new Graph with ``node`` replaced by ``protos`` (decoded), ``constants`` added."""
    new_nodes = []
    for proto in protos:
        attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        metadata = {e.key: e.value for e in proto.metadata_props}
        new_nodes.append(
            Node(proto.name, proto.op_type, "", list(proto.input), list(proto.output), attrs, proto, metadata)
        )
    at = graph.nodes.index(node)
    nodes = graph.nodes[:at] + new_nodes + graph.nodes[at + 1 :]
    producer = {out: n for n in nodes for out in n.outputs if out}
    return Graph(nodes, {**graph.initializers, **constants}, graph.inputs, graph.outputs, producer)


def mark_recurrent_layers(layers: list[Layer], nodes: dict[str, Node]) -> None:
    """Mark the layers of unrolled cells (docs/method.md §14.1): gate layers are internal; the
    hidden state of the first step is the recurrent layer's failure site, named after it, and
    the states of the later steps are tied to it."""
    sites: dict[str, list[Layer]] = {}
    for layer in layers:
        anchor = nodes.get(layer.nodes[0])
        if anchor is None:
            continue
        if GATE_KEY in anchor.metadata:
            layer.internal = True
            layer.name = f"{anchor.metadata[GATE_KEY]}.gates"
        elif SITE_KEY in anchor.metadata:
            sites.setdefault(anchor.metadata[SITE_KEY], []).append(layer)
            layer.name = anchor.metadata.get(NAME_KEY, layer.name)
            layer.kind = anchor.metadata.get(CELL_KEY, layer.kind)
            layer.fanout_limit = 1
    for states in sites.values():
        first, *later = states
        first.tied = tuple(later)
        for step, layer in enumerate(later, start=1):
            layer.internal = True
            layer.name = f"{first.name}@{step}"


def state_inputs(nodes: list[Node]) -> set[str]:
    """The values read as initial states of unrolled cells (batch on axis 1, as ONNX lays them out)."""
    return {node.metadata[STATE_KEY] for node in nodes if STATE_KEY in node.metadata}
