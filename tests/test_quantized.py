"""Quantized models as onnxruntime's ``quantize_static`` writes them (QDQ format): bounded, and
the bound covers the worst search of ``inject`` on the quantized model itself, run by
onnxruntime (docs/method.md §1.2, §11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, cli_json, run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quantized import quantize

SAMPLES = ROOT / "sample_models"
CNN_INT8 = SAMPLES / "digits_cnn_int8.onnx"
CNN_INPUTS = SAMPLES / "digits_cnn_inputs.npz"
MLP_INPUTS = SAMPLES / "digits_inputs.npz"


@pytest.fixture(scope="module")
def mlp_qdq(tmp_path_factory) -> Path:
    """scikit-learn's digits MLP (sample model), quantized to int8 QDQ on its own inputs."""
    calibration = np.load(MLP_INPUTS)["x"][:60]
    return quantize(SAMPLES / "digits_mlp.onnx", tmp_path_factory.mktemp("q") / "mlp_qdq.onnx", calibration)


def test_sample_int8_model_is_qdq_and_small() -> None:
    model = onnx.load(CNN_INT8)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert CNN_INT8.stat().st_size < 200_000


def test_qdq_layers_are_the_float_layers(mlp_qdq) -> None:
    """The failure sites of the QDQ model are the float model's layers; their values the dequantized ones."""
    report = cli_json("inspect", CNN_INT8)
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["conv1", "conv2", "fc1", "fc2"]  # three hidden layers and the output layer
    assert [layer["activation"] for layer in report["layers"][:3]] == ["QDQ"] * 3  # ReLU folded into the codes
    assert [la["neurons"] for la in cli_json("inspect", mlp_qdq)["layers"]][:2] == [32, 16]


def _inject(model: Path, inputs: Path, *args: object) -> dict:
    return cli_json("inject", model, "--search", "worst", "--inputs", inputs, "--trials", 60, "-q",
                    "--in-process", *args)


QDQ_CASES = given(
    which=st.sampled_from(["cnn", "mlp"]),
    mode=st.sampled_from(["crash", "byzantine", "bit_flip"]),
    count=st.integers(1, 3),
    method=st.sampled_from(["tight", "paper"]),
)
QDQ_SETTINGS = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=2, **QDQ_SETTINGS)
@QDQ_CASES
def test_bound_covers_worst_search_on_qdq_models(mlp_qdq, which, mode, count, method) -> None:
    check_qdq_worst_search(mlp_qdq, which, mode, count, method)


@pytest.mark.slow
@settings(max_examples=24, **QDQ_SETTINGS)
@QDQ_CASES
def test_bound_covers_worst_search_on_qdq_models_thorough(mlp_qdq, which, mode, count, method) -> None:
    check_qdq_worst_search(mlp_qdq, which, mode, count, method)


def check_qdq_worst_search(mlp_qdq: Path, which: str, mode: str, count: int, method: str) -> None:
    """The bound covers `inject --search worst` on a QDQ model (float bounds, int8 codes)."""
    model, inputs = (CNN_INT8, CNN_INPUTS) if which == "cnn" else (mlp_qdq, MLP_INPUTS)
    extra = {
        "crash": ["--crash", count],
        "byzantine": ["--byzantine", count, "--capacity", 2.0],
        "bit_flip": ["--bit-flip", count],
    }[mode]
    report = _inject(model, inputs, "--method", method, *extra)
    assert not report["violation"]
    for vector in report["vectors"]:
        assert vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
        assert vector["measured"]["max"] > 0


def test_quantized_bound_uses_the_code_range() -> None:
    """Clipping to the codes gives the int8 model ranges at least as tight as the float model's IBP."""
    float_report = cli_json("bound", SAMPLES / "digits_cnn.onnx", "--crash", 1)
    int8_report = cli_json("bound", CNN_INT8, "--crash", 1)
    for f_layer, q_layer in zip(float_report["layers"], int8_report["layers"], strict=True):
        assert q_layer["delta"] <= f_layer["delta"] * 1.05


def test_float16_cast_alone_makes_the_ops_after_it_round(tmp_path) -> None:
    """A Cast to float16 that is not cast straight back: the ops after it compute in float16, each result rounded
    (docs/method.md §1.2; it was refused by name). Here the Relu is exact and the Cast back to float32 ends it:
    the hidden layer x·I → round → Relu has δ = (1 + 2⁻¹¹)·1 + 2⁻²⁵ (the rounding's interval of [0, 1]), and
    the output layer, I again, passes a crash's δ unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Cast", ["m"], ["h"], to=TensorProto.FLOAT16, name="to16"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Cast", ["r"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["f", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "W")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    report = cli_json("bound", path, "--crash", 1, "--input-range", "0,1")
    assert report["settings"]["float16"] is True
    u, t = 2.0**-11, 2.0**-25
    delta = (1 + u) * 1 + t  # x·I ∈ [0, 1] rounded; the Relu passes it; one crash sends 0 instead
    assert report["layers"][0]["delta"] == pytest.approx(delta, rel=1e-12)
    assert report["fep_tight"] == pytest.approx(delta, rel=1e-12)  # W = I: the crashed element moves y by δ


@pytest.mark.parametrize("command", ["precision", "wait"])
def test_linear_applications_refuse_models_that_round(command) -> None:
    """precision/wait scale linear gains by σ; the model's own rounding is a constant they cannot carry."""
    proc = run_in_process(command, CNN_INT8, expect=2)
    assert "rounds inside" in proc.stderr and proc.stderr.count("\n") == 1


def test_inspect_gives_the_range_a_final_qdq_pair_keeps_the_output_in() -> None:
    """inspect's out row is the Gemm's range; the audited output, after the int8 model's last QDQ pair, lies in that
    pair's codes range ((0 − zp)·scale, (255 − zp)·scale for uint8), which bound caps at: inspect says so too."""
    path = ROOT / "sample_models" / "digits_cnn_int8.onnx"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    scale, zero_point = float(inits["logits_scale"]), int(inits["logits_zero_point"])
    codes = ((0 - zero_point) * scale, (255 - zero_point) * scale)
    report = cli_json("inspect", path)
    assert report["output_range"] == pytest.approx(list(codes), rel=1e-6)
    assert report["layers"][-1]["output_range"][0] < codes[0]  # the Gemm's own range is wider
    assert cli_json("bound", path, "--crash", "1")["output_range"] == report["output_range"]
    text = " ".join(run_in_process("inspect", path).stdout.split())
    assert f"audited output 'logits' in [{codes[0]:.4g}, {codes[1]:.4g}] whatever fails" in text, text
    assert cli_json("inspect", ROOT / "sample_models" / "lenet.onnx")["output_range"] is None
