"""ONNX rewrites and onnxruntime runs behind the applications (docs/method.md §9.1).

* ``design --write``: a copy of the model with every layer's weight multiplied by s;
* ``precision --check``: each hidden layer's output rounded to b bits over its range,
  ``y' = Floor((y − lo)/step + 1/2)·step + lo`` (in double), switched on per layer by
  a fed flag, or each layer's weights replaced by rounded ones (``--weights``);
* ``wait --check``: each layer's weight fed as an input, with r_l incoming synapses of
  every neuron set to 0 at random (conv: the same kernel taps at every position).

The base model is :func:`robaudit.injection.instrument.audited_model` (the audited part of the
graph, batch made symbolic). One session per check; configurations are fed, never
rebuilt. Reference and faulty outputs come from the same session, so they differ only
by the simulated perturbation and float32 noise, which ``FLOAT_TOLERANCE`` allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from robaudit.applications.results import CheckRun, PrecisionResult, SimulationCheck, WaitResult
from robaudit.errors import InjectionRuntimeError, OptionError, UnsupportedModelError
from robaudit.graph.inputs import feed_box, sample_feed
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.injection.instrument import audited_model, feed_shape
from robaudit.injection.sandbox import open_session
from robaudit.inputs import load_inputs as read_inputs
from robaudit.inputs import outside_domain, sample_inputs

#: Measured errors may exceed a bound by this much times (1 + max |F|): float32 arithmetic.
FLOAT_TOLERANCE = 1e-5
#: Inputs per onnxruntime run.
CHUNK = 256
_NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}


# --------------------------------------------------------------------------- design: scaled copy


def scale_weights(proto: onnx.ModelProto, network: Network, factor: float) -> onnx.ModelProto:
    """A copy of the model with the weight of every layer's affine op multiplied by ``factor``.

    Biases (and folded normalization shifts) are untouched: the effective weight of
    every layer is multiplied by ``factor``, which is what ``design``'s shrink factor
    means. A weight initializer read only by the edited nodes is scaled in place; any
    other weight gets a scaled copy under a new name. A dynamically quantized layer keeps
    its integer codes and has its weight scale multiplied (:func:`_weight_slot`).
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    by_output = {node.output[0]: node for node in graph.node if node.output}
    # a sum layer's identity map is robaudit's, not the model's: its summands carry its weights (§1.4)
    slots = [(_weight_slot(network, la, by_output), la) for la in network.layers if not la.summands]
    edited = {id(node) for (node, _), _ in slots}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in graph.initializer}
    scaled: set[str] = set()
    for (node, position), layer in slots:
        weight = node.input[position]
        only_edited = all(id(c) in edited for c in consumers.get(weight, []))
        if weight in initializers and only_edited:
            if weight not in scaled:
                array = numpy_helper.to_array(initializers[weight])
                initializers[weight].CopyFrom(numpy_helper.from_array((array * factor).astype(array.dtype), weight))
                scaled.add(weight)
            continue
        value = np.asarray(network.constants[weight])
        name = f"{weight}/robaudit_scaled/{layer.name}"
        graph.initializer.append(numpy_helper.from_array((value * factor).astype(value.dtype), name))
        node.input[position] = name
    return model


def _weight_slot(
    network: Network, layer: Layer, by_output: dict[str, onnx.NodeProto]
) -> tuple[onnx.NodeProto, int]:
    """The node of ``proto`` and the input position holding the weight that scales ``layer``'s.

    Input 1 of the layer's affine node; for a layer fused from ``quantize_dynamic``'s
    ``Mul(Cast(MatMulInteger(codes, W_codes, …)), Mul(s, W_scale))`` (docs/method.md §11), whose
    affine node exists only in robaudit's reading, ``W_scale`` in the ``Mul(s, W_scale)``: the weight
    is (W_codes − W_zp)·W_scale, so scaling W_scale scales it exactly and keeps the int8 codes.
    """
    try:
        return _plain_slot(anchor_node(network, layer), by_output), 1
    except InjectionRuntimeError:
        pass
    fused = next((node for node in network.nodes if node.name == layer.nodes[0]), None)
    slot = None if fused is None else _dynamic_slot(fused.outputs[0], fused.inputs[1], by_output)
    if slot is None:
        raise UnsupportedModelError(
            f"layer '{layer.name}': its affine node '{layer.nodes[0]}' is not in the model, so its weights cannot "
            "be scaled", node=layer.nodes[0])
    return slot


def _plain_slot(anchor, by_output: dict[str, onnx.NodeProto]) -> onnx.NodeProto:
    """The model's node that is ``anchor`` (a node of the graph robaudit read)."""
    return by_output[anchor.outputs[0]]


def _dynamic_slot(
    output: str, weight: str, by_output: dict[str, onnx.NodeProto]
) -> tuple[onnx.NodeProto, int] | None:
    """``Mul(s, W_scale)`` and W_scale's position behind the fused affine node giving ``output`` from the
    dequantized ``weight`` (``<W_codes>/ra_dequantized``), or None (see :func:`_weight_slot`)."""
    final = by_output.get(output)
    if final is None or final.op_type != "Mul" or len(final.input) != 2:
        return None
    for k, value in enumerate(final.input):
        cast, scales = by_output.get(value), by_output.get(final.input[1 - k])
        integer = by_output.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        if integer is None or integer.op_type not in ("MatMulInteger", "ConvInteger") or scales is None:
            continue
        if len(integer.input) < 2 or weight != f"{integer.input[1]}/ra_dequantized":
            continue
        quant = by_output.get(integer.input[0])
        if quant is None or quant.op_type != "DynamicQuantizeLinear" or scales.op_type != "Mul":
            continue
        others = [p for p, v in enumerate(scales.input) if v != quant.output[1]]
        if len(others) == 1:
            return scales, others[0]
    return None


def check_model_target(target: Path, model: Path, flag: str, what: str) -> None:
    """A model file to write: a .onnx name in an existing folder, not the model being read (it would be lost).

    Raises:
        OptionError: any of these does not hold.
    """
    if target.suffix.lower() != ".onnx":
        raise OptionError(f"{flag} takes a .onnx file name, got '{target}'")
    if target.resolve() == model.resolve():
        raise OptionError(f"{flag} '{target}' is the model being read; write {what} elsewhere")
    if not target.parent.is_dir():
        raise OptionError(f"{flag} '{target}': the folder '{target.parent}' does not exist")


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` to ``path`` (one file, no external data)."""
    try:
        onnx.save(model, str(path))
    except OSError as exc:
        raise OptionError(f"cannot write model '{path}': {exc.strerror}") from None


def anchor_node(network: Network, layer: Layer):
    """The layer's affine node (its first node)."""
    for node in network.graph.nodes:
        if node.name == layer.nodes[0]:
            return node
    raise InjectionRuntimeError(f"layer '{layer.name}': its affine node '{layer.nodes[0]}' is not in the graph")


# --------------------------------------------------------------------------- inputs


def _packed_inputs(path: Path | None, samples: int, network: Network, seed: int) -> tuple[np.ndarray, str, list[str]]:
    if path is None:
        x = sample_feed(network.inputs, samples, np.random.default_rng(seed), network.packed)
        return x, f"{samples} samples uniform in the input boxes", []
    x, where = read_inputs(path, feed_shape(network))
    outside = outside_domain(x, feed_box(network.inputs, network.packed))
    notes = [f"{outside:.1%} of the input values lie outside the input boxes; the bound does not cover them"]
    return x, f"{len(x)} inputs from {where}", notes if outside > 0 else []


def load_inputs(
    path: Path | None, samples: int, network: Network, seed: int = 0, packed: bool = False
) -> tuple[np.ndarray, str, list[str]]:
    """Inputs for a check: a ``.npy``/``.npz`` file or ``samples`` uniform draws from the domain.

    Reading and checking is :mod:`robaudit.inputs` (the same as ``inject``). Returns
    the inputs [n, *shape], where they came from, and a note when some lie outside
    the input range (the bound does not cover them).

    With ``packed`` a model with several, token, held or per-element inputs gets one packed
    vector per sample, as ``inject`` (docs/method.md §12.3).

    Raises:
        UnsupportedModelError: the model has several, token or held inputs (only ``inject`` feeds those).
    """
    if packed and (network.packed or network.inputs[0].source != "--input-range"):
        return _packed_inputs(path, samples, network, seed)
    if network.packed or network.inputs[0].source != "--input-range":
        raise UnsupportedModelError(
            "--check runs models with one float input and a plain --input-range; "
            "use robaudit inject for several, token, held or per-element inputs"
        )
    shape = tuple(network.input_shape[1:])
    lo, hi = network.input_range
    if path is None:
        x = sample_inputs(samples, shape, network.input_range, np.random.default_rng(seed))
        return x, f"{samples} samples uniform in [{lo:g}, {hi:g}]", []
    x, where = read_inputs(path, shape)
    outside = outside_domain(x, network.input_range)
    notes = []
    if outside > 0:
        notes.append(
            f"{outside:.1%} of the input values lie outside the input range [{lo:g}, {hi:g}]; "
            "the bound does not cover them"
        )
    return x, f"{len(x)} inputs from {where}", notes


# --------------------------------------------------------------------------- running


class _Runner:
    """One onnxruntime session of a rewritten audited model, on a fixed set of inputs, in a contained
    child process as ``inject``'s (docs/method.md §8: a native crash, runaway allocation or hang is one
    error line). A context manager: the child stops on exit."""

    def __init__(self, model: onnx.ModelProto, network: Network, inputs: np.ndarray, fixed_batch: bool):
        self.session = open_session(model.SerializeToString())
        elem = model.graph.input[0].type.tensor_type.elem_type
        self.inputs = inputs.astype(_NP_TYPES.get(elem, np.float32))
        self.input_name = network.input_name
        self.output_name = network.output_name
        # a dynamically quantized model computes its step over the whole batch: one sample per run (§11)
        dynamic = any(node.op_type == "DynamicQuantizeLinear" for node in model.graph.node)
        self.chunk = 1 if fixed_batch or dynamic else CHUNK
        self.reference: np.ndarray | None = None

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def outputs(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The audited output for every input, float64 [n, K]."""
        parts = []
        for start in range(0, len(self.inputs), self.chunk):
            run_feeds = dict(feeds)
            run_feeds[self.input_name] = self.inputs[start : start + self.chunk]
            (out,) = self.session.run([self.output_name], run_feeds)
            parts.append(np.asarray(out, np.float64).reshape(len(run_feeds[self.input_name]), -1))
        return np.concatenate(parts)

    def errors(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """err(x) = max_k |F̃_k(x) − F_k(x)| per input (docs/method.md §1.1), against the reference feeds."""
        return np.abs(self.outputs(feeds) - self.reference).max(axis=1)

    @property
    def tolerance(self) -> float:
        """Float32 allowance: FLOAT_TOLERANCE·(1 + max |F|)."""
        if self.reference is None:
            raise ValueError("the reference outputs are not computed yet")
        return FLOAT_TOLERANCE * (1.0 + float(np.abs(self.reference).max(initial=0.0)))


def _run(
    runner: _Runner, config: str, bound: float, feeds_list: Sequence[dict], site: str = "", setting: int | None = None
) -> CheckRun:
    """Measure one configuration (several random trials share the bound)."""
    errors = np.concatenate([runner.errors(feeds) for feeds in feeds_list])
    worst, bound = float(errors.max(initial=0.0)), float(bound)
    ok = bool(worst <= bound + runner.tolerance)
    return CheckRun(config, bound, worst, float(errors.mean()), ok, site, setting)


def _insert_after_producers(graph: onnx.GraphProto, extra: dict[str, list[onnx.NodeProto]]) -> None:
    """Put the nodes ``extra[value]`` right after the node producing ``value`` (or first, for inputs)."""
    nodes = list(graph.node)
    del graph.node[:]
    for value in [v for v in extra if not any(v in n.output for n in nodes)]:
        graph.node.extend(extra[value])
    for node in nodes:
        graph.node.append(node)
        for out in node.output:
            graph.node.extend(extra.get(out, []))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a convenience; float32 is assumed otherwise
        return {}
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {i.name: i.type.tensor_type.elem_type for i in infos if i.type.tensor_type.elem_type}


# --------------------------------------------------------------------------- precision: rounded outputs


def rounding_model(network: Network, opset: int) -> tuple[onnx.ModelProto, bool]:
    """The audited model with every hidden layer's output rounded when its flag input is 1.

    Inputs per hidden layer i (double scalars): ``ra/q/i/on``, ``ra/q/i/lo``, ``ra/q/i/step``.
    """
    model, fixed = audited_model(network, opset)
    graph = model.graph
    types = _elem_types(model)
    extra: dict[str, list[onnx.NodeProto]] = {}
    for i, layer in enumerate(network.hidden_layers):
        value = layer.output_value
        raw = f"{value}/ra_unrounded"
        for node in graph.node:
            for k, name in enumerate(node.output):
                if name == value:
                    node.output[k] = raw
        prefix = f"ra/q/{i}"
        for role in ("on", "lo", "step"):
            graph.input.append(helper.make_tensor_value_info(f"{prefix}/{role}", TensorProto.DOUBLE, []))
        extra[raw] = _rounding_nodes(raw, value, prefix, types.get(value, TensorProto.FLOAT))
    _insert_after_producers(graph, extra)
    return model, fixed


def _rounding_nodes(raw: str, value: str, prefix: str, elem: int) -> list[onnx.NodeProto]:
    """y' = y + on·(Floor((y − lo)/step + 1/2)·step + lo − y), computed in double."""

    def node(op, inputs, out, **attrs):
        return helper.make_node(op, inputs, [f"{prefix}/{out}"], name=f"{prefix}/{out}", **attrs)

    half = helper.make_node(
        "Constant",
        [],
        [f"{prefix}/half"],
        name=f"{prefix}/half",
        value=helper.make_tensor("h", TensorProto.DOUBLE, [], [0.5]),
    )
    p = prefix
    nodes = [
        half,
        node("Cast", [raw], "y", to=TensorProto.DOUBLE),
        node("Sub", [f"{p}/y", f"{p}/lo"], "shifted"),
        node("Div", [f"{p}/shifted", f"{p}/step"], "scaled"),
        node("Add", [f"{p}/scaled", f"{p}/half"], "halved"),
        node("Floor", [f"{p}/halved"], "level"),
        node("Mul", [f"{p}/level", f"{p}/step"], "grid"),
        node("Add", [f"{p}/grid", f"{p}/lo"], "rounded"),
        node("Sub", [f"{p}/rounded", f"{p}/y"], "error"),
        node("Mul", [f"{p}/error", f"{p}/on"], "applied"),
        node("Add", [f"{p}/y", f"{p}/applied"], "out"),
    ]
    nodes.append(helper.make_node("Cast", [f"{p}/out"], [value], name=f"{p}/cast", to=elem))
    return nodes


def _rounding_feeds(result: PrecisionResult, bits: Sequence[int | None]) -> dict[str, np.ndarray]:
    feeds = {}
    for i, (layer, b) in enumerate(zip(result.layers, bits, strict=True)):
        lo, hi = layer.range
        step = (hi - lo) / (2.0**b - 1.0) if b is not None and hi > lo else 1.0
        feeds[f"ra/q/{i}/on"] = np.array(0.0 if b is None or hi <= lo else 1.0)
        feeds[f"ra/q/{i}/lo"] = np.array(float(lo))
        feeds[f"ra/q/{i}/step"] = np.array(float(step))
    return feeds


def check_precision_outputs(
    network: Network, opset: int, result: PrecisionResult, inputs: np.ndarray, source: str, notes: Sequence[str] = ()
) -> SimulationCheck:
    """Round the outputs in onnxruntime: each layer alone at its bits, then all at once (uniform, together)."""
    model, fixed = rounding_model(network, opset)
    with _Runner(model, network, inputs, fixed) as runner:
        count = len(result.layers)
        runner.reference = runner.outputs(_rounding_feeds(result, [None] * count))
        runs = []
        for i, layer in enumerate(result.layers):
            bits: list[int | None] = [None] * count
            bits[i] = layer.bits
            runs.append(
                _run(
                    runner,
                    f"{layer.name} alone at {layer.bits} bits",
                    layer.bound_at_bits,
                    [_rounding_feeds(result, bits)],
                    layer.name,
                    layer.bits,
                )
            )
        runs += _joint_runs(runner, result, lambda bits: _rounding_feeds(result, bits))
        runs += _format_runs(network, opset, result, runner)
        return SimulationCheck(len(inputs), source, tuple(runs), runner.tolerance, tuple(notes))


#: ONNX element types of the float storage formats ``precision`` judges.
_FLOAT_FORMATS = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def cast_model(network: Network, opset: int, elem: int) -> tuple[onnx.ModelProto, bool]:
    """The audited model with every hidden layer's output stored as ``elem`` (Cast there and back)."""
    model, fixed = audited_model(network, opset)
    types = _elem_types(model)
    extra: dict[str, list[onnx.NodeProto]] = {}
    for i, layer in enumerate(network.hidden_layers):
        value = layer.output_value
        raw = f"{value}/ra_unstored"
        for node in model.graph.node:
            for k, name in enumerate(node.output):
                if name == value:
                    node.output[k] = raw
        stored = f"ra/store/{i}"
        extra[raw] = [
            helper.make_node("Cast", [raw], [stored], name=f"{stored}/to", to=elem),
            helper.make_node("Cast", [stored], [value], name=f"{stored}/back", to=types.get(value, TensorProto.FLOAT)),
        ]
    _insert_after_producers(model.graph, extra)
    return model, fixed


def _format_runs(network: Network, opset: int, result: PrecisionResult, runner: _Runner) -> list[CheckRun]:
    """Every hidden layer's outputs stored in fp16, bf16 and int8 at once: what ``formats`` judges."""
    bounds = {f.name: f.bound for f in result.formats if not f.reason}  # an overflow is judged already
    runs = []
    for name, elem in _FLOAT_FORMATS.items():
        if name not in bounds:
            continue
        model, fixed = cast_model(network, opset, elem)
        with _Runner(model, network, runner.inputs, fixed) as stored:
            stored.reference = runner.reference
            runs.append(_run(stored, f"{name}: every layer's outputs stored", bounds[name], [{}], name))
    if "int8" in bounds:
        feeds = _rounding_feeds(result, [8] * len(result.layers))
        runs.append(_run(runner, "int8: every layer's outputs at 8 bits", bounds["int8"], [feeds], "int8"))
    return runs


def _joint_runs(runner: _Runner, result: PrecisionResult, feeds_for) -> list[CheckRun]:
    count = len(result.layers)
    runs = []
    if result.uniform_bits is not None and result.fep_uniform is not None:  # set together
        feeds = feeds_for([result.uniform_bits] * count)
        label = f"all at {result.uniform_bits} bits (uniform)"
        runs.append(_run(runner, label, result.fep_uniform, [feeds], "all", result.uniform_bits))
    if result.fep_together is not None:
        bits = [la.bits_together for la in result.layers]
        label = "all at " + ",".join(map(str, bits)) + " bits (together)"
        runs.append(_run(runner, label, result.fep_together, [feeds_for(bits)]))
    return runs


# --------------------------------------------------------------------------- weights as inputs


class _WeightFeed:
    """A layer whose affine op reads its weight from a graph input (raw ONNX layout)."""

    def __init__(self, network: Network, layer: Layer, node, input_name: str):
        self.layer = layer
        self.input_name = input_name
        self.raw = np.asarray(network.constants[node.inputs[1]], np.float64)
        self.transposed = layer.kind == "dense" and not (node.op_type == "Gemm" and node.attr("transB", 0))
        self.dtype = np.asarray(network.constants[node.inputs[1]]).dtype
        effective = self.effective_layout(self.raw).reshape(self.raw.shape[1 if self.transposed else 0], -1)
        target = layer.weight.reshape(len(effective), -1)
        norms = np.einsum("ij,ij->i", effective, effective)
        self.scale = np.where(norms > 0, np.einsum("ij,ij->i", target, effective) / np.where(norms > 0, norms, 1), 0.0)
        rebuilt = self.scale[:, None] * effective
        self.exact = bool(np.allclose(rebuilt, target, rtol=1e-5, atol=1e-12 * (1 + np.abs(target).max(initial=0))))

    def effective_layout(self, raw: np.ndarray) -> np.ndarray:
        """Raw ONNX weight → [out, …] (dense: transposed unless Gemm transB=1)."""
        return raw.T if self.transposed else raw

    def raw_from_effective(self, weight: np.ndarray) -> np.ndarray:
        """An effective weight [out, …] → the raw input that produces it (channel scales undone)."""
        flat = weight.reshape(len(self.scale), -1)
        raw_flat = self.effective_layout(self.raw).reshape(len(self.scale), -1)
        safe = np.where(self.scale != 0, self.scale, 1.0)[:, None]
        out = np.where(self.scale[:, None] != 0, flat / safe, raw_flat).reshape(weight.shape)
        return self.effective_layout(out).astype(self.dtype)

    def masked(self, mask: np.ndarray) -> np.ndarray:
        """The raw weight with the effective-layout ``mask`` (0 = dropped synapse) applied."""
        return (self.raw * self.effective_layout(mask)).astype(self.dtype)

    @property
    def original(self) -> np.ndarray:
        """The unchanged raw weight."""
        return self.raw.astype(self.dtype)


def weight_input_model(
    network: Network, opset: int, layers: Sequence[Layer]
) -> tuple[onnx.ModelProto, bool, dict[str, _WeightFeed], list[str]]:
    """The audited model with the weights of ``layers`` read from graph inputs ``ra/w/<name>``.

    Layers that cannot be rewritten (conv-transpose, MatMul weights of rank > 2) are
    skipped with a note.
    """
    model, fixed = audited_model(network, opset)
    graph = model.graph
    by_output = {node.output[0]: node for node in graph.node if node.output}
    feeds, notes = {}, []
    for layer in layers:
        if layer.summands:
            notes.append(
                f"layer '{layer.name}' sums two affine ops of different inputs: not simulated (docs/method.md §1.4)"
            )
            continue
        node = anchor_node(network, layer)
        raw = np.asarray(network.constants.get(node.inputs[1], np.zeros(0)))
        if layer.kind not in ("dense", "conv") or (layer.kind == "dense" and raw.ndim != 2):
            notes.append(f"layer '{layer.name}' ({layer.kind}) is not simulated: only dense and conv weights are")
            continue
        name = f"ra/w/{layer.name}"
        proto_node = by_output[node.outputs[0]]
        proto_node.input[1] = name
        elem = helper.np_dtype_to_tensor_dtype(raw.dtype) if raw.dtype.kind == "f" else TensorProto.FLOAT
        graph.input.append(helper.make_tensor_value_info(name, elem, list(raw.shape)))
        feeds[layer.name] = _WeightFeed(network, layer, node, name)
    used = {v for n in graph.node for v in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, fixed, feeds, notes


def _original_feeds(feeds: dict[str, _WeightFeed]) -> dict[str, np.ndarray]:
    return {f.input_name: f.original for f in feeds.values()}


# --------------------------------------------------------------------------- precision: rounded weights


def quantize(weight: np.ndarray, bits: int) -> np.ndarray:
    """Round to 2^b levels over [min W, max W]: error ≤ (max − min)/(2·(2^b − 1)) (docs/method.md §9.1)."""
    lo, hi = float(weight.min()), float(weight.max())
    if hi <= lo:
        return weight.copy()
    step = (hi - lo) / (2.0**bits - 1.0)
    return np.clip(np.floor((weight - lo) / step + 0.5) * step + lo, lo, hi)


def check_precision_weights(
    network: Network, opset: int, result: PrecisionResult, inputs: np.ndarray, source: str, notes: Sequence[str] = ()
) -> SimulationCheck:
    """Round the weights (effective, then mapped back through folded channel scales) and measure."""
    sites = network.hidden_layers + ([network.output_layer] if network.output_layer is not None else [])
    model, fixed, feeds, skipped = weight_input_model(network, opset, sites)
    notes = list(notes) + skipped
    for name, feed in feeds.items():
        if not feed.exact:
            notes.append(f"layer '{name}': its folded weight is not a per-channel scaling of the stored one; skipped")
    with _Runner(model, network, inputs, fixed) as runner:
        runner.reference = runner.outputs(_original_feeds(feeds))

        def feeds_for(bits: Sequence[int | None]) -> dict[str, np.ndarray]:
            out = _original_feeds(feeds)
            for layer, b in zip(sites, bits, strict=True):
                feed = feeds.get(layer.name)
                if b is not None and feed is not None and feed.exact:
                    out[feed.input_name] = feed.raw_from_effective(quantize(np.asarray(layer.weight, np.float64), b))
            return out

        runs = []
        for i, row in enumerate(result.layers):
            if row.name not in feeds:
                continue  # not simulated: said in the notes
            bits: list[int | None] = [None] * len(sites)
            bits[i] = row.bits
            label = f"{row.name} alone at {row.bits} bits"
            runs.append(_run(runner, label, row.bound_at_bits, [feeds_for(bits)], row.name, row.bits))
        runs += _joint_runs(runner, result, feeds_for)
        notes += _unsimulated(sites, feeds)
        return SimulationCheck(len(inputs), source, tuple(runs), runner.tolerance, tuple(notes))


# --------------------------------------------------------------------------- wait: dropped synapses


def _unsimulated(layers: Sequence[Layer], feeds: dict) -> list[str]:
    """The note that the runs of every layer at once leave the layers not simulated as they are."""
    missing = [f"'{layer.name}'" for layer in layers if layer.name not in feeds]
    if not missing:
        return []
    return [f"the runs of every layer at once leave {', '.join(missing)} untouched (not simulated)"]


def drop_mask(shape: tuple[int, ...], ignored: int, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 mask over an effective weight [out, …]: exactly ``ignored`` zeros in every row (neuron/channel)."""
    rows = shape[0]
    fan_in = int(np.prod(shape[1:]))
    mask = np.ones((rows, fan_in))
    if ignored:
        order = np.argsort(rng.random((rows, fan_in)), axis=1)[:, :ignored]
        np.put_along_axis(mask, order, 0.0, axis=1)
    return mask.reshape(shape)


def check_wait(
    network: Network,
    opset: int,
    result: WaitResult,
    inputs: np.ndarray,
    source: str,
    trials: int = 10,
    seed: int = 0,
    notes: Sequence[str] = (),
) -> SimulationCheck:
    """Drop r_l incoming signals per neuron at random (each layer alone, then all together) and measure."""
    if trials < 1:
        raise OptionError(f"--trials must be ≥ 1, got {trials}")
    hidden = network.hidden_layers
    model, fixed, feeds, skipped = weight_input_model(network, opset, hidden)
    notes = list(notes) + skipped
    if any(la.kind == "conv" for la in hidden if la.name in feeds):
        notes.append("conv layers: the same kernel taps are dropped at every position of a channel")
    with _Runner(model, network, inputs, fixed) as runner:
        runner.reference = runner.outputs(_original_feeds(feeds))
        rng = np.random.default_rng(seed)

        def trial_feeds(ignored: Sequence[int]) -> list[dict]:
            out = []
            for _ in range(trials):
                feed = _original_feeds(feeds)
                for layer, r in zip(hidden, ignored, strict=True):
                    if r and layer.name in feeds:
                        spec = feeds[layer.name]
                        feed[spec.input_name] = spec.masked(drop_mask(layer.weight.shape, r, rng))
                out.append(feed)
            return out

        runs = []
        for i, row in enumerate(result.layers):
            if row.name not in feeds:
                continue  # not simulated: said in the notes
            ignored = [0] * len(hidden)
            ignored[i] = row.ignore
            bound = row.ignore * row.cost_per_signal
            runs.append(
                _run(
                    runner,
                    f"{row.name} alone ignoring {row.ignore} of {row.fan_in}",
                    bound,
                    trial_feeds(ignored),
                    row.name,
                    row.ignore,
                )
            )
        together = [row.fan_in - row.wait_for_together for row in result.layers]
        label = "all ignoring " + ",".join(map(str, together)) + " (together)"
        runs.append(_run(runner, label, result.fep_together, trial_feeds(together)))
        notes += _unsimulated(hidden, feeds)
        return SimulationCheck(
            len(inputs), f"{source}, {trials} random trials", tuple(runs), runner.tolerance, tuple(notes)
        )
