"""The layer graph (SPEC §1): failure sites, the ops between them, clean intervals.

``build_network`` takes a checked :class:`~robaudit.graph.onnx_graph.Graph`, folds constant
subexpressions, propagates the input domain through every op (which also fixes all
shapes at batch size 1), and groups each affine op with its folded normalization /
constant scaling and its element-wise activation into one :class:`Layer`.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from robaudit.errors import ModelStructureError, ShapeError, UnsupportedModelError
from robaudit.graph.conv import ConvGeometry
from robaudit.graph.folding import fold_node
from robaudit.graph.onnx_graph import Graph, Node, ValueInfo
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.activations import Activation, Clip, PRelu
from robaudit.graph.ops.affine import (
    batchnorm_scale_shift,
    conv_geometry,
    conv_transpose_geometry,
    float_weight,
    gemm_operands,
    weight_extremes,
)
from robaudit.graph.ops.base import unsupported
from robaudit.graph.ops.gated import recognize, recognize_early
from robaudit.graph.ops.pooling import SoftmaxTail

_FLOAT_TYPES = {1, 10, 11, 16}
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
MAX_INPUT_ELEMENTS = 2**24
_AFFINE_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")


@dataclass(frozen=True)
class NetworkOptions:
    """How to read the model: input shape, audited output, input domain."""

    #: Shape of the input; a symbolic batch dimension becomes 1. None: from the model.
    input_shape: tuple[int, ...] | None = None
    #: Name of the tensor to audit; None: the float output the last affine layer reaches.
    output: str | None = None
    #: The input domain [LO, HI] applied to every input element (SPEC §2).
    input_range: tuple[float, float] = (0.0, 1.0)


@dataclass
class Layer:
    """One failure site: affine op + folded normalization/scaling + activation (SPEC §1)."""

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
    #: (id(weight), min, max) already read while checking the constant for NaN/Inf;
    #: used only while ``weight`` is still that very array.
    weight_range_hint: tuple[int, float, float] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def neurons(self) -> int:
        """N_l: elements of the output for one sample."""
        return int(math.prod(self.out_shape[1:]))  # not np.prod: asked thousands of times by the searches

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
    def fan_in(self) -> int:
        """Incoming synapses per neuron (for ConvTranspose: the most any output position gets)."""
        if self.kind == "conv_transpose":
            kernel = tuple(self.weight.shape[2:])
            return self.weight.shape[0] // self.geometry.groups * self.geometry.max_fanout(kernel)
        return int(np.prod(self.weight.shape[1:]))

    @cached_property
    def fanout(self) -> int:
        """Most neurons of this layer that one neuron of the previous layer feeds (SPEC §3)."""
        if self.geometry is None:
            per_input = self.weight.shape[0]
        elif self.kind == "conv_transpose":
            per_input = self.weight.shape[1] * int(np.prod(self.weight.shape[2:]))
        else:
            kernel = tuple(self.weight.shape[2:])
            kernel2 = (1, kernel[0]) if len(kernel) == 1 else kernel
            per_input = self.weight.shape[0] // self.geometry.groups * self.geometry.max_fanout(kernel2)
        return min(per_input, self.neurons)


Step = Layer | Node


@dataclass
class Network:
    """The audited part of a model, ready for bounds and injection."""

    graph: Graph
    input_name: str
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
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

    @property
    def hidden_layers(self) -> list[Layer]:
        """Failure sites l = 1..L."""
        return [layer for layer in self.layers if not layer.is_output]

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


def _choose_input(graph: Graph) -> ValueInfo:
    candidates = [i for i in graph.inputs if i.is_tensor]
    if len(candidates) != 1:
        names = ", ".join(f"'{i.name}'" for i in graph.inputs) or "none"
        raise UnsupportedModelError(
            f"the model has {len(candidates)} tensor inputs ({names}); robaudit audits models with exactly one input"
        )
    if candidates[0].elem_type not in _FLOAT_TYPES:
        raise UnsupportedModelError(f"input '{candidates[0].name}' is not a float tensor")
    return candidates[0]


def _input_shape(info: ValueInfo, given: tuple[int, ...] | None) -> tuple[int, ...]:
    dims = info.dims
    if given is not None:
        shape = tuple(given)
        if dims is not None and len(shape) == len(dims) - 1:
            shape = (1,) + shape
        if dims is not None and len(shape) != len(dims):
            raise ShapeError(
                f"--input-shape {list(given)} has rank {len(given)}, the input '{info.name}' has rank {len(dims)}"
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
        shape = []
        for axis, dim in enumerate(dims):
            if axis == 0:
                shape.append(1)
            elif isinstance(dim, int) and dim > 0:
                shape.append(dim)
            else:
                raise ShapeError(
                    f"input '{info.name}' has a symbolic dimension '{dim}' at axis {axis}; "
                    "give the shape with --input-shape (e.g. --input-shape 3,224,224)"
                )
        shape = tuple(shape)
    if any(d <= 0 for d in shape) or np.prod(shape, dtype=np.float64) > MAX_INPUT_ELEMENTS:
        raise ShapeError(f"input shape {list(shape)} has a non-positive dimension or is too large")
    return (1,) + tuple(shape[1:])


def _choose_output(graph: Graph, requested: str | None) -> str:
    """The tensor to audit: ``--output NAME``, else the first float graph output.

    Classifier tails are skipped: integer labels are not float, and a ``ZipMap``
    (sequence of maps) is replaced by the float probabilities it reads.
    """
    if requested:
        if requested not in graph.producer:
            raise UnsupportedModelError(f"audited tensor '{requested}' (--output-tensor) is not produced by any node")
        return requested
    for out in graph.outputs:
        if out.is_tensor and out.elem_type in _FLOAT_TYPES:
            return out.name
        node = graph.producer.get(out.name)
        if not out.is_tensor and node is not None and node.op_type == "ZipMap":
            return node.inputs[0]
    names = ", ".join(f"'{o.name}'" for o in graph.outputs)
    raise UnsupportedModelError(f"no float tensor among the outputs ({names}); name one with --output-tensor")


def _ancestors(graph: Graph, output: str) -> list[Node]:
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


# --------------------------------------------------------------------------- evaluation


def _check_finite(node: Node, args: list, graph: Graph, extremes: dict[str, tuple[float, float]]) -> None:
    """Refuse NaN/Inf constants; remember each one's (min, max) so layers need not read it again."""
    if node.op_type == "Clip":
        return
    for name, arg in zip(node.inputs, args, strict=False):
        if not (isinstance(arg, np.ndarray) and arg.dtype.kind == "f" and arg.size):
            continue
        if name not in extremes:
            extremes[name] = weight_extremes(arg)  # block by block, fast on unaligned views of the file too
        low, high = extremes[name]
        if not (np.isfinite(low) and np.isfinite(high)):  # min/max propagate NaN and Inf
            raise ModelStructureError(f"constant '{name}' used by node {node.describe()} contains NaN or Inf values")


def evaluate(
    graph: Graph,
    nodes: list[Node],
    input_name: str,
    input_box: Interval,
    opset: int,
    constants: dict[str, np.ndarray] | None = None,
    widen: dict[str, tuple[float, float]] | None = None,
    radius: dict[str, float] | None = None,
    extremes: dict[str, tuple[float, float]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Interval]]:
    """Fold constants and propagate the input box through ``nodes`` (IBP).

    ``widen`` joins the given [a, b] into a value's interval (failed neurons) and
    ``radius`` widens it by ±r (failed synapses): the faulty network's intervals.
    """
    constants = dict(graph.initializers) if constants is None else constants
    widen, radius = widen or {}, radius or {}
    clean: dict[str, Interval] = {input_name: input_box}
    for node in nodes:
        node.opset = opset or node.opset
        args = [clean.get(v, constants.get(v)) if v else None for v in node.inputs]
        variable = any(isinstance(a, Interval) for a in args)
        if not variable:
            if all(out in constants for out in node.outputs if out):
                continue
            if any(a is None and v for a, v in zip(args, node.inputs, strict=True)):
                raise ModelStructureError(f"node {node.describe()} reads a value that is not available")
            for out, value in zip(node.outputs, fold_node(node, args, node.proto, opset), strict=False):
                constants[out] = value
            continue
        if node.op_type == "Shape":
            constants[node.outputs[0]] = _shape_of(node, args[0])
            continue
        rule = lookup(node)
        if rule is None:
            raise unsupported(node, "robaudit has no rule to bound its error propagation")
        _check_finite(node, args, graph, extremes if extremes is not None else {})
        try:
            results = rule.interval(node, args)
        except (ValueError, IndexError, ZeroDivisionError) as exc:  # shapes or attributes do not fit together
            shapes = [list(a.shape if isinstance(a, Interval) else np.shape(a)) for a in args if a is not None]
            message = f"node {node.describe()} has incompatible input shapes {shapes} or attributes{_reason(exc)}"
            raise ModelStructureError(message) from None
        for out, value in zip(node.outputs, results, strict=False):
            if out:
                if value.lo.size == 0:
                    raise ModelStructureError(f"node {node.describe()} produces an empty tensor")
                if not (np.all(np.isfinite(value.lo)) and np.all(np.isfinite(value.hi))):
                    raise ModelStructureError(
                        f"node {node.describe()} produces NaN or infinite values "
                        "(check its constants and --input-range)"
                    )
                if out in radius:
                    value = Interval(value.lo - radius[out], value.hi + radius[out])
                if out in widen:
                    a, b = widen[out]
                    value = Interval(np.minimum(value.lo, a), np.maximum(value.hi, b))
                clean[out] = value
    return constants, clean


def _reason(exc: Exception) -> str:
    """`` (numpy's message)`` of a ValueError (it names shapes or values); nothing for other errors."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f" ({text})" if text and isinstance(exc, ValueError) else " (shape mismatch)"


def _shape_of(node: Node, x: Interval) -> np.ndarray:
    shape = np.array(x.shape, dtype=np.int64)
    start, end = node.attr("start", 0), node.attr("end")
    return shape[start:end]


# --------------------------------------------------------------------------- layers


def _short_name(node: Node) -> str:
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


def _anchor(node: Node, clean: dict, constants: dict) -> bool:
    if node.op_type not in _AFFINE_OPS or node.inputs[0] not in clean:
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
        weight, bias = gemm_operands(node, None, np.asarray(args[1]), None if len(args) < 3 else args[2])
        weight = weight.T
    else:
        weight, bias = float_weight(args[1]).T, None
    out = weight.shape[0]
    bias = (
        np.zeros(out)
        if bias is None
        else np.broadcast_to(
            np.asarray(bias, np.float64).reshape(-1) if np.size(bias) in (1, out) else bias, (out,)
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
    index = [0] * len(out_shape)
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
    if not isinstance(rule, Activation) or node.op_type in ("Neg",):
        return None
    if isinstance(rule, PRelu):
        if node.inputs[1] not in constants:
            return None
        return rule.slopes_lipschitz(np.asarray(constants[node.inputs[1]])), None
    if isinstance(rule, Clip):
        return 1.0, rule.clip_range(node, constants)
    return rule.lipschitz(node), rule.output_range(node)


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
        if not any(v in clean for v in node.inputs) or not any(v in clean for v in node.outputs):
            continue  # constant, or a shape read off a variable (``Shape``): folded, not a step
        if not _anchor(node, clean, constants):
            if node.op_type in _AFFINE_OPS:
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
        if first.inputs[0] != second.inputs[0] or any(
            _single_consumer(p.outputs[0], consumers, protected) is not add for p in pair
        ):
            continue
        shapes = {clean[v].shape for v in (*add.inputs, add.outputs[0])}
        if len(shapes) == 1 and _same_affine_form(first, second, clean, constants):
            order = sorted(pair, key=nodes.index)
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
    chain, current, name = [anchor.name], anchor.outputs[0], _short_name(anchor)
    if partner is not None:  # act(A·x + B·x): one layer with weight A + B (see _summed_anchors)
        second, add = partner
        _, weight_b, bias_b, _ = _dense_or_conv(second, clean, constants)
        weight, bias = np.asarray(weight, np.float64) + np.asarray(weight_b, np.float64), bias + bias_b
        chain, current, name = [anchor.name, second.name, add.name], add.outputs[0], f"{name}+{_short_name(second)}"
    out_shape = clean[current].shape
    channel_axis = len(out_shape) - 1 if kind == "dense" else 1
    while (nxt := _single_consumer(current, consumers, protected)) is not None:
        folded = _scale_shift(nxt, constants, out_shape, channel_axis)
        if folded is None or clean[nxt.outputs[0]].shape != out_shape:
            break
        scale, shift = folded
        if not np.all(scale == 1.0):  # a bias Add scales nothing: keep the weight (and its read range)
            weight = scale_output_channels(weight, scale, kind, geometry)
        bias = bias * scale + shift
        chain.append(nxt.name)
        current = nxt.outputs[0]
    preact, activation, lipschitz, act_range = current, None, 1.0, None
    nxt = _single_consumer(current, consumers, protected)
    info = _activation_info(nxt, constants) if nxt is not None else None
    if nxt is not None and info is not None:
        activation, (lipschitz, act_range) = nxt.attr("template", nxt.op_type), info
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
        lipschitz=lipschitz,
        activation_range=act_range,
        in_shape=clean[anchor.inputs[0]].shape,
        out_shape=clean[current].shape,
        weight_range_hint=hint if weight is original else None,
    )


def _tail(output: str, nodes_by_output: dict[str, Node], constants: dict) -> tuple[str, float, set[str]]:
    """Walk back from the output through the ∞-norm tail: (start value, factor, tail node names).

    The tail is shape-only ops, Softmax/LogSoftmax (factor ½ / 2), and a ``Concat`` of
    copies of one value under scalar affine maps — scikit-learn's binary classifiers
    output [1 − p, p] — whose factor is the largest |scale|.
    """
    value, factor, names = output, 1.0, set()
    while (node := nodes_by_output.get(value)) is not None:
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
    return value, factor, names


def _affine_copies(concat: Node, nodes_by_output: dict, constants: dict) -> tuple[str, float, set[str]] | None:
    """(v, max |scale|, nodes) when every input of ``concat`` is v or c ± s·v with scalar constants."""
    sources, scales, inner = set(), [], set()
    for value in concat.inputs:
        scale = 1.0
        while (node := nodes_by_output.get(value)) is not None and node.op_type in ("Sub", "Add", "Mul", "Neg"):
            variable = [v for v in node.inputs if v not in constants]
            consts = [v for v in node.inputs if v in constants]
            if len(variable) != 1 or any(np.size(constants[c]) != 1 for c in consts):
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


def _unique_names(layers: list[Layer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        count = seen.get(layer.name, 0)
        seen[layer.name] = count + 1
        if count:
            layer.name = f"{layer.name}_{count + 1}"


def build_network(
    graph: Graph, options: NetworkOptions, opset: int = 17, include_output_layer: bool = False
) -> Network:
    """Build the layer graph of ``graph`` for the given options (SPEC §1)."""
    lo, hi = options.input_range
    info = _choose_input(graph)
    shape = _input_shape(info, options.input_shape)
    output = _choose_output(graph, options.output)
    nodes = recognize_early(_ancestors(graph, output), graph.initializers, info.name)
    box = Interval(np.full(shape, float(lo)), np.full(shape, float(hi)))
    extremes: dict[str, tuple[float, float]] = {}
    constants, clean = evaluate(graph, nodes, info.name, box, opset, extremes=extremes)
    if output not in clean:
        raise UnsupportedModelError(f"output '{output}' does not depend on the input '{info.name}'")
    before = [n for n in nodes if any(v in clean for v in n.inputs)]
    var_nodes = recognize(before, constants, set(clean))
    if len(var_nodes) != len(before) or any(a is not b for a, b in zip(var_nodes, before, strict=True)):
        constants, clean = evaluate(graph, var_nodes, info.name, box, opset, constants)
    nodes_by_output = {out: n for n in var_nodes for out in n.outputs}
    tail_start, tail_factor, tail_nodes = _tail(output, nodes_by_output, constants)
    steps = group_layers(var_nodes, clean, constants, protected={output, tail_start}, extremes=extremes)
    steps = [s for s in steps if not (isinstance(s, Node) and s.name in tail_nodes)]
    _refuse_inner_softmax(steps)
    layers = [s for s in steps if isinstance(s, Layer)]
    if not layers:
        raise UnsupportedModelError("no affine layer (Gemm, MatMul, Conv) found on the audited path")
    _unique_names(layers)
    for layer in layers:
        layer.is_output = layer.output_value == tail_start and not include_output_layer
    for index, layer in enumerate((la for la in layers if not la.is_output), start=1):
        layer.index = index
    return Network(
        graph,
        info.name,
        shape,
        (float(lo), float(hi)),
        output,
        steps,
        layers,
        constants,
        clean,
        tail_start,
        tail_factor,
        nodes=var_nodes,
    )


def _refuse_inner_softmax(steps: list[Step]) -> None:
    for step in steps:
        if isinstance(step, Node) and step.op_type in ("Softmax", "LogSoftmax"):
            raise unsupported(step, "Softmax is supported only at the output (as in a classifier)")
