"""The rules for ops between layers added for exporter forms: Sum, Pow by a constant,
Reciprocal and Div by a variable, LRN, GatherND, Scaler, Upsample (opsets 7 and 9), 3-D
MaxPool and AveragePool.

Each rule is checked against an independent computation of its op (plain numpy loops,
or onnxruntime running the op itself) on hypothesis-drawn input boxes:

* ``interval`` contains f(x) for every sampled x in the box;
* ``backward`` (cotangent = identity) gives c with |f(x̃)_k − f(x)_k| ≤ Σ_j c_kj·|x̃_j − x_j|
  for every sampled pair x, x̃ in the box (the box stands for the faulty range);
* ``paper`` scales Σ_j |Δx_j| to a bound on Σ_k |Δf_k|.

A weakened copy of each rule (slopes halved, interval shrunk by 10 %) must fail the same
check: the check can fail.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext, lookup

#: float64 rules vs float32 onnxruntime outputs.
TOL = 1e-4


# --------------------------------------------------------------------------- independent references


def ref_lrn(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """LRN by the ONNX definition, one channel at a time."""
    out = np.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        low, high = max(0, c - (size - 1) // 2), min(channels - 1, c + math.ceil((size - 1) / 2))
        square_sum = (x[:, low : high + 1] ** 2).sum(axis=1)
        out[:, c] = x[:, c] / (bias + alpha / size * square_sum) ** beta
    return out


def ref_gather_nd(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """GatherND, batch_dims = 0, by explicit loops over the index tuples."""
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth)
    parts = [x[tuple(int(i) for i in row)] for row in flat]
    return np.stack(parts).reshape(indices.shape[:-1] + x.shape[depth:])


def ort_op(op_type: str, attrs: dict, shape: tuple, opset: int, extra: list | None = None):
    """A function running the single op in onnxruntime (float32), extra constant inputs given."""
    extra = extra or []
    names = ["x"] + [f"k{i}" for i in range(len(extra))]
    node = helper.make_node(op_type, names, ["y"], **attrs)
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), f"k{i}") for i, v in enumerate(extra)]
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.astype(np.float32)})[0].astype(np.float64)


# --------------------------------------------------------------------------- the check


class Weakened:
    """A rule whose slopes are halved and interval shrunk by 10 % around its centre."""

    def __init__(self, rule) -> None:
        self.rule = rule

    def interval(self, node, args):
        out = []
        for box in self.rule.interval(node, args):
            centre, half = (box.lo + box.hi) / 2, (box.hi - box.lo) / 2 * 0.9
            out.append(Interval(centre - half, centre + half))
        return out

    def backward(self, node, cot, ctx):
        return [None if g is None else 0.5 * g for g in self.rule.backward(node, cot, ctx)]

    def paper(self, node, errs, ctx):
        return [0.5 * e for e in self.rule.paper(node, errs, ctx)]


def make_node(op_type: str, n_inputs: int, attrs: dict, domain: str = "", opset: int = 17) -> Node:
    node = Node(f"{op_type.lower()}0", op_type, domain, [f"in{i}" for i in range(n_inputs)], ["out"], attrs)
    node.opset = opset
    return node


def violations(node, rule, boxes, consts, function, rng, pairs: int = 40) -> list[str]:
    """What the rule gets wrong on the given boxes (variable inputs) and constants (others)."""
    names = node.inputs
    args = list(boxes) + list(consts)
    clean = {n: b for n, b in zip(names, boxes, strict=False)}
    constants = {n: c for n, c in zip(names[len(boxes) :], consts, strict=True)}
    (out_box,) = rule.interval(node, args)
    clean[node.outputs[0]] = out_box
    ctx = PropagationContext(clean, clean, constants)
    out_shape = out_box.shape
    k = int(np.prod(out_shape))
    grads = rule.backward(node, [np.eye(k).reshape((k,) + out_shape)], ctx)
    coeff = [g.reshape(k, -1) for g in grads[: len(boxes)]]
    scales = []
    for i in range(len(boxes)):
        errs = [1.0 if j == i else 0.0 for j in range(len(boxes))] + [None] * len(consts)
        scales.append(rule.paper(node, errs, ctx)[0])
    found = []

    def draw(box, mode):
        if mode == 0:
            return rng.uniform(box.lo, box.hi)
        return np.where(rng.random(box.shape) < 0.5, box.lo, box.hi)

    for trial in range(pairs):
        xs = [draw(b, trial % 3 == 0) for b in boxes]
        near = [
            np.clip(x + rng.uniform(-1e-3, 1e-3, x.shape) * (b.hi - b.lo), b.lo, b.hi)
            for x, b in zip(xs, boxes, strict=True)
        ]
        others = near if trial % 2 else [draw(b, 0) for b in boxes]
        fx, fy = function(*xs), function(*others)
        if np.any(fx < out_box.lo - TOL * (1 + np.abs(fx))) or np.any(fx > out_box.hi + TOL * (1 + np.abs(fx))):
            found.append("interval")
        diffs = [np.abs(y - x).reshape(-1) for x, y in zip(xs, others, strict=True)]
        bound = sum(c @ d for c, d in zip(coeff, diffs, strict=True))
        change = np.abs(fy - fx).reshape(-1)
        if np.any(change > bound * (1 + TOL) + TOL * 1e-2):
            found.append("backward")
        if change.sum() > sum(s * d.sum() for s, d in zip(scales, diffs, strict=True)) * (1 + TOL) + TOL * 1e-2:
            found.append("paper")
    return sorted(set(found))


def draw_box(data, shape, low=-2.0, high=2.0, width=2.0, away_from_zero=False) -> Interval:
    values = data.draw(st.lists(st.floats(low, high), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    widths = data.draw(st.lists(st.floats(0.0, width), min_size=len(values), max_size=len(values)))
    lo = np.array(values).reshape(shape)
    hi = lo + np.array(widths).reshape(shape)
    if away_from_zero:
        lo, hi = np.where(lo > 0, lo + 0.1, lo), np.where(lo > 0, hi + 0.1, np.minimum(hi, -0.1))
        lo = np.minimum(lo, hi)
    return Interval(lo, hi)


SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- per rule


@pytest.mark.parametrize("exponent", [2.0, 3.0, 0.5, -1.0, 1.5])
@SETTINGS
@given(data=st.data())
def test_pow_rule_against_numpy(exponent, data):
    node = make_node("Pow", 2, {})
    positive = not float(exponent).is_integer() or exponent < 0
    box = draw_box(data, (1, 4), 0.05 if positive else -2.0, 2.0)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    assert violations(node, lookup(node), [box], [np.array(exponent)], lambda x: np.power(x, exponent), rng) == []


def test_pow_refuses_a_fractional_power_of_negatives_and_zero_for_negative_powers():
    node = make_node("Pow", 2, {})
    with pytest.raises(Exception, match="below 0"):
        lookup(node).interval(node, [Interval(np.array([[-1.0]]), np.array([[1.0]])), np.array(0.5)])
    with pytest.raises(Exception, match="contains 0"):
        lookup(node).interval(node, [Interval(np.array([[-1.0]]), np.array([[1.0]])), np.array(-2.0)])


@SETTINGS
@given(data=st.data())
def test_sum_rule_against_numpy(data):
    node = make_node("Sum", 3, {})
    boxes = [draw_box(data, (1, 3)), draw_box(data, (1, 1)), draw_box(data, (1, 3))]
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    assert violations(node, lookup(node), boxes, [], lambda a, b, c: a + b + c, rng) == []


@SETTINGS
@given(data=st.data())
def test_reciprocal_rule_against_numpy(data):
    node = make_node("Reciprocal", 1, {})
    box = draw_box(data, (1, 4), away_from_zero=True)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    assert violations(node, lookup(node), [box], [], lambda x: 1.0 / x, rng) == []


@SETTINGS
@given(data=st.data())
def test_division_by_a_variable_against_numpy(data):
    node = make_node("Div", 2, {})
    x, y = draw_box(data, (1, 3)), draw_box(data, (1, 3), away_from_zero=True)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    assert violations(node, lookup(node), [x, y], [], lambda a, b: a / b, rng) == []


def test_division_by_a_range_containing_zero_is_refused():
    node = make_node("Div", 2, {})
    box = Interval(np.array([[-1.0]]), np.array([[1.0]]))
    with pytest.raises(Exception, match="divisor's range contains 0"):
        lookup(node).interval(node, [box, box])


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@SETTINGS
@given(data=st.data())
def test_lrn_rule_against_numpy(size, data):
    attrs = {"size": size, "alpha": 0.6, "beta": 0.75, "bias": 1.0}
    node = make_node("LRN", 1, attrs)
    box = draw_box(data, (1, 5, 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    assert violations(node, lookup(node), [box], [], lambda x: ref_lrn(x, size, 0.6, 0.75, 1.0), rng) == []


def test_lrn_matches_onnxruntime():
    rng = np.random.default_rng(0)
    attrs = {"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 2.0}
    x = rng.uniform(-2, 2, (1, 5, 3, 3))
    expected = ort_op("LRN", attrs, x.shape, 17)(x)
    np.testing.assert_allclose(ref_lrn(x, 3, 0.5, 0.75, 2.0), expected, rtol=1e-5)
    (box,) = lookup(make_node("LRN", 1, attrs)).interval(make_node("LRN", 1, attrs), [Interval.point(x)])
    np.testing.assert_allclose(box.lo, expected, rtol=1e-5)


@SETTINGS
@given(data=st.data())
def test_gather_nd_rule_against_loops(data):
    node = make_node("GatherND", 2, {"batch_dims": 0})
    indices = np.array([[0, 1], [2, 0], [0, 1], [1, 2]])
    box = draw_box(data, (3, 3, 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    assert violations(node, lookup(node), [box], [indices], lambda x: ref_gather_nd(x, indices), rng) == []


def test_gather_nd_with_batch_dims_matches_onnxruntime():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 3, 4))
    indices = np.array([[[1], [0], [2]], [[2], [2], [0]]])
    node = helper.make_node("GatherND", ["x", "k0"], ["y"], batch_dims=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(indices.astype(np.int64), "k0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)}
    )[0]
    rule_node = make_node("GatherND", 2, {"batch_dims": 1})
    (box,) = lookup(rule_node).interval(rule_node, [Interval.point(x), indices])
    np.testing.assert_allclose(box.lo, expected, rtol=1e-6)


@SETTINGS
@given(data=st.data())
def test_scaler_rule_against_numpy(data):
    scale, offset = [0.5, -2.0, 3.0], [1.0, 0.0, -1.0]
    node = make_node("Scaler", 1, {"scale": scale, "offset": offset}, domain="ai.onnx.ml")
    box = draw_box(data, (1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    function = lambda x: (x - np.array(offset)) * np.array(scale)  # noqa: E731
    assert violations(node, lookup(node), [box], [], function, rng) == []


UPSAMPLES = {
    "opset7_nearest": ({"scales": [1.0, 1.0, 2.0, 3.0], "mode": "nearest"}, 7, None),
    "opset7_linear": ({"scales": [1.0, 1.0, 2.0, 1.5], "mode": "linear"}, 7, None),
    "opset9_linear": ({"mode": "linear"}, 9, [1.0, 1.0, 1.5, 2.0]),
    "opset9_nearest": ({"mode": "nearest"}, 9, [1.0, 1.0, 3.0, 2.5]),
}


@pytest.mark.parametrize("name", sorted(UPSAMPLES))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_upsample_forms_against_onnxruntime(name, data):
    attrs, opset, scales = UPSAMPLES[name]
    shape = (1, 2, 3, 4)
    node = make_node("Upsample", 1 if scales is None else 2, attrs, opset=opset)
    function = ort_op("Upsample", attrs, shape, opset, None if scales is None else [scales])
    box = draw_box(data, shape)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    consts = [] if scales is None else [np.array(scales)]
    assert violations(node, lookup(node), [box], consts, function, rng, pairs=12) == []


POOLS_3D = {
    "max": ("MaxPool", {"kernel_shape": [2, 2, 2], "strides": [1, 2, 1], "pads": [0, 1, 0, 1, 0, 1]}),
    "average": ("AveragePool", {"kernel_shape": [2, 3, 2], "strides": [2, 1, 1], "pads": [1, 1, 0, 0, 1, 1]}),
    "average_with_pads": (
        "AveragePool",
        {"kernel_shape": [2, 2, 2], "pads": [1, 0, 1, 0, 1, 0], "count_include_pad": 1},
    ),
    "max_ceil": ("MaxPool", {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2], "ceil_mode": 1}),
}


@pytest.mark.parametrize("name", sorted(POOLS_3D))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_volume_pooling_against_onnxruntime(name, data):
    op_type, attrs = POOLS_3D[name]
    shape = (1, 2, 3, 3, 4)
    node = make_node(op_type, 1, attrs)
    box = draw_box(data, shape)
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    function = ort_op(op_type, attrs, shape, 17)
    assert violations(node, lookup(node), [box], [], function, rng, pairs=12) == []


# --------------------------------------------------------------------------- the checks can fail

WEAKENED_CASES = {
    "pow3": (
        make_node("Pow", 2, {}),
        [Interval(np.full((1, 3), 0.5), np.full((1, 3), 2.0))],
        [np.array(3.0)],
        lambda x: x**3,
    ),
    "sum": (make_node("Sum", 2, {}), [Interval(np.zeros((1, 3)), np.ones((1, 3)))] * 2, [], lambda a, b: a + b),
    "reciprocal": (
        make_node("Reciprocal", 1, {}),
        [Interval(np.full((1, 3), 0.5), np.full((1, 3), 2.0))],
        [],
        lambda x: 1 / x,
    ),
    "div": (
        make_node("Div", 2, {}),
        [Interval(np.full((1, 3), -1.0), np.ones((1, 3))), Interval(np.full((1, 3), 0.5), np.full((1, 3), 2.0))],
        [],
        lambda a, b: a / b,
    ),
    # AlexNet's parameters: close to x / bias^β, where the Jacobian bound is nearly attained
    "lrn": (
        make_node("LRN", 1, {"size": 5, "alpha": 1e-4, "beta": 0.75, "bias": 2.0}),
        [Interval(np.full((1, 6, 1), -2.0), np.full((1, 6, 1), 2.0))],
        [],
        lambda x: ref_lrn(x, 5, 1e-4, 0.75, 2.0),
    ),
    "scaler": (
        make_node("Scaler", 1, {"scale": [0.5, -2.0], "offset": [1.0, 0.0]}, domain="ai.onnx.ml"),
        [Interval(np.zeros((1, 2)), np.ones((1, 2)))],
        [],
        lambda x: (x - np.array([1.0, 0.0])) * np.array([0.5, -2.0]),
    ),
    "upsample_opset7_linear": (
        make_node("Upsample", 1, {"scales": [1.0, 1.0, 2.0, 2.0], "mode": "linear"}, opset=7),
        [Interval(np.zeros((1, 1, 2, 3)), np.ones((1, 1, 2, 3)))],
        [],
        ort_op("Upsample", {"scales": [1.0, 1.0, 2.0, 2.0], "mode": "linear"}, (1, 1, 2, 3), 7),
    ),
    "average_pool_3d": (
        make_node("AveragePool", 1, {"kernel_shape": [2, 2, 2]}),
        [Interval(np.zeros((1, 1, 2, 3, 2)), np.ones((1, 1, 2, 3, 2)))],
        [],
        ort_op("AveragePool", {"kernel_shape": [2, 2, 2]}, (1, 1, 2, 3, 2), 17),
    ),
    "gather_nd": (
        make_node("GatherND", 2, {}),
        [Interval(np.zeros((3, 2)), np.ones((3, 2)))],
        [np.array([[0], [2]])],
        lambda x: ref_gather_nd(x, np.array([[0], [2]])),
    ),
}


@pytest.mark.parametrize("name", sorted(WEAKENED_CASES))
def test_a_weakened_rule_is_caught(name):
    node, boxes, consts, function = WEAKENED_CASES[name]
    rng = np.random.default_rng(0)
    assert violations(node, lookup(node), boxes, consts, function, rng, pairs=200) == []
    found = violations(node, Weakened(lookup(node)), boxes, consts, function, np.random.default_rng(0), pairs=200)
    assert {"interval", "backward", "paper"} <= set(found), found
