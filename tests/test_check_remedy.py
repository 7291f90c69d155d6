"""Weight targets for unmet requirements (robaudit/remedy.py) and the gate's requirement test."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, run_cli
from onnx import numpy_helper
from test_graph_ops import GraphBuilder

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
from robaudit.bounds.fep import FailureModel
from robaudit.bounds.ranges import tighten_network
from robaudit.gate.remedy import SCALE_TOLERANCE, largest_scale_within, meets, reading_layers
from robaudit.graph.network import NetworkOptions
from robaudit.graph.scaling import Ranges, scaled_network

# --------------------------------------------------------------------------- the pure search


class Counted:
    """A bound function that counts its evaluations."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, s: float) -> float:
        self.calls += 1
        return self.function(s)


@pytest.mark.parametrize(
    ("function", "crossing"),
    [
        (lambda s: 5.0 * s**2, math.sqrt(1 / 5)),  # power law: all weights of a two-layer tail
        (lambda s: 3.0 * s, 1 / 3),  # one downstream layer (paper bound, docs/method.md §3.1)
        (lambda s: 0.4 + 2.0 * s, 0.3),  # the failing layer's own term does not scale
        (lambda s: math.floor(40 * s) / 10, 0.275),  # a staircase (tolerated counts are integers)
        (lambda s: 2.0 * s**3 + 0.5 * s, None),  # no closed form: checked by evaluation below
    ],
)
def test_largest_scale_is_a_verified_pass_within_tolerance(function, crossing):
    counted = Counted(function)
    scale = largest_scale_within(counted, 1.0)
    assert function(scale) <= 1.0 + 1e-12  # a passing scale (ε has the inverse problems' 1e-12 slack) …
    assert function(scale * (1 + SCALE_TOLERANCE)) > 1.0  # … within one tolerance step of the crossing
    if crossing is not None:
        assert crossing / (1 + SCALE_TOLERANCE) <= scale <= crossing * (1 + 1e-9)
    assert counted.calls <= 30


def test_power_laws_need_few_evaluations():
    """Bisection on log s from 1e-3 to 1% needs 11 evaluations; the log-secant guess needs fewer."""
    counted = Counted(lambda s: 7.3 * s**2)
    largest_scale_within(counted, 1.0)
    assert counted.calls <= 6, counted.calls


def test_unreachable_and_already_met():
    assert largest_scale_within(lambda s: 2.0, 1.0) is None  # e.g. a sigmoid layer's own δ
    assert largest_scale_within(lambda s: 0.5 * s, 1.0) == 1.0


# --------------------------------------------------------------------------- the requirement test


@pytest.fixture(scope="module")
def networks():
    out = {}
    for name in ("paper_mlp_sigmoid", "resnet_small", "resnet_small_bn"):
        loaded, network = load_network(SAMPLES / f"{name}.onnx", NetworkOptions())
        out[name] = (loaded, network)
    return out


@pytest.mark.parametrize(
    ("name", "epsilon", "method", "failure"),
    [
        ("paper_mlp_sigmoid", 1.0, "paper", FailureModel.crash()),
        ("paper_mlp_sigmoid", 1.0, "tight", FailureModel.crash()),
        ("paper_mlp_sigmoid", 3.0, "tight", FailureModel.byzantine(capacity=2.0)),
        ("resnet_small", 1.0, "tight", FailureModel.crash()),
    ],
)
def test_meets_agrees_with_the_figures_of_bound(networks, name, epsilon, method, failure):
    """``meets`` (one bound evaluation) against ``bound_network``'s inverse problems (binary searches)."""
    loaded, network = networks[name]
    options = BoundOptions(epsilon=epsilon, failure=failure, method=method)
    result = bound_network(network, options, model_info(loaded))
    for index, layer in enumerate(result.layers):
        for count in {max(layer.max_failures, 0), layer.max_failures + 1}:
            assert meets(network, options, "layer", count, index) == (count <= layer.max_failures), (layer, count)
    for kind, figure in (("uniform", result.uniform), ("total", result.total)):
        for count in {max(figure, 0), figure + 1}:
            assert meets(network, options, kind, count) == (count <= figure), (kind, count, figure)


def _scaled_file(source, target, factor: float):
    model = onnx.load(str(source))
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv")}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in weights:
            array = numpy_helper.to_array(tensor).astype(np.float64) * factor
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    onnx.save(model, str(target))


@pytest.mark.parametrize("name", ["paper_mlp_sigmoid", "resnet_small_bn"])
def test_scaled_network_equals_a_rescaled_export(networks, tmp_path, name):
    """Scaling in memory (ranges recomputed) = writing a model with weights × 2 and loading it."""
    loaded, network = networks[name]
    _scaled_file(SAMPLES / f"{name}.onnx", tmp_path / "x2.onnx", 2.0)
    # scaled_network recomputes IBP ranges (the remedy then applies the network's range method)
    loaded2, reference = load_network(tmp_path / "x2.onnx", NetworkOptions(ranges="ibp"))
    scaled = scaled_network(network, {la.name: 2.0 for la in network.layers}, Ranges.RECOMPUTED)
    for ours, theirs in zip(scaled.layers, reference.layers, strict=True):
        np.testing.assert_allclose(ours.weight, theirs.weight, rtol=1e-6)
    for value, box in reference.clean.items():
        np.testing.assert_allclose(scaled.clean[value].lo, box.lo, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scaled.clean[value].hi, box.hi, rtol=1e-5, atol=1e-6)
    options = BoundOptions(epsilon=5.0)
    ours = bound_network(scaled, options, model_info(loaded))
    theirs = bound_network(reference, options, model_info(loaded))
    assert [la.max_failures for la in ours.layers] == [la.max_failures for la in theirs.layers]
    assert (ours.uniform, ours.total) == (theirs.uniform, theirs.total)
    unchanged = scaled_network(network, {la.name: 1.0 for la in network.layers}, Ranges.RECOMPUTED)
    tighten_network(unchanged, network.ranges)  # as the remedy does
    assert bound_network(unchanged, options, model_info(loaded)) == bound_network(network, options, model_info(loaded))


def _onnx_readers(model: onnx.ModelProto, start: str) -> list[str]:
    """Conv/Gemm nodes reachable from value ``start`` without passing another Conv/Gemm (on the raw graph)."""
    found, frontier, seen = [], [start], {start}
    while frontier:
        value = frontier.pop()
        for node in model.graph.node:
            if value not in node.input:
                continue
            if node.op_type in ("Conv", "Gemm"):
                found.append(node.name)
            else:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return sorted(found)


def test_reading_layers_follow_the_residual_graph(networks):
    _, network = networks["resnet_small"]
    model = onnx.load(str(SAMPLES / "resnet_small.onnx"))
    for layer in network.hidden_layers:
        readers = reading_layers(network, layer)
        assert sorted(r.nodes[0] for r in readers) == _onnx_readers(model, layer.output_value), layer.name


def test_a_model_with_a_batch_of_one_fixed_gets_its_remedy_figures(tmp_path):
    """Most torch exports fix the batch at 1: the remedy's scaled model runs on 200 domain samples one per
    run (it stopped the whole gate with 'Got: 200 Expected: 1', exit 2)."""
    b = GraphBuilder(3, [6])
    hidden = b.op("Relu", [b.gemm("x", 6, 8, name="fc1")])
    model = b.model(b.gemm(b.op("Relu", [b.gemm(hidden, 8, 8, name="fc2")]), 8, 3, name="fc3"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # "N" → 1
    path = tmp_path / "batch1.onnx"
    path.write_bytes(model.SerializeToString())
    proc = run_cli("check", path, "-e", "0.001", "--require-crash", "1", "--format", "json", expect=1)
    report = json.loads(proc.stdout)
    remedies = [r["remedy"] for m in report["models"] for r in m["requirements"] if r.get("remedy")]
    scaled = [r["scaled"] for r in remedies if r.get("scaled")]
    assert scaled and all(s["inputs"] == 200 for s in scaled), proc.stdout[:2000]


# --------------------------------------------------------------------------- weights that cannot be rescaled


def _float_gru(path, op: str = "GRU") -> None:
    """x [1, 4, 3] (float, batch 1) → Transpose → GRU/LSTM → Y_h → Reshape → MatMul: a recurrent model the remedy's
    domain samples can run (a token model's cannot)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    gates = {"GRU": 3, "LSTM": 4}[op]
    inits = [
        numpy_helper.from_array((rng.standard_normal((1, gates * 5, 3))).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((1, gates * 5, 5))).astype(np.float32), "R"),
        numpy_helper.from_array((rng.standard_normal((5, 2))).astype(np.float32), "Wo"),
        numpy_helper.from_array(np.array([1, 5], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node(op, ["xt", "W", "R"], ["", "hT"], hidden_size=5),
        helper.make_node("Reshape", ["hT", "flat"], ["h"]),
        helper.make_node("MatMul", ["h", "Wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _dynamic_int8_mlp(tmp_path):
    from quantized import quantize

    return quantize(SAMPLES / "digits_mlp.onnx", tmp_path / "dynamic.onnx", np.zeros((1, 64), np.float32), "dynamic")


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "dynamic int8"])
def test_an_unmet_requirement_on_a_model_whose_weights_cannot_be_rescaled_fails_the_gate(tmp_path, kind):
    """The remedy stopped the gate with 'internal error' (exit 2, no report): a recurrent op's weights (KeyError on
    the unrolled steps' names) and a dynamically quantized layer's (StopIteration: no float weight) cannot be
    rescaled. Now the requirement fails (exit 1), its remedy says why there are no weight targets, and the
    report is written."""
    if kind == "dynamic int8":
        model, reason = _dynamic_int8_mlp(tmp_path), "no float weight this search can rescale"
    else:
        model, reason = tmp_path / f"{kind}.onnx", "recurrent (GRU/LSTM) op"
        _float_gru(model, kind)
    report = tmp_path / "report.json"
    proc = run_cli("check", model, "-e", "1e-6", "--require-crash", "1", "--report", report, expect=1)
    assert "internal error" not in proc.stderr and "no weight targets" in proc.stdout
    remedy = json.loads(report.read_text())["models"][0]["requirements"][0]["remedy"]
    assert reason in remedy["unscalable"] and remedy["shrink_factor"] is None and remedy["layers"] == []


def test_the_weights_of_a_recurrent_token_model_are_not_rescaled():
    """The token GRU sample got 'all weights × 0.56', found on robaudit's unrolled graph with its constants scaled,
    among them the state update's identity that every step shares (scaled once per step): not the model with its
    weights × 0.56. No weight target is given for a recurrent model."""
    proc = run_cli("check", SAMPLES / "text_gru.onnx", "-e", "0.001", "--require-crash", "1", "--format", "json",
                   expect=1)
    remedy = json.loads(proc.stdout)["models"][0]["requirements"][0]["remedy"]
    assert "recurrent" in remedy["unscalable"] and remedy["shrink_factor"] is None


def test_unscalable_names_the_first_layer_that_cannot_be_rescaled(tmp_path):
    """None for a float model (whose every layer's weight the remedy rescales); scaled_network refuses the others in
    one clear error instead of StopIteration."""
    from robaudit.errors import UnsupportedModelError
    from robaudit.graph.scaling import unscalable

    _, plain = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions())
    assert unscalable(plain) is None
    _, dynamic = load_network(_dynamic_int8_mlp(tmp_path), NetworkOptions())
    reason = unscalable(dynamic)
    assert reason is not None and reason.startswith(f"layer '{dynamic.layers[0].name}'")
    with pytest.raises(UnsupportedModelError, match="no float weight"):
        scaled_network(dynamic, {dynamic.layers[0].name: 0.5}, Ranges.RECOMPUTED)
