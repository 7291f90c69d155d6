"""``check``'s "what it would take" on the trained digits CNN: the scaled model and the range-restricted
one are run beside the original, and a remedy that changes predictions is never presented as a fix
without saying so (docs/method.md §9.2). Figures are recomputed here independently: weights scaled in
the ONNX file by hand, ``harden`` run by its own command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from conftest import ROOT, cli_json, run_in_process
from onnx import numpy_helper

SAMPLES = ROOT / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
DATA = SAMPLES / "digits_cnn_inputs.npz"


def _policy(tmp_path: Path, epsilon: float, require: dict, inputs: bool = True) -> Path:
    entry = {"path": str(CNN), "epsilon": epsilon, "require": require}
    if inputs:
        entry["inputs"] = str(DATA)
    path = tmp_path / "robaudit.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


def _check(policy: Path) -> tuple[dict, str]:
    report = json.loads(run_in_process("check", "--policy", policy, "--format", "json", expect=1).stdout)
    table = run_in_process("check", "--policy", policy, expect=1, columns=400).stdout
    return report["models"][0]["requirements"][0], table


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0].astype(np.float64)


def _scaled_by_hand(factor: float) -> onnx.ModelProto:
    """The CNN with every Conv/Gemm weight × factor (biases unchanged), written independently of robaudit."""
    model = onnx.load(str(CNN))
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in weights:
            array = numpy_helper.to_array(tensor).astype(np.float64) * factor
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    return model


def test_scaling_that_ruins_the_model_is_not_presented_as_a_fix(tmp_path) -> None:
    """ε = 1, one crash in every layer: all weights must shrink ×0.26, which changes most predictions."""
    verdict, table = _check(_policy(tmp_path, 1.0, {"crash": 1}))
    remedy = verdict["remedy"]
    scaled = remedy["scaled"]
    data = np.load(DATA)
    x, labels = data["x"], data["labels"]
    before, after = _outputs(onnx.load(str(CNN)), x), _outputs(_scaled_by_hand(remedy["shrink_factor"]), x)
    agreement = float(np.mean(before.argmax(1) == after.argmax(1)))
    assert scaled["inputs"] == len(x)
    assert scaled["agreement"] == pytest.approx(agreement, abs=1e-9)
    assert scaled["accuracy_before"] == pytest.approx(float(np.mean(before.argmax(1) == labels)))
    assert scaled["accuracy_after"] == pytest.approx(float(np.mean(after.argmax(1) == labels)))
    assert scaled["max_output_change"] == pytest.approx(float(np.abs(after - before).max()), rel=1e-4)
    assert agreement < 0.5 and scaled["accuracy_after"] < scaled["accuracy_before"] - 0.5
    assert "not a drop-in fix" in table and f"{1 - agreement:.1%} of predictions" in table


def test_range_restriction_is_offered_with_its_figures(tmp_path) -> None:
    """ε = 20, one crash in conv2 alone: harden meets it with every prediction kept; its figure agrees
    with ``bound`` on a model hardened by the ``harden`` command itself."""
    verdict, table = _check(_policy(tmp_path, 20.0, {"layers": {"conv2": 1}}))
    hardened = verdict["remedy"]["hardened"]
    hard = tmp_path / "hard.onnx"
    harden = cli_json("harden", CNN, "--inputs", DATA, "--labels", DATA, "-o", hard, "-e", 20)
    conv2 = next(la for la in cli_json("bound", hard, "-e", 20)["layers"] if la["name"] == "conv2")
    assert hardened["achieved"] == conv2["max_failures"] >= 1 and hardened["meets"]
    assert hardened["agreement"] == 1.0 and hardened["max_output_change"] == 0.0
    assert hardened["accuracy_after"] == hardened["accuracy_before"] == harden["accuracy_before"]
    assert "robaudit harden (predictions kept on 200 inputs" in table


def test_without_inputs_the_scaled_model_runs_on_samples_of_the_domain(tmp_path) -> None:
    verdict, table = _check(_policy(tmp_path, 1.0, {"crash": 1}, inputs=False))
    remedy = verdict["remedy"]
    assert remedy["hardened"] is None and remedy["scaled"]["accuracy_before"] is None
    assert "samples uniform" in remedy["scaled"]["source"] and remedy["scaled"]["inputs"] == 200
    assert "samples of the domain" in table
    if remedy["scaled"]["agreement"] < 1.0:
        assert "not a drop-in fix" in table


def test_inputs_flag_gives_every_model_its_inputs(tmp_path) -> None:
    """``check --inputs FILE`` = the policy key ``inputs`` for every model."""
    verdict, _ = _check(_policy(tmp_path, 20.0, {"layers": {"conv2": 1}}))
    proc = run_in_process("check", CNN, "-e", 20, "--require-layer", "conv2=1", "--inputs", DATA, "--format", "json",
                   expect=1)
    flagged = json.loads(proc.stdout)["models"][0]["requirements"][0]
    assert flagged["remedy"]["hardened"] == verdict["remedy"]["hardened"]
    assert flagged["remedy"]["scaled"]["agreement"] == verdict["remedy"]["scaled"]["agreement"]
