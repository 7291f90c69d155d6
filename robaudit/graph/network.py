"""The layer graph (docs/method.md §1.1): failure sites, the ops between them, clean intervals.

``build_network`` takes a checked :class:`~robaudit.graph.onnx_graph.Graph`, folds constant
subexpressions, propagates the input domain through every op (which also fixes all
shapes at batch size 1), and groups each affine op with its folded normalization /
constant scaling and its element-wise activation into one :class:`Layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robaudit.errors import ModelStructureError, OptionError, UnsupportedModelError
from robaudit.graph.endpoints import audited_nodes, choose_output
from robaudit.graph.float16 import float16_values, widen_float16
from robaudit.graph.ibp import evaluate
from robaudit.graph.inputs import CONSTANT, FLOAT, InputDomain, InputSpec, input_specs
from robaudit.graph.layers import Layer, Step, group_layers, short_name, unique_names
from robaudit.graph.onnx_graph import Graph, Node
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.activations import Activation, Clip
from robaudit.graph.ops.base import broadcast_scalar, unsupported
from robaudit.graph.ops.dynamic import fuse_dynamic, is_dynamic_rounding
from robaudit.graph.ops.gated import literal_constants, recognize, recognize_early
from robaudit.graph.ops.normalization import recognize_normalizations
from robaudit.graph.ops.pooling import SoftmaxTail
from robaudit.graph.ops.qoperator import qoperator_to_qdq
from robaudit.graph.ops.recurrent_cell import fuse_state_updates
from robaudit.graph.ops.restriction import Protection, fuse_channel_clips, fuse_nan_guards, protection_of
from robaudit.graph.ops.rounding import Rounding, fuse_rounding, is_rounding
from robaudit.graph.recurrent import RECURRENT_OPS, mark_recurrent_layers, unroll_recurrent
from robaudit.graph.stored_words import FLOAT16
from robaudit.graph.summed import insert_identities, mark_sum_layers, summed_pairs

_TAIL_OPS = {
    "Identity",
    "Cast",
    "Dropout",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Softmax",
    "LogSoftmax",
}


@dataclass(frozen=True)
class NetworkOptions:
    """How to read the model: input shape, audited output, input domain."""

    #: Shape of the input; a symbolic batch dimension becomes 1. None: from the model.
    input_shape: tuple[int, ...] | None = None
    #: Name of the tensor to audit; None: the float output the last affine layer reaches.
    output: str | None = None
    #: The input domain [LO, HI] applied to every input element (docs/method.md §2.4).
    input_range: tuple[float, float] = (0.0, 1.0)
    #: How neuron ranges are computed: ``crown`` (IBP tightened by back-substitution) or ``ibp``.
    ranges: str = "crown"
    #: Per input name: its own [LO, HI] (docs/method.md §12.1).
    named_ranges: tuple[tuple[str, float, float], ...] = ()
    #: An .npz of per-element bounds (``lo``/``hi``, or ``NAME.lo``/``NAME.hi``).
    input_range_file: str | None = None
    #: Per input name: an .npy file of the value it is held at.
    input_values: tuple[tuple[str, str], ...] = ()

    def domain(self) -> InputDomain:
        """The input domain these options describe."""
        return InputDomain(self.input_range, self.named_ranges, self.input_range_file, self.input_values)


@dataclass(frozen=True)
class BatchLayout:
    """Where the batch sits in a value whose batch is not axis 0 (docs/method.md §13.4).

    At batch size B the value is ``shape[:axis] + (outer, B, inner) + shape[axis+1:]`` reshaped
    (outer·inner = its size along ``axis`` at batch size 1): ``[T, B, D]`` is axis 1, outer 1,
    inner 1; ``[T·B, D]`` (tokens and batch merged, token-major) is axis 0, outer T, inner 1.
    """

    axis: int
    outer: int
    inner: int

    def expanded(self, shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
        """The value's shape with the batch as an axis of its own (``batch`` −1 for a reshape target)."""
        return shape[: self.axis] + (self.outer, batch, self.inner) + shape[self.axis + 1 :]

    def front_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The expanded shape without its batch axis (what follows the batch once it is put first)."""
        return shape[: self.axis] + (self.outer, self.inner) + shape[self.axis + 1 :]

    def sample_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """One sample's shape (batch removed, axes of size 1 it leaves dropped) from the shape at batch size 1;
        its flat order is that of the value at batch size 1."""
        kept = tuple(d for d in (self.outer, self.inner) if d != 1)
        return shape[: self.axis] + kept + shape[self.axis + 1 :]

    def to_front(self, rank: int) -> list[int]:
        """The Transpose permutation of the expanded value (rank ``rank`` + 2) that puts the batch first."""
        return [self.axis + 1] + [k for k in range(rank + 2) if k != self.axis + 1]


@dataclass
class Network:
    """The audited part of a model, ready for bounds and injection."""

    graph: Graph
    #: Every input the audited output reads, with its box and kind (docs/method.md §12.1).
    inputs: list[InputSpec]
    output_name: str
    #: Steps in topological order: layers and the ops between them.
    steps: list[Step]
    layers: list[Layer]
    constants: dict[str, np.ndarray]
    clean: dict[str, Interval]
    #: The value the ∞-norm tail (shape-only ops, Softmax) starts from, and its factor.
    tail_start: str
    tail_factor: float
    #: The audited ONNX nodes that depend on the input (recognized patterns replaced).
    nodes: list[Node] = field(default_factory=list)
    #: The model file's name, for titles (set by ``audit.load_network``).
    source_name: str = ""
    notes: list[str] = field(default_factory=list)
    #: The range method ``clean`` holds (``ibp`` until ``bounds.ranges.tighten_network`` runs) and how it went.
    ranges: str = "ibp"
    range_report: Any = None
    #: [lo, hi] every element of the audited output lies in whatever fails (Softmax, Sigmoid,
    #: Tanh, Clip at the output), or None when unbounded (docs/method.md §3.4).
    output_range: tuple[float, float] | None = None
    #: ρ per element (flat) of every value a rounding op produces (QDQ pair, float16 cast): each
    #: element's deviation may grow by ρ there once the value deviates (docs/method.md §1.2).
    rounding: dict[str, np.ndarray] = field(default_factory=dict)
    #: What roundings in the ∞-norm tail add to the output error once it deviates.
    tail_rounding: float = 0.0
    #: The Clip each protected hidden layer's output passes through, by output value (docs/method.md §1.3).
    protections: dict[str, Protection] = field(default_factory=dict)
    #: Values whose batch is not axis 0 (the sequence-first layout inside attention), by name: where it
    #: sits, or None where robaudit could not tell (docs/method.md §13.4).
    batch_axes: dict[str, BatchLayout | None] = field(default_factory=dict)
    #: The model computes in float16: read as float32 arithmetic rounded after every op (docs/method.md §1.2).
    float16: bool = False
    #: Per normalization node, from the CROWN pass: the clean box of its input it holds for and a floor
    #: of σ per group there (docs/method.md §13.1); ranges computed again leave it unused.
    sigma_floors: dict[str, tuple[Interval, np.ndarray]] = field(default_factory=dict)
    #: True for a copy whose weights were scaled with the original ranges kept (``design``'s per-layer
    #: question, :func:`robaudit.graph.scaling.scaled_network`): the boxes are not this network's, so
    #: rules that read them as this network's own ranges (the output cut, docs/method.md §4.1) stay off.
    ranges_kept: bool = False

    def layout(self, value: str) -> BatchLayout | None:
        """Where the batch of ``value`` sits; None when it is axis 0 (the usual layout).

        Raises:
            UnsupportedModelError: robaudit could not tell where the batch of ``value`` sits.
        """
        if value not in self.batch_axes:
            return None
        found = self.batch_axes[value]
        if found is None:
            raise UnsupportedModelError(
                f"value '{value}' (shape {list(self.clean[value].shape)} at batch size 1) holds the batch on an "
                "axis robaudit could not place; it cannot feed it one sample at a time"
            )
        return found

    def sample_shape(self, value: str) -> tuple[int, ...]:
        """Shape of one sample of ``value``, batch axis removed, in the flat order of the value at batch size 1."""
        layout = self.layout(value)
        shape = self.clean[value].shape
        return shape[1:] if layout is None else layout.sample_shape(shape)

    @property
    def has_classes(self) -> bool:
        """Whether the audited output reads as class scores: a vector of several elements per sample.

        One element (a regression), or several axes longer than 1 (an image, a sequence of tokens), has no
        classes: no arg-max to flip, and an input is certified when its bound is within ε (docs/method.md §7.1).
        """
        return sum(1 for n in self.sample_shape(self.output_name) if n > 1) == 1

    @property
    def output_width(self) -> float:
        """hi − lo of :attr:`output_range` (+inf when unbounded): no output change exceeds it."""
        return math.inf if self.output_range is None else self.output_range[1] - self.output_range[0]

    @property
    def variable_inputs(self) -> list[InputSpec]:
        """The inputs that vary over their box (not held constant)."""
        return [spec for spec in self.inputs if spec.kind != CONSTANT]

    @property
    def input_boxes(self) -> dict[str, Interval]:
        """Box of every variable input, by name: what IBP starts from."""
        return {spec.name: spec.box for spec in self.variable_inputs}

    @property
    def input_name(self) -> str:
        """The first variable input (the only one of a single-input model)."""
        return self.variable_inputs[0].name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape (batch 1) of :attr:`input_name`."""
        return self.variable_inputs[0].shape

    @property
    def input_range(self) -> tuple[float, float]:
        """[min LO, max HI] over the float inputs' elements (the single input's [LO, HI]); token ids if none."""
        floats = [spec for spec in self.variable_inputs if spec.kind == FLOAT] or self.variable_inputs
        hulls = [spec.hull for spec in floats]
        return min(h[0] for h in hulls), max(h[1] for h in hulls)

    @property
    def packed(self) -> bool:
        """Whether injection feeds the inputs packed into one float vector (anything but one float input)."""
        return len(self.inputs) != 1 or self.inputs[0].kind != FLOAT

    @property
    def hidden_layers(self) -> list[Layer]:
        """Failure sites l = 1..L."""
        return [layer for layer in self.layers if layer.failure_site]

    def require_hidden_layers(self) -> list[Layer]:
        """:attr:`hidden_layers`, refusing a network without any (nothing can fail).

        Raises:
            OptionError: no hidden layer (the message names ``--include-output-layer`` of the commands that take
                it: the output layer is then a failure site).
        """
        if not self.hidden_layers:
            raise OptionError(
                "the model has no hidden layer (only the output layer); nothing can fail "
                "(bound, inject and certify take --include-output-layer: the output layer fails)"
            )
        return self.hidden_layers

    @property
    def output_layer(self) -> Layer | None:
        """Layer L+1, or None when the output is not produced by a layer."""
        return next((layer for layer in self.layers if layer.is_output), None)

    def layer(self, key: str | int) -> Layer:
        """A hidden layer by name, else by 1-based index (names win: ``nn.Sequential`` names layers "0", "1", ...)."""
        for layer in self.hidden_layers:
            if layer.name == str(key):
                return layer
        for layer in self.hidden_layers:
            if str(layer.index) == str(key):
                return layer
        names = ", ".join(layer.name for layer in self.hidden_layers)
        raise UnsupportedModelError(f"no hidden layer named '{key}' (layers: {names})")

    @property
    def graph_name(self) -> str:
        """A short name for titles: the model file's stem if known, else the output name."""
        return self.source_name or self.output_name

    def is_chain(self) -> bool:
        """True when every step has exactly one variable input (no residuals or concats)."""
        for step in self.steps:
            if isinstance(step, Node) and sum(1 for v in step.inputs if v in self.clean) > 1:
                return False
        return True


# --------------------------------------------------------------------------- input/output


# --------------------------------------------------------------------------- evaluation


# --------------------------------------------------------------------------- layers


def _tail(
    output: str, nodes_by_output: dict[str, Node], constants: dict, clean: dict
) -> tuple[str, float, set[str], float]:
    """Walk back from the output through the ∞-norm tail: (start value, factor, tail node names,
    what its roundings add).

    The tail is shape-only ops, Softmax/LogSoftmax (factor ½ / 2), rounding ops (factor L,
    plus ρ times the factor after them: docs/method.md §1.2), and a ``Concat`` of copies of
    one value under scalar affine maps — scikit-learn's binary classifiers output [1 − p, p] —
    whose factor is the largest |scale|.
    """
    value, factor, names, added = output, 1.0, set(), 0.0
    while (node := nodes_by_output.get(value)) is not None:
        if is_rounding(node):
            rule = lookup(node)
            assert isinstance(rule, Rounding)
            added += factor * float(np.max(rule.radius(node, clean[node.inputs[0]])))
            factor *= rule.lipschitz(node)
            names.add(node.name)
            value = node.inputs[0]
            continue
        if node.op_type in _TAIL_OPS:
            rule = lookup(node)
            if isinstance(rule, SoftmaxTail):
                factor *= rule.tail_factor(node)
            names.add(node.name)
            value = node.inputs[0]
            continue
        copies = _affine_copies(node, nodes_by_output, constants) if node.op_type == "Concat" else None
        if copies is None:
            break
        source, scale, inner = copies
        factor *= scale
        names |= inner | {node.name}
        value = source
    return value, factor, names, added


def _affine_copies(concat: Node, nodes_by_output: dict, constants: dict) -> tuple[str, float, set[str]] | None:
    """(v, max |scale|, nodes) when every input of ``concat`` is v or c ± s·v with scalar constants."""
    sources, scales, inner = set(), [], set()
    for value in concat.inputs:
        scale = 1.0
        while (node := nodes_by_output.get(value)) is not None and node.op_type in ("Sub", "Add", "Mul", "Neg"):
            variable = [v for v in node.inputs if v not in constants]
            consts = [v for v in node.inputs if v in constants]
            if len(variable) != 1 or any(broadcast_scalar(constants[c]) is None for c in consts):
                break
            if node.op_type == "Mul":
                scale *= abs(float(np.asarray(constants[consts[0]]).reshape(-1)[0]))
            inner.add(node.name)
            value = variable[0]
        sources.add(value)
        scales.append(scale)
    if len(sources) != 1:
        return None
    return sources.pop(), max(scales), inner


def build_network(
    graph: Graph, options: NetworkOptions, opset: int = 17, include_output_layer: bool = False
) -> Network:
    """Build the layer graph of ``graph`` for the given options (docs/method.md §1.1).

    A QOperator model is first rewritten into its QDQ form (docs/method.md §11), a model that computes in
    float16 into float32 arithmetic rounded after every op (§1.2): ``Network.graph`` is that form, which
    injection runs.
    """
    widened = widen_float16(graph)
    float16 = widened is not graph
    half = float16_values(graph) if float16 else set()
    graph = qoperator_to_qdq(widened)
    output = choose_output(graph, options.output)
    audited = audited_nodes(graph, output)
    refuse_narrow_arithmetic(graph, audited)
    read = {v for n in audited for v in n.inputs} | {output}
    specs = input_specs(graph, options.domain(), options.input_shape, read)
    boxes = {s.name: s.box for s in specs if s.kind != CONSTANT}
    held = {s.name: s.value for s in specs if s.value is not None}
    if any(n.op_type in RECURRENT_OPS for n in audited):
        graph = unroll_recurrent(graph, lambda g, n: _inputs_of(g, n, boxes, held, opset), short_name, opset)
        audited = fuse_state_updates(audited_nodes(graph, output))
    nodes = recognize_normalizations(recognize_early(audited, graph.initializers, set(boxes)), graph.initializers)
    literals = literal_constants(nodes, graph.initializers)
    nodes = fuse_rounding(fuse_dynamic(nodes, literals), literals)
    nodes = fuse_channel_clips(fuse_nan_guards(nodes, literals), literals)
    extremes: dict[str, tuple[float, float]] = {}
    constants, clean = evaluate(graph, nodes, boxes, None, opset, dict(graph.initializers) | held, extremes=extremes)
    if output not in clean:
        names = ", ".join(f"'{name}'" for name in boxes)
        raise UnsupportedModelError(f"output '{output}' does not depend on the varying inputs ({names})")
    before = [n for n in nodes if any(v in clean for v in n.inputs)]
    var_nodes = recognize(before, constants, set(clean))
    if len(var_nodes) != len(before) or any(a is not b for a, b in zip(var_nodes, before, strict=True)):
        constants, clean = evaluate(graph, var_nodes, boxes, None, opset, constants)
    nodes_by_output = {out: n for n in var_nodes for out in n.outputs}
    tail_start, tail_factor, tail_nodes, tail_rounding = _tail(output, nodes_by_output, constants, clean)
    steps = group_layers(var_nodes, clean, constants, protected={output, tail_start}, extremes=extremes)
    pairs = summed_pairs(steps, var_nodes, constants, clean, {output, tail_start})
    if pairs:  # act(W·x + V·z): the sum and its activation one layer (docs/method.md §1.4)
        graph, var_nodes = insert_identities(graph, var_nodes, pairs, constants, clean)
        steps = group_layers(var_nodes, clean, constants, protected={output, tail_start}, extremes=extremes)
        mark_sum_layers(steps, pairs)
    steps = [s for s in steps if not (isinstance(s, Node) and s.name in tail_nodes)]

    layers = [s for s in steps if isinstance(s, Layer)]
    if not layers:
        raise UnsupportedModelError("no affine layer (Gemm, MatMul, Conv) found on the audited path")
    mark_recurrent_layers(layers, {n.name: n for n in var_nodes})
    unique_names(layers)
    found = _batch_axes(graph, nodes, specs, opset, clean) if _moved(layers, clean) else {}
    _refuse_moved_batch(layers, found, specs)
    batch_axes = found or {}
    for layer in layers:
        layer.is_output = layer.output_value == tail_start and not include_output_layer
    for index, layer in enumerate((la for la in layers if la.failure_site), start=1):
        layer.index = index
    for layer in layers:  # a float16 result is stored as a float16 word (docs/method.md §2.3)
        if half and all(value in half for value in [layer.output_value, *(m.output_value for m in layer.tied)]):
            layer.word = FLOAT16
    return Network(
        graph,
        specs,
        output,
        steps,
        layers,
        constants,
        clean,
        tail_start,
        tail_factor,
        nodes=var_nodes,
        output_range=_output_range(output, nodes_by_output, constants, include_output_layer),
        rounding=_rounding_radii(steps, clean),
        tail_rounding=tail_rounding,
        protections=_protections(layers, var_nodes, constants, clean),
        batch_axes=batch_axes,
        float16=float16,
    )


#: ONNX element types of narrow floats, whose arithmetic robaudit does not model (docs/method.md §1.2).
_NARROW_FLOATS = {10: "float16", 16: "bfloat16"}


def refuse_narrow_arithmetic(graph: Graph, nodes: list[Node]) -> None:
    """Refuse a model that computes in float16/bfloat16: a narrow-float graph input, or a DequantizeLinear with a
    narrow-float scale, read by anything but a ``Cast`` (docs/method.md §1.2). Each of its ops rounds to the
    narrow type, which the bounds do not include (an all-float16 model measured 2.5·10⁻⁴ above its bound).

    Raises:
        UnsupportedModelError: naming the node and the value.
    """
    narrow = {info.name: _NARROW_FLOATS[info.elem_type] for info in graph.inputs if info.elem_type in _NARROW_FLOATS}
    for node in nodes:
        if node.op_type == "DequantizeLinear" and len(node.inputs) > 1:
            scale = graph.initializers.get(node.inputs[1])
            if scale is not None and np.asarray(scale).dtype == np.float16:
                narrow[node.outputs[0]] = "float16"
    for node in nodes:
        if node.op_type == "Cast":
            continue
        for value in node.inputs:
            if value in narrow:
                kind = narrow[value]
                raise UnsupportedModelError(
                    f"node {node.describe()} computes in {kind} ('{value}' is {kind}): robaudit does not model "
                    f"{kind} arithmetic, whose rounding the bounds would miss; audit the float32 model (or cast "
                    "the input to float32 first)"
                )


def _inputs_of(graph: Graph, node: Node, boxes: dict, held: dict, opset: int) -> list:
    """Each input of ``node``: its value when constant, its interval when variable, None when absent
    (IBP of the nodes it depends on: docs/method.md §14.1)."""
    if node.inputs[0] in {info.name for info in graph.inputs}:
        raise unsupported(
            node,
            f"its input X '{node.inputs[0]}' is a graph input, whose axis 0 (the time axis here) robaudit reads "
            "as the batch; feed it batch first through a Transpose, as PyTorch's exporters do",
        )
    needed: dict[str, Node] = {}
    for value in node.inputs:
        if value:
            needed.update((n.name, n) for n in audited_nodes(graph, value))
    before = [n for n in graph.nodes if n.name in needed]
    constants, clean = evaluate(graph, before, boxes, None, opset, dict(graph.initializers) | held)
    return [clean.get(v, constants.get(v)) if v else None for v in node.inputs]


def _moved(layers: list[Layer], clean: dict[str, Interval]) -> bool:
    """Whether some layer's output has more than one row on axis 0 at batch size 1 (the batch moved)."""
    return any(clean[layer.output_value].shape[0] != 1 for layer in layers)


def _batch_axes(
    graph: Graph, nodes: list[Node], specs: list[InputSpec], opset: int, clean: dict
) -> dict[str, BatchLayout | None] | None:
    """Where the batch sits in each value whose batch is not axis 0 (docs/method.md §13.4).

    The graph is evaluated again at batch size 2, the first sample over the input box and the
    second at a point of it. A value whose shape changes on one axis k (size s → 2s) holds the
    batch there; its layout (outer, 2, inner) is the one whose second-sample slices are exactly
    the slices of zero width. None where no layout fits (or several axes grow); None for the whole
    model when it does not run at batch 2 (a batch of 1 written into its reshapes).
    """
    boxes, held = {}, {}
    for spec in specs:
        if spec.value is not None:
            held[spec.name] = np.repeat(np.asarray(spec.value), 2, axis=0)
            continue
        point = (spec.box.lo + spec.box.hi) / 2.0
        point = np.round(point) if spec.kind != FLOAT else point
        boxes[spec.name] = Interval(np.concatenate([spec.box.lo, point]), np.concatenate([spec.box.hi, point]))
    try:
        _, doubled = evaluate(graph, nodes, boxes, None, opset, dict(graph.initializers) | held)
    except (UnsupportedModelError, ModelStructureError, ValueError):
        return None
    layouts: dict[str, BatchLayout | None] = {}
    for value, box in clean.items():
        other = doubled.get(value)
        if other is None or other.shape == box.shape or (box.shape[0] == 1 and other.shape[1:] == box.shape[1:]):
            continue
        layouts[value] = _layout(box.shape, other)
    return layouts


def _layout(shape: tuple[int, ...], doubled: Interval) -> BatchLayout | None:
    """The layout of a value of ``shape`` at batch 1 whose batch-2 box (second sample a point) is ``doubled``."""
    grown = [k for k, (a, b) in enumerate(zip(shape, doubled.shape, strict=False)) if a != b]
    if len(shape) != len(doubled.shape) or len(grown) != 1 or doubled.shape[grown[0]] != 2 * shape[grown[0]]:
        return None
    axis, size = grown[0], shape[grown[0]]
    width = np.moveaxis(doubled.hi - doubled.lo, axis, 0).reshape(2 * size, -1).max(axis=1)
    scale = 1.0 + float(np.max(np.maximum(np.abs(doubled.lo), np.abs(doubled.hi))))
    wide = width > 1e-7 * scale
    for inner in (d for d in range(1, size + 1) if size % d == 0):
        first = (np.arange(2 * size) // inner) % 2 == 0
        if np.array_equal(wide, first):
            return BatchLayout(axis, size // inner, inner)
    return None


def _refuse_moved_batch(
    layers: list[Layer], layouts: dict[str, BatchLayout | None] | None, specs: list[InputSpec]
) -> None:
    """Refuse a layer whose output holds the batch where robaudit cannot place it (the model does not run
    at batch 2, ``layouts`` None, or no layout fits): its neurons would not be one sample's.

    A model that does not run at batch 2 is an export with its batch of 1 written into it (torch's
    attention reshapes to [tokens, batch·heads, …]): which axis is the batch cannot be told, and
    injection batches fault sets on it, so the remedy is an export with a dynamic batch axis.
    """
    known = layouts or {}
    for layer in layers:
        if known.get(layer.output_value) is not None or (layer.output_value not in known and layer.out_shape[0] == 1):
            continue
        rows = f"layer '{layer.name}' has {layer.out_shape[0]} rows on axis 0 at batch size 1"
        if layouts is None:
            axes = ", ".join(f"'{s.name}': {{0: 'batch'}}" for s in specs if s.kind != CONSTANT)
            raise UnsupportedModelError(
                f"{rows} and the model does not run at batch size 2 (a batch of 1 is fixed in the export), so "
                "robaudit cannot tell which axis holds the batch; re-export it with a dynamic batch axis, e.g. "
                f"torch.onnx.export(..., dynamic_axes={{{axes}}})"
            )
        raise UnsupportedModelError(
            f"{rows} and its batch axis cannot be placed (robaudit evaluates the model at batch size 2 to find it; "
            "it must run there)"
        )


#: Ops that keep every element's value (they only move or copy elements).
_VALUE_KEEPING = {"Identity", "Cast", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}


def _output_range(
    output: str, nodes_by_output: dict[str, Node], constants: dict, output_fails: bool = False
) -> tuple[float, float] | None:
    """The range every element of ``output`` lies in, clean or faulty: a Softmax [0, 1], or a bounded
    activation (Sigmoid, Tanh, Clip, …) read back through shape-only ops; None otherwise (docs/method.md §3.4).

    When the output layer is a failure site (``output_fails``) its failed neurons bypass
    their activation, so only a Softmax still bounds the output.
    """
    value = output
    while (node := nodes_by_output.get(value)) is not None and node.op_type in _VALUE_KEEPING:
        if node.op_type == "Cast" and node.attr("to", 1) not in (1, 11):  # a narrower float may round past the range
            return None
        value = node.inputs[0]
    if node is None:
        return None
    if node.op_type == "Softmax":
        return (0.0, 1.0)
    if output_fails:
        return None
    rule = lookup(node)
    if isinstance(rule, Clip):
        return rule.clip_range(node, constants)
    if isinstance(rule, Activation):
        return rule.output_range(node)
    return None


def _protections(
    layers: list[Layer], nodes: list[Node], constants: dict, clean: dict[str, Interval]
) -> dict[str, Protection]:
    found = {}
    for layer in layers:
        if layer.is_output:
            continue
        shape = clean[layer.output_value].shape
        if (protection := protection_of(layer.output_value, nodes, constants, shape)) is not None:
            found[layer.output_value] = protection
    return found


def _rounding_radii(steps: list[Step], clean: dict[str, Interval]) -> dict[str, np.ndarray]:
    """ρ per element of each value produced by rounding: layers with rounding inside, rounding ops."""
    radii: dict[str, np.ndarray] = {}
    for step in steps:
        if isinstance(step, Layer) and step.rounding is not None:
            radii[step.output_value] = step.rounding
        elif isinstance(step, Node) and (is_rounding(step) or is_dynamic_rounding(step)):
            rule = lookup(step)  # a DynamicRound's radius is redone from the faulty box (docs/method.md §11)
            assert isinstance(rule, Rounding)
            radii[step.outputs[0]] = rule.radius(step, clean[step.inputs[0]]).reshape(-1)
    return radii
