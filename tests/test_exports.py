"""Real exports load and give a bound (README "Supported ONNX").

PyTorch 2.13 ``torch.onnx.export`` with the default exporter (dynamo, forced to write
external data ``model.onnx.data``) and with ``dynamo=False``, for an MLP and a
LeNet-style CNN; scikit-learn's MLPClassifier through skl2onnx, relu and logistic,
with and without ZipMap. Models are generated in the test session (session-scoped
fixtures in conftest.py); every check runs the real ``robaudit`` command.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
from conftest import cli_json, ort_session, run_cli

pytestmark = [pytest.mark.export, pytest.mark.cli]

TORCH_CASES = [("mlp", True), ("mlp", False), ("lenet", True), ("lenet", False)]
SKLEARN_CASES = [("relu", False), ("relu", True), ("logistic", False), ("logistic", True)]


def _ids(cases):
    return [f"{a}-{'dynamo' if b is True else 'legacy' if b is False else b}" for a, b in cases]


def check_layers(report: dict, export, activations: list[str] | None = None) -> None:
    """Hidden layers: kinds, neuron counts and max weights match the source model."""
    layers = report["layers"]
    assert [(la["kind"], la["neurons"]) for la in layers] == export.expected_hidden, layers
    for la, weight in zip(layers, export.max_weights, strict=False):
        assert la["max_weight"] == pytest.approx(weight, rel=1e-6), la
    if activations is not None:
        assert [la.get("activation") for la in layers] == activations


def check_default_output_is_the_scores(export, report: dict, x: np.ndarray) -> None:
    """The audited tensor is the float logits/probabilities: onnxruntime reproduces the source model's scores."""
    name = report["settings"]["output"]
    assert name == export.expected_output
    model = onnx.load(str(export.path))
    if name not in {o.name for o in model.graph.output}:  # an inner tensor (before ZipMap): expose it
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort_session(model)
    got = session.run([name], {session.get_inputs()[0].name: x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, export.predict(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "dynamo"), TORCH_CASES, ids=_ids(TORCH_CASES))
def test_torch_export_gives_a_bound(torch_export, name, dynamo):
    export = torch_export(name, dynamo)
    data = export.path.with_name(export.path.name + ".data")
    if dynamo:
        # the default exporter was asked for external data: the weights live in model.onnx.data
        assert data.is_file(), sorted(p.name for p in export.path.parent.iterdir())
        header = onnx.load(str(export.path), load_external_data=False)
        external = [t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, "no initializer refers to external data"
    else:
        assert not data.exists()
    report = cli_json("bound", export.path, "--epsilon", "0.5", "--crash", "1")
    check_layers(report, export)
    hidden = len(export.expected_hidden)
    assert report["failures"] == [1] * hidden
    assert 0 < report["fep_tight"] <= report["fep_paper"] < math.inf
    assert report["fep"] == report["fep_tight"]
    assert all(la["delta"] > 0 and la["lipschitz"] in (0.25, 1.0) for la in report["layers"])
    inspect = cli_json("inspect", export.path)
    assert len(inspect["layers"]) == hidden + 1 and inspect["layers"][-1]["is_output"]
    assert inspect["layers"][-1]["max_weight"] == pytest.approx(export.max_weights[-1], rel=1e-6)
    for la in inspect["layers"]:
        if la["kind"] == "conv":  # fanout = C_out·⌈kh/sh⌉·⌈kw/sw⌉ = C_out·25 for 5×5 stride-1 kernels
            channels = la["neurons"] // (24 * 24 if la["index"] == 1 else 8 * 8)
            assert la["fanout"] == channels * 25, la
        else:
            assert la["fanout"] == la["neurons"], la
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, *export.extra["input_shape"][1:])).astype(np.float32)
    check_default_output_is_the_scores(export, report, x)


def test_torch_external_data_moves_with_the_model(torch_export, tmp_path):
    """The model and its .data file copied elsewhere still load (location is relative)."""
    export = torch_export("mlp", True)
    for path in (export.path, export.path.with_name(export.path.name + ".data")):
        shutil.copy(path, tmp_path / path.name)
    report = cli_json("bound", tmp_path / export.path.name, "--crash", "1")
    check_layers(report, export)


def test_torch_external_data_missing_is_refused(torch_export, tmp_path):
    export = torch_export("mlp", True)
    shutil.copy(export.path, tmp_path / export.path.name)  # without model.onnx.data
    proc = run_cli("bound", tmp_path / export.path.name, expect=2)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not exist" in proc.stderr and ".data" in proc.stderr


@pytest.mark.parametrize(("activation", "zipmap"), SKLEARN_CASES, ids=_ids(SKLEARN_CASES))
def test_sklearn_mlp_gives_a_bound(sklearn_export, activation, zipmap):
    export = sklearn_export(activation, zipmap)
    model = onnx.load(str(export.path))
    ops = {n.op_type for n in model.graph.node}
    assert ("ZipMap" in ops) == zipmap
    if zipmap:  # the graph output is a sequence of maps; robaudit must audit the tensor ZipMap reads
        assert export.expected_output not in {o.name for o in model.graph.output}
    else:
        assert export.expected_output in {o.name for o in model.graph.output}
    report = cli_json("bound", export.path, "--epsilon", "0.2", "--crash", "1")
    check_layers(report, export)
    expected_k = 0.25 if activation == "logistic" else 1.0
    assert [la["lipschitz"] for la in report["layers"]] == [expected_k, expected_k]
    if activation == "logistic":  # bounded activation: δ from the range (0, 1)
        assert [la["delta"] for la in report["layers"]] == [1.0, 1.0]
    assert 0 < report["fep_tight"] <= report["fep_paper"] < math.inf
    x = np.random.default_rng(1).uniform(0, 1, (4, export.extra["features"])).astype(np.float32)
    check_default_output_is_the_scores(export, report, x)
    inspect = cli_json("inspect", export.path)
    assert inspect["layers"][-1]["is_output"] and inspect["layers"][-1]["neurons"] == export.extra["classes"]


def test_sample_models_give_a_bound():
    """Every bundled sample loads and gives a bound through the command."""
    from conftest import SAMPLES

    for name in ("paper_mlp_sigmoid", "digits_mlp", "lenet", "resnet_small", "resnet_small_bn", "mobilenet_se"):
        report = cli_json("bound", SAMPLES / f"{name}.onnx", "--epsilon", "1", "--crash", "1")
        assert report["layers"] and report["fep_tight"] <= report["fep_paper"], name
