"""The margin left under failures (``certify``'s ``margin_slack``, docs/method.md §7.4): F_c − F_j falls by
at most |ΔF_c| + |ΔF_j|, so on an output without a tail the reported lower bound is never below
``margin − 2·bound`` (a new-user trial saw −1789 beside a bound of 85.2 and a margin of 0.44), and it
holds: every failure set of a network with a LayerNorm (byzantine values at the ends of the range), run
in onnxruntime at each certified input, keeps F̃_c − F̃_j above it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import make_model, ort_session, with_fault_inputs
from onnx import TensorProto, helper, numpy_helper

import robaudit.bounds.certify as certify
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import certify_inputs
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions


def _model(seed: int):
    """fc1 (ReLU, 3) → fc2 (4) → LayerNorm → out (3 classes)."""
    rng = np.random.default_rng(seed)

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [
        const("w1", rng.normal(0, 3, (3, 2))), const("b1", rng.normal(0, 1, 3)),
        const("w2", rng.normal(0, 3, (4, 3))), const("b2", rng.normal(0, 1, 4)),
        const("g", rng.uniform(0.5, 2.0, 4)), const("beta", rng.normal(0, 1, 4)),
        const("w3", rng.normal(0, 1, (3, 4))), const("b3", rng.normal(0, 1, 3)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["p1"], name="fc1", transB=1),
        helper.make_node("Relu", ["p1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("LayerNormalization", ["h2", "g", "beta"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("Gemm", ["n", "w3", "b3"], ["y"], name="out", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "margins",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return make_model(graph)


def _least_margins(model, inputs: np.ndarray, predicted: list[int], failure_range) -> np.ndarray:
    """Per input, min over every failure set of one neuron in fc1 and one in fc2 (values at the ends of the
    range) of F̃_c − max_{j≠c} F̃_j, by onnxruntime."""
    session = ort_session(with_fault_inputs(model, ["h1", "h2"], [3, 4]))
    least = np.full(len(inputs), np.inf)
    count = len(inputs)
    for i, j in itertools.product(range(3), range(4)):
        for a, b in itertools.product(failure_range, repeat=2):
            keep1, inject1 = np.ones((count, 3)), np.zeros((count, 3))
            keep2, inject2 = np.ones((count, 4)), np.zeros((count, 4))
            keep1[:, i], inject1[:, i], keep2[:, j], inject2[:, j] = 0.0, a, 0.0, b
            feed = {"x": inputs.astype(np.float32), "keep_0": keep1, "inject_0": inject1,
                    "keep_1": keep2, "inject_1": inject2}
            out = session.run(["y"], {k: v.astype(np.float32) for k, v in feed.items()})[0].astype(np.float64)
            for row, c in enumerate(predicted):
                others = np.delete(out[row], c)
                least[row] = min(least[row], out[row, c] - others.max())
    return least


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_margin_under_failures_is_consistent_with_the_bound_and_holds(tmp_path, seed):
    model = _model(seed)
    path = tmp_path / "margins.onnx"
    path.write_bytes(model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    inputs = np.random.default_rng(seed).uniform(0, 1, (12, 2))
    failure = FailureModel.byzantine(failure_range=(-2.0, 3.0))
    result = certify_inputs(net, failure, inputs, [1, 1], epsilon=0.1, layer_counts=False)
    for cert in result.inputs:
        assert cert.margin_slack >= cert.margin - 2 * cert.bound - 1e-9, cert
    predicted = [cert.predicted for cert in result.inputs]
    measured = _least_margins(model, inputs, predicted, failure.failure_range)
    slack = np.array([cert.margin_slack for cert in result.inputs])
    assert np.all(measured >= slack - 1e-5 * (1 + np.abs(slack))), (measured, slack)


def _flipping_model():
    """h = relu(0·x + (1, 0, 1, 0)), z = LayerNorm(h) = s·(1, −1, 1, −1) (s = ½/√(¼ + ε)), y = (w·z, −w·z) with
    w = (1, −1, 1, −1): class 0 by the margin 8s; four byzantine values (0, 1, 0, 1) flip z and the margin
    to −8s, where margin − 2·bound = 8s − 2·8 (the normalization cut's 2√n·‖w‖₂ = 8 per output)."""
    w = np.array([1.0, -1, 1, -1])
    inits = [
        numpy_helper.from_array(np.zeros((4, 1), np.float32), "w1"),
        numpy_helper.from_array(np.array([1.0, 0, 1, 0], np.float32), "b1"),
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.zeros(4, np.float32), "beta"),
        numpy_helper.from_array(np.stack([w, -w]).T.astype(np.float32), "w_out"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["p"], name="fc1", transB=1),
        helper.make_node("Relu", ["p"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g", "beta"], ["z"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["z", "w_out"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "flip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return make_model(graph)


def test_the_margin_from_the_bound_is_nearly_reached_and_a_halved_one_is_caught(tmp_path, monkeypatch):
    model = _flipping_model()
    path = tmp_path / "flip.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort_session(with_fault_inputs(model, ["h"], [4]))
    x = np.full((1, 1), 0.5, np.float32)
    faulty = session.run(["y"], {"x": x, "keep_0": np.zeros((1, 4), np.float32),
                                 "inject_0": np.array([[0.0, 1, 0, 1]], np.float32)})[0][0].astype(np.float64)
    measured = faulty[0] - faulty[1]
    s = 0.5 / np.sqrt(0.25 + 1e-5)
    assert measured == pytest.approx(-8 * s, rel=1e-5)
    _, net = load_network(path, NetworkOptions())
    failure = FailureModel.byzantine(failure_range=(0.0, 1.0))
    (cert,) = certify_inputs(net, failure, x.astype(np.float64), [4], epsilon=0.1, layer_counts=False).inputs
    assert cert.predicted == 0 and cert.margin == pytest.approx(8 * s, rel=1e-5)
    assert measured >= cert.margin_slack - 1e-5 and cert.margin_slack >= measured - 1e-3, (measured, cert)
    weakened = certify.margin_drops
    monkeypatch.setattr(certify, "margin_drops", lambda *args: 0.5 * weakened(*args))
    (halved,) = certify_inputs(net, failure, x.astype(np.float64), [4], epsilon=0.1, layer_counts=False).inputs
    assert measured < halved.margin_slack - 1.0, (measured, halved)
