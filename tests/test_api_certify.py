"""``robaudit.certify`` from Python gives what the ``certify`` command reports (docs/api.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "sample_models" / "digits_mlp.onnx"
DATA = ROOT / "sample_models" / "digits_inputs.npz"


def _command_report(inputs: Path, labels: Path) -> dict:
    args = ["certify", str(MODEL), "--inputs", str(inputs), "--labels", str(labels), "--crash", "1", "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "robaudit", *args, "--format", "json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_api_certify_matches_the_command_line(tmp_path):
    import robaudit

    data = np.load(DATA)
    x, y = data["x"][:12], data["labels"][:12]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    expected = _command_report(tmp_path / "x.npy", tmp_path / "y.npy")
    from_path = robaudit.certify(MODEL, x, labels=y, crash=1).to_dict()
    from_proto = robaudit.certify(onnx.load(MODEL), tmp_path / "x.npy", labels=tmp_path / "y.npy", crash=1).to_dict()
    for got in (from_path, from_proto):
        assert [i["bound"] for i in got["inputs"]] == pytest.approx([i["bound"] for i in expected["inputs"]])
        assert [i["certified"] for i in got["inputs"]] == [i["certified"] for i in expected["inputs"]]
        assert got["certified_accuracy"] == pytest.approx(expected["certified_accuracy"])
    assert from_proto["model"]["path"] == "<in-memory model>"
    assert "certify" in robaudit.__all__


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"radius": 0.0}, "OptionError"),
        ({"radius": -1.0}, "OptionError"),
        ({"inputs": np.full((2, 64), np.nan, np.float32)}, "InputDataError"),
        ({"inputs": np.zeros((2, 7), np.float32)}, "InputDataError"),
        ({"labels": np.zeros(3, np.int64)}, "InputDataError"),
    ],
)
def test_api_certify_errors_are_one_hierarchy(kwargs, error):
    import robaudit

    args = {"inputs": np.load(DATA)["x"][:2], **kwargs}
    with pytest.raises(robaudit.RobauditError) as caught:
        robaudit.certify(MODEL, **args)
    assert error in [c.__name__ for c in type(caught.value).__mro__], repr(caught.value)
