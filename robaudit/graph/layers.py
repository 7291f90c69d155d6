"""Failure sites: each affine op grouped with its folded normalization or constant scaling
and its activation into one :class:`Layer`, named after the model's modules
(docs/method.md §1.1)."""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from robaudit.graph.conv import ConvGeometry
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import lookup
from robaudit.graph.ops.activations import Activation, Clip, PRelu
from robaudit.graph.ops.affine import (
    batchnorm_scale_shift,
    conv_geometry,
    conv_transpose_geometry,
    float_weight,
    gemm_operands,
    weight_extremes,
)
from robaudit.graph.ops.base import Role, unsupported
from robaudit.graph.ops.rounding import QuantizeDequantize, Rounding, is_rounding
from robaudit.graph.stored_words import FLOAT32, FloatWord


@dataclass
class Layer:
    """One failure site: affine op + folded normalization/scaling + activation (docs/method.md §1.1)."""

    #: Short name, e.g. ``fc1`` for a node named ``/fc1/Gemm``.
    name: str
    #: ``dense``, ``conv`` or ``conv_transpose``.
    kind: str
    #: Names of the ONNX nodes grouped into this layer.
    nodes: list[str]
    #: ONNX value names: the layer's input, its pre-activation and its output.
    input_value: str
    preact_value: str
    output_value: str
    #: Effective weight after folding: dense [out, in]; conv [C_out, C_in/g, *kernel].
    #: float64, except an unfolded float32 model weight, kept as it is (possibly a
    #: transposed view); its values are exact either way — cast before arithmetic that
    #: must run in float64.
    weight: np.ndarray
    bias: np.ndarray
    #: Conv geometry (None for dense).
    geometry: ConvGeometry | None
    #: Activation op type (None if the layer has none), its K and bounded range.
    activation: str | None
    lipschitz: float
    activation_range: tuple[float, float] | None
    #: Shapes (batch 1 included) of input and output.
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    #: Whether this is the output layer L+1 (not a failure site unless asked).
    is_output: bool = False
    #: 1-based index among hidden layers (0 for the output layer).
    index: int = 0
    #: ρ per neuron (flat, N_l): what rounding inside the layer (a QDQ pair, a float16 cast)
    #: adds to each neuron's deviation once its input deviates (docs/method.md §1.2); None: exact.
    rounding: np.ndarray | None = None
    #: Integer-coded outputs (the layer ends on a QDQ pair): scale and zero point per neuron
    #: (flat, N_l) and the code range (qmin, qmax) (docs/method.md §2.3); None: stored as floats.
    codes: tuple[np.ndarray, np.ndarray, int, int] | None = None
    #: The IEEE-754 word the output is stored in when not integer-coded: float16 in a model that computes in
    #: float16 (its result is a float16 value), float32 otherwise (docs/method.md §2.3).
    word: FloatWord = FLOAT32
    #: (id(weight), min, max) already read while checking the constant for NaN/Inf;
    #: used only while ``weight`` is still that very array.
    weight_range_hint: tuple[int, float, float] | None = field(default=None, repr=False, compare=False)
    #: Not a failure site of its own: a gate of a recurrent cell, or the hidden state of a
    #: recurrent layer at a later time step (docs/method.md §14.1).
    internal: bool = False
    #: A recurrent layer's hidden state at the other time steps: the same neurons, failing with
    #: this layer's (docs/method.md §14.1). Empty for every other layer.
    tied: tuple[Layer, ...] = field(default=(), repr=False, compare=False)
    #: The most neurons of this layer one input element feeds, when the weight says less than its
    #: shape (the identity of a recurrent state: 1); None: from the weight's shape.
    fanout_limit: int | None = None
    #: Not a failure site: an affine op summed with another one of a different input before one
    #: activation, whose sum is the pre-activation of a later layer (docs/method.md §1.4).
    part: bool = False
    #: The two affine ops (parts) whose sum this layer's identity map reads (docs/method.md §1.4); empty
    #: for every other layer. Their weights are this layer's synapses.
    summands: tuple[Layer, ...] = field(default=(), repr=False, compare=False)

    @property
    def failure_site(self) -> bool:
        """Whether this is a hidden layer l = 1..L: not the output layer, a recurrent cell's gate or later step,
        or a part of a sum layer (docs/method.md §1.1, §1.4, §14.1)."""
        return not (self.is_output or self.internal or self.part)

    @cached_property
    def neurons(self) -> int:
        """N_l: elements of the output for one sample (at batch size 1, wherever the batch axis sits)."""
        return int(math.prod(self.out_shape))  # not np.prod: asked thousands of times by the searches

    @cached_property
    def weight_range(self) -> tuple[float, float]:
        """(min, max) of the effective weight, read once ((0, 0) for an empty weight)."""
        hint = self.weight_range_hint
        if hint is not None and hint[0] == id(self.weight):
            return hint[1], hint[2]
        return weight_extremes(self.weight)

    @cached_property
    def max_abs_weight(self) -> float:
        """w_m: the largest absolute effective weight into this layer (biases ignored).

        max(max W, −min W): the same number as max |W|, without a copy of the weight.
        """
        low, high = self.weight_range
        return max(high, -low)

    @cached_property
    def synapse_max_abs_weight(self) -> float:
        """The largest absolute weight on a synapse into this layer: w_m, or its summands' largest
        (a sum layer's own identity map is no synapse, docs/method.md §1.4). Reports and ``design`` read this."""
        if self.summands:
            return max(part.max_abs_weight for part in self.summands)
        return self.max_abs_weight

    @cached_property
    def synapse_fanout(self) -> int:
        """Most neurons of this layer one input neuron feeds through a synapse: :attr:`fanout`, or its summands'
        largest for a sum layer (docs/method.md §1.4). Reports read this."""
        if self.summands:
            return max(part.fanout for part in self.summands)
        return self.fanout

    @cached_property
    def fan_in(self) -> int:
        """Incoming synapses per neuron (for ConvTranspose: the most any output position gets; for a sum
        layer: its summands' together, docs/method.md §1.4)."""
        if self.summands:
            return sum(part.fan_in for part in self.summands)
        if self.kind == "conv_transpose" and self.geometry is not None:
            kernel = tuple(self.weight.shape[2:])
            return self.weight.shape[0] // self.geometry.groups * self.geometry.max_fanout(kernel)
        return int(np.prod(self.weight.shape[1:]))

    @cached_property
    def fanout(self) -> int:
        """Most neurons of this layer that one neuron of the previous layer feeds (docs/method.md §3.1)."""
        if self.fanout_limit is not None:
            per_input = self.fanout_limit
        elif self.geometry is None:
            per_input = self.weight.shape[0]
        elif self.kind == "conv_transpose":
            per_input = self.weight.shape[1] * int(np.prod(self.weight.shape[2:]))
        else:
            kernel = tuple(self.weight.shape[2:])
            kernel2 = (1, kernel[0]) if len(kernel) == 1 else kernel
            per_input = self.weight.shape[0] // self.geometry.groups * self.geometry.max_fanout(kernel2)
        return min(per_input, self.neurons)


Step = Layer | Node


def short_name(node: Node) -> str:
    """``fc1`` for PyTorch's ``/fc1/Gemm``, ``block2.shortcut.0`` for ``/block2/shortcut/shortcut.0/Conv``.

    The dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata gives the module path;
    where it fused a BatchNorm into the Linear/Conv, that path is the BatchNorm's, and the
    weight's parameter name (``fc1.weight``) names the layer as the legacy exporter does.
    """
    scopes = node.metadata.get("pkg.torch.onnx.name_scopes", "")
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parts = []
        if isinstance(parts, list) and len(parts) >= 2 and parts[-2]:
            if "batch_norm" in str(parts[-1]) and (owner := _parameter_module(node)):
                return owner  # BatchNorm folded into this Linear/Conv by the exporter: name it after the layer
            return str(parts[-2])
    match = re.fullmatch(r"/?(.+)/[A-Za-z]+(_\d+)?", node.name)
    if not match:
        return node.name
    name = ""
    for part in match.group(1).split("/"):
        last = name.rsplit(".", 1)[-1] if name else ""
        if name and part.startswith(last + "."):
            name = name[: len(name) - len(last)] + part
        else:
            name = f"{name}.{part}" if name else part
    return name


def _parameter_module(node: Node) -> str | None:
    """``fc1`` when the node's weight is PyTorch's parameter ``fc1.weight``."""
    match = re.fullmatch(r"([A-Za-z_][\w.]*)\.weight", node.inputs[1]) if len(node.inputs) > 1 else None
    return match.group(1) if match else None


def _is_affine(node: Node) -> bool:
    """Whether the node's rule anchors a layer (Gemm, MatMul, Conv, ConvTranspose: docs/method.md §1.1)."""
    rule = lookup(node)
    return rule is not None and rule.role is Role.AFFINE


def _anchor(node: Node, clean: dict, constants: dict) -> bool:
    if not _is_affine(node) or node.inputs[0] not in clean:
        return False
    return all(v == "" or v in constants for v in node.inputs[1:])


def _dense_or_conv(node: Node, clean: dict, constants: dict):
    """(kind, weight, bias, geometry) of an anchor op, weight in the canonical layout."""
    args = [constants.get(v) if v else None for v in node.inputs]
    if node.op_type == "Conv":
        weight = np.asarray(args[1], np.float64)
        bias = np.zeros(weight.shape[0]) if len(args) < 3 or args[2] is None else np.asarray(args[2], np.float64)
        return "conv", weight, bias, conv_geometry(node, clean[node.inputs[0]].shape, weight.shape)
    if node.op_type == "ConvTranspose":
        weight = np.asarray(args[1], np.float64)
        geom, _ = conv_transpose_geometry(node, clean[node.inputs[0]].shape, weight.shape)
        channels = weight.shape[1] * geom.groups
        bias = np.zeros(channels) if len(args) < 3 or args[2] is None else np.asarray(args[2], np.float64)
        return "conv_transpose", weight, bias, geom
    if node.op_type == "Gemm":
        if node.attr("transA", 0) and clean[node.inputs[0]].shape[-1] != 1:
            shape = list(clean[node.inputs[0]].shape)
            raise unsupported(node, f"Gemm with transA=1 needs A as [features, batch], got A of shape {shape}")
        weight, given = gemm_operands(node, None, np.asarray(args[1]), None if len(args) < 3 else args[2])
        weight = weight.T
    else:
        weight, given = float_weight(args[1]).T, None
    out = weight.shape[0]
    bias = (
        np.zeros(out)
        if given is None
        else np.broadcast_to(
            np.asarray(given, np.float64).reshape(-1) if np.size(given) in (1, out) else given, (out,)
        ).copy()
    )
    return "dense", weight, bias, None


def _per_channel(value: np.ndarray, out_shape: tuple[int, ...], channel_axis: int) -> np.ndarray | None:
    """``value`` as a per-channel vector if it broadcasts to ``out_shape`` varying only on that axis."""
    value = np.asarray(value, np.float64)
    try:
        if np.broadcast_shapes(value.shape, out_shape) != tuple(out_shape):
            return None
    except ValueError:
        return None
    full = np.broadcast_to(value, out_shape)
    index: list[int | slice] = [0] * len(out_shape)
    index[channel_axis] = slice(None)
    vector = full[tuple(index)]
    shape = [1] * len(out_shape)
    shape[channel_axis] = out_shape[channel_axis]
    if not np.array_equal(np.broadcast_to(vector.reshape(shape), out_shape), full):
        return None
    return vector.copy()


def _scale_shift(node: Node, constants: dict, out_shape, channel_axis) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (scale, shift) of a foldable BN / constant arithmetic node, else None."""
    if node.op_type == "BatchNormalization":
        if channel_axis != 1 or len(node.outputs) > 1 and any(node.outputs[1:]):
            return None
        if not all(v in constants for v in node.inputs[1:5]):
            return None
        args = [None] + [constants[v] for v in node.inputs[1:5]]
        return batchnorm_scale_shift(node, args)
    if node.op_type not in ("Add", "Sub", "Mul", "Div"):
        return None
    const_names = [v for v in node.inputs[:2] if v in constants]
    if len(const_names) != 1:
        return None
    vector = _per_channel(constants[const_names[0]], out_shape, channel_axis)
    if vector is None:
        return None
    var_first = node.inputs[1] == const_names[0]
    ones, zeros = np.ones_like(vector), np.zeros_like(vector)
    if node.op_type == "Add":
        return ones, vector
    if node.op_type == "Sub":
        return (ones, -vector) if var_first else (-ones, vector)
    if node.op_type == "Mul":
        return vector, zeros
    if not var_first or np.any(vector == 0):
        return None
    return 1.0 / vector, zeros


def _activation_info(node: Node, constants: dict) -> tuple[float, tuple[float, float] | None] | None:
    rule = lookup(node)
    if rule is None or rule.role is not Role.ACTIVATION or not isinstance(rule, Activation):
        return None
    if isinstance(rule, PRelu):
        if node.inputs[1] not in constants:
            return None
        return rule.slopes_lipschitz(np.asarray(constants[node.inputs[1]])), None
    if isinstance(rule, Clip):
        return 1.0, rule.clip_range(node, constants)
    return rule.lipschitz(node), rule.output_range(node)


def is_activation(node: Node, constants: dict) -> bool:
    """Whether ``node`` is an element-wise activation a layer ends on (not a rounding op)."""
    return not is_rounding(node) and _activation_info(node, constants) is not None


def group_layers(
    nodes: list[Node], clean: dict, constants: dict, protected: set[str], extremes: dict | None = None
) -> list[Step]:
    """Group anchors with their folded successors and activation into :class:`Layer` steps."""
    consumers: dict[str, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            if value in clean:
                consumers.setdefault(value, []).append(node)
    absorbed: dict[str, Layer] = {}
    steps: list[Step] = []
    partners = _summed_anchors(nodes, consumers, clean, constants, protected)
    for node in nodes:
        if node.name in absorbed:
            layer = absorbed[node.name]
            if layer.nodes[-1] == node.name:
                steps.append(layer)
            continue
        if (
            not any(v in clean for v in node.inputs)
            or all(o in constants for o in node.outputs if o)
            or not any(v in clean for v in node.outputs)
        ):
            continue  # constant, or a shape read off a variable (``Shape``): folded, not a step
        if not _anchor(node, clean, constants):
            if _is_affine(node) and not (node.op_type == "MatMul" and all(v in clean for v in node.inputs[:2])):
                raise unsupported(node, "only a variable input times constant weights can be bounded")
            steps.append(node)
            continue
        layer = _make_layer(node, consumers, clean, constants, protected, extremes or {}, partners.get(node.name))
        for name in layer.nodes:
            absorbed[name] = layer
        if layer.nodes[-1] == node.name:
            steps.append(layer)
    return steps


def _summed_anchors(
    nodes: list[Node], consumers: dict, clean: dict, constants: dict, protected: set[str]
) -> dict[str, tuple[Node, Node]]:
    """{first anchor: (second anchor, Add)} for ``act(A·x + B·x)``: two affine ops of one input, summed.

    The sum is one affine map of x (weight A + B, bias a + b), so the two ops, the ``Add``
    and what follows form one layer whose neurons are the activation's outputs (docs/method.md
    §1.1). Both must be dense, or convolutions of one geometry, each read only by the ``Add``.
    """
    producer = {out: n for n in nodes for out in n.outputs}
    found: dict[str, tuple[Node, Node]] = {}
    for add in nodes:
        if add.op_type not in ("Add", "Sum") or len(add.inputs) != 2 or not all(v in clean for v in add.inputs):
            continue
        pair = [producer.get(v) for v in add.inputs]
        if any(p is None or not _anchor(p, clean, constants) for p in pair) or pair[0] is pair[1]:
            continue
        first, second = pair
        assert first is not None and second is not None  # checked just above
        if first.inputs[0] != second.inputs[0] or any(
            _single_consumer(p.outputs[0], consumers, protected) is not add for p in (first, second)
        ):
            continue
        shapes = {clean[v].shape for v in (*add.inputs, add.outputs[0])}
        if len(shapes) == 1 and _same_affine_form(first, second, clean, constants):
            order = sorted((first, second), key=nodes.index)
            found[order[0].name] = (order[1], add)
    return found


def _same_affine_form(first: Node, second: Node, clean: dict, constants: dict) -> bool:
    """Whether two anchors' weights can be added: both dense, or convs of one geometry and weight shape."""
    kind_a, weight_a, _, geom_a = _dense_or_conv(first, clean, constants)
    kind_b, weight_b, _, geom_b = _dense_or_conv(second, clean, constants)
    return kind_a == kind_b and np.shape(weight_a) == np.shape(weight_b) and geom_a == geom_b


def _single_consumer(value: str, consumers: dict, protected: set[str]) -> Node | None:
    users = consumers.get(value, [])
    if value in protected or len(users) != 1:
        return None
    return users[0]


def scale_output_channels(weight: np.ndarray, scale: np.ndarray, kind: str, geometry) -> np.ndarray:
    """Multiply the weights feeding each output channel by ``scale[channel]`` (BN / constant Mul folding)."""
    if kind != "conv_transpose":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    groups = geometry.groups
    c_in, c_out_g = weight.shape[:2]
    grouped = weight.reshape((groups, c_in // groups, c_out_g) + weight.shape[2:])
    grouped = grouped * scale.reshape((groups, 1, c_out_g) + (1,) * (weight.ndim - 2))
    return grouped.reshape(weight.shape)


def _range_hint(anchor: Node, weight: np.ndarray, extremes: dict) -> tuple[int, float, float] | None:
    """(id(weight), min, max) from the extremes read off the weight constant, if still valid.

    The canonical weight holds the constant's values (itself, a transposed view or a
    float64 copy); a Gemm with alpha ≠ 1 has other values and gets no hint.
    """
    if len(anchor.inputs) < 2 or anchor.inputs[1] not in extremes:
        return None
    if anchor.op_type == "Gemm" and float(anchor.attr("alpha", 1.0)) != 1.0:
        return None
    low, high = extremes[anchor.inputs[1]]
    return id(weight), low, high


def _make_layer(
    anchor: Node,
    consumers: dict,
    clean: dict,
    constants: dict,
    protected: set[str],
    extremes: dict,
    partner: tuple[Node, Node] | None = None,
) -> Layer:
    kind, weight, bias, geometry = _dense_or_conv(anchor, clean, constants)
    original, hint = weight, _range_hint(anchor, weight, extremes)  # ``original`` keeps its id unique
    chain, current, name = [anchor.name], anchor.outputs[0], short_name(anchor)
    if partner is not None:  # act(A·x + B·x): one layer with weight A + B (see _summed_anchors)
        second, add = partner
        _, weight_b, bias_b, _ = _dense_or_conv(second, clean, constants)
        weight, bias = np.asarray(weight, np.float64) + np.asarray(weight_b, np.float64), bias + bias_b
        chain, current, name = [anchor.name, second.name, add.name], add.outputs[0], f"{name}+{short_name(second)}"
    out_shape = clean[current].shape
    channel_axis = len(out_shape) - 1 if kind == "dense" else 1
    track, last_rounding = _RoundingTrack(clean), None
    while (nxt := _single_consumer(current, consumers, protected)) is not None:
        if is_rounding(nxt) and clean[nxt.outputs[0]].shape == out_shape:
            track.add(nxt)  # rounding between the affine op and its bias/scale (docs/method.md §1.2)
            last_rounding = nxt
            chain.append(nxt.name)
            current = nxt.outputs[0]
            continue
        folded = _scale_shift(nxt, constants, out_shape, channel_axis)
        if folded is None or clean[nxt.outputs[0]].shape != out_shape:
            break
        scale, shift = folded
        if not np.all(scale == 1.0):  # a bias Add scales nothing: keep the weight (and its read range)
            weight = scale_output_channels(weight, scale, kind, geometry)
            track.scale(scale, out_shape, channel_axis)
        bias = bias * scale + shift
        last_rounding = None
        chain.append(nxt.name)
        current = nxt.outputs[0]
    preact, activation, lipschitz, act_range = current, None, 1.0, None
    final_rounding = last_rounding
    nxt = _single_consumer(current, consumers, protected)
    info = _activation_info(nxt, constants) if nxt is not None and not is_rounding(nxt) else None
    if nxt is not None and info is not None:
        # an activation after the affine op, or after a rounding of it that a quantizer left between the two
        # (Q → DQ before a Tanh it does not fuse): the layer ends after the activation, as the float model's
        # does; that rounding is inside the layer, its radius carried through the activation (§1.2)
        activation, (lipschitz, act_range) = nxt.attr("template", nxt.op_type), info
        track.times(lipschitz)
        chain.append(nxt.name)
        current = nxt.outputs[0]
        final_rounding = None
    elif last_rounding is not None:
        preact = last_rounding.inputs[0]  # the chain ends on a rounding: it is the layer's activation
        activation = _rounding_label(last_rounding)  # its range is the interval's: IBP clips to the codes
    while (nxt := _single_consumer(current, consumers, protected)) is not None and is_rounding(nxt):
        track.add(nxt)  # a quantized (or float16) activation: rounding after the activation
        activation = f"{activation}→{_rounding_label(nxt)}" if activation else _rounding_label(nxt)
        act_range = None  # rounded values may leave the activation's range; IBP follows them
        final_rounding = nxt
        chain.append(nxt.name)
        current = nxt.outputs[0]
    return Layer(
        name=name,
        kind=kind,
        nodes=chain,
        input_value=anchor.inputs[0],
        preact_value=preact,
        output_value=current,
        weight=weight,
        bias=bias,
        geometry=geometry,
        activation=activation,
        lipschitz=lipschitz * track.gain,
        activation_range=act_range,
        in_shape=clean[anchor.inputs[0]].shape,
        out_shape=clean[current].shape,
        weight_range_hint=hint if weight is original else None,
        rounding=track.radius,
        codes=_codes(final_rounding, clean[current].shape),
    )


def _codes(node: Node | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(scale, zero point) per neuron and (qmin, qmax) when the layer stores integer codes (a final QDQ)."""
    if node is None or node.op_type != "QuantizeDequantize":
        return None
    scale, zp, qmin, qmax = QuantizeDequantize.parameters(node, shape)
    flat = (np.broadcast_to(scale, shape).reshape(-1).copy(), np.broadcast_to(zp, shape).reshape(-1).copy())
    return flat[0], flat[1], qmin, qmax


class _RoundingTrack:
    """The rounding radius ρ at the current value of a layer's chain and the Lipschitz factor
    the roundings add (docs/method.md §1.2): ρ ← L·ρ + ρ_new at a rounding, ρ ← |scale|·ρ at a
    folded scale, ρ ← K·ρ at the activation."""

    def __init__(self, clean: dict) -> None:
        self.clean = clean
        self.gain = 1.0
        self._radius: np.ndarray | None = None

    def add(self, node: Node) -> None:
        rule = lookup(node)
        assert isinstance(rule, Rounding)
        factor = rule.lipschitz(node)
        new = rule.radius(node, self.clean[node.inputs[0]])
        self.gain *= factor
        self._radius = new if self._radius is None else self._radius * factor + new

    def scale(self, scale: np.ndarray, out_shape: tuple[int, ...], channel_axis: int) -> None:
        if self._radius is not None:
            view = [1] * len(out_shape)
            view[channel_axis] = -1
            self._radius = self._radius * np.abs(scale).reshape(view)

    def times(self, factor: float) -> None:
        if self._radius is not None:
            self._radius = self._radius * factor

    @property
    def radius(self) -> np.ndarray | None:
        return None if self._radius is None else np.asarray(self._radius, np.float64).reshape(-1)


def _rounding_label(node: Node) -> str:
    if node.op_type == "QuantizeDequantize":
        return "QDQ"
    return "Cast(float16)" if node.attr("to") == 10 else "Cast(bfloat16)"


def activation_chain(layer: Layer, nodes_by_name: dict[str, Node]) -> list[Node]:
    """The layer's nodes after the one that writes its pre-activation, in order: its activation, then any
    rounding op after it (docs/method.md §1.2); empty for a layer without one. A rule that takes a single
    node as the activation φ holds only where this has one node (docs/method.md §5.2)."""
    if layer.output_value == layer.preact_value:
        return []
    nodes = [nodes_by_name[name] for name in layer.nodes if name in nodes_by_name]
    start = next((i + 1 for i, n in enumerate(nodes) if layer.preact_value in n.outputs), 0)
    return nodes[start:]


def unique_names(layers: list[Layer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        count = seen.get(layer.name, 0)
        seen[layer.name] = count + 1
        if count:
            layer.name = f"{layer.name}_{count + 1}"


def layer_label(index: int | None, name: str) -> str:
    """``#index name`` as reports write a layer; a name that is a bare number (nn.Sequential's ``0``, ``2``) is
    quoted, which would read as a count otherwise (``#2 '2'``, not ``#2 2``)."""
    shown = f"'{name}'" if name.isdigit() else name
    return f"#{index} {shown}" if index else shown
