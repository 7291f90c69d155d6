"""QOperator models (``quantize_static(quant_format=QOperator)``: QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, ...): rewritten into their QDQ form, which onnxruntime runs exactly as the integer
model, bounded, and the bound covers the worst search of ``inject`` (docs/method.md §11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, cli_json, require_exact_int8
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from quantized import every_qlinear_op_source, quantize

from robaudit.bounds.audit import load_network
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import qoperator
from robaudit.injection.instrument import audited_model

SAMPLES = ROOT / "sample_models"
CNN_INPUTS = SAMPLES / "digits_cnn_inputs.npz"
MLP_INPUTS = SAMPLES / "digits_inputs.npz"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """The trained digits CNN and MLP (sample models) and a small every-op CNN, each quantized in
    the QOperator format on inputs of their own; the CNN also with per-channel weight scales."""
    folder = tmp_path_factory.mktemp("qop")
    cnn_x, mlp_x = np.load(CNN_INPUTS)["x"], np.load(MLP_INPUTS)["x"]
    tiny_x = np.random.default_rng(3).uniform(0.0, 1.0, (60, 2, 6, 6)).astype(np.float32)
    np.save(folder / "tiny_x.npy", tiny_x)
    tiny = every_qlinear_op_source(folder / "tiny.onnx")
    return {
        "cnn": (quantize(SAMPLES / "digits_cnn.onnx", folder / "cnn.onnx", cnn_x[:60], "QOperator"), CNN_INPUTS),
        "cnn_channel": (
            quantize(SAMPLES / "digits_cnn.onnx", folder / "cnn_pc.onnx", cnn_x[:60], "QOperator", per_channel=True),
            CNN_INPUTS,
        ),
        "mlp": (quantize(SAMPLES / "digits_mlp.onnx", folder / "mlp.onnx", mlp_x[:60], "QOperator"), MLP_INPUTS),
        "tiny": (quantize(tiny, folder / "tiny_q.onnx", tiny_x[:30], "QOperator"), folder / "tiny_x.npy"),
    }


def _inputs(path: Path) -> np.ndarray:
    return (np.load(path)["x"] if path.suffix == ".npz" else np.load(path)).astype(np.float32)


def test_the_models_are_integer_models(models) -> None:
    ops = {name: {n.op_type for n in onnx.load(path).graph.node} for name, (path, _) in models.items()}
    assert {"QLinearConv", "QGemm", "MaxPool"} <= ops["cnn"] and "Conv" not in ops["cnn"]
    assert {"QLinearMatMul", "QLinearAdd", "QLinearSoftmax"} <= ops["mlp"] and "MatMul" not in ops["mlp"]
    every = {"QLinearConv", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearSigmoid", "QLinearAdd", "QLinearMul",
             "QLinearConcat", "QLinearGlobalAveragePool", "QGemm"}
    assert every <= ops["tiny"], every - ops["tiny"]


def _qdq_form_outputs(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(what onnxruntime gives for the QDQ form robaudit analyses and injects, what it gives for the model)."""
    loaded, network = load_network(path, NetworkOptions())
    model, _ = audited_model(network, loaded.opset)
    ours = ort.InferenceSession(model.SerializeToString()).run([network.output_name], {network.input_name: x})[0]
    session = ort.InferenceSession(str(path))
    theirs = session.run([network.output_name], {session.get_inputs()[0].name: x})[0]
    return ours, theirs


@pytest.mark.parametrize("which", ["cnn", "cnn_channel", "mlp", "tiny"])
def test_qdq_form_computes_what_the_integer_model_computes(models, which) -> None:
    """The rewrite is exact: onnxruntime gives the same codes for the QDQ form as for the integer ops."""
    require_exact_int8()
    path, inputs = models[which]
    ours, theirs = _qdq_form_outputs(path, _inputs(inputs))
    assert np.array_equal(ours, theirs), np.abs(ours - theirs).max()


@pytest.mark.parametrize("weakening", ["no_rounding", "bias_scale"])
def test_a_weakened_rewrite_is_caught(models, monkeypatch, weakening) -> None:
    """Dropping the requantization, or dequantizing the int32 bias with 0.9·s_x·s_w, changes the outputs."""
    if weakening == "no_rounding":
        def exact(self, node, value, codes, scale, zp):  # the float result passed on unrounded
            self.emit("Identity", [value], [f"{codes}/ra_dq"], f"{node.name}/weak")
            self.twin[codes] = (f"{codes}/ra_dq", scale, zp)

        monkeypatch.setattr(qoperator._Rewriter, "quantize_result", exact)
    else:
        original = qoperator._Rewriter.constant

        def shrunk(self, name, value):
            return original(self, name, value * np.float32(0.9) if name.endswith("/ra_scale") else value)

        monkeypatch.setattr(qoperator._Rewriter, "constant", shrunk)
    path, inputs = models["cnn"]
    ours, theirs = _qdq_form_outputs(path, _inputs(inputs))
    assert np.abs(ours - theirs).max() > 0.05


def test_layers_are_the_float_models_layers(models) -> None:
    """Failure sites of the integer model are the float model's layers, named alike."""
    names = [layer["name"] for layer in cli_json("inspect", models["cnn"][0])["layers"]]
    assert names == [layer["name"] for layer in cli_json("inspect", SAMPLES / "digits_cnn.onnx")["layers"]]
    assert [la["neurons"] for la in cli_json("inspect", models["mlp"][0])["layers"]][:2] == [32, 16]


_VECTORS = {"cnn": 3, "cnn_channel": 3, "mlp": 2, "tiny": 3}


QOPERATOR_CASES = given(
    which=st.sampled_from(["cnn", "cnn_channel", "mlp", "tiny"]),
    mode=st.sampled_from(["crash", "byzantine", "bit_flip"]),
    layer=st.integers(0, 2),
    count=st.integers(1, 2),
    method=st.sampled_from(["tight", "paper"]),
)
QOPERATOR_SETTINGS = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}


# The default suite: three chosen cases (the tight method, per-channel codes, byzantine values; ~5 s each);
# the thorough twin below adds the other chosen cases and random ones.
@settings(max_examples=1, phases=[Phase.explicit], **QOPERATOR_SETTINGS)
@example(which="tiny", mode="crash", layer=2, count=2, method="tight")
@example(which="cnn_channel", mode="bit_flip", layer=2, count=1, method="paper")
@example(which="cnn", mode="byzantine", layer=1, count=2, method="paper")
@QOPERATOR_CASES
def test_bound_covers_worst_search_on_qoperator_models(models, which, mode, layer, count, method) -> None:
    check_qoperator_worst_search(models, which, mode, layer, count, method)


@pytest.mark.slow
@settings(max_examples=12, **QOPERATOR_SETTINGS)
@example(which="mlp", mode="bit_flip", layer=1, count=1, method="paper")
@example(which="tiny", mode="bit_flip", layer=0, count=1, method="tight")
@QOPERATOR_CASES
def test_bound_covers_worst_search_on_qoperator_models_thorough(models, which, mode, layer, count, method) -> None:
    check_qoperator_worst_search(models, which, mode, layer, count, method)


def check_qoperator_worst_search(models, which: str, mode: str, layer: int, count: int, method: str) -> None:
    """One layer failing at a time (so that the output's code range does not cap every bound)."""
    path, inputs = models[which]
    counts = [0] * _VECTORS[which]
    counts[layer % len(counts)] = count
    vector = ",".join(map(str, counts))
    extra = {
        "crash": ["--crash", vector],
        "byzantine": ["--byzantine", vector, "--capacity", 2.0],
        "bit_flip": ["--bit-flip", vector],
    }[mode]
    report = cli_json("inject", path, "--search", "worst", "--inputs", inputs, "--trials", 30, "-q",
                      "--in-process", "--method", method, *extra)
    assert not report["violation"]
    for result in report["vectors"]:
        assert result["measured"]["max"] <= result["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
        assert result["measured"]["max"] > 0


def test_harden_and_design_edit_the_qdq_form(models, tmp_path) -> None:
    """harden and design --write name layer values that exist only in the QDQ form: they edit that form,
    which keeps every output of the integer model on the inputs."""
    require_exact_int8()
    path, inputs = models["cnn"]
    report = cli_json("harden", path, "--inputs", inputs, "--labels", inputs, "-o", tmp_path / "h.onnx",
                      "--per-channel")
    assert report["max_output_change"] == 0.0 and report["agreement"] == 1.0
    _, network = load_network(tmp_path / "h.onnx", NetworkOptions())
    assert len(network.protections) == len(network.hidden_layers) == 3
    design = cli_json("design", path, "-e", 5, "--tolerate", 1, "--write", tmp_path / "d.onnx")
    assert design["written"] == str(tmp_path / "d.onnx") and (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("edit", ["channels_last", "few_inputs", "unknown_codes"])
def test_unusable_forms_are_refused_in_one_line(models, tmp_path, edit) -> None:
    """A layout the float form cannot express, a truncated op, codes of unknown scale: one line, exit 2."""
    from conftest import run_cli

    model = onnx.load(models["cnn"][0])
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    if edit == "channels_last":
        pool = next(n for n in model.graph.node if n.op_type == "QGemm")
        pool.attribute.append(onnx.helper.make_attribute("channels_last", 1))
    elif edit == "few_inputs":
        del conv.input[5:]
    else:  # the first conv reads the graph input directly, as if it were uint8 codes
        conv.input[0] = model.graph.input[0].name
    path = tmp_path / f"{edit}.onnx"
    onnx.save(model, path)
    proc = run_cli("bound", path, expect=2)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert "Q" in proc.stderr
