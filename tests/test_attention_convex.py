"""Attention's P·V as a convex combination (docs/method.md §13.3): a row of a Softmax's output along its last axis is
a probability vector, so (P @ V)[…, i, j] lies in the hull [min_t V_lo[t, j], max_t V_hi[t, j]] of column j of V.
Checked against numpy on points of the boxes and against onnxruntime (the boxes and the tight bound under
crashes and byzantine values) on attention models; the hull shrunk by 10 % and the hull claimed for a Softmax
along another axis are caught."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import failure_rows, fault_errors, make_model, ort_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import affine, pooling
from robaudit.graph.ops.affine import convex_combination_interval, matmul_interval
from robaudit.graph.ops.base import Interval, Probabilities
from robaudit.graph.ops.pooling import softmax_interval

TOKENS, FEATURES, WIDTH = 3, 2, 2


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _box(rng: np.random.Generator, shape, spread: float) -> Interval:
    centre = rng.normal(0.0, spread, shape)
    radius = rng.uniform(0.0, 1.0, shape) * rng.choice([0.05, 0.5, 2.0])
    return Interval(centre - radius, centre + radius)


def _points(rng: np.random.Generator, box: Interval, count: int) -> np.ndarray:
    u = rng.uniform(0, 1, (count,) + box.shape)
    u[: count // 2] = rng.integers(0, 2, (count // 2,) + box.shape)
    return box.lo + u * (box.hi - box.lo)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5), d=st.integers(1, 4), spread=st.sampled_from([0.5, 3.0]))
def test_convex_combination_holds_every_point(seed, t, d, spread):
    """softmax(L) @ V for L, V anywhere in their boxes (numpy, independently) lies in the narrowed box."""
    rng = np.random.default_rng(seed)
    logits, values = _box(rng, (2, t, t), spread), _box(rng, (2, t, d), spread)
    probs = softmax_interval(logits, -1)
    box = convex_combination_interval(matmul_interval(probs, values), values)
    for lo_pt, v_pt in zip(_points(rng, logits, 200), _points(rng, values, 200), strict=True):
        out = _softmax(lo_pt) @ v_pt
        slack = 1e-12 * (1 + np.abs(out))
        assert np.all(out >= box.lo - slack) and np.all(out <= box.hi + slack)


def test_the_hull_is_reached_and_shrinking_it_is_caught():
    """V's rows all at their upper ends give P @ V = max_t V_hi for any P: the hull's end is reached, and a hull
    shrunk by 10 % leaves that value out."""
    values = Interval(np.zeros((1, 3, 2)), np.array([[[1.0, 2.0], [0.5, 2.0], [1.0, 1.5]]]))
    logits = Interval(np.full((1, 3, 3), -4.0), np.full((1, 3, 3), 4.0))
    box = convex_combination_interval(matmul_interval(softmax_interval(logits, -1), values), values)
    point = _softmax(np.zeros((1, 3, 3))) @ np.ones((1, 3, 2)) * np.array([1.0, 2.0])  # every row of V at (1, 2)
    assert np.allclose(box.hi.max(axis=-2), [1.0, 2.0])  # max_t V_hi per column, the closed form
    assert np.all(point <= box.hi + 1e-12)
    shrunk = box.hi - 0.1 * (box.hi - box.lo)
    assert np.any(point > shrunk + 1e-12)


def _attention(seed: int, softmax_axis: int, scale: float, opset: int = 17, v_shift: float = 0.0) -> onnx.ModelProto:
    """x [N, T·F] → q, k, v layers (MatMul + Add, [N, T·W] each) → Reshape [N, T, W] → softmax(q·kᵀ, ``softmax_axis``)
    · v → 'pv' → Reshape [N, T·W] → MatMul → y [N, 2]; ``v_shift`` added to v's bias (a hull away from 0)."""
    rng = np.random.default_rng(seed)
    n_in, n_mid = TOKENS * FEATURES, TOKENS * WIDTH
    inits = [numpy_helper.from_array(np.array([-1, TOKENS, WIDTH], np.int64), "tokens"),
             numpy_helper.from_array(np.array([-1, n_mid], np.int64), "flat"),
             numpy_helper.from_array(rng.normal(size=(n_mid, 2)).astype(np.float32), "Wo")]
    nodes = []
    for name in ("q", "k", "v"):
        inits += [numpy_helper.from_array((scale * rng.normal(size=(n_in, n_mid))).astype(np.float32), f"W{name}"),
                  numpy_helper.from_array((rng.normal(size=n_mid) + (v_shift if name == "v" else 0.0)).astype(
                      np.float32), f"b{name}")]
        nodes += [helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_m"], name=f"{name}_mm"),
                  helper.make_node("Add", [f"{name}_m", f"b{name}"], [name], name=f"{name}_add"),
                  helper.make_node("Reshape", [name, "tokens"], [f"{name}_t"], name=f"{name}_tokens")]
    nodes += [
        helper.make_node("Transpose", ["k_t"], ["kT"], name="kT", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q_t", "kT"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=softmax_axis),
        helper.make_node("MatMul", ["p", "v_t"], ["pv"], name="pv"),
        helper.make_node("Reshape", ["pv", "flat"], ["pv_flat"], name="pv_flat"),
        helper.make_node("MatMul", ["pv_flat", "Wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return make_model(graph, opset)


def _outside(model: onnx.ModelProto, path, inputs: np.ndarray) -> int:
    """onnxruntime's values of 'pv' at ``inputs`` outside robaudit's clean box of it."""
    onnx.save(model, path)
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    box = network.clean["pv"]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name="pv"))
    seen = ort_session(probe).run(["pv"], {"x": inputs})[0].astype(np.float64)
    slack = 1e-6 * (1 + np.abs(seen))
    return int(np.sum((seen < box.lo - slack) | (seen > box.hi + slack)))


def _inputs(rng: np.random.Generator, count: int) -> np.ndarray:
    corners = rng.integers(0, 2, (count // 2, TOKENS * FEATURES))
    return np.concatenate([corners, rng.random((count - count // 2, TOKENS * FEATURES))]).astype(np.float32)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 2.0]), byzantine=st.booleans())
def test_boxes_and_bound_hold_against_onnxruntime(tmp_path, seed, scale, byzantine):
    """The box of P·V holds onnxruntime's values, and the tight bound of one failure in q, k or v — and of one in
    each — every error onnxruntime measures (crash, or values in [−2, 2])."""
    model = _attention(seed, -1, scale)
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng, 64)
    assert _outside(model, tmp_path / "m.onnx", inputs) == 0
    failure = FailureModel.byzantine(failure_range=(-2.0, 2.0)) if byzantine else FailureModel.crash()
    _, network = load_network(tmp_path / "m.onnx", NetworkOptions(input_range=(0.0, 1.0)))
    tight = TightBound(Analysis(network, failure))
    sizes = [TOKENS * WIDTH] * 3
    for counts in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]):
        rows = failure_rows(sizes, counts, failure.failure_range, inputs[:4], rng)
        measured = fault_errors(model, ["q", "k", "v"], sizes, rows).max()
        assert measured <= tight.fep(counts) * (1 + 1e-5) + 1e-6


def test_the_hull_claimed_for_a_softmax_along_another_axis_is_caught(tmp_path, monkeypatch):
    """Weakened: every Softmax output marked as rows of probabilities, here one normalized along axis 1 (its columns
    sum to 1, not its rows): P·V then leaves V's hull and onnxruntime's values fall outside the box."""
    model = _attention(5, 1, 2.0)
    inputs = _inputs(np.random.default_rng(0), 400)
    assert _outside(model, tmp_path / "m.onnx", inputs) == 0
    original = pooling.SoftmaxTail.interval

    def marked(self, node, args):
        (out,) = original(self, node, args)
        return [Probabilities(out.lo, out.hi)]

    monkeypatch.setattr(pooling.SoftmaxTail, "interval", marked)
    assert _outside(model, tmp_path / "m.onnx", inputs) > 0


@pytest.mark.parametrize("weaken", [0.9])
def test_a_shrunk_hull_in_the_rule_is_caught_on_a_model(tmp_path, monkeypatch, weaken):
    """Weakened: the rule's hull shrunk by 10 % towards its centre — onnxruntime's values of P·V leave the box."""
    model = _attention(2, -1, 2.0)
    inputs = _inputs(np.random.default_rng(1), 400)
    assert _outside(model, tmp_path / "m.onnx", inputs) == 0

    def shrunk(product, y):
        lo, hi = y.lo.min(axis=-2, keepdims=True), y.hi.max(axis=-2, keepdims=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * weaken
        return Interval(np.maximum(product.lo, mid - half), np.minimum(product.hi, mid + half))

    monkeypatch.setattr(affine, "convex_combination_interval", shrunk)
    assert _outside(model, tmp_path / "m.onnx", inputs) > 0


def test_a_product_rounded_past_the_hull_gives_the_hull_not_an_inverted_box():
    """Every row of V equal to 0.1: P @ V is 0.1 exactly, and a product box rounded just above it (as a float64 point
    product may be) leaves the hull [0.1, 0.1], with lo ≤ hi everywhere."""
    values = Interval(np.full((1, 3, 2), 0.1), np.full((1, 3, 2), 0.1))
    above = np.nextafter(np.full((1, 3, 2), 0.1), 1.0)
    box = convex_combination_interval(Interval(above, above), values)
    assert np.all(box.lo <= box.hi)
    assert np.all(box.lo == 0.1) and np.all(box.hi == 0.1)


def test_before_opset_13_only_a_softmax_over_the_last_axis_makes_probability_rows(tmp_path):
    """Opset 12: Softmax(axis=1) on [N, T, T] normalizes all T·T scores together (rows sum to about 1/T), so P·V
    leaves V's hull — its box still holds onnxruntime's values (an attack helper found values 2.7 outside while
    the hull was claimed); Softmax(axis=2), the last axis, normalizes each row, and P·V stays in V's hull."""
    inputs = _inputs(np.random.default_rng(3), 400)
    model = _attention(7, 1, 2.0, opset=12, v_shift=8.0)
    assert _outside(model, tmp_path / "m.onnx", inputs) == 0
    model = _attention(7, 2, 2.0, opset=12, v_shift=8.0)
    assert _outside(model, tmp_path / "m.onnx", inputs) == 0
    _, network = load_network(tmp_path / "m.onnx", NetworkOptions(input_range=(0.0, 1.0)))
    values, box = network.clean["v_t"], network.clean["pv"]
    hull_lo, hull_hi = values.lo.min(axis=-2, keepdims=True), values.hi.max(axis=-2, keepdims=True)
    assert np.all(box.hi <= hull_hi) and np.all(box.lo >= hull_lo)
