"""``design --check`` compares the scaled model's predictions with the original's
(docs/method.md §9.2): a remedy that changes them is never confirmed."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from conftest import ROOT, run_cli

CNN = ROOT / "sample_models" / "digits_cnn.onnx"
DATA = ROOT / "sample_models" / "digits_cnn_inputs.npz"


def _accuracy(path, x, y) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {"input": x})[0].argmax(1) == y))


def test_scaled_model_whose_accuracy_drops_is_not_confirmed(tmp_path) -> None:
    scaled = tmp_path / "scaled.onnx"
    proc = run_cli("design", CNN, "-e", 1, "--tolerate", 1, "--method", "tight", "--write", scaled, "--check",
                   "--inputs", DATA, "--labels", DATA, expect=1)
    assert "NOT confirmed" in proc.stdout and "confirmed" not in proc.stdout.replace("NOT confirmed", "")
    # the bound holds on that line; the reason is said there, not only on the next line
    assert "NOT confirmed: the scaled model changes predictions" in " ".join(proc.stdout.split()), proc.stdout
    data = np.load(DATA)
    before, after = _accuracy(CNN, data["x"], data["labels"]), _accuracy(scaled, data["x"], data["labels"])
    assert after < before - 0.05  # the independent measurement: scaling really broke the model
    assert f"{before:.1%} → {after:.1%}" in proc.stdout
    assert "harden" in proc.stdout


def test_design_check_without_inputs_compares_on_samples(tmp_path) -> None:
    proc = run_cli("design", CNN, "-e", 1, "--tolerate", 1, "--method", "tight", "--check", expect=None)
    assert "200 samples" in proc.stdout and "predictions unchanged on" in proc.stdout
