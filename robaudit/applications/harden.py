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

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
from robaudit.bounds.fep import FailureModel
from robaudit.bounds.results import ModelInfo
from robaudit.errors import OptionError
from robaudit.graph.inputs import split_feed
from robaudit.graph.network import Network, NetworkOptions


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
    #: Fep for one crashed neuron per hidden layer, before and after.
    fep_before: float | None
    fep_after: float | None
    #: Fep for one flipped bit per hidden layer (any bit), before (None: unbounded) and after.
    bit_flip_before: float | None
    bit_flip_after: float | None


def widen(low: float, high: float, margin: float) -> tuple[float, float]:
    """[low − M·w, high + M·w] with w = high − low (w = max(|low|, |high|, 1) when the range is a point)."""
    width = high - low if high > low else max(abs(low), abs(high), 1.0)
    return low - margin * width, high + margin * width


def observed_ranges(
    model: onnx.ModelProto, values: list[str], inputs: np.ndarray | dict[str, np.ndarray]
) -> list[tuple[float, float]]:
    """(min, max) of each value over the inputs, computed by onnxruntime."""
    outputs = _run(model, inputs, values)
    return [(float(np.min(v)), float(np.max(v))) for v in outputs]


def insert_restrictions(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """Copy of ``model`` where every reader of each value v sees Clip(Where(IsNaN(v), low, v), low, high)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    graph = copy.graph
    outputs = {o.name for o in graph.output}
    added = []
    for index, (value, (low, high)) in enumerate(ranges.items()):
        prefix = f"robaudit_harden/{index}"
        clipped = f"{prefix}/clipped"
        for node in graph.node:
            node.input[:] = [clipped if v == value else v for v in node.input]
        if value in outputs:
            raise OptionError(f"layer output '{value}' is a graph output; harden restricts hidden layers only")
        graph.initializer.extend([
            numpy_helper.from_array(np.array(low, np.float32), f"{prefix}/low"),
            numpy_helper.from_array(np.array(high, np.float32), f"{prefix}/high"),
        ])
        added += [
            helper.make_node("IsNaN", [value], [f"{prefix}/isnan"], name=f"{prefix}/IsNaN"),
            helper.make_node("Where", [f"{prefix}/isnan", f"{prefix}/low", value], [f"{prefix}/guarded"],
                             name=f"{prefix}/Where"),
            helper.make_node("Clip", [f"{prefix}/guarded", f"{prefix}/low", f"{prefix}/high"], [clipped],
                             name=f"{prefix}/Clip"),
        ]
    graph.node.extend(added)
    _toposort(graph)
    for opset in copy.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 13:
            opset.version = 13  # IsNaN on float, Clip with tensor bounds
    onnx.checker.check_model(copy)
    return copy


def harden_model(
    path: str | Path,
    inputs: np.ndarray,
    output: str | Path,
    margin: float = 0.0,
    labels: np.ndarray | None = None,
    epsilon: float = 0.1,
    network_options: NetworkOptions = NetworkOptions(),
) -> HardenResult:
    """Write the hardened model to ``output`` and compare it with the original (docs/method.md §9.2)."""
    if not margin >= 0 or not np.isfinite(margin):
        raise OptionError(f"--margin must be a finite number ≥ 0, got {margin}")
    loaded, network = load_network(path, network_options)
    model = onnx.load(str(path))
    hidden = network.hidden_layers
    feeds = split_feed(network.inputs, inputs)  # several inputs: packed vectors (docs/method.md §12.3)
    seen = observed_ranges(model, [la.output_value for la in hidden], feeds)
    layers = tuple(
        LayerRange(la.name, la.output_value, lo, hi, *widen(lo, hi, margin))
        for la, (lo, hi) in zip(hidden, seen, strict=True)
    )
    hardened = insert_restrictions(model, {r.value: (r.low, r.high) for r in layers})
    onnx.save(hardened, str(output))
    loaded_after, after = load_network(output, network_options)
    before_out = _run(model, feeds, [network.output_name])[0]
    after_out = _run(hardened, feeds, [network.output_name])[0]
    figures = _bounds(network, epsilon, model_info(loaded)) + _bounds(after, epsilon, model_info(loaded_after))
    return HardenResult(
        output=str(output),
        layers=layers,
        inputs=len(inputs),
        max_output_change=float(np.max(np.abs(after_out.astype(np.float64) - before_out))),
        agreement=_agreement(before_out, after_out),
        accuracy_before=_accuracy(before_out, labels),
        accuracy_after=_accuracy(after_out, labels),
        epsilon=epsilon,
        uniform_before=figures[0],
        fep_before=figures[1],
        bit_flip_before=figures[2],
        uniform_after=figures[3],
        fep_after=figures[4],
        bit_flip_after=figures[5],
    )


def _bounds(network: Network, epsilon: float, info: ModelInfo) -> tuple[int, float | None, float | None]:
    ones = tuple(1 for _ in network.hidden_layers)
    crash = bound_network(network, BoundOptions(epsilon=epsilon, failures=ones), info)
    flips = bound_network(network, BoundOptions(epsilon=epsilon, failure=FailureModel.bit_flip(), failures=ones), info)
    return crash.uniform, crash.fep, flips.fep


def _agreement(before: np.ndarray, after: np.ndarray) -> float:
    if before.ndim < 2 or before.shape[-1] < 2:
        return 1.0
    return float(np.mean(before.reshape(len(before), -1).argmax(1) == after.reshape(len(after), -1).argmax(1)))


def _accuracy(outputs: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean(outputs.reshape(len(outputs), -1).argmax(1) == labels))


def _run(model: onnx.ModelProto, inputs: np.ndarray | dict[str, np.ndarray], values: list[str]) -> list[np.ndarray]:
    """``values`` computed by onnxruntime on the inputs: one array for the first graph input, or feeds by name."""
    import onnxruntime as ort

    copy = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in copy.graph.output}
    copy.graph.output.extend([helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in values
                              if v not in known])
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    if isinstance(inputs, dict):
        feeds = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in inputs.items()}
    else:
        feeds = {copy.graph.input[0].name: inputs.astype(np.float32)}
    return [np.asarray(v) for v in session.run(values, feeds)]


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
