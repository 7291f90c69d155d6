"""Soundness as a property (docs/method.md §8.2): on random networks, failure vectors, failure models,
input domains and searches, the measured error never exceeds the bound.

The default suite runs a modest campaign; ``-m slow`` runs a larger one on wider and
deeper networks.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense_chain, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.fep import FailureModel
from robaudit.bounds.results import ModelInfo
from robaudit.graph.network import NetworkOptions, build_network
from robaudit.graph.onnx_graph import build_graph
from robaudit.injection.campaign import run_injection
from robaudit.injection.results import FailureVector, InjectOptions

DENSE_ACTIVATIONS = ["relu", "sigmoid", "tanh", "leakyrelu", "elu_small", "hardsigmoid"]
CONV_ACTIVATIONS = {"relu": ("Relu", {}), "tanh": ("Tanh", {}), "sigmoid": ("Sigmoid", {})}
INFO = ModelInfo("generated.onnx", "0" * 64, "hypothesis", 17)


@st.composite
def dense_models(draw, max_width: int, max_depth: int):
    depth = draw(st.integers(1, max_depth))
    sizes = [draw(st.integers(1, max_width)) for _ in range(depth + 2)]
    activations = [draw(st.sampled_from(DENSE_ACTIVATIONS)) for _ in range(depth)]
    chain = dense_chain(
        sizes,
        activations,
        seed=draw(st.integers(0, 2**16)),
        weight_scale=draw(st.sampled_from([0.3, 1.0, 2.5])),
        bias_scale=draw(st.sampled_from([0.0, 0.5])),
        layouts=draw(st.sampled_from(["gemm_t1", "matmul_add"])),
        softmax=draw(st.booleans()),
    )
    return chain.model


@st.composite
def conv_models(draw, max_channels: int):
    """Conv(3x3) → act → Conv(3x3, stride 1 or 2) → act → Flatten → Gemm."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c0, c1, c2 = (draw(st.integers(1, max_channels)) for _ in range(3))
    side = draw(st.integers(3, 6))
    stride = draw(st.sampled_from([1, 2]))
    act1, act2 = (CONV_ACTIVATIONS[draw(st.sampled_from(sorted(CONV_ACTIVATIONS)))] for _ in range(2))
    out_side = (side - 1) // stride + 1
    flat = c2 * out_side * out_side
    inits = {
        "W1": rng.uniform(-1, 1, (c1, c0, 3, 3)),
        "b1": rng.uniform(-0.2, 0.2, c1),
        "W2": rng.uniform(-1, 1, (c2, c1, 3, 3)),
        "b2": rng.uniform(-0.2, 0.2, c2),
        "W3": rng.uniform(-1, 1, (3, flat)),
        "b3": rng.uniform(-0.2, 0.2, 3),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(act1[0], ["c1"], ["a1"], name="act1", **act1[1]),
        helper.make_node("Conv", ["a1", "W2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[stride] * 2),
        helper.make_node(act2[0], ["c2"], ["a2"], name="act2", **act2[1]),
        helper.make_node("Flatten", ["a2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "b3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c0, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return make_model(graph)


@st.composite
def campaigns(draw, models):
    model = draw(models)
    lo = draw(st.sampled_from([-1.0, 0.0, 0.5]))
    hi = lo + draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    if draw(st.booleans()):
        failure = FailureModel.crash()
    elif draw(st.booleans()):
        failure = FailureModel.byzantine(capacity=draw(st.sampled_from([0.1, 1.0, 4.0])))
    else:
        a = draw(st.sampled_from([-2.0, 0.0, 0.5]))
        failure = FailureModel.byzantine(failure_range=(a, a + draw(st.sampled_from([0.0, 1.0, 3.0]))))
    network = build_network(build_graph(model), NetworkOptions(input_range=(lo, hi)), 17)
    hidden = network.hidden_layers
    neurons = tuple(draw(st.integers(0, layer.neurons)) for layer in hidden)
    synapses = ()
    if draw(st.booleans()):
        synapses = tuple(
            draw(st.integers(0, min(3, layer.neurons * layer.fan_in))) if layer.kind == "dense" else 0
            for layer in hidden
        )
    return network, failure, FailureVector(neurons, synapses), draw(st.sampled_from(["random", "worst"]))


def check_campaign(campaign, trials: int, samples: int, seed: int) -> None:
    network, failure, vector, search = campaign
    options = InjectOptions(
        failure=failure, vectors=(vector,), search=search, trials=trials, samples=samples, seed=seed, isolate=False
    )
    result = run_injection(network, options, INFO)
    for measured in result.vectors:
        limit = measured.bound * (1 + result.margin_relative) + result.margin_absolute
        paper_limit = measured.fep_paper * (1 + result.margin_relative) + result.margin_absolute
        assert not measured.violation, (measured, failure, network.input_range)
        assert measured.measured.max <= limit and measured.measured.max <= paper_limit, measured
        assert measured.evaluations >= trials or search == "worst"


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=20, **SETTINGS)
@given(campaign=campaigns(dense_models(max_width=6, max_depth=3)), seed=st.integers(0, 3))
def test_measured_never_exceeds_bound_dense(campaign, seed):
    check_campaign(campaign, trials=20, samples=6, seed=seed)


@settings(max_examples=4, **SETTINGS)
@given(campaign=campaigns(conv_models(max_channels=3)), seed=st.integers(0, 3))
def test_measured_never_exceeds_bound_conv(campaign, seed):
    check_campaign(campaign, trials=10, samples=4, seed=seed)


@pytest.mark.slow
@settings(max_examples=200, **SETTINGS)
@given(campaign=campaigns(dense_models(max_width=24, max_depth=5)), seed=st.integers(0, 100))
def test_measured_never_exceeds_bound_dense_large(campaign, seed):
    check_campaign(campaign, trials=200, samples=32, seed=seed)


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(campaign=campaigns(conv_models(max_channels=6)), seed=st.integers(0, 100))
def test_measured_never_exceeds_bound_conv_large(campaign, seed):
    check_campaign(campaign, trials=100, samples=16, seed=seed)
