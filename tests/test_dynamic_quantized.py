"""Dynamically quantized models (``quantize_dynamic``: DynamicQuantizeLinear → MatMulInteger /
ConvInteger → Cast → Mul by the scales): the step is computed from the tensor at run time, so
the rounding radius comes from the faulty network's range (docs/method.md §11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, cli_json, require_exact_int8, run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from quantized import quantize

from robaudit.graph.onnx_graph import build_graph
from robaudit.graph.ops.base import Interval
from robaudit.graph.ops.dynamic import STEP_SLACK, DynamicRound, dynamic_reference, fuse_dynamic, largest_step
from robaudit.graph.ops.gated import literal_constants

SAMPLES = ROOT / "sample_models"
CNN_INPUTS = SAMPLES / "digits_cnn_inputs.npz"
MLP_INPUTS = SAMPLES / "digits_inputs.npz"
RULE = DynamicRound()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """The trained digits CNN (ConvInteger + MatMulInteger) and MLP, dynamically quantized; the MLP
    also with per-channel weight scales."""
    folder = tmp_path_factory.mktemp("dyn")
    return {
        "cnn": (quantize(SAMPLES / "digits_cnn.onnx", folder / "cnn.onnx", None, "dynamic"), CNN_INPUTS),
        "mlp": (quantize(SAMPLES / "digits_mlp.onnx", folder / "mlp.onnx", None, "dynamic"), MLP_INPUTS),
        "mlp_channel": (quantize(SAMPLES / "digits_mlp.onnx", folder / "mlp_pc.onnx", None, "dynamic",
                                 per_channel=True), MLP_INPUTS),
    }


# --------------------------------------------------------------------------- the op against onnxruntime

_SESSION: list[ort.InferenceSession] = []


def _ort_round(x: np.ndarray) -> np.ndarray:
    """DequantizeLinear(DynamicQuantizeLinear(x)) run by onnxruntime on the whole array."""
    if not _SESSION:
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        _SESSION.append(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]))
    (out,) = _SESSION[0].run(None, {"x": np.asarray(x, np.float32).reshape(-1)})
    return np.asarray(out, np.float64).reshape(np.shape(x))


def _gap(clean: np.ndarray, faulty: np.ndarray) -> np.ndarray:
    """|r(ỹ) − r(y)| − |ỹ − y| per element, r by onnxruntime."""
    return np.abs(_ort_round(faulty) - _ort_round(clean)) - np.abs(faulty.astype(np.float64) - clean)


VALUES = st.floats(-50.0, 50.0, allow_subnormal=False, width=32)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(clean=st.lists(VALUES, min_size=1, max_size=40), faults=st.lists(st.tuples(st.integers(0, 39), VALUES),
                                                                         max_size=4))
def test_dynamic_round_radius_holds_against_onnxruntime(clean, faults) -> None:
    """|r(ỹ) − r(y)| ≤ |ỹ − y| + ρ with ρ from the box holding both tensors, and r(y) lies in the
    rule's interval; the numpy reference of the ONNX definition agrees with onnxruntime."""
    y = np.asarray(clean, np.float32)
    faulty = y.copy()
    for index, value in faults:
        faulty[index % len(y)] = value
    box = Interval(np.minimum(y, faulty).astype(np.float64), np.maximum(y, faulty).astype(np.float64))
    rho = RULE.radius(None, box)
    assert np.all(_gap(y, faulty) <= rho + 1e-12)
    out = RULE.interval(None, [Interval(y.astype(np.float64), y.astype(np.float64))])[0]
    assert np.all(out.lo <= _ort_round(y)) and np.all(_ort_round(y) <= out.hi)
    np.testing.assert_allclose(dynamic_reference(y), _ort_round(y), rtol=1e-6, atol=1e-7)


def test_weakened_radii_are_exceeded() -> None:
    """A radius halved, or computed from the clean range alone, is exceeded by real roundings."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(400):
        y = rng.uniform(-1.0, 1.0, 16).astype(np.float32)
        faulty = y.copy()
        faulty[rng.integers(16)] = rng.uniform(-1.0, 1.0)
        step = largest_step(np.minimum(y, faulty), np.maximum(y, faulty))
        worst = max(worst, float(np.max(_gap(y, faulty))) / step)
    assert 0.5 < worst <= 1.0 + 2 * STEP_SLACK  # ρ/2 is exceeded; ρ = s̄(1 + 2η) is not
    # one byzantine value 10 among values in [0, 1]: the unchanged values move by up to s̃/2 = 5/255
    y = np.linspace(0.0, 1.0, 64).astype(np.float32)
    faulty = y.copy()
    faulty[0] = 10.0
    clean_rho = RULE.radius(None, Interval(y.astype(np.float64), y.astype(np.float64)))[0]
    assert np.max(_gap(y, faulty)[1:]) > clean_rho


# --------------------------------------------------------------------------- the rewrite against onnxruntime


def _fused_model(path: Path, round_values: bool = True) -> onnx.ModelProto:
    """The fused form as an ONNX model: each DynamicRound back as DynamicQuantizeLinear →
    DequantizeLinear (or dropped: the weakened copy), the float op on the dequantized weight."""
    model = onnx.load(path)
    graph = build_graph(model)
    fused = fuse_dynamic(graph.nodes, literal_constants(graph.nodes, graph.initializers))
    assert all(n.op_type not in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear") for n in fused)
    protos = []
    for node in fused:
        if node.op_type == "DynamicRound":
            x, out = node.inputs[0], node.outputs[0]
            if round_values:
                protos += [helper.make_node("DynamicQuantizeLinear", [x], [f"{out}/q", f"{out}/s", f"{out}/z"]),
                           helper.make_node("DequantizeLinear", [f"{out}/q", f"{out}/s", f"{out}/z"], [out])]
            else:
                protos.append(helper.make_node("Identity", [x], [out]))
        else:
            protos.append(node.proto)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(protos)
    return copy


def _outputs(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """The float output of each input run alone (batch 1), as onnxruntime computes it."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    output = next(o.name for o in session.get_outputs() if o.name in ("probabilities", "logits"))
    return np.concatenate([session.run([output], {name: row[None]})[0] for row in x])


@pytest.mark.parametrize("which", ["cnn", "mlp", "mlp_channel"])
def test_fused_form_computes_what_onnxruntime_computes(models, which) -> None:
    """The fused form (float op on r(x) and the dequantized weight) gives onnxruntime's outputs of the
    dynamically quantized model for batch-1 inputs; dropping the rounding is caught."""
    require_exact_int8()
    path, inputs = models[which]
    x = np.load(inputs)["x"][:40].astype(np.float32)
    reference = _outputs(path, x)
    scale = 1e-5 * (1.0 + np.abs(reference))
    assert np.all(np.abs(_outputs(_fused_model(path), x) - reference) <= scale)
    assert np.any(np.abs(_outputs(_fused_model(path, round_values=False), x) - reference) > scale)


# --------------------------------------------------------------------------- bounds cover the worst search


def test_dynamic_models_are_bounded_with_the_float_layers(models) -> None:
    report = cli_json("bound", models["cnn"][0], "--crash", 1)
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "conv2", "fc1"]
    assert all(np.isfinite(layer["delta"]) for layer in report["layers"])
    assert [la["neurons"] for la in cli_json("bound", models["mlp"][0])["layers"]] == [32, 16]


DYNAMIC_CASES = given(
    which=st.sampled_from(["cnn", "mlp", "mlp_channel"]),
    mode=st.sampled_from(["crash", "byzantine"]),
    count=st.integers(1, 3),
    method=st.sampled_from(["tight", "paper"]),
)
DYNAMIC_SETTINGS = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}


def check_dynamic_worst_search(models, which: str, mode: str, count: int, method: str) -> None:
    """The bound covers `inject --search worst` on the dynamically quantized model, one sample per run."""
    model, inputs = models[which]
    extra = {"crash": ["--crash", count], "byzantine": ["--byzantine", count, "--capacity", 2.0]}[mode]
    report = cli_json("inject", model, "--search", "worst", "--inputs", inputs, "--trials", 40, "-q",
                      "--in-process", "--method", method, *extra)
    assert not report["violation"]
    for vector in report["vectors"]:
        assert vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
        assert vector["measured"]["max"] > 0


@settings(max_examples=2, **DYNAMIC_SETTINGS)
@DYNAMIC_CASES
def test_bound_covers_worst_search_on_dynamic_models(models, which, mode, count, method) -> None:
    check_dynamic_worst_search(models, which, mode, count, method)


@pytest.mark.slow
@settings(max_examples=16, **DYNAMIC_SETTINGS)
@DYNAMIC_CASES
def test_bound_covers_worst_search_on_dynamic_models_thorough(models, which, mode, count, method) -> None:
    check_dynamic_worst_search(models, which, mode, count, method)


def test_inject_runs_one_sample_per_run(models, monkeypatch) -> None:
    """A batch would share one step between samples: even where batched runs look close enough to the
    probe (forced here), the evaluator's clean outputs are onnxruntime's outputs of each sample run
    alone, and the campaign says it runs one sample per run."""
    from robaudit.bounds.audit import load_network
    from robaudit.graph.network import NetworkOptions
    from robaudit.injection.instrument import instrument, neuron_site
    from robaudit.injection.sandbox import Evaluator

    path, inputs = models["cnn"]
    x = np.load(inputs)["x"][:24].astype(np.float32)
    loaded, network = load_network(path, NetworkOptions())
    sites = tuple(neuron_site(layer, i) for i, layer in enumerate(network.hidden_layers))
    monkeypatch.setattr(Evaluator, "_batching_works", lambda self: True)
    evaluator = Evaluator(instrument(network, sites, loaded.opset), x)
    assert not evaluator.batched
    np.testing.assert_allclose(evaluator.clean, _outputs(path, x), rtol=1e-6, atol=1e-6)
    proc = run_in_process("inject", models["mlp"][0], "--crash", 1, "--samples", 8, "-q")
    assert "one sample per onnxruntime run" in proc.stdout


# --------------------------------------------------------------------------- refused forms


def _handmade(path: Path, k: int, weight: int, scale_mul: bool = True) -> Path:
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dql"),
        helper.make_node("MatMulInteger", ["q", "W", "z", "wz"], ["acc"], name="mmi"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
    ]
    if scale_mul:
        nodes += [helper.make_node("Mul", ["s", "ws"], ["sw"], name="scales"),
                  helper.make_node("Mul", ["accf", "sw"], ["y"], name="out")]
    else:
        nodes += [helper.make_node("Add", ["accf", "s"], ["y"], name="out")]
    inits = [numpy_helper.from_array(np.full((k, 2), weight, np.int8), "W"),
             numpy_helper.from_array(np.int8(0), "wz"), numpy_helper.from_array(np.float32(0.01), "ws")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_accumulator_overflow_is_refused_in_one_line(tmp_path) -> None:
    """255·127·70000 > 2³¹: the int32 sum could overflow; 255·127·60000 < 2³¹ is bounded."""
    proc = run_in_process("bound", _handmade(tmp_path / "big.onnx", 70000, 127), expect=2)
    assert proc.stderr.count("\n") == 1 and "'mmi'" in proc.stderr and "overflow" in proc.stderr
    run_in_process("inspect", _handmade(tmp_path / "ok.onnx", 60000, 127))


def test_other_dynamic_forms_are_refused_in_one_line(tmp_path) -> None:
    proc = run_in_process("bound", _handmade(tmp_path / "odd.onnx", 4, 1, scale_mul=False), expect=2)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "DynamicQuantizeLinear" in proc.stderr and "quantize_dynamic" in proc.stderr


def test_certify_refuses_dynamic_models_in_one_line(models) -> None:
    """certify's local pass does not carry the faulty-range rounding radius: refused, never unsound."""
    model, inputs = models["mlp"]
    proc = run_in_process("certify", model, "--inputs", inputs, expect=2)
    assert proc.stderr.count("\n") == 1 and "dynamically quantized" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def hardened(models, tmp_path_factory) -> tuple[Path, Path]:
    """The dynamically quantized CNN hardened (NaN-guarded Clips) on 30 of its inputs."""
    folder = tmp_path_factory.mktemp("hard")
    model, inputs = models["cnn"]
    np.save(folder / "x.npy", np.load(inputs)["x"][:30].astype(np.float32))
    run_in_process("harden", model, "--inputs", folder / "x.npy", "-o", folder / "hard.onnx")
    return folder / "hard.onnx", folder / "x.npy"


def test_bit_flips_are_unbounded_until_hardened(models, hardened) -> None:
    """Stored float32 activations: a bit flip is unbounded until `harden` clips them."""
    unbounded = cli_json("bound", models["cnn"][0], "--bit-flip", 1)
    assert unbounded["fep"] is None and "unbounded" in unbounded["notes"][0]
    assert np.isfinite(cli_json("bound", hardened[0], "--bit-flip", 1)["fep"])


@pytest.mark.slow
def test_bound_covers_bit_flips_after_harden(hardened) -> None:
    """The hardened model's bound covers `inject --bit-flip --search worst` (every bit position)."""
    model, x = hardened
    report = cli_json("inject", model, "--bit-flip", 1, "--search", "worst", "--inputs", x, "--trials", 20, "-q",
                      "--in-process")
    assert not report["violation"]
    for vector in report["vectors"]:
        assert np.isfinite(vector["bound"])
        assert 0 < vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]


def _rounding_dominated(path: Path) -> Path:
    """x [1, 4] → MatMul(I) → Relu (the hidden layer) → quantize_dynamic's pattern → Σ: y [1, 1]."""
    nodes = [
        helper.make_node("MatMul", ["x", "I"], ["z"], name="fc1"),
        helper.make_node("Relu", ["z"], ["h"], name="relu"),
        helper.make_node("DynamicQuantizeLinear", ["h"], ["q", "s", "zp"], name="h_quantize"),
        helper.make_node("Mul", ["s", "ws"], ["sw"], name="fc2_scales"),
        helper.make_node("MatMulInteger", ["q", "W", "zp", "wz"], ["acc"], name="fc2_quant"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["accf", "sw"], ["y"], name="out"),
    ]
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "I"),
             numpy_helper.from_array(np.ones((4, 1), np.int8), "W"), numpy_helper.from_array(np.int8(0), "wz"),
             numpy_helper.from_array(np.float32(1.0), "ws")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_faulty_range_radius_is_needed_on_a_network(tmp_path, monkeypatch) -> None:
    """One byzantine neuron sending −100 enlarges the step of the three others: onnxruntime's error
    exceeds the bound whose radius comes from the clean range, and stays below the real bound."""
    import robaudit.api
    import robaudit.bounds.fep as fep

    path = _rounding_dominated(tmp_path / "m.onnx")
    tail = onnx.load(path)
    del tail.graph.node[:2]
    keep = [init for init in tail.graph.initializer if init.name != "I"]
    del tail.graph.initializer[:]
    tail.graph.initializer.extend(keep)
    tail.graph.input[0].name = "h"
    session = ort.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    measured = 0.0  # measured 101.64; bound 104.14 (ρ = 200/255 per element); clean-range radius 101.02
    for _ in range(3000):  # one sample per run: the step is the tensor's
        h = rng.uniform(0.0, 1.0, (1, 4)).astype(np.float32)
        faulty = h.copy()
        faulty[0, 0] = -100.0
        (clean_y,), (faulty_y,) = session.run(None, {"h": h})[0], session.run(None, {"h": faulty})[0]
        measured = max(measured, float(np.abs(faulty_y - clean_y).max()))
    bound = robaudit.api.bound(path, byzantine=1, capacity=100.0).fep
    assert measured <= bound
    monkeypatch.setattr(fep, "faulty_radii", lambda steps, faulty: {})  # keep the clean range's radius
    weakened = robaudit.api.bound(path, byzantine=1, capacity=100.0).fep
    assert weakened < measured, (weakened, measured, bound)


def test_harden_measures_ranges_one_sample_per_run(models, tmp_path) -> None:
    """The ranges harden clips to are what each sample alone gives in onnxruntime (a batch would share
    one step between the samples and change the values)."""
    model, inputs = models["cnn"]
    x = np.load(inputs)["x"][:50].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = cli_json("harden", model, "--inputs", tmp_path / "x.npy", "-o", tmp_path / "hard.onnx")
    copy = onnx.load(model)
    values = [layer["value"] for layer in report["layers"]]
    copy.graph.output.extend([helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in values])
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    alone = [session.run(values, {"input": row[None]}) for row in x]
    for index, layer in enumerate(report["layers"]):
        assert layer["seen_high"] == pytest.approx(max(float(run[index].max()) for run in alone), rel=1e-6)


# --------------------------------------------------------------------------- design scales the weight scales


def _weight_scales(model: onnx.ModelProto) -> set[str]:
    """W_scale of every ``Mul(s, W_scale)`` that quantize_dynamic wrote (s a DynamicQuantizeLinear's scale)."""
    steps = {n.output[1] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"}
    return {v for n in model.graph.node if n.op_type == "Mul" and steps & set(n.input) for v in n.input} - steps


def _first_affine(model: onnx.ModelProto) -> str:
    """The output of the first integer op's scale Mul: the first layer's affine value before its bias."""
    integer = next(n for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger"))
    cast = next(n for n in model.graph.node if n.input and n.input[0] == integer.output[0])
    return next(n.output[0] for n in model.graph.node if n.op_type == "Mul" and cast.output[0] in n.input)


@pytest.mark.parametrize("which", ["cnn", "mlp_channel"])
def test_design_writes_dynamic_models_with_scaled_weight_scales(models, which, tmp_path) -> None:
    """``design`` on a dynamically quantized model (it stopped at "its affine node … is not in the graph"):
    the written copy keeps every int8 code, zero point and bias and multiplies each weight scale by the
    shrink factor, so in onnxruntime the first layer's affine value is the factor times the original's
    (the input's rounding is the same); ``bound`` on the copy meets ε."""
    path, inputs = models[which]
    eps = cli_json("bound", path, "--crash", 1)["fep"] / 2
    out = tmp_path / "scaled.onnx"
    factor = cli_json("design", path, "-e", eps, "--tolerate", 1, "--write", out)["shrink_factor"]
    assert 0 < factor < 1 and cli_json("bound", out, "--crash", 1)["fep"] <= eps * (1 + 1e-6)
    original, scaled = onnx.load(path), onnx.load(out)
    before, after = ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (original, scaled))
    assert before.keys() == after.keys() and len(scaled.graph.node) == len(original.graph.node)
    scales = _weight_scales(original)
    assert scales and scales <= before.keys()
    for name, value in before.items():
        expected = (value * factor).astype(value.dtype) if name in scales else value
        np.testing.assert_array_equal(after[name], expected, err_msg=name)
    value = _first_affine(original)
    runs = []
    for model in (original, scaled):
        model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        runs.append([session.run([value], {name: row[None]})[0] for row in np.load(inputs)["x"][:20]])
    np.testing.assert_allclose(np.asarray(runs[1]), factor * np.asarray(runs[0]), rtol=1e-5, atol=1e-6)
