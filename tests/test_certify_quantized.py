"""Certificates on a QDQ int8 model (docs/method.md §1.2, §7.2).

Both the clean and the faulty network round at every QuantizeLinear → DequantizeLinear pair,
so a deviating element may move by one step ρ more than its deviation before rounding. The
certificate adds Σ_v |coefficient|·ρ_v over the rounding values downstream of a failing layer.

Checked on the bundled int8 digits CNN against an exhaustive, independent injection
(``tests/ort_faults.py``: its own graph rewrite, run by onnxruntime on the int8 model itself):
every single crash (and both byzantine extremes in fc1) at 20 inputs. Without the rounding
term (the weakened copy) real crashes exceed the certificate.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from ort_faults import FaultRunner

import robaudit.bounds.certify as certify_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions

MODEL = SAMPLES / "digits_cnn_int8.onnx"
#: onnxruntime computes in float32, the certificate in float64.
REL32, ABS32 = 1e-5, 1e-6


@pytest.fixture(scope="module")
def int8():
    data = np.load(SAMPLES / "digits_cnn_inputs.npz")
    inputs = data[[k for k in data.files if k != "labels"][0]][:20].astype(np.float32)
    _, network = load_network(MODEL, NetworkOptions(input_range=(0.0, 1.0)))
    return network, inputs, onnx.load(MODEL)


def _worst(model, network, layer, inputs, values: list[float]) -> np.ndarray:
    """Largest output change per input over every single failed neuron of ``layer`` and each value."""
    shape = tuple(network.clean[layer.output_value].shape[1:])
    runner = FaultRunner(model, [layer.output_value], [shape])
    clean = runner.clean(inputs)
    worst = np.zeros(len(inputs))
    size = int(np.prod(shape))
    for j in range(size):
        keep = np.ones((len(inputs), size), np.float32)
        keep[:, j] = 0.0
        for value in values:
            repl = np.zeros((len(inputs), size), np.float32)
            repl[:, j] = value
            out = runner.run(inputs, [keep.reshape((-1,) + shape)], [repl.reshape((-1,) + shape)])
            worst = np.maximum(worst, np.abs(out - clean).reshape(len(inputs), -1).max(axis=1))
    return worst


def _exceeded(int8, layer_index: int, failure: FailureModel, values: list[float]) -> int:
    network, inputs, model = int8
    hidden = network.hidden_layers
    counts = [1 if i == layer_index else 0 for i in range(len(hidden))]
    certifier = Certifier(network, failure, inputs)
    bounds = np.array([certifier.box(i, counts).bound for i in range(len(inputs))])
    worst = _worst(model, network, hidden[layer_index], inputs, values)
    assert worst.max() > 0
    return int((worst > bounds * (1 + REL32) + ABS32).sum())


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_crash_certificates_cover_the_int8_model(int8, layer_index) -> None:
    assert _exceeded(int8, layer_index, FailureModel.crash(), [0.0]) == 0


def test_byzantine_certificates_cover_the_int8_model(int8) -> None:
    assert _exceeded(int8, 2, FailureModel.byzantine(3.0), [-3.0, 3.0]) == 0


def test_certificates_without_the_rounding_terms_are_exceeded(int8, monkeypatch) -> None:
    """The weakened copy: rounding treated as the identity (slope 1, no ρ) inside the network and at
    the int8 output (the tail)."""
    monkeypatch.setattr(
        certify_module.LocalCertifier, "_rounding_total", lambda self, rounded, failures, rows: np.zeros(rows)
    )
    monkeypatch.setattr(int8[0], "tail_rounding", 0.0)
    assert _exceeded(int8, 2, FailureModel.crash(), [0.0]) > 0


def _coarse_qdq_chain(tmp_path):
    """x [1, 2] → Relu(x·I) → Relu(h·[-1, 1]ᵀ) → QDQ (step 1) → ·1 → y: at x = (0.02, 0.51) the
    rounded value is round(0.49) = 0; crashing h_0 moves it to round(0.51) = 1 (worked out by hand)."""
    from conftest import make_model
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.eye(2, dtype=np.float32), "w0"),
        numpy_helper.from_array(np.array([[-1.0], [1.0]], np.float32), "w1"),
        numpy_helper.from_array(np.array([[1.0]], np.float32), "w2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a0"], name="fc0"),
        helper.make_node("Relu", ["a0"], ["h0"], name="relu0"),
        helper.make_node("MatMul", ["h0", "w1"], ["a1"], name="fc1"),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("QuantizeLinear", ["h1", "s", "zp"], ["q1"], name="q1"),
        helper.make_node("DequantizeLinear", ["q1", "s", "zp"], ["d1"], name="dq1"),
        helper.make_node("MatMul", ["d1", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "coarse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        inits,
    )
    path = tmp_path / "coarse.onnx"
    onnx.save(make_model(graph), str(path))
    return path


def test_rounding_inside_the_network_is_carried(tmp_path, monkeypatch) -> None:
    """A crash that moves a pre-rounding value by 0.02 moves the rounded one by a whole step (1.0):
    the certificate covers it, and without the in-network rounding term it does not."""
    path = _coarse_qdq_chain(tmp_path)
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    x = np.array([[0.02, 0.51]], np.float32)
    assert [la.neurons for la in network.hidden_layers] == [2, 1]
    runner = FaultRunner(onnx.load(path), ["h0"], [(2,)])
    crashed = runner.run(x, [np.array([[0.0, 1.0]])], [np.zeros((1, 2))])
    error = float(np.abs(crashed - runner.clean(x)).max())
    assert error == 1.0
    assert Certifier(network, FailureModel.crash(), x).box(0, [1, 0]).bound >= error
    monkeypatch.setattr(
        certify_module.LocalCertifier, "_rounding_total", lambda self, rounded, failures, rows: np.zeros(rows)
    )
    assert Certifier(network, FailureModel.crash(), x).box(0, [1, 0]).bound < error
