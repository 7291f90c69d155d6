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


def test_api_takes_bit_flips_as_the_command_line_does(tmp_path):
    """``robaudit.bound/certify/inject(bit_flip=N, bit=B)`` and ``stuck_at=V`` (they had crash and byzantine only):
    the figures of the same command-line runs; a stuck value other than 0/1 and a bit flip beside a crash are
    RobauditErrors."""
    import robaudit

    lenet = ROOT / "sample_models" / "lenet.onnx"
    inputs = ROOT / "sample_models" / "lenet_inputs.npz"

    def command(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "robaudit", *args, "--format", "json"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode in (0, 1), proc.stderr
        return json.loads(proc.stdout)

    bound = robaudit.bound(lenet, 20.0, bit_flip=1, bit=22).to_dict()
    expected = command("bound", str(lenet), "-e", "20", "--bit-flip", "1", "--bit", "22")
    assert bound["fep_tight"] == pytest.approx(expected["fep_tight"]) and bound["settings"]["bit"] == 22
    stuck = robaudit.bound(lenet, 20.0, bit_flip=1, bit=31, stuck_at=0).to_dict()
    assert stuck["settings"]["mode"] == "stuck_at" and stuck["fep_tight"] == 0.0  # ReLU outputs keep their sign
    x = np.load(inputs)["x"][:5]
    certified = robaudit.certify(lenet, x, bit_flip=[0, 0, 1, 1], bit=22, layer_counts=False).to_dict()
    np.save(tmp_path / "x.npy", x)
    flags = ("--bit-flip", "0,0,1,1", "--bit", "22", "--no-layer-counts", "-q")
    expected = command("certify", str(lenet), "--inputs", str(tmp_path / "x.npy"), *flags)
    assert [i["bound"] for i in certified["inputs"]] == pytest.approx([i["bound"] for i in expected["inputs"]])
    injected = robaudit.inject(lenet, 20.0, bit_flip=1, bit=22, inputs=x, trials=20, isolate=False).to_dict()
    vector = injected["vectors"][0]
    assert vector["bound"] == pytest.approx(bound["fep_tight"]) and not injected["violation"]
    for kwargs in ({"bit_flip": 1, "stuck_at": 2}, {"bit_flip": 1, "crash": 1}):
        with pytest.raises(robaudit.RobauditError):
            robaudit.bound(lenet, 1.0, **kwargs)
