"""Two affine ops of different inputs summed before one activation: one layer (docs/method.md §1.4).

``relu(A(h) + B(x))`` — a ResNet block whose shortcut is a strided 1×1 convolution — has one failure
site, the activation's outputs; A and B are parts of it. Checked here against computations that
share no code with robaudit:

* a small convolutional block, hand-built, every crash set of one or two neurons at the sum layer
  and every single crash in the layer before it (byzantine values at both ends of the range too),
  at corners and random points of the input box, evaluated by onnxruntime on a copy of the model
  whose failure sites take keep/value inputs: no error above robaudit's bound;
* ``precision --weights``: A's and B's weights rounded in onnxruntime at the bits robaudit gives the
  sum layer (each over its own range) stay within the bound reported at those bits; a weakened copy
  that rounds only A into the sum layer's perturbation is caught;
* ``design``: a factor on the sum layer scales its summands' weights (its identity map is robaudit's),
  once each when every layer is scaled at once;
* what is refused: injecting synapse failures into the sum layer, one line, exit 2.

The dense form is in the soundness suite (``soundness_nets.random_summed``: exhaustive search,
synapse failures, a weakened synapse reach) and in the certify suite.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_in_process
from onnx import TensorProto, helper, numpy_helper
from soundness_nets import random_summed, to_onnx

from robaudit.applications import analysis
from robaudit.applications.analysis import compute_precision
from robaudit.bounds.audit import BoundOptions, compute_bound, load_network
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions
from robaudit.graph.scaling import Ranges, scaled_network

RNG = np.random.default_rng(7)
W1 = (RNG.uniform(-1, 1, (2, 1, 3, 3))).astype(np.float32)
B1 = RNG.uniform(-0.2, 0.2, 2).astype(np.float32)
WA = (RNG.uniform(-0.6, 0.6, (2, 2, 3, 3))).astype(np.float32)
BA = RNG.uniform(-0.2, 0.2, 2).astype(np.float32)
WB = (RNG.uniform(-1.5, 1.5, (2, 1, 1, 1))).astype(np.float32)
BB = RNG.uniform(-0.2, 0.2, 2).astype(np.float32)
WO = (RNG.uniform(-1, 1, (3, 8))).astype(np.float32)
BO = RNG.uniform(-0.2, 0.2, 3).astype(np.float32)


def conv_block(faults: bool = False) -> onnx.ModelProto:
    """x [N,1,4,4] → h = relu(conv3×3(x)) [2,4,4] → s = relu(convA3×3/2(h) + convB1×1/2(x)) [2,2,2] → Gemm 8→3.

    With ``faults`` h and s become h·keep_h + value_h and s·keep_s + value_s (extra inputs)."""
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "w1"), (B1, "b1"), (WA, "wa"), (BA, "ba"))]
    inits += [numpy_helper.from_array(a, n) for a, n in ((WB, "wb"), (BB, "bb"), (WO, "wo"), (BO, "bo"))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["z1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z1"], ["h0"], name="relu1"),
    ]
    h, s = "h0", "s0"
    if faults:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2, 4, 4]) for n in ("kh", "vh")]
        nodes += [helper.make_node("Mul", ["h0", "kh"], ["hm"]), helper.make_node("Add", ["hm", "vh"], ["h1"])]
        h = "h1"
    nodes += [
        helper.make_node("Conv", [h, "wa", "ba"], ["za"], name="conv_a", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["zb"], name="shortcut", strides=[2, 2]),
        helper.make_node("Add", ["za", "zb"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["s0"], name="relu2"),
    ]
    if faults:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2, 2, 2]) for n in ("ks", "vs")]
        nodes += [helper.make_node("Mul", ["s0", "ks"], ["sm"]), helper.make_node("Add", ["sm", "vs"], ["s1"])]
        s = "s1"
    nodes += [
        helper.make_node("Flatten", [s], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wo", "bo"], ["y"], name="out", transB=1),
    ]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    graph = helper.make_graph(nodes, "block", inputs, out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 2, (24, 1, 4, 4)).astype(np.float32)
    return np.concatenate([corners, rng.uniform(0, 1, (40, 1, 4, 4)).astype(np.float32)])


def _measured(sets_h, sets_s, values) -> float:
    """Largest max_k |F̃_k − F_k| over the failure sets (indices into h's 32 and s's 8 neurons) × values × inputs."""
    session = ort.InferenceSession(conv_block(True).SerializeToString(), providers=["CPUExecutionProvider"])
    x = _inputs()
    m = len(x)
    ones = {"kh": np.ones((m, 2, 4, 4), np.float32), "vh": np.zeros((m, 2, 4, 4), np.float32)}
    ones |= {"ks": np.ones((m, 2, 2, 2), np.float32), "vs": np.zeros((m, 2, 2, 2), np.float32)}
    clean = session.run(None, {"x": x, **ones})[0].astype(np.float64)
    worst = 0.0
    for failed_h, failed_s in zip(sets_h, sets_s, strict=True):
        for value in values:
            feeds = {k: v.copy() for k, v in ones.items()}
            for where, failed, shape in (("h", failed_h, (32,)), ("s", failed_s, (8,))):
                keep, val = np.ones(shape, np.float32), np.zeros(shape, np.float32)
                keep[list(failed)], val[list(failed)] = 0.0, value
                feeds["k" + where][:] = keep.reshape(feeds["k" + where].shape[1:])
                feeds["v" + where][:] = val.reshape(feeds["v" + where].shape[1:])
            faulty = session.run(None, {"x": x, **feeds})[0].astype(np.float64)
            worst = max(worst, float(np.abs(faulty - clean).max()))
    return worst


@pytest.fixture(scope="module")
def block_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sum") / "block.onnx"
    onnx.save(conv_block(), path)
    return path


def test_the_sum_and_its_activation_are_one_layer(block_path) -> None:
    _, network = load_network(block_path, NetworkOptions())
    assert [(la.name, la.neurons) for la in network.hidden_layers] == [("conv1", 32), ("conv_a+shortcut", 8)]
    parts = {la.name for la in network.layers if la.part}
    assert parts == {"conv_a", "shortcut"}
    s = network.hidden_layers[1]
    assert s.fan_in == 2 * 9 + 1 and s.synapse_max_abs_weight == pytest.approx(max(np.abs(WA).max(), np.abs(WB).max()))


@pytest.mark.parametrize(
    ("mode", "counts", "values"),
    [
        ("crash", [0, 2], [0.0]),
        ("crash", [1, 1], [0.0]),
        ("byzantine", [0, 2], [-1.0, 1.0]),
        ("byzantine", [1, 0], [-1.0, 1.0]),
    ],
)
def test_no_error_above_the_bound(block_path, mode, counts, values) -> None:
    import itertools

    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    result = compute_bound(block_path, BoundOptions(epsilon=1.0, failure=failure, failures=tuple(counts)))
    sets_h = list(itertools.combinations(range(32), counts[0]))
    sets_s = list(itertools.combinations(range(8), counts[1]))
    pairs = list(itertools.product(sets_h, sets_s))
    measured = _measured([p[0] for p in pairs], [p[1] for p in pairs], values)
    assert measured > 0.0
    for bound in (result.fep_tight, result.fep_paper):
        assert measured <= bound * (1 + 1e-5) + 1e-6, (measured, bound)


def test_inject_runs_on_the_sum_layer(block_path) -> None:
    proc = run_in_process(
        "inject", block_path, "--crash", "0,2", "--search", "worst", "-e", "100", "--format", "json", "-q"
    )
    report = json.loads(proc.stdout)
    vector = report["vectors"][0] if "vectors" in report else report
    assert vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5)
    assert [la["name"] for la in report["layers"]] == ["conv1", "conv_a+shortcut"]


def test_synapse_injection_into_a_sum_layer_is_refused(tmp_path) -> None:
    spec = random_summed(np.random.default_rng(1), 3, 3, 3, 2, ["relu", "relu"], 1.0)
    onnx.save(to_onnx(spec), tmp_path / "summed.onnx")
    proc = run_in_process("inject", tmp_path / "summed.onnx", "--synapse", "0,1", "-q", expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sums two affine ops" in lines[0], proc.stderr


# --------------------------------------------------------------------------- precision --weights


def _rounded(weight: np.ndarray, bits: int) -> np.ndarray:
    """Nearest of 2^bits levels spread evenly over [min, max] of ``weight`` (written here, not imported)."""
    lo, hi = float(weight.min()), float(weight.max())
    levels = np.linspace(lo, hi, 2**bits)
    nearest = np.abs(weight.astype(np.float64)[..., None] - levels).argmin(axis=-1)
    return levels[nearest].astype(np.float32)


def _weights_error(spec, bits: int) -> float:
    """Largest output change when the sum layer's two summands' weights are rounded to ``bits`` (onnxruntime)."""
    clean = to_onnx(spec)
    rounded = to_onnx(spec)
    for tensor in rounded.graph.initializer:
        if tensor.name in ("l2a.W", "l2b.W"):
            tensor.CopyFrom(numpy_helper.from_array(_rounded(numpy_helper.to_array(tensor), bits), tensor.name))
    rng = np.random.default_rng(3)
    n_in = spec.in_shape[0]
    x = np.concatenate([rng.integers(0, 2, (64, n_in)), rng.uniform(0, 1, (256, n_in))]).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (clean, rounded)]
    return float(np.abs(run[1].run(None, {"x": x})[0] - run[0].run(None, {"x": x})[0]).max())


def _summed_spec():
    spec = random_summed(np.random.default_rng(5), 6, 8, 6, 3, ["relu", "relu"], 0.5)
    spec.hidden[1].first.weight *= 0.1  # the shortcut B dominates the sum's weight rounding
    spec.hidden[1].second.weight *= 8.0
    return spec


def _sum_row(path, epsilon: float):
    result = compute_precision(path, BoundOptions(epsilon=epsilon), weights=True)
    return next(row for row in result.layers if row.name == "l2a+l2b")


def test_rounded_summand_weights_stay_within_the_bound(tmp_path, monkeypatch) -> None:
    spec = _summed_spec()
    onnx.save(to_onnx(spec), tmp_path / "summed.onnx")
    row = _sum_row(tmp_path / "summed.onnx", 0.05)
    for bits in (row.bits, max(row.bits - 2, 2)):
        bound = row.gain * (row.range[1] - row.range[0]) / (2 * (2**bits - 1))
        assert _weights_error(spec, bits) <= bound * (1 + 1e-4) + 1e-6
    # weakened copy: the sum layer's weights rounded as if they were A's alone
    original = analysis._weight_sites

    def first_only(network, an):
        sites = original(network, an)
        for k, layer in enumerate(sites.layers):
            if layer.summands:
                first = layer.summands[0]
                sites.scales[k] = layer.lipschitz * first.fan_in * an.paper_range(first.input_value)[1]
                sites.ranges[k] = (float(first.weight.min()), float(first.weight.max()))
        return sites

    monkeypatch.setattr(analysis, "_weight_sites", first_only)
    weak = _sum_row(tmp_path / "summed.onnx", 0.05)
    bound = weak.gain * (weak.range[1] - weak.range[0]) / (2 * (2**weak.bits - 1))
    assert _weights_error(spec, weak.bits) > bound, "rounding only A's weights into the sum layer went unnoticed"


# --------------------------------------------------------------------------- design


def test_a_factor_on_the_sum_layer_scales_its_summands(block_path) -> None:
    _, network = load_network(block_path, NetworkOptions())
    layers = {la.name: la for la in network.layers}
    alone = scaled_network(network, {"conv_a+shortcut": 0.5}, Ranges.KEPT)
    scaled = {la.name: la for la in alone.layers}
    for name in ("conv_a", "shortcut"):
        assert np.allclose(scaled[name].weight, 0.5 * np.asarray(layers[name].weight, np.float64))
    assert np.array_equal(scaled["conv_a+shortcut"].weight, layers["conv_a+shortcut"].weight)
    every = scaled_network(network, dict.fromkeys(layers, 0.5), Ranges.KEPT)
    for la in every.layers:
        if la.name != "conv_a+shortcut":
            assert np.allclose(la.weight, 0.5 * np.asarray(layers[la.name].weight, np.float64)), la.name


def test_injection_runs_the_model_as_it_is(tmp_path) -> None:
    """The identity map is robaudit's reading only: a MatMul by I in the graph injection runs turned one float32
    element overflowing to inf into NaN across its row (tanh(inf) = 1 in the model), and inject reported a
    violation with byzantine values of ±3e38 (a review found it). Values that may pass float32's largest are now
    refused in one line (docs/method.md §10.2); large ones below it run as the model computes them."""
    import json

    spec = random_summed(np.random.default_rng(2), 3, 4, 3, 2, ["relu", "tanh"], 1.0)
    onnx.save(to_onnx(spec), tmp_path / "summed.onnx")
    _, network = load_network(tmp_path / "summed.onnx", NetworkOptions())
    assert any(node.name.endswith("/robaudit_sum") for node in network.nodes)
    assert not any(node.name.endswith("/robaudit_sum") for node in network.graph.nodes)
    refused = run_in_process("inject", tmp_path / "summed.onnx", "--byzantine", "3,0", "--capacity", "3e38", "-e",
                             "10", "-q", expect=2)
    assert "largest float32 value" in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    proc = run_in_process(
        "inject", tmp_path / "summed.onnx", "--byzantine", "3,0", "--capacity", "1e36", "-e", "10", "-q",
        "--format", "json",
    )
    report = json.loads(proc.stdout)
    vector = report["vectors"][0] if "vectors" in report else report
    assert not vector["violation"] and vector["measured"]["max"] <= vector["bound"]


def test_simulated_checks_list_no_run_for_a_sum_layer(tmp_path) -> None:
    """precision --weights --check and wait --check do not round/drop a sum layer's weights: no row may read as if
    they had (a review saw 'measured 0 … ≤ bound yes' for it), and a note says what the joint runs leave out."""
    import json

    spec = random_summed(np.random.default_rng(2), 3, 4, 3, 2, ["relu", "tanh"], 1.0)
    onnx.save(to_onnx(spec), tmp_path / "summed.onnx")
    for command in (["precision", "--weights"], ["wait"]):
        proc = run_in_process(
            command[0], tmp_path / "summed.onnx", *command[1:], "-e", "0.5", "--check", "--samples", "16", "-q",
            "--format", "json", expect=None,
        )
        check = json.loads(proc.stdout)["check"]
        assert not any(run["config"].startswith("l2a+l2b") for run in check["runs"]), check["runs"]
        assert any("'l2a+l2b'" in note and "not simulated" in note for note in check["notes"]), check["notes"]


def test_a_sum_layer_at_the_output_reports_its_summands_weights(tmp_path) -> None:
    """design's output layer read the identity's weight 1 for y = tanh(A·h + B·x) (a review found it)."""
    import json

    rng = np.random.default_rng(4)
    w1, wa, wb = (rng.uniform(-1, 1, s).astype(np.float32) for s in ((3, 5), (5, 2), (3, 2)))
    wb *= 3.0
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (wa, "wa"), (wb, "wb"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["z1"], name="fc1"), helper.make_node("Relu", ["z1"], ["h"]),
        helper.make_node("MatMul", ["h", "wa"], ["za"], name="fca"),
        helper.make_node("MatMul", ["x", "wb"], ["zb"], name="fcb"),
        helper.make_node("Add", ["za", "zb"], ["s"], name="add"), helper.make_node("Tanh", ["s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "last", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "last.onnx")
    design = json.loads(
        run_in_process("design", tmp_path / "last.onnx", "--tolerate", "1", "-e", "1", "-q", "--format", "json").stdout
    )
    largest = float(max(np.abs(wa).max(), np.abs(wb).max()))
    assert design["output_layer"]["name"] == "fca+fcb"
    assert design["output_layer"]["max_weight"] == pytest.approx(largest)
