"""Outputs with and without classes in ``certify`` (docs/method.md §7.4).

A vector output of several elements holds class scores (certified: no failure set changes the
arg-max); one element, an image or a sequence holds none, and ``--no-classes`` says so for a
vector (an autoencoder's pixels): an input is then certified only when its certificate is
within ε. The worst error is found here independently, by a numpy forward pass over every crash
set, on a network whose arg-max no crash can move (the first output carries a bias of 100):
an ε below that error must leave the input uncertified — the arg-max reading would certify it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import make_model, run_in_process
from onnx import TensorProto, helper, numpy_helper

W1 = np.array([[1.0, -0.5, 0.25, 0.8], [0.3, 0.9, -0.7, 0.2], [-0.4, 0.6, 1.1, -0.3]])
B1 = np.array([0.1, 0.2, 0.05])
W2 = np.array([[0.5, -1.0, 0.7], [1.2, 0.4, -0.6], [-0.8, 0.9, 0.3], [0.2, -0.5, 1.0]])
B2 = np.array([100.0, 0.0, 0.1, -0.2])
X = np.array([[0.9, 0.2, 0.6, 0.4]], np.float32)


def _model(image: bool) -> onnx.ModelProto:
    """x [1, 4] → relu(W1·x + B1) → W2·h + B2 [1, 4], reshaped to [1, 1, 2, 2] when ``image``."""
    inits = [
        numpy_helper.from_array(W1.astype(np.float32), "w1"),
        numpy_helper.from_array(B1.astype(np.float32), "b1"),
        numpy_helper.from_array(W2.astype(np.float32), "w2"),
        numpy_helper.from_array(B2.astype(np.float32), "b2"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc1", transB=1),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["y" if not image else "v"], name="fc2", transB=1),
    ]
    if image:
        nodes.append(helper.make_node("Reshape", ["v", "shape"], ["y"], name="to_image"))
    out_shape = [1, 1, 2, 2] if image else [1, 4]
    graph = helper.make_graph(
        nodes,
        "classes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return make_model(graph)


def _worst_single_crash() -> tuple[float, bool]:
    """max over the 3 single crashes of max_k |ΔF_k| at X, and whether any moves the arg-max (numpy, float64)."""
    x = X[0].astype(np.float64)
    h = np.maximum(W1 @ x + B1, 0.0)
    clean = W2 @ h + B2
    worst, moved = 0.0, False
    for i in range(3):
        faulty_h = h.copy()
        faulty_h[i] = 0.0
        faulty = W2 @ faulty_h + B2
        worst = max(worst, float(np.abs(faulty - clean).max()))
        moved |= int(np.argmax(faulty)) != int(np.argmax(clean))
    return worst, moved


def _certify(tmp_path, image: bool, epsilon: float, *extra: str, expect: int = 0):
    path = tmp_path / ("image.onnx" if image else "vector.onnx")
    onnx.save(_model(image), path)
    np.save(tmp_path / "x.npy", X)
    proc = run_in_process(
        "certify", path, "--inputs", tmp_path / "x.npy", "--crash", "1", "-e", str(epsilon),
        "--format", "json", "-q", *extra, expect=expect,
    )
    return proc if expect else json.loads(proc.stdout)


def test_an_image_output_is_certified_within_epsilon_not_by_its_arg_max(tmp_path) -> None:
    worst, moved = _worst_single_crash()
    assert worst > 0.1 and not moved  # the arg-max reading would certify every ε
    report = _certify(tmp_path, True, worst / 2)
    assert report["classes"] is False
    assert report["inputs"][0]["predicted"] is None
    assert report["inputs"][0]["bound"] >= worst * (1 - 1e-6)
    assert report["inputs"][0]["certified"] is False
    assert report["certified_fraction"] == 0.0
    assert report["layers"][0]["max_failures_certified"] == 0
    roomy = _certify(tmp_path, True, report["inputs"][0]["bound"] * 1.01)
    assert roomy["inputs"][0]["certified"] is True


def test_a_vector_output_has_classes_unless_told(tmp_path) -> None:
    worst, _ = _worst_single_crash()
    scores = _certify(tmp_path, False, worst / 2)
    assert scores["classes"] is True and scores["inputs"][0]["predicted"] == 0
    assert scores["inputs"][0]["certified"] is True  # no crash moves the arg-max (bias 100)
    pixels = _certify(tmp_path, False, worst / 2, "--no-classes")
    assert pixels["classes"] is False and pixels["inputs"][0]["certified"] is False
    forced = _certify(tmp_path, True, worst / 2, "--classes")
    assert forced["classes"] is True and forced["inputs"][0]["certified"] is True


def test_labels_without_classes_are_refused(tmp_path) -> None:
    np.save(tmp_path / "y.npy", np.zeros(1, np.int64))
    proc = _certify(tmp_path, True, 1.0, "--labels", str(tmp_path / "y.npy"), expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "classes" in lines[0], proc.stderr


def _policy(tmp_path, certified: str) -> None:
    onnx.save(_model(False), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    worst, _ = _worst_single_crash()
    (tmp_path / "robaudit.yaml").write_text(
        f"models:\n  - path: m.onnx\n    epsilon: {worst / 2!r}\n    input_range: [0, 1]\n    inputs: x.npy\n"
        f"    require:\n      certified: {certified}\n"
    )


def test_check_reads_classes_from_the_policy(tmp_path) -> None:
    _policy(tmp_path, "{crash: 1}")
    run_in_process("check", cwd=tmp_path, expect=0)
    _policy(tmp_path, "{crash: 1, classes: false}")
    proc = run_in_process("check", "--format", "json", cwd=tmp_path, expect=1)
    assert "require.certified" in proc.stdout
    _policy(tmp_path, "{crash: 1, classes: 'no'}")
    proc = run_in_process("check", cwd=tmp_path, expect=2)
    assert "classes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_table_says_how_an_output_without_classes_is_certified(tmp_path) -> None:
    onnx.save(_model(True), tmp_path / "image.onnx")
    np.save(tmp_path / "x.npy", X)
    proc = run_in_process("certify", tmp_path / "image.onnx", "--inputs", tmp_path / "x.npy", "-e", "0.25", "-q")
    assert "no classes: an input is certified when its bound is at most ε = 0.25" in proc.stdout


def test_the_library_takes_classes_too(tmp_path) -> None:
    from robaudit import api

    worst, _ = _worst_single_crash()
    model = _model(False)
    assert api.certify(model, X, epsilon=worst / 2).inputs[0].certified is True
    result = api.certify(model, X, epsilon=worst / 2, classes=False)
    assert result.classes is False and result.inputs[0].certified is False
