"""The tight method's per-element rules (docs/method.md §4.3, §4.4) against independent numpy.

* ``max_slope`` of every activation rule: for u, v anywhere in [lo, hi] (ends, random
  points, the points where |f′| peaks), |f(u) − f(v)| ≤ max_slope·|u − v|, with f written
  out again here in numpy; a copy with the slope halved is caught by the same check.
* the max-pool adjoint over candidates: for x, x̃ in the box, each window's
  |max x̃ − max x| ≤ Σ over its candidates of |x̃_j − x_j|, max-pool computed here by
  loops; a copy that drops one candidate per window is caught.
* chunked sensitivities: the kept top prefix sums with a memory budget of one output
  per chunk equal those of the dense P of ``tests/reference.py`` (an independent
  implementation with explicit loops), and chunked == all-at-once on conv nets.
* the output-range cap (docs/method.md §3.4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import dense_chain
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from reference import Reference

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
from robaudit.bounds.fep import Analysis, FailureModel, neuron_delta, top_prefix_sums
from robaudit.bounds.tight import TightBound, dense_sensitivities
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, lookup
from robaudit.graph.ops.pooling import max_candidates_adjoint


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


_ERF = np.vectorize(math.erf, otypes=[np.float64])

#: (op_type, attributes, domain, independent numpy f)
FUNCTIONS = [
    ("Relu", {}, "", lambda x: np.maximum(x, 0)),
    ("LeakyRelu", {"alpha": 0.1}, "", lambda x: np.where(x > 0, x, 0.1 * x)),
    ("LeakyRelu", {"alpha": -2.0}, "", lambda x: np.where(x > 0, x, -2.0 * x)),
    ("Sigmoid", {}, "", _sigmoid),
    ("Tanh", {}, "", np.tanh),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, "", lambda x: np.clip(0.3 * x + 0.4, 0, 1)),
    ("HardSigmoid", {"alpha": -0.5, "beta": 0.5}, "", lambda x: np.clip(-0.5 * x + 0.5, 0, 1)),
    ("Softplus", {}, "", _softplus),
    ("Softsign", {}, "", lambda x: x / (1 + np.abs(x))),
    ("Elu", {"alpha": 1.5}, "", lambda x: np.where(x > 0, x, 1.5 * (np.exp(np.minimum(x, 0)) - 1))),
    ("Celu", {"alpha": 0.7}, "", lambda x: np.where(x > 0, x, 0.7 * (np.exp(np.minimum(x, 0) / 0.7) - 1))),
    ("Selu", {}, "", lambda x: 1.0507 * np.where(x > 0, x, 1.67326 * (np.exp(np.minimum(x, 0)) - 1))),
    ("Clip", {"min": -0.5, "max": 2.0}, "", lambda x: np.clip(x, -0.5, 2.0)),
    ("Clip", {"min": 1.0, "max": 0.5}, "", lambda x: np.minimum(np.maximum(x, 1.0), 0.5)),  # ONNX: the constant max
    ("HardSwish", {}, "", lambda x: x * np.clip(x + 3, 0, 6) / 6),
    ("Gelu", {}, "", lambda x: x * 0.5 * (1 + _ERF(x / np.sqrt(2)))),
    ("Gelu", {"approximate": "tanh"}, "", lambda x: 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))),
    ("Mish", {}, "", lambda x: x * np.tanh(_softplus(x))),
    ("Erf", {}, "", _ERF),
    ("GatedActivation", {"template": "SiLU", "scale": 2.0}, "robaudit", lambda x: 2.0 * x * _sigmoid(x)),
    ("GatedActivation", {"template": "Gelu", "scale": 1.0}, "robaudit", lambda x: x * 0.5 * (1 + _ERF(x / np.sqrt(2)))),
    ("GatedActivation", {"template": "Mish", "scale": 1.0}, "robaudit", lambda x: x * np.tanh(_softplus(x))),
    ("GatedActivation", {"template": "HardSwish", "scale": 1.0}, "robaudit", lambda x: x * np.clip(x + 3, 0, 6) / 6),
    ("GatedActivation", {"template": "Softsign", "scale": 0.5}, "robaudit", lambda x: 0.5 * x / (1 + np.abs(x))),
    ("ScaledSoftplus", {"beta": 2.0, "jump": 0.0}, "robaudit", lambda x: _softplus(2.0 * x) / 2.0),
]
#: Where |f′| peaks for some f (turning points of f′, kinks): always among the tried points.
SPECIAL = np.array([0.0, -3.0, 3.0, -2.3994, 2.3994, -1.4142, 1.4142, -1.4185, 1.4185, -2.2564, 1.4906, -0.5, 2.0])


def _node(op_type: str, attrs: dict, domain: str) -> Node:
    return Node("act", op_type, domain, ["z"], ["y"], dict(attrs), None, {})


def _worst_ratio(function, slope_of, lo: float, hi: float, rng) -> float:
    """max over pairs u ≠ v in [lo, hi] of |f(u) − f(v)| / (slope·|u − v|) (> 1: the slope is too small)."""
    inside = SPECIAL[(SPECIAL >= lo) & (SPECIAL <= hi)]
    points = np.concatenate([[lo, hi], inside, rng.uniform(lo, hi, 24)])
    u, v = np.meshgrid(points, points)
    near = np.concatenate([points, points + 1e-4]).clip(lo, hi)  # pairs close together: local slopes
    u = np.concatenate([u.ravel(), near[: len(points)]])
    v = np.concatenate([v.ravel(), near[len(points) :]])
    gap = np.abs(u - v)
    keep = gap > 1e-9
    change = np.abs(function(u[keep]) - function(v[keep]))
    slope = float(slope_of(lo, hi))
    if slope == 0.0:
        return math.inf if change.max(initial=0.0) > 1e-12 else 0.0
    return float(np.max(change / (slope * gap[keep]), initial=0.0))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.sampled_from(range(len(FUNCTIONS))),
    st.floats(-12, 12),
    st.floats(0, 10),
    st.integers(0, 2**31),
)
def test_max_slope_bounds_every_change_inside_the_interval(index, lo, width, seed):
    op_type, attrs, domain, function = FUNCTIONS[index]
    node = _node(op_type, attrs, domain)
    rule = lookup(node)
    hi = lo + width

    def slope_of(a, b):
        return rule.max_slope(node, np.array([a]), np.array([b]), {})[0]

    ratio = _worst_ratio(function, slope_of, lo, hi, np.random.default_rng(seed))
    assert ratio <= 1 + 1e-6, (op_type, attrs, lo, hi, ratio)
    assert slope_of(lo, hi) <= rule.lipschitz(node) * (1 + 1e-6) + 1e-9, (op_type, lo, hi)  # never above K


def test_halved_slopes_are_caught():
    """The same check, on every rule with its slope halved, finds a violation on some interval."""
    rng = np.random.default_rng(0)
    intervals = [(-1.0, 1.0), (0.5, 4.0), (-4.0, -0.5), (1.0, 3.0), (-3.0, 0.2), (-0.3, 0.3)]
    for op_type, attrs, domain, function in FUNCTIONS:
        if op_type == "Clip" and attrs["min"] > attrs["max"]:
            continue  # a constant: slope 0, nothing to halve
        node = _node(op_type, attrs, domain)
        rule = lookup(node)

        def halved(a, b, rule=rule, node=node):
            return rule.max_slope(node, np.array([a]), np.array([b]), {})[0] / 2

        worst = max(_worst_ratio(function, halved, lo, hi, rng) for lo, hi in intervals)
        assert worst > 1.5, (op_type, attrs, worst)


def test_prelu_slopes_per_channel():
    node = Node("p", "PRelu", "", ["z", "s"], ["y"], {}, None, {})
    slopes = np.array([0.25, -2.0]).reshape(1, 2)
    got = lookup(node).max_slope(node, np.array([[-1.0, -1.0]]), np.array([[-0.5, 2.0]]), {"s": slopes})
    assert got.tolist() == [[0.25, 2.0]]  # negative side only: |slope|; both sides: max(1, |slope|)


# --------------------------------------------------------------------------- max-pool candidates


def _maxpool(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    """[C, H, W] → [C, Ho, Wo] with explicit loops (no padding)."""
    c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.empty((c, ho, wo))
    for ch in range(c):
        for i in range(ho):
            for j in range(wo):
                out[ch, i, j] = x[ch, i * stride : i * stride + k, j * stride : j * stride + k].max()
    return out


def _pool_node(k: int, stride: int) -> Node:
    return Node("pool", "MaxPool", "", ["x"], ["y"], {"kernel_shape": [k, k], "strides": [stride, stride]}, None, {})


def _pool_weights(k, stride, box, drop_one=False) -> np.ndarray:
    """[windows, C·H·W]: the adjoint of each window's unit cotangent (optionally one candidate dropped)."""
    node = _pool_node(k, stride)
    c, h, w = box.shape[1:]
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    cot = np.eye(c * ho * wo).reshape(c * ho * wo, 1, c, ho, wo)
    weights = max_candidates_adjoint(node, cot, box).reshape(c * ho * wo, -1)
    if drop_one:  # the candidate with the highest hi in each window loses its weight
        for row in weights:
            members = np.nonzero(row)[0]
            if len(members) > 1:
                row[members[np.argmax(box.hi.reshape(-1)[members])]] = 0.0
    return weights


def _pool_violation(k, stride, box, weights, rng, trials=300) -> float:
    lo, hi = box.lo[0], box.hi[0]
    worst = 0.0
    for _ in range(trials):
        pick = rng.uniform(size=(2,) + lo.shape)
        corner = rng.integers(0, 2, size=(2,) + lo.shape)
        x, y = (np.where(rng.uniform() < 0.5, lo + pick[i] * (hi - lo), np.where(corner[i], hi, lo)) for i in range(2))
        change = np.abs(_maxpool(y, k, stride) - _maxpool(x, k, stride)).reshape(-1)
        allowed = weights @ np.abs(y - x).reshape(-1)
        worst = max(worst, float(np.max(change - allowed)))
    return worst


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.sampled_from([(2, 2), (3, 2), (3, 1), (2, 1)]), st.integers(0, 2**31))
def test_maxpool_candidate_adjoint_bounds_every_change(kernel_stride, seed):
    k, stride = kernel_stride
    rng = np.random.default_rng(seed)
    lo = rng.normal(size=(1, 2, 5, 5)) * 2
    box = Interval(lo, lo + rng.exponential(0.7, size=lo.shape))
    weights = _pool_weights(k, stride, box)
    assert _pool_violation(k, stride, box, weights, rng, trials=60) <= 1e-12
    assert weights.sum() <= weights.shape[0] * k * k  # never more than the plain (sum) adjoint


def test_dropping_a_maxpool_candidate_is_caught():
    rng = np.random.default_rng(1)
    found = 0.0
    for _ in range(6):
        lo = rng.normal(size=(1, 2, 5, 5))
        box = Interval(lo, lo + rng.exponential(1.0, size=lo.shape))
        found = max(found, _pool_violation(3, 2, box, _pool_weights(3, 2, box, drop_one=True), rng))
    assert found > 1e-3


# --------------------------------------------------------------------------- chunked sensitivities


def _kept_prefix_from_dense(sens_rows, deltas, kept) -> np.ndarray:
    return top_prefix_sums(np.asarray(sens_rows) * np.asarray(deltas)[None, :], kept)


@pytest.mark.parametrize(
    "acts,mode",
    [
        (["relu", "tanh"], "crash"),
        (["sigmoid", "relu"], "byzantine"),
        (["leakyrelu", "elu"], "crash"),
        (["hardsigmoid", "tanh"], "byzantine"),
    ],
)
def test_chunked_prefixes_equal_the_reference_dense_sensitivities(acts, mode, tmp_path):
    path = dense_chain([5, 6, 4, 3], acts, seed=7, weight_scale=1.5).save(tmp_path)
    failure_range = (0.0, 0.0) if mode == "crash" else (-2.0, 2.0)
    ref = Reference(path, failure_range=failure_range)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(2.0)
    _, network = load_network(path, NetworkOptions(ranges="ibp"))  # the reference uses IBP ranges
    analysis = Analysis(network, failure)
    # one output per chunk and 2 kept values per layer and output
    tiny = 4 * 16 * 3 * 2 * 2  # kept = (budget / 4) / (16 · outputs · layers)
    tight = TightBound(analysis, memory_bytes=tiny)
    assert [t.shape[1] for t in tight.top] == [2, 2]
    for i in range(len(ref.neurons)):
        want = _kept_prefix_from_dense(ref.sens[i], ref.neuron_deltas[i], None)
        np.testing.assert_allclose(tight.prefix[i], want[:, :3], rtol=1e-10, atol=1e-12)
        for f in range(ref.neurons[i] + 1):  # past the kept prefix: an upper bound, exact at f = N
            got = tight.layer_sum(i, f)
            assert np.all(got >= want[:, f] * (1 - 1e-10) - 1e-12)
        np.testing.assert_allclose(tight.layer_sum(i, ref.neurons[i]), want[:, -1], rtol=1e-10)
    full = TightBound(analysis)
    for counts in ([1, 0], [0, 2], [2, 3], [4, 3]):
        assert tight.fep(counts) >= full.fep(counts) * (1 - 1e-12)
        assert float(full.sums(counts).max()) == pytest.approx(ref.fep(counts, "sums"), rel=1e-9)
        assert full.fep(counts) == pytest.approx(ref.fep(counts, "sensitivity"), rel=1e-9)


def test_chunked_equals_all_at_once_on_a_conv_net(tmp_path):
    from test_graph_ops import residual_net, se_block

    for model in (residual_net(3), se_block(4)):
        path = tmp_path / "m.onnx"
        path.write_bytes(model.SerializeToString())
        _, network = load_network(path, NetworkOptions())
        analysis = Analysis(network, FailureModel.byzantine(1.5))
        dense = dense_sensitivities(analysis)
        one_row = TightBound(analysis, memory_bytes=1)  # one output per chunk, one kept value
        kept = TightBound(analysis)
        for i, sens in enumerate(dense):
            delta = neuron_delta((-1.5, 1.5), *analysis.neuron_ranges(analysis.hidden[i]))
            want = top_prefix_sums(sens * delta[None, :])
            np.testing.assert_allclose(kept.prefix[i], want, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(one_row.prefix[i], want[:, :2], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(one_row.total[i], want[:, -1], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- output cap


def _bounded_output_model(tail: str, path) -> None:
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.uniform(-3, 3, (6, 4)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.uniform(-3, 3, (3, 6)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
        numpy_helper.from_array(np.array(0.25, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2"], ["z"], transB=1),
    ]
    last = {"Softmax": ["z"], "Sigmoid": ["z"], "Tanh": ["z"], "Clip": ["z", "lo", "hi"], "Identity": ["z"]}[tail]
    nodes += [helper.make_node(tail, last, ["o"]), helper.make_node("Flatten", ["o"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    "tail,width", [("Softmax", 1.0), ("Sigmoid", 1.0), ("Tanh", 2.0), ("Clip", 0.75), ("Identity", math.inf)]
)
def test_bounds_are_capped_at_the_output_width(tail, width, tmp_path):
    path = tmp_path / "m.onnx"
    _bounded_output_model(tail, path)
    loaded, network = load_network(path, NetworkOptions(input_range=(-5.0, 5.0)))
    assert network.output_width == width
    options = BoundOptions(epsilon=0.05, failure=FailureModel.byzantine(50.0), failures=(3,))
    result = bound_network(network, options, model_info(loaded))
    assert result.fep_tight <= width and result.fep_paper <= width
    if math.isfinite(width):
        assert result.capped and result.fep_tight == width and result.output_range is not None
        assert any("capped" in note and "binds" in note for note in result.notes)
        wide = bound_network(network, BoundOptions(epsilon=width, failures=(6,)), model_info(loaded))
        assert wide.layers[0].max_failures == 6 and wide.uniform == 6 and wide.total == 6 and wide.capped
    else:
        assert not result.capped and result.output_range is None and result.fep_tight > 10


def test_a_clip_with_min_above_max_is_its_constant_max(tmp_path):
    """ONNX's Clip is min(max(x, min), max): with min > max the output is max whatever the input, so no failure
    moves it. Read as written, the output cap max − min was −0.5: a negative bound (an independent attack)."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 1, (2, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(0.5, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2"], ["z"], transB=1),
        helper.make_node("Clip", ["z", "lo", "hi"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "clip_inverted.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.uniform(-5, 5, (64, 3)).astype(np.float32)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.all(out == 0.5)  # the independent reference: onnxruntime, any input
    loaded, network = load_network(path, NetworkOptions(input_range=(-5.0, 5.0)))
    assert network.output_range == (0.5, 0.5) and network.output_width == 0.0
    for failure in (FailureModel(), FailureModel.byzantine(50.0)):
        result = bound_network(network, BoundOptions(epsilon=1e-6, failure=failure, failures=(2,)), model_info(loaded))
        assert result.fep_tight == 0.0 and result.fep_paper == 0.0
        assert result.layers[0].max_failures == 4
