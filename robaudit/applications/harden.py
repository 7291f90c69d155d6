"""Range restriction (``robaudit harden``, docs/method.md §9.2): a NaN-guarded ``Clip`` after
each hidden layer at the range its neurons take on given inputs, widened by a margin.

A failed neuron's value then passes through its layer's Clip (docs/method.md §1.3): what
downstream sees from it lies in the Clip's range, so δ shrinks to at most the range's width
and a bit flip of a stored float becomes bounded. On the given inputs the clean network is
unchanged whenever every value lies in its range — which the command checks by running both
models (outputs, arg-max agreement, accuracy with labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from robaudit.applications.analysis import refuse_recurrent
from robaudit.applications.check import check_model_target, write_model
from robaudit.bounds.audit import finite_or_none, load_network, model_info
from robaudit.bounds.bound import make_bound
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.results import ModelInfo, Settings
from robaudit.errors import OptionError
from robaudit.graph.forms import analysed_model
from robaudit.graph.inputs import split_feed
from robaudit.graph.network import Network, NetworkOptions
from robaudit.injection.sandbox import open_session
from robaudit.inputs import refuse_outside_domain


@dataclass(frozen=True)
class LayerRange:
    """The range a hidden layer's outputs are restricted to."""

    #: The layer's short name and its output value.
    name: str
    value: str
    #: Smallest and largest output seen on the inputs, and the Clip's [low, high] (widened).
    seen_low: float
    seen_high: float
    low: float
    high: float
    #: With ``--per-channel``: each channel's widened [low, high] (conv: axis 1; dense: each neuron).
    channel_low: tuple[float, ...] | None = None
    channel_high: tuple[float, ...] | None = None


@dataclass(frozen=True)
class HardenResult:
    """What ``harden`` wrote and what it changed (docs/method.md §9.2)."""

    #: The hardened model's path.
    output: str
    #: One restricted range per hidden layer.
    layers: tuple[LayerRange, ...]
    #: Inputs the model was run on.
    inputs: int
    #: Largest |change| of the audited output on the inputs, hardened vs original.
    max_output_change: float
    #: Fraction of inputs whose arg-max is the same in both models.
    agreement: float
    #: Accuracy of the original and hardened models (None without labels).
    accuracy_before: float | None
    accuracy_after: float | None
    #: ε and the largest crash count tolerated in every layer at once (tight), before and after.
    epsilon: float
    uniform_before: int
    uniform_after: int
    #: Fep for one crashed neuron per hidden layer, before and after: the tight bound of the searches on both
    #: sides (a vector's refinement, docs/method.md §4.1, does not apply to a protected layer: §9.2).
    fep_before: float | None
    fep_after: float | None
    #: Fep for one flipped bit per hidden layer (any bit), before (None: unbounded) and after.
    bit_flip_before: float | None
    bit_flip_after: float | None
    #: Crash failures each hidden layer tolerates alone at ε (tight), before and after, in layer order.
    alone_before: tuple[int, ...] = ()
    alone_after: tuple[int, ...] = ()
    #: The original model (path, size, digest) and the settings of the bounds: the report's header.
    model: ModelInfo | None = None
    settings: Settings | None = None


def widen(low: float, high: float, margin: float) -> tuple[float, float]:
    """[low − M·w, high + M·w] with w = high − low (w = max(|low|, |high|, 1) when the range is a point)."""
    width = high - low if high > low else max(abs(low), abs(high), 1.0)
    return low - margin * width, high + margin * width


def channel_ranges(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per channel of a layer's outputs on the inputs ([n, *shape]), shaped to broadcast
    against [batch, *shape]: axis 1 for a convolution ([C, 1, …]), the last axis otherwise ([F])."""
    if kind == "conv" and values.ndim >= 3:
        axes = tuple(i for i in range(values.ndim) if i != 1)
        view = (values.shape[1],) + (1,) * (values.ndim - 2)
    else:
        axes = tuple(range(values.ndim - 1))
        view = (values.shape[-1],)
    return values.min(axis=axes).reshape(view), values.max(axis=axes).reshape(view)


def widen_channels(low: np.ndarray, high: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`widen` per channel."""
    point = np.maximum(np.maximum(np.abs(low), np.abs(high)), 1.0)
    width = np.where(high > low, high - low, point)
    return low - margin * width, high + margin * width


def observed_ranges(
    model: onnx.ModelProto, values: list[str], inputs: np.ndarray | dict[str, np.ndarray]
) -> list[tuple[float, float]]:
    """(min, max) of each value over the inputs, computed by onnxruntime."""
    outputs = _run(model, inputs, values)
    return [(float(np.min(v)), float(np.max(v))) for v in outputs]


def insert_restrictions(
    model: onnx.ModelProto, ranges: dict[str, tuple], dtype: type = np.float32
) -> onnx.ModelProto:
    """Copy of ``model`` where every reader of each value v sees Clip(Where(IsNaN(v), low, v), low, high).

    A range given as two arrays (per channel, shaped to broadcast against v) is written
    ``Min(Max(Where(IsNaN(v), min(low), v), low), high)``: ONNX's Clip takes scalars only. The constants are
    ``dtype``, the values' type (float16 in a float16 model), each end rounded outwards.
    """
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    graph = copy.graph
    outputs = {o.name for o in graph.output}
    added = []
    taken = _names(graph)
    for value, (low, high) in ranges.items():
        prefix = _free_prefix(taken)
        clipped = f"{prefix}/clipped"
        for node in graph.node:
            node.input[:] = [clipped if v == value else v for v in node.input]
        if value in outputs:
            raise OptionError(f"layer output '{value}' is a graph output; harden restricts hidden layers only")
        per_channel = np.ndim(low) > 0
        low, high = _outward(low, dtype, -np.inf), _outward(high, dtype, np.inf)
        graph.initializer.extend([
            numpy_helper.from_array(low, f"{prefix}/low"),
            numpy_helper.from_array(high, f"{prefix}/high"),
            numpy_helper.from_array(np.array(np.min(low), dtype), f"{prefix}/nan_value"),
        ])
        added += [
            helper.make_node("IsNaN", [value], [f"{prefix}/isnan"], name=f"{prefix}/IsNaN"),
            helper.make_node("Where", [f"{prefix}/isnan", f"{prefix}/nan_value", value], [f"{prefix}/guarded"],
                             name=f"{prefix}/Where"),
        ]
        if per_channel:
            added += [
                helper.make_node("Max", [f"{prefix}/guarded", f"{prefix}/low"], [f"{prefix}/raised"],
                                 name=f"{prefix}/Max"),
                helper.make_node("Min", [f"{prefix}/raised", f"{prefix}/high"], [clipped], name=f"{prefix}/Min"),
            ]
        else:
            added.append(helper.make_node("Clip", [f"{prefix}/guarded", f"{prefix}/low", f"{prefix}/high"],
                                          [clipped], name=f"{prefix}/Clip"))
    graph.node.extend(added)
    _toposort(graph)
    for opset in copy.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 13:
            opset.version = 13  # IsNaN on float, Clip with tensor bounds
    _check_edit(model, copy)
    return copy


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every name the graph uses: values, initializers, nodes."""
    names = {i.name for i in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    for node in graph.node:
        names |= {node.name, *node.input, *node.output}
    return names


def _free_prefix(taken: set[str]) -> str:
    """The first ``robaudit_harden/N`` no name in ``taken`` starts with (a hardened model hardened again keeps the
    names of its first guards), marked taken."""
    index = 0
    while any(name.startswith(f"robaudit_harden/{index}/") for name in taken):
        index += 1
    prefix = f"robaudit_harden/{index}"
    taken.add(f"{prefix}/")
    return prefix


def _outward(values, dtype: type, towards: float) -> np.ndarray:
    """``values`` as ``dtype``, each rounded towards ``towards`` (−inf: down, +inf: up) where ``dtype`` cannot hold it:
    a range written in float16 still holds every value of the range measured."""
    exact = np.asarray(values, np.float64)
    rounded: np.ndarray = exact.astype(dtype)
    off = rounded.astype(np.float64) < exact if towards > 0 else rounded.astype(np.float64) > exact
    with np.errstate(over="ignore"):  # the largest finite value's neighbour is inf; it is used only where off
        return np.where(off, np.nextafter(rounded, dtype(towards)), rounded).astype(dtype)


def _check_edit(model: onnx.ModelProto, copy: onnx.ModelProto) -> None:
    """onnx's checker on the edited copy, when it passes the model itself (onnxruntime runs models the checker
    refuses, such as a graph output declared without a shape: those are not robaudit's to reject)."""
    try:
        onnx.checker.check_model(copy)
    except onnx.checker.ValidationError:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError:
            return
        raise


def harden_model(
    path: str | Path,
    inputs: np.ndarray,
    output: str | Path,
    margin: float = 0.0,
    labels: np.ndarray | None = None,
    epsilon: float = 0.1,
    network_options: NetworkOptions = NetworkOptions(),
    per_channel: bool = False,
) -> HardenResult:
    """Write the hardened model to ``output`` and compare it with the original (docs/method.md §9.2).

    ``per_channel``: one range per channel of each convolution (per neuron of each dense layer)
    instead of one per layer. Raises OptionError for a negative or non-finite margin.
    """
    check_model_target(Path(output), Path(path), "--output", "the hardened copy")
    loaded, network = load_network(path, network_options)
    refuse_recurrent(network, "harden")
    network.require_hidden_layers()  # before the ranges are taken: nothing to restrict
    refuse_outside_domain(network, inputs, "harden would read its ranges off inputs the bounds make no claim on")
    original = onnx.load(str(path))
    model = analysed_model(original)  # the layer values exist in the form robaudit reads
    feeds = split_feed(network.inputs, inputs)  # several inputs: packed vectors (docs/method.md §12.3)
    hardened, layers = restricted_model(model, network, feeds, margin, per_channel, original)
    write_model(hardened, Path(output))
    loaded_after, after = load_network(output, network_options)
    before_out = _run(original if network.float16 else model, feeds, [network.output_name])[0]
    after_out = _run(hardened, feeds, [network.output_name])[0]
    before, later = _bounds(network, epsilon), _bounds(after, epsilon)
    return HardenResult(
        output=str(output),
        layers=layers,
        inputs=len(inputs),
        max_output_change=float(np.max(np.abs(after_out.astype(np.float64) - before_out))),
        agreement=_agreement(before_out, after_out),
        accuracy_before=_accuracy(before_out, labels),
        accuracy_after=_accuracy(after_out, labels),
        epsilon=epsilon,
        uniform_before=before.uniform,
        fep_before=before.fep,
        bit_flip_before=before.bit_flip,
        uniform_after=later.uniform,
        fep_after=later.fep,
        bit_flip_after=later.bit_flip,
        alone_before=before.alone,
        alone_after=later.alone,
        model=model_info(loaded),
        settings=Settings(
            "crash", epsilon, "tight", network.input_range, output=network.output_name, input_shape=network.input_shape,
            float16=network.float16, ranges=network.ranges,
        ),
    )


def restricted_model(
    model: onnx.ModelProto,
    network: Network,
    inputs: np.ndarray | dict[str, np.ndarray],
    margin: float = 0.0,
    per_channel: bool = False,
    original: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, tuple[LayerRange, ...]]:
    """``model`` with every hidden layer of ``network`` restricted to its range on ``inputs`` ([n, *shape], or
    feeds by input name), widened by ``margin`` (docs/method.md §9.2), and those ranges. A model that computes in
    float16 is restricted as the file (``original``) holds it, in float16: its stored values stay float16 words.
    Raises OptionError for a bad margin."""
    if not margin >= 0 or not np.isfinite(margin):
        raise OptionError(f"--margin must be a finite number ≥ 0, got {margin}")
    hidden = network.hidden_layers
    layers = _layer_ranges(model, hidden, inputs, margin, per_channel)
    target, dtype = (original, np.float16) if network.float16 and original is not None else (model, np.float32)
    hardened = insert_restrictions(target, {r.value: _clip_bounds(r, la.kind, la.out_shape)
                                            for r, la in zip(layers, hidden, strict=True)}, dtype)
    return hardened, layers


def _layer_ranges(model: onnx.ModelProto, hidden: list, inputs: np.ndarray | dict[str, np.ndarray], margin: float,
                  per_channel: bool) -> tuple[LayerRange, ...]:
    outputs = _run(model, inputs, [la.output_value for la in hidden])
    ranges = []
    for layer, values in zip(hidden, outputs, strict=True):
        lo, hi = float(np.min(values)), float(np.max(values))
        if not per_channel:
            ranges.append(LayerRange(layer.name, layer.output_value, lo, hi, *widen(lo, hi, margin)))
            continue
        low, high = widen_channels(*channel_ranges(values.astype(np.float64), layer.kind), margin)
        ranges.append(LayerRange(layer.name, layer.output_value, lo, hi, float(low.min()), float(high.max()),
                                 tuple(low.reshape(-1).tolist()), tuple(high.reshape(-1).tolist())))
    return tuple(ranges)


def _clip_bounds(layer: LayerRange, kind: str, shape: tuple[int, ...]) -> tuple:
    """The scalar [low, high], or the per-channel arrays shaped to broadcast against the layer's output."""
    if layer.channel_low is None or layer.channel_high is None:
        return layer.low, layer.high
    count = len(layer.channel_low)
    view = (count,) + (1,) * (len(shape) - 2) if kind == "conv" and len(shape) >= 3 else (count,)
    return np.reshape(layer.channel_low, view), np.reshape(layer.channel_high, view)


class _Figures(NamedTuple):
    uniform: int
    fep: float | None
    bit_flip: float | None
    alone: tuple[int, ...]


def _bounds(network: Network, epsilon: float) -> _Figures:
    """The uniform crash count at ε, the Fep of one crash and of one bit flip per layer (None: unbounded) and the
    crash count each layer tolerates alone, by the same rule on the original and the hardened model: the tight
    bound of the searches (``bound`` refines a vector it is asked for further, docs/method.md §4.1). A float16
    model's flips are of its float16 words, before and after (it is restricted in float16, docs/method.md §2.3)."""
    hidden = network.require_hidden_layers()
    ones = [1] * len(hidden)
    crash = make_bound(Analysis(network, FailureModel.crash()), "tight")
    flip_fep = finite_or_none(make_bound(Analysis(network, FailureModel.bit_flip()), "tight").fep(ones))
    alone = tuple(crash.max_single(i, la.neurons, epsilon) for i, la in enumerate(hidden))
    return _Figures(crash.max_uniform(epsilon), finite_or_none(crash.fep(ones)), flip_fep, alone)


def _agreement(before: np.ndarray, after: np.ndarray) -> float:
    if before.ndim < 2 or before.shape[-1] < 2:
        return 1.0
    return float(np.mean(before.reshape(len(before), -1).argmax(1) == after.reshape(len(after), -1).argmax(1)))


def _accuracy(outputs: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean(outputs.reshape(len(outputs), -1).argmax(1) == labels))


def _run(model: onnx.ModelProto, inputs: np.ndarray | dict[str, np.ndarray], values: list[str]) -> list[np.ndarray]:
    """``values`` computed by onnxruntime on the inputs (one array for the first graph input, or feeds by
    name), in a contained child process as ``inject``'s (docs/method.md §8)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in copy.graph.output}
    copy.graph.output.extend([helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in values
                              if v not in known])
    if not isinstance(inputs, dict):
        inputs = {copy.graph.input[0].name: inputs}
    half = {i.name for i in copy.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT16}
    feeds = {k: v.astype(np.float16 if k in half else np.float32) if v.dtype.kind == "f" else v
             for k, v in inputs.items()}
    counts = {len(v) for v in feeds.values()}
    session = open_session(copy.SerializeToString())
    try:
        # the step of a dynamically quantized model spans the whole batch (docs/method.md §11), and an export
        # with a batch of 1 fixed in its input takes no other: one sample per run
        if len(counts) == 1 and (_batch_of_one(copy.graph, feeds) or any(
                n.op_type == "DynamicQuantizeLinear" for n in copy.graph.node)):
            parts = [session.run(values, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(counts.pop())]
            return [np.concatenate([np.asarray(part[j]) for part in parts]) for j in range(len(values))]
        return [np.asarray(v) for v in session.run(values, feeds)]
    finally:
        session.close()


def _batch_of_one(graph: onnx.GraphProto, feeds: dict[str, np.ndarray]) -> bool:
    """Whether a graph input fed here fixes its first dimension (the batch) at 1."""
    for info in graph.input:
        if info.name in feeds:
            dims = info.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                return True
    return False


def _toposort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(v in available for v in n.input)]
        if not ready:
            raise OptionError("the hardened graph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)
