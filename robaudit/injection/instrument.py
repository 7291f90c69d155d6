"""Instrumentation for fault injection (docs/method.md §8.1): the ONNX graph rewritten once.

The audited part of the model is cut in two at the earliest failure sites:

* the **prefix** computes, once per input, the clean *frontier* values the rest
  of the network needs (the outputs of the faulty layers, skip connections, …);
* the **suffix** recomputes only what lies after the failure sites, for many
  fault configurations at once.

A run of the suffix evaluates C configurations × m inputs. Its rows are
configuration-major (row = c·m + j); ``ra/cm`` = [C, m] is fed with every run.
At a failed layer's output ``y`` (per-input values of shape [m, *rest] or per-row
values [C·m, *rest]) the suffix computes, per configuration,

    y' = y · keep + value        keep, value: [C, 1, *rest]

so crashed neurons get keep 0 and value 0, byzantine ones keep 0 and their value,
and every other neuron keep 1 and value 0 (for crash-only campaigns the ``value``
input, always 0, is left out, and so is ``vsum`` below). A failed synapse i→j of a dense layer
(docs/method.md §2.1) delivers v instead of w_ji·y_i, i.e. its pre-activation changes by
v − w_ji·y_i:

    z' = z + (y_in · sel) · onehot + vsum
    sel[c, i, k] = −w_{j_k i_k}  at i = i_k,   onehot[c, k, j_k] = 1,   vsum[c, j] = Σ_{k: j_k = j} v_k

Only numpy and onnx are used here; onnxruntime lives in :mod:`robaudit.injection.sandbox`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from robaudit.errors import InputDataError, OptionError
from robaudit.graph.stored_words import FloatWord

if TYPE_CHECKING:  # the child process unpickles specs without importing the layer graph
    from robaudit.graph.layers import Layer
    from robaudit.graph.network import Network

#: Name of the [C, m] input of every suffix run.
CM_INPUT = "ra/cm"
#: The one float input of the audited model when the original has several (or token/held) inputs.
PACKED_INPUT = "ra/feed"
#: Bits of the stored integer codes a bit flip may hit (int8/uint8).
CODE_BITS = 8
_FLOAT_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class FaultSite:
    """One place where failures are injected: a layer's neurons or its incoming synapses."""

    #: ``neuron`` (the layer's output neurons fail) or ``synapse`` (its incoming synapses fail).
    kind: str
    #: The layer's short name and its 0-based position among the hidden layers.
    layer: str
    hidden_index: int
    #: The value rewritten: the layer's output (neuron) or pre-activation (synapse).
    point: str
    #: Shape of one sample of ``point`` (batch excluded).
    shape: tuple[int, ...]
    #: Synapse sites: the layer's input value and effective weight [out, in].
    source: str = ""
    weight: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: Bit-flip sites: (scale, zero point) per neuron and (qmin, qmax) of the stored codes.
    codes: tuple | None = field(default=None, compare=False, repr=False)
    #: Bit-flip sites storing float values: the IEEE-754 word (float32, float16) whose bits flip.
    word: FloatWord | None = None
    #: Neuron sites of a recurrent layer: its hidden state at the later time steps, rewritten with
    #: the same failed units and values as ``point`` (docs/method.md §14.1).
    tied: tuple[str, ...] = ()

    @property
    def points(self) -> tuple[str, ...]:
        """Every value this site rewrites: ``point`` and the tied ones."""
        return (self.point, *self.tied)

    @property
    def stored(self) -> bool:
        """Whether bits of the stored value are flipped (or stuck) at this site."""
        return self.codes is not None or self.word is not None

    @property
    def bits(self) -> int:
        """Bit-flip sites: the bit positions of a stored value (8 for integer codes, the word's width)."""
        return self.word.width if self.word is not None else CODE_BITS

    @property
    def neurons(self) -> int:
        """Elements of ``point`` per sample."""
        return int(np.prod(self.shape))

    @property
    def fan_in(self) -> int:
        """Synapse sites: incoming synapses per neuron."""
        return 0 if self.weight is None else int(self.weight.shape[1])

    def synapse_weight(self) -> np.ndarray:
        """The effective weight [out, in] of a synapse site.

        Raises:
            ValueError: the site is a neuron site (it has no weight).
        """
        if self.weight is None:
            raise ValueError(f"site '{self.layer}' is a {self.kind} site, not a synapse site")
        return self.weight


def neuron_site(
    layer: Layer, hidden_index: int, stored: bool = False, shape: tuple[int, ...] | None = None
) -> FaultSite:
    """The output neurons of ``layer`` as a failure site (``stored``: bit flips of its integer codes).

    ``shape``: one sample's shape when the layer's batch is not axis 0 (``Network.sample_shape``).
    """
    shape = tuple(layer.out_shape[1:]) if shape is None else tuple(shape)
    codes = layer.codes if stored else None
    word = layer.word if stored and layer.codes is None else None
    tied = tuple(member.output_value for member in layer.tied)
    return FaultSite("neuron", layer.name, hidden_index, layer.output_value, shape, codes=codes, word=word, tied=tied)


def synapse_site(layer: Layer, hidden_index: int) -> FaultSite:
    """The incoming synapses of a dense ``layer`` (2-D input and output) as a failure site."""
    if layer.summands:
        raise OptionError(
            f"--synapse injection into layer '{layer.name}' is not supported: it sums two affine ops of different "
            "inputs, whose synapses are theirs (docs/method.md §1.4); bound --synapse covers it"
        )
    if layer.kind != "dense" or len(layer.in_shape) != 2 or len(layer.out_shape) != 2 or layer.in_shape[0] != 1:
        raise OptionError(
            f"--synapse injection supports dense layers with a [batch, features] input; layer '{layer.name}' "
            f"is {layer.kind} with input shape {list(layer.in_shape)}"
        )
    return FaultSite(
        "synapse",
        layer.name,
        hidden_index,
        layer.preact_value,
        tuple(layer.out_shape[1:]),
        source=layer.input_value,
        weight=np.asarray(layer.weight, np.float64),
    )


@dataclass(frozen=True)
class FaultBatch:
    """C fault configurations that fail the same number of neurons/synapses per site.

    ``neurons[s]`` = (flat neuron indices [C, f], values [C, f]) for neuron site s;
    ``synapses[s]`` = (source neurons i [C, k], destination neurons j [C, k], values [C, k]).
    Sites that are not mentioned fail nothing in this batch.
    """

    count: int
    neurons: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    synapses: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def take(self, rows: slice) -> FaultBatch:
        """The configurations ``rows`` of this batch."""
        neurons = {s: (i[rows], v[rows]) for s, (i, v) in self.neurons.items()}
        synapses = {s: (i[rows], j[rows], v[rows]) for s, (i, j, v) in self.synapses.items()}
        count = len(range(*rows.indices(self.count)))
        return FaultBatch(count, neurons, synapses)


@dataclass(frozen=True)
class Instrumented:
    """The prefix and suffix models and the names the evaluator feeds."""

    #: Serialized prefix model (input → frontier values), or None when the frontier is the input alone.
    prefix: bytes | None
    #: Serialized suffix model (frontier + fault inputs → audited output).
    suffix: bytes
    #: The model input and its numpy dtype.
    input_name: str
    input_dtype: str
    #: Frontier values, in the order the prefix outputs them (may include the input).
    frontier: tuple[str, ...]
    #: Per-sample shapes of the frontier values.
    frontier_shapes: tuple[tuple[int, ...], ...]
    output_name: str
    sites: tuple[FaultSite, ...]
    #: numpy dtype of each site's rewritten value.
    site_dtypes: tuple[str, ...]
    #: Whether the model fixed its batch size to 1 (and a Reshape was made batch-agnostic).
    fixed_batch: bool = False
    #: Whether failed elements may send non-zero values (False: crash only, no value inputs).
    sends_values: bool = True
    notes: tuple[str, ...] = ()
    #: Whether every onnxruntime run must hold one sample: a dynamically quantized model's step is
    #: computed over the whole tensor, so a batch would change each sample's rounding (docs/method.md §11).
    one_sample: bool = False

    def site_input(self, index: int, role: str) -> str:
        """The suffix input name for a site: roles keep/value (neuron), sel/onehot/vsum (synapse)."""
        return f"ra/{role}/{index}"

    def encode(self, batch: FaultBatch) -> dict[str, np.ndarray]:
        """Feeds for the fault inputs of the suffix (docs/method.md §8): keep/value and synapse terms."""
        feeds: dict[str, np.ndarray] = {}
        for index, site in enumerate(self.sites):
            dtype = np.dtype(self.site_dtypes[index])
            if site.kind == "neuron":
                keep, value = neuron_masks(batch.count, site.neurons, batch.neurons.get(index), dtype)
                if site.stored:  # 2^B at flipped neurons, 1 elsewhere (never a division by 0)
                    value = np.where(keep == 0, value, 1).astype(dtype)
                shape = (batch.count, 1) + site.shape
                feeds[self.site_input(index, "keep")] = keep.reshape(shape)
                if self.sends_values:
                    feeds[self.site_input(index, "value")] = value.reshape(shape)
            else:
                sel, onehot, vsum = synapse_terms(batch.count, site.synapse_weight(), batch.synapses.get(index), dtype)
                feeds[self.site_input(index, "sel")] = sel
                feeds[self.site_input(index, "onehot")] = onehot
                if self.sends_values:
                    feeds[self.site_input(index, "vsum")] = vsum
        return feeds


# --------------------------------------------------------------------------- fault encodings (pure numpy)


def neuron_masks(count: int, neurons: int, faults, dtype) -> tuple[np.ndarray, np.ndarray]:
    """keep [C, N] (0 at failed neurons, else 1) and value [C, N] (the sent values, else 0)."""
    keep = np.ones((count, neurons), dtype)
    value = np.zeros((count, neurons), dtype)
    if faults is not None and faults[0].size:
        index, sent = faults
        np.put_along_axis(keep, index, 0, axis=1)
        np.put_along_axis(value, index, sent.astype(dtype), axis=1)
    return keep, value


def synapse_terms(count: int, weight: np.ndarray, faults, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sel [C, in, k], onehot [C, k, out], vsum [C, 1, out] for failed synapses i_k → j_k (docs/method.md §2.2)."""
    out, fan_in = weight.shape
    width = 0 if faults is None else faults[0].shape[1]
    sel = np.zeros((count, fan_in, max(width, 1)), dtype)
    onehot = np.zeros((count, max(width, 1), out), dtype)
    vsum = np.zeros((count, 1, out), dtype)
    if width:
        src, dst, sent = faults
        rows = np.repeat(np.arange(count), width)
        slots = np.tile(np.arange(width), count)
        sel[rows, src.reshape(-1), slots] = -weight[dst.reshape(-1), src.reshape(-1)]
        onehot[rows, slots, dst.reshape(-1)] = 1
        np.add.at(vsum, (rows, np.zeros_like(rows), dst.reshape(-1)), sent.reshape(-1))
    return sel, onehot, vsum


# --------------------------------------------------------------------------- the audited model


def _opset_imports(network: Network, opset: int) -> list:
    domains = {node.domain for node in network.graph.nodes if node.domain not in ("", "ai.onnx")}
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(domain, 3 if domain == "ai.onnx.ml" else 1) for domain in sorted(domains)]
    return imports


def _ancestor_nodes(network: Network, values: set[str]) -> list:
    """Nodes (in graph order) that ``values`` depend on."""
    producer = network.graph.producer
    needed: set[str] = set()
    stack = list(values)
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(v for v in node.inputs if v)
    return [node for node in network.graph.nodes if node.name in needed]


def feed_name(network: Network) -> str:
    """The audited model's one input: the original input, or the packed vector (docs/method.md §12.3)."""
    return PACKED_INPUT if network.packed else network.input_name


def _input_elem_type(network: Network) -> int:
    if network.packed:
        return TensorProto.FLOAT
    for info in network.graph.inputs:
        if info.name == network.input_name:
            return info.elem_type
    return TensorProto.FLOAT


def _fixed_batch(network: Network) -> bool:
    names = {spec.name for spec in network.variable_inputs}
    for info in network.graph.inputs:
        if info.name in names and info.dims:
            return info.dims[0] == 1
    return False


def _unfix_reshapes(protos: list, initializers: dict[str, np.ndarray]) -> int:
    """Make Reshape targets that hard-code batch 1 batch-agnostic (1 → −1, or 0 when −1 is taken)."""
    changed = 0
    for proto in protos:
        if proto.op_type != "Reshape" or len(proto.input) < 2 or proto.input[1] not in initializers:
            continue
        if any(a.name == "allowzero" and a.i == 1 for a in proto.attribute):
            continue
        shape = np.asarray(initializers[proto.input[1]]).reshape(-1)
        if shape.size < 1 or shape[0] != 1:
            continue
        fixed = shape.astype(np.int64).copy()
        fixed[0] = 0 if -1 in fixed[1:] else -1
        name = f"{proto.input[1]}/ra_batch"
        initializers[name] = fixed
        proto.input[1] = name
        changed += 1
    return changed


def _constant_outputs(protos: list) -> dict[str, np.ndarray]:
    """Values of ``Constant`` nodes (to find hard-coded Reshape targets)."""
    out = {}
    for proto in protos:
        if proto.op_type == "Constant" and proto.attribute and proto.attribute[0].name == "value":
            out[proto.output[0]] = numpy_helper.to_array(proto.attribute[0].t)
    return out


def audited_model(network: Network, opset: int) -> tuple[onnx.ModelProto, bool]:
    """The audited part of the model (input → ``network.output_name``) with a symbolic batch.

    Returns the model and whether the original fixed batch 1 (its hard-coded Reshape
    targets are then rewritten; the evaluator checks that batching still works).
    """
    nodes = _ancestor_nodes(network, {network.output_name})
    _refuse_varying_states(network, nodes)
    protos = [_copy(node.proto) for node in nodes]
    used = {v for proto in protos for v in proto.input}
    initializers = {k: v for k, v in network.graph.initializers.items() if k in used}
    fixed = _fixed_batch(network)
    if fixed:
        constants = _constant_outputs(protos)
        for name, value in constants.items():
            if any(p.op_type == "Reshape" and len(p.input) > 1 and p.input[1] == name for p in protos):
                initializers[name] = value
        protos = [p for p in protos if not (p.op_type == "Constant" and p.output[0] in initializers)]
        _unfix_reshapes(protos, initializers)
    elem = _input_elem_type(network)
    dims: list[str | int] = ["batch", *network.input_shape[1:]]
    if network.packed:
        unpack, held = _unpack(network)
        protos = unpack + protos
        initializers.update(held)
        dims = ["batch", packed_size(network)]
    graph = helper.make_graph(
        protos,
        "robaudit_audited",
        [helper.make_tensor_value_info(feed_name(network), elem, dims)],
        [helper.make_tensor_value_info(network.output_name, TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()],
    )
    imports = _opset_imports(network, opset)
    model = helper.make_model(graph, opset_imports=imports, producer_name="robaudit")
    model.ir_version = max(8, helper.find_min_ir_version_for(imports, ignore_unknown=True))
    _set_output_type(model, network.output_name)
    return model, fixed


def _refuse_varying_states(network: Network, nodes: list) -> None:
    """A GRU/LSTM initial state input lays the batch on axis 1; samples are fed on axis 0
    (docs/method.md §14.1): such an input must be held at a value for injection."""
    from robaudit.graph.recurrent import state_inputs  # not at import: the child process never needs it

    varying = sorted(state_inputs(nodes) & {spec.name for spec in network.variable_inputs})
    if varying:
        raise OptionError(
            f"inject: the recurrent state input '{varying[0]}' varies over a range; hold it at a value with "
            f"--input-value {varying[0]}=FILE.npy (bound covers the whole range)"
        )


def packed_size(network: Network) -> int:
    """Length of the packed feed vector: the elements of every variable input (batch excluded)."""
    return sum(int(np.prod(spec.shape[1:], dtype=np.int64)) for spec in network.variable_inputs)


def feed_shape(network: Network) -> tuple[int, ...]:
    """Shape of one fed sample (batch excluded): the input's, or the packed vector's."""
    return (packed_size(network),) if network.packed else tuple(network.input_shape[1:])


def load_feed(path, network: Network) -> tuple[np.ndarray, str]:
    """Inputs from a ``.npy``/``.npz`` file as the network is fed (:func:`feed_shape`), and where they came
    from; for several inputs, a wrong shape is explained with the packed layout (docs/method.md §12.3).

    Raises:
        InputDataError: the file is missing, unreadable, of another shape, or holds NaN/Inf.
    """
    from robaudit.inputs import load_inputs

    try:
        return load_inputs(path, feed_shape(network))
    except InputDataError as exc:
        if not network.packed or "shape" not in str(exc):
            raise
        parts = " + ".join(f"'{spec.name}' {int(np.prod(spec.shape[1:], dtype=np.int64))}"
                           for spec in network.variable_inputs)
        raise InputDataError(f"{exc} (the inputs packed into one vector per sample: {parts})") from None


def _unpack(network: Network) -> tuple[list, dict[str, np.ndarray]]:
    """Nodes that cut the packed feed into the original inputs, and the held inputs as initializers."""
    nodes, held, offset = [], {}, 0
    for spec in network.inputs:
        if spec.value is not None:
            held[spec.name] = np.asarray(spec.value).astype(helper.tensor_dtype_to_np_dtype(spec.elem_type))
            continue
        size = int(np.prod(spec.shape[1:], dtype=np.int64))
        consts = {"starts": [offset], "ends": [offset + size], "axes": [1], "shape": [-1, *spec.shape[1:]]}
        names = {key: f"ra/unpack/{spec.name}/{key}" for key in consts}
        for key, values in consts.items():
            held[names[key]] = np.asarray(values, np.int64)
        flat, shaped = f"ra/unpack/{spec.name}/flat", f"ra/unpack/{spec.name}/shaped"
        last = spec.name if spec.elem_type == TensorProto.FLOAT else shaped
        nodes.append(helper.make_node("Slice", [PACKED_INPUT, names["starts"], names["ends"], names["axes"]], [flat]))
        nodes.append(helper.make_node("Reshape", [flat, names["shape"]], [last]))
        if last != spec.name:
            nodes.append(helper.make_node("Cast", [shaped], [spec.name], to=spec.elem_type))
        offset += size
    return nodes, held


def _copy(proto):
    clone = onnx.NodeProto()
    clone.CopyFrom(proto)
    return clone


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of every value, from onnx's type inference (unknown values are missing)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is only a convenience; fall back to the input's type
        inferred = model
    types = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        elem = info.type.tensor_type.elem_type
        if elem:
            types[info.name] = elem
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    return types


def _set_output_type(model: onnx.ModelProto, name: str) -> None:
    elem = _elem_types(model).get(name, model.graph.input[0].type.tensor_type.elem_type)
    model.graph.output[0].type.tensor_type.elem_type = elem


# --------------------------------------------------------------------------- prefix / suffix split


def _downstream(protos: list, start: set[str]) -> list[int]:
    """Indices of the nodes that (transitively) read one of ``start``."""
    tainted, chosen = set(start), []
    for index, proto in enumerate(protos):
        if any(v in tainted for v in proto.input):
            chosen.append(index)
            tainted.update(v for v in proto.output if v)
    return chosen


def _suffix_nodes(protos: list, network: Network, sites: tuple[FaultSite, ...]) -> tuple[list[int], list[str]]:
    """The suffix's nodes and its frontier (per-input values computed by the prefix)."""
    points = {point for site in sites for point in site.points} or {feed_name(network)}
    reads = {site.source for site in sites if site.source}
    chosen = set(_downstream(protos, points))
    producer = {out: i for i, p in enumerate(protos) for out in p.output if out}
    initializers = set(network.graph.initializers)
    while True:
        produced = {out for i in chosen for out in protos[i].output}
        wanted = {v for i in chosen for v in protos[i].input if v} | points | reads
        missing = [v for v in wanted - produced if v not in initializers]
        fed = set(network.clean) | {feed_name(network)}
        pulled = {producer[v] for v in missing if v not in fed and v in producer}
        if not pulled - chosen:
            frontier = sorted(v for v in missing if v in fed)
            return sorted(chosen), frontier
        chosen |= pulled


def instrument(
    network: Network, sites: tuple[FaultSite, ...], opset: int, sends_values: bool = True, stuck: int | None = None
) -> Instrumented:
    """Build the prefix and suffix models for ``sites`` (once per campaign).

    ``sends_values=False`` (crash only: every failed element sends 0) drops the value inputs.
    At bit-flip sites (``site.codes``) the ``value`` input holds 2^B per failed neuron (1
    elsewhere) and the bit is flipped, or stuck at ``stuck``, in the graph.
    """
    if opset < 11 and any(site.kind == "synapse" for site in sites):
        raise OptionError(f"synapse injection needs opset ≥ 11 (MatMul broadcasting); the model declares {opset}")
    base, fixed = audited_model(network, opset)
    types = _elem_types(base)
    input_type = base.graph.input[0].type.tensor_type.elem_type
    protos = list(base.graph.node)
    chosen, frontier = _suffix_nodes(protos, network, sites)
    feed = feed_name(network)
    frontier = [v for v in frontier if v != feed] + ([feed] if feed in frontier else [])
    shapes = tuple(network.sample_shape(v) if v in network.clean else (packed_size(network),) for v in frontier)
    prefix = _prefix_model(base, network, frontier, types)
    sends_values = sends_values or any(site.stored for site in sites)
    builder = _SuffixBuilder(base, network, sites, frontier, types, sends_values, stuck)
    suffix = builder.build([protos[i] for i in chosen])
    site_dtypes = tuple(np.dtype(_FLOAT_NP.get(types.get(site.point, input_type), np.float32)).name for site in sites)
    # A fixed batch of 1 (every torch export) is made symbolic silently: nothing the user must know.
    notes: tuple[str, ...] = ()
    return Instrumented(
        prefix=None if prefix is None else prefix.SerializeToString(),
        suffix=suffix.SerializeToString(),
        input_name=feed,
        input_dtype=np.dtype(_FLOAT_NP.get(input_type, np.float32)).name,
        frontier=tuple(frontier),
        frontier_shapes=shapes,
        output_name=network.output_name,
        sites=sites,
        site_dtypes=site_dtypes,
        fixed_batch=fixed,
        sends_values=sends_values,
        notes=notes,
        one_sample=any(node.op_type == "DynamicQuantizeLinear" for node in network.graph.nodes),
    )


def _prefix_model(base: onnx.ModelProto, network: Network, frontier: list[str], types) -> onnx.ModelProto | None:
    outputs = [v for v in frontier if v != feed_name(network)]
    if not outputs:
        return None
    tainted_needed: set[str] = set(outputs)
    protos = list(base.graph.node)
    keep = [False] * len(protos)
    for index in range(len(protos) - 1, -1, -1):
        if any(out in tainted_needed for out in protos[index].output):
            keep[index] = True
            tainted_needed.update(v for v in protos[index].input if v)
    moved = [v for v in outputs if network.layout(v) is not None]
    nodes = [_copy(p) if moved else p for p, k in zip(protos, keep, strict=True) if k]  # renamed below
    nodes += _batch_first(nodes, network, moved)
    used = {v for p in nodes for v in p.input}
    inits = [t for t in base.graph.initializer if t.name in used]
    elem_default = base.graph.input[0].type.tensor_type.elem_type
    graph = helper.make_graph(
        nodes,
        "robaudit_prefix",
        list(base.graph.input),
        [helper.make_tensor_value_info(v, types.get(v, elem_default), None) for v in outputs],
        inits,
    )
    return _with_header(graph, base)


def _batch_first(nodes: list, network: Network, moved: list[str]) -> list:
    """Prefix outputs with the batch moved to axis 0 (docs/method.md §13.4): each such value is renamed
    inside ``nodes`` and nodes are returned that give it, under its own name, as [batch, *sample shape]."""
    added: list = []
    for value in moved:
        layout = network.layout(value)
        assert layout is not None
        natural = f"{value}/natural"
        for proto in nodes:
            proto.output[:] = [natural if v == value else v for v in proto.output]
            proto.input[:] = [natural if v == value else v for v in proto.input]
        shape = network.clean[value].shape
        names = [f"ra/batch_first/{value}/{k}" for k in ("expanded", "split", "front", "rows")]
        targets = (layout.expanded(shape, -1), (-1, *network.sample_shape(value)))
        constants = [numpy_helper.from_array(np.asarray(target, np.int64)) for target in targets]
        added += [
            helper.make_node("Constant", [], [names[0]], value=constants[0]),
            helper.make_node("Reshape", [natural, names[0]], [names[1]]),
            helper.make_node("Transpose", [names[1]], [names[2]], perm=layout.to_front(len(shape))),
            helper.make_node("Constant", [], [names[3]], value=constants[1]),
            helper.make_node("Reshape", [names[2], names[3]], [value]),
        ]
    return added


def _with_header(graph, base: onnx.ModelProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=list(base.opset_import), producer_name="robaudit")
    model.ir_version = base.ir_version
    return model


class _SuffixBuilder:
    """Assembles the suffix graph: frontier inputs, copied nodes, fault rewrites."""

    def __init__(
        self, base, network: Network, sites, frontier: list[str], types, sends_values: bool, stuck: int | None = None
    ):
        self.base, self.network, self.sites = base, network, sites
        self.stuck = stuck
        self.sends_values = sends_values
        self.frontier = set(frontier)
        self.frontier_order = frontier
        self.types = types
        self.default_type = base.graph.input[0].type.tensor_type.elem_type
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = [helper.make_tensor_value_info(CM_INPUT, TensorProto.INT64, [2])]
        self._count = 0
        self._shape3: dict[tuple[int, ...], str] = {}
        self.rewritten = {point for site in sites for point in site.points}
        self._fault_inputs: dict[str, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"ra/{hint}/{self._count}"

    def _const(self, values, hint: str = "shape") -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def _add(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self._name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _type(self, value: str) -> int:
        return self.types.get(value, self.default_type)

    def rest(self, value: str) -> tuple[int, ...]:
        """Per-sample shape of a value (from the clean intervals at batch 1)."""
        return self.network.sample_shape(value)

    def shape3(self, rest: tuple[int, ...]) -> str:
        """A [C, m, *rest] shape tensor built from the ``ra/cm`` input."""
        if rest not in self._shape3:
            tail = self._const(list(rest), "rest") if rest else None
            parts = [CM_INPUT] + ([tail] if tail else [])
            self._shape3[rest] = self._add("Concat", parts, "shape3", axis=0) if tail else CM_INPUT
        return self._shape3[rest]

    def per_input3(self, value: str) -> str:
        """A frontier value [m, *rest] as [1, m, *rest]."""
        return self._add("Reshape", [f"ra_in/{value}", self._const([1, -1, *self.rest(value)])], "in3")

    def per_row3(self, name: str, value: str) -> str:
        """The per-row tensor ``name`` (rows of ``value``, [C·m, *rest]) as [C, m, *rest]; a value whose batch
        is not axis 0 is first put batch first (docs/method.md §13.4)."""
        layout = self.network.layout(value)
        if layout is not None:
            shape = self.network.clean[value].shape
            split = self._add("Reshape", [name, self._const(list(layout.expanded(shape, -1)))], "split")
            name = self._add("Transpose", [split], "front", perm=layout.to_front(len(shape)))
        return self._add("Reshape", [name, self.shape3(self.rest(value))], "row3")

    def flatten_rows(self, value3: str, value: str) -> None:
        """[C, m, *rest] back to rows [C·m, *rest], named ``value`` for the original consumers (in the value's
        own layout when its batch is not axis 0)."""
        layout = self.network.layout(value)
        if layout is None:
            shape = self._const([-1, *self.rest(value)])
            self.nodes.append(helper.make_node("Reshape", [value3, shape], [value], name=f"ra/rows/{value}"))
            return
        natural = self.network.clean[value].shape
        rows = self._add("Reshape", [value3, self._const([-1, *layout.front_shape(natural)])], "rows")
        back = list(np.argsort(layout.to_front(len(natural))))
        moved = self._add("Transpose", [rows], "back", perm=[int(k) for k in back])
        target = self._const(list(natural[: layout.axis]) + [-1] + list(natural[layout.axis + 1 :]))
        self.nodes.append(helper.make_node("Reshape", [moved, target], [value], name=f"ra/rows/{value}"))

    def _fault_input(self, index: int, role: str, value: str, dims) -> str:
        name = f"ra/{role}/{index}"
        if name not in self._fault_inputs:  # a recurrent site reads the same inputs at every time step
            self.inputs.append(helper.make_tensor_value_info(name, self._type(value), dims))
            self._fault_inputs[name] = value
        return name

    def rewrite(self, value: str) -> None:
        """Nodes producing the faulty ``value`` from its clean version (synapses first, then neurons)."""
        source = self.per_input3(value) if value in self.frontier else self.per_row3(f"{value}/clean", value)
        for index, site in enumerate(self.sites):
            if site.point == value and site.kind == "synapse":
                source = self._synapse(index, site, source)
        for index, site in enumerate(self.sites):
            if value in site.points and site.kind == "neuron":
                keep = self._fault_input(index, "keep", value, ["configs", 1, *site.shape])
                if site.stored:
                    power = self._fault_input(index, "value", value, ["configs", 1, *site.shape])
                    flip = self._flipped if site.codes is not None else self._flipped_float
                    source = flip(source, keep, power, site)
                    continue
                source = self._add("Mul", [source, keep], "kept")
                if self.sends_values:
                    sent = self._fault_input(index, "value", value, ["configs", 1, *site.shape])
                    source = self._add("Add", [source, sent], "faulty")
        self.flatten_rows(source, value)

    def _float(self, values, hint: str) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    def _flipped(self, y: str, keep: str, power: str, site: FaultSite) -> str:
        """y·keep + (1 − keep)·y' with y' the dequantized value after bit log2(P) of the stored
        code changed (docs/method.md §2.3): q = round(y/s) + zp; u = q mod 2^w (two's
        complement); b = ⌊u/P⌋ mod 2; u' = u + (1 − 2b)·P (flip) or + (v − b)·P (stuck at v)."""
        assert site.codes is not None
        scale, zp, qmin, qmax = site.codes
        shape = (1, 1, *site.shape)
        s = self._float(np.asarray(scale, np.float64).reshape(shape), "scale")
        z = self._float(np.asarray(zp, np.float64).reshape(shape), "zp")
        span = float(qmax - qmin + 1)
        q = self._add("Add", [self._add("Round", [self._add("Div", [y, s], "ys")], "q0"), z], "q")
        u = self._add("Mod", [self._add("Add", [q, self._float(span, "span")], "qs"), self._float(span, "span")],
                      "u", fmod=1)
        bit = self._add("Mod", [self._add("Floor", [self._add("Div", [u, power], "up")], "uf"),
                                self._float(2.0, "two")], "b", fmod=1)
        if self.stuck is None:
            step = self._add("Sub", [self._float(1.0, "one"), self._add("Mul", [bit, self._float(2.0, "two")], "b2")],
                             "sgn")
        else:
            step = self._add("Sub", [self._float(float(self.stuck), "stuck"), bit], "sgn")
        u2 = self._add("Add", [u, self._add("Mul", [step, power], "du")], "u2")
        if qmin < 0:  # back from the unsigned pattern to the signed code
            high = self._add("Cast", [self._add("Greater", [u2, self._float(qmax + 0.5, "top")], "neg")], "negf",
                             to=TensorProto.FLOAT)
            u2 = self._add("Sub", [u2, self._add("Mul", [high, self._float(span, "span")], "wrap")], "q2")
        faulty = self._add("Mul", [self._add("Sub", [u2, z], "c2"), s], "y2")
        kept = self._add("Mul", [y, keep], "kept")
        dropped = self._add("Sub", [self._float(1.0, "one"), keep], "drop")
        return self._add("Add", [kept, self._add("Mul", [faulty, dropped], "flip")], "faulty")

    def _where(self, condition: str, a: str, b: str) -> str:
        return self._add("Where", [condition, a, b], "where")

    def _flipped_float(self, y: str, keep: str, power: str, site: FaultSite) -> str:
        """y·keep + (1 − keep)·y' with y' the stored y with bit B = log2(P) of its IEEE-754 word (float32 or
        float16, ``site.word``) flipped (or stuck), in float arithmetic (docs/method.md §2.3): with m mantissa
        bits, y = ±(1 + M/2^m)·2^(e−bias) (e = 0: ±M·2^(1−bias−m)); the highest bit is the sign, the bits
        from m up the exponent e, 0..m−1 the mantissa M. Every step is exact in float32 for such a y."""
        word = site.word
        assert word is not None
        m, bias, top = float(word.mantissa_bits), float(word.bias), float(word.exponent_all_ones)
        f = lambda v, hint="c": self._float(v, hint)  # noqa: E731
        op = self._add
        a = op("Abs", [y], "abs")
        negative = op("Less", [y, f(0.0)], "neg")
        sign = self._where(negative, f(-1.0), f(1.0))
        bit = op("Round", [op("Div", [op("Log", [power], "lp"), f(np.log(2.0))], "lb")], "bit")
        tiny = op("Less", [a, f(word.min_normal)], "sub")
        guess = op("Floor", [op("Div", [op("Log", [op("Max", [a, f(word.min_normal)], "am")], "la"),
                                        f(np.log(2.0))], "e0")], "ef")
        mant = op("Div", [a, op("Pow", [f(2.0), guess], "p0")], "m0")  # in [1, 2) up to Log's error
        guess = op("Add", [guess, op("Sub", [op("Cast", [op("GreaterOrEqual", [mant, f(2.0)], "hi")], "hif",
                                                  to=TensorProto.FLOAT),
                                             op("Cast", [op("Less", [mant, f(1.0)], "lo")], "lof",
                                                to=TensorProto.FLOAT)], "adj")], "e1")
        exponent = self._where(tiny, f(0.0), op("Add", [guess, f(bias)], "eb"))
        scale_e = self._where(tiny, f(word.min_normal), op("Pow", [f(2.0), guess], "p1"))
        fraction = op("Div", [a, scale_e], "fr")  # 1.f (normal) or 0.f (subnormal)
        mantissa = op("Mul", [self._where(tiny, fraction, op("Sub", [fraction, f(1.0)], "f1")), f(2.0**m)], "M")
        # mantissa bit B < m
        m_bit = op("Mod", [op("Floor", [op("Div", [mantissa, power], "mp")], "mf"), f(2.0)], "mb", fmod=1)
        m_new = op("Add", [mantissa, op("Mul", [self._step(m_bit), power], "md")], "M2")
        normal_m = op("Mul", [op("Add", [f(1.0), op("Div", [m_new, f(2.0**m)], "mq")], "m1"), scale_e], "vm")
        sub_m = op("Mul", [m_new, f(word.subnormal_step)], "vs")
        by_mantissa = self._where(tiny, sub_m, normal_m)
        # exponent bit B − m
        k_pow = op("Pow", [f(2.0), op("Sub", [bit, f(m)], "k")], "K")
        e_bit = op("Mod", [op("Floor", [op("Div", [exponent, k_pow], "ek")], "ekf"), f(2.0)], "eb2", fmod=1)
        e_new = op("Add", [exponent, op("Mul", [self._step(e_bit), k_pow], "ed")], "e2")
        frac = op("Div", [mantissa, f(2.0**m)], "fq")
        unbiased = op("Sub", [op("Max", [e_new, f(1.0)], "e3"), f(bias)], "e4")
        as_normal = op("Mul", [op("Add", [f(1.0), frac], "n1"), op("Pow", [f(2.0), unbiased], "p2")], "vn")
        as_sub = op("Mul", [frac, f(word.min_normal)], "vz")
        special = self._where(op("Equal", [frac, f(0.0)], "f0"), f(np.inf), f(np.nan))
        by_exponent = self._where(op("Equal", [e_new, f(top)], "inf"), special,
                                  self._where(op("Equal", [e_new, f(0.0)], "zero"), as_sub, as_normal))
        magnitude = self._where(op("Less", [bit, f(m)], "ism"), by_mantissa, by_exponent)
        flipped_sign = op("Neg", [sign], "ns") if self.stuck is None else self._where(
            op("Equal", [f(float(self.stuck)), f(1.0)], "s1"), f(-1.0), f(1.0))
        faulty = self._where(op("Equal", [bit, f(float(word.sign_bit))], "iss"), op("Mul", [a, flipped_sign], "vsg"),
                             op("Mul", [magnitude, sign], "vmg"))
        kept = op("Mul", [y, keep], "kept")
        dropped = op("Sub", [f(1.0), keep], "drop")
        # Where, not a product: a NaN/Inf y' must not leak into the neurons that keep their value
        return self._where(op("Equal", [keep, f(1.0)], "kp"), kept, op("Add", [kept, op("Mul", [faulty, dropped],
                                                                                           "flip")], "faulty"))

    def _step(self, bit: str) -> str:
        """How the pattern's bit changes: 1 − 2b (flip) or v − b (stuck at v)."""
        if self.stuck is None:
            return self._add("Sub", [self._float(1.0, "one"), self._add("Mul", [bit, self._float(2.0, "two")], "b2")],
                             "step")
        return self._add("Sub", [self._float(float(self.stuck), "stuck"), bit], "step")

    def _synapse(self, index: int, site: FaultSite, source: str) -> str:
        x = site.source
        x3 = self.per_input3(x) if x in self.frontier and x not in self.rewritten else self.per_row3(x, x)
        out, fan_in = site.synapse_weight().shape
        sel = self._fault_input(index, "sel", site.point, ["configs", fan_in, "k"])
        onehot = self._fault_input(index, "onehot", site.point, ["configs", "k", out])
        delta = self._add("MatMul", [self._add("MatMul", [x3, sel], "picked"), onehot], "delta")
        source = self._add("Add", [source, delta], "syn")
        if not self.sends_values:
            return source
        vsum = self._fault_input(index, "vsum", site.point, ["configs", 1, out])
        return self._add("Add", [source, vsum], "syn_sent")

    def expand(self, value: str) -> None:
        """A frontier value read by suffix nodes but not rewritten: repeated for every configuration."""
        rows3 = self._add("Expand", [self.per_input3(value), self.shape3(self.rest(value))], "expand")
        self.flatten_rows(rows3, value)

    def build(self, suffix_protos: list) -> onnx.ModelProto:
        """The suffix model: inputs, rewrites and copied nodes in topological order."""
        read = {v for p in suffix_protos for v in p.input if v}
        for value in self.frontier_order:
            self.inputs.append(
                helper.make_tensor_value_info(f"ra_in/{value}", self._type(value), ["inputs", *self.rest(value)])
            )
            if value in self.rewritten:
                self.rewrite(value)
            elif value in read or value == self.network.output_name:
                self.expand(value)
        for proto in suffix_protos:
            clone = _copy(proto)
            for k, out in enumerate(clone.output):
                if out in self.rewritten:
                    clone.output[k] = f"{out}/clean"
            self.nodes.append(clone)
            for out in proto.output:
                if out in self.rewritten:
                    self.rewrite(out)
        used = {v for p in self.nodes for v in p.input}
        self.inits += [t for t in self.base.graph.initializer if t.name in used]
        out_type = self._type(self.network.output_name)
        graph = helper.make_graph(
            _topological(self.nodes, {i.name for i in self.inputs} | {t.name for t in self.inits}),
            "robaudit_suffix",
            self.inputs,
            [helper.make_tensor_value_info(self.network.output_name, out_type, None)],
            self.inits,
        )
        return _with_header(graph, self.base)


def _topological(nodes: list, available: set[str]) -> list:
    """A topological order of NodeProtos, stable where the given order already is one."""
    ready_values = set(available)
    pending = list(nodes)
    ordered = []
    while pending:
        waiting = []
        for node in pending:
            if all(not v or v in ready_values for v in node.input):
                ordered.append(node)
                ready_values.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({v for n in waiting for v in n.input if v and v not in ready_values})
            raise AssertionError(f"instrumented graph reads undefined values {missing[:5]}")
        pending = waiting
    return ordered
