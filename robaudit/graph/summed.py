"""Two affine ops of different inputs summed before one activation, ``act(W·x + V·z)``: one layer
whose neurons are the activation's outputs (docs/method.md §1.4).

The sum is given an identity map of its own — a depthwise 1×1 ``Conv`` of weight 1 for convolution
outputs, a ``MatMul`` by the identity matrix for dense ones — inserted between the ``Add`` and the
activation in the layer graph (not in the graph injection runs, which stays the model's). The identity map with the
activation is then an ordinary layer (its pre-activation is the sum, exactly), and the two affine
ops stay layers of their own marked as *parts*: not failure sites, their errors carried through
the ``Add`` like any step's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from onnx import helper

from robaudit.graph.layers import Layer, Step, is_activation
from robaudit.graph.onnx_graph import Graph, Node, readers_of
from robaudit.graph.ops import Interval
from robaudit.graph.ops.rounding import is_rounding
from robaudit.graph.recurrent import CELL_KEY


@dataclass(frozen=True)
class SummedPair:
    """``act(A(x) + B(z))`` found among the steps: the ``Add`` and the two affine layers it sums."""

    add: Node
    first: Layer
    second: Layer

    @property
    def identity_name(self) -> str:
        """Name of the identity node inserted after the ``Add`` (also its output's and weight's stem)."""
        return f"{self.add.name}/robaudit_sum"


def summed_pairs(
    steps: list[Step], nodes: list[Node], constants: dict, clean: dict[str, Interval], protected: set[str]
) -> list[SummedPair]:
    """Every ``Add`` of two affine layers (no activation, no integer codes, of one output shape and kind)
    whose only reader is an activation, each layer read only by that ``Add`` — outside unrolled recurrent
    cells, whose gates are internal layers of the recurrent one (docs/method.md §14.1)."""
    readers = readers_of(nodes)
    by_output = {step.output_value: step for step in steps if isinstance(step, Layer)}
    found = []
    sums = [s for s in steps if isinstance(s, Node) and s.op_type in ("Add", "Sum") and len(s.inputs) == 2]
    for add in (s for s in sums if CELL_KEY not in s.metadata):  # an unrolled GRU/LSTM keeps its gates (§14.1)
        first, second = (by_output.get(v) for v in add.inputs)
        if first is None or second is None or first is second or add.outputs[0] in protected:
            continue
        pair = (first, second)
        if any(not _affine_only(la) or la.output_value in protected for la in pair):
            continue
        if any(len(readers.get(la.output_value, [])) != 1 for la in pair):
            continue
        shapes = {clean[v].shape for v in (*add.inputs, add.outputs[0])}
        kinds = {"dense" if la.kind == "dense" else "conv" for la in pair}
        if len(shapes) == 1 and len(kinds) == 1 and _activated(add.outputs[0], readers, constants):
            found.append(SummedPair(add, first, second))
    return found


def _affine_only(layer: Layer) -> bool:
    """Whether ``layer`` is an affine op with no activation — its result at most rounded to float16/bfloat16,
    as every op of a float16 model's is (docs/method.md §1.2) — and stores no integer codes."""
    rounded_only = layer.activation is None or all(
        part in ("Cast(float16)", "Cast(bfloat16)") for part in layer.activation.split("→"))
    return rounded_only and layer.codes is None


def _activated(value: str, readers: dict[str, list[Node]], constants: dict) -> bool:
    """Whether ``value``'s one reader is an activation, or a float rounding whose one reader is (float16)."""
    users = readers.get(value, [])
    if len(users) == 1 and users[0].op_type == "FloatRound" and is_rounding(users[0]):
        users = readers.get(users[0].outputs[0], [])
    return len(users) == 1 and is_activation(users[0], constants)


def _identity(pair: SummedPair, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Node, np.ndarray]:
    """The identity node reading the ``Add``'s output (batch 1 ``shape``), and its weight."""
    name = pair.identity_name
    source, out, weight_name = pair.add.outputs[0], f"{name}/out", f"{name}/weight"
    if pair.first.kind == "dense":
        weight = np.eye(shape[-1], dtype=dtype)
        proto = helper.make_node("MatMul", [source, weight_name], [out], name=name)
        attrs: dict = {}
    else:
        channels, spatial = shape[1], len(shape) - 2
        weight = np.ones((channels, 1) + (1,) * spatial, dtype=dtype)
        attrs = {"group": channels, "kernel_shape": [1] * spatial}
        proto = helper.make_node("Conv", [source, weight_name], [out], name=name, **attrs)
    return Node(name, proto.op_type, "", list(proto.input), list(proto.output), attrs, proto), weight


def _rewired(node: Node, old: str, new: str) -> Node:
    """A copy of ``node`` reading ``new`` where it read ``old`` (its NodeProto too)."""
    proto = node.proto
    if proto is not None:
        proto = type(proto)()
        proto.CopyFrom(node.proto)
        for k, value in enumerate(proto.input):
            if value == old:
                proto.input[k] = new
    return dataclasses.replace(node, inputs=[new if v == old else v for v in node.inputs], proto=proto)


def _spliced(nodes: list[Node], add: Node, identity: Node) -> list[Node]:
    """``nodes`` with ``identity`` after ``add`` and every other reader of its output reading the identity's."""
    old, new = add.outputs[0], identity.outputs[0]
    out: list[Node] = []
    for node in nodes:
        out.append(_rewired(node, old, new) if old in node.inputs else node)
        if node.outputs and node.outputs[0] == old:
            out.append(identity)
    return out


def insert_identities(
    graph: Graph,
    nodes: list[Node],
    pairs: list[SummedPair],
    constants: dict[str, np.ndarray],
    clean: dict[str, Interval],
) -> tuple[Graph, list[Node]]:
    """The audited nodes with an identity map after each pair's ``Add``, and the graph with its weight; the
    weight is added to ``constants`` and the identity's output box (the sum's) to ``clean``.

    The graph's nodes stay the model's: injection runs them, and its failure sites (the activation's outputs)
    are there already. (A ``MatMul`` by the identity there would turn one float32 element that overflows to
    ±inf into NaN in every element of its row, where the model gives tanh(inf) = 1.)"""
    initializers = dict(graph.initializers)
    by_name = {node.name: node for node in nodes}
    for pair in pairs:
        source = pair.add.outputs[0]
        anchor = by_name[pair.first.nodes[0]]
        stored = np.asarray(constants.get(anchor.inputs[1], np.zeros(0, np.float32))).dtype
        dtype = stored if stored in (np.float64, np.float16) else np.dtype(np.float32)
        identity, weight = _identity(pair, clean[source].shape, dtype)
        initializers[identity.inputs[1]] = weight
        constants[identity.inputs[1]] = weight
        clean[identity.outputs[0]] = clean[source]
        nodes = _spliced(nodes, pair.add, identity)
    return dataclasses.replace(graph, initializers=initializers), nodes


def mark_sum_layers(steps: list[Step], pairs: list[SummedPair]) -> None:
    """Mark each pair's affine layers as parts and name the layer of its identity map after them."""
    by_output = {step.output_value: step for step in steps if isinstance(step, Layer)}
    by_anchor = {step.nodes[0]: step for step in steps if isinstance(step, Layer)}
    for pair in pairs:
        first, second = by_output[pair.first.output_value], by_output[pair.second.output_value]
        first.part = second.part = True
        layer = by_anchor[pair.identity_name]
        layer.summands = (first, second)
        layer.name = f"{first.name}+{second.name}"
        layer.fanout_limit = 1  # an identity map: each element of the sum feeds one neuron
