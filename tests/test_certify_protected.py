"""Certificates of range-restricted models (what ``harden`` writes, docs/method.md §1.3, §7.3): the guard's ops —
the NaN guard, ``Clip``, per-neuron ``Max``/``Min`` — carry chord slopes in the signed pass (1 inside the
range, 0 outside, [0, 1] across an end) instead of losing the signs there.

* the chord slopes of each op against onnxruntime's own Clip / Max / Min on pairs of points of the interval;
* certificates of random restricted chains against every failure set onnxruntime measures at the input
  (and at corners and inner points of a radius);
* a hand-built chain where two paths of one failure cancel unless the clip saturates one of them: the
  clip read as slope 1 (the weakened rule) certifies 0 where onnxruntime measures 0.5.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_model, ort_session, with_fault_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_output_cut_protected import _restricted_chain
from test_tight_cuts import _errors, _model, _rows

import robaudit.bounds.certify as certify
from robaudit.applications.harden import insert_restrictions
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier, node_chord_slopes
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import Node


def _session(op: str):
    """onnxruntime's ``Clip(x, lo, hi)``, or ``Min(Max(x, lo), hi)`` for ``ChannelClip``, on [n] vectors."""
    names = ["x", "lo", "hi"]
    if op == "Clip":
        nodes = [helper.make_node("Clip", names, ["y"])]
        shapes = [["n"], [], []]
    else:
        nodes = [helper.make_node("Max", ["x", "lo"], ["m"]), helper.make_node("Min", ["m", "hi"], ["y"])]
        shapes = [["n"], ["n"], ["n"]]
    inputs = [helper.make_tensor_value_info(v, TensorProto.DOUBLE, s) for v, s in zip(names, shapes, strict=True)]
    graph = helper.make_graph(nodes, "clip", inputs, [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n"])])
    return ort.InferenceSession(make_model(graph, 13).SerializeToString(), providers=["CPUExecutionProvider"])


SESSIONS = {op: _session(op) for op in ("Clip", "ChannelClip")}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["Clip", "ChannelClip", "NanGuard"]),
    st.integers(0, 2**31),
)
def test_chord_slopes_of_the_guard_ops_hold_for_every_pair(op, seed) -> None:
    """(g(u) − g(z)) / (u − z) ∈ [s_lo, s_hi] for u, z in [zlo, zhi] — g run by onnxruntime — and the
    slopes are exact (1) where the interval lies inside the range, 0 where it lies beyond an end."""
    rng = np.random.default_rng(seed)
    n = 8
    zlo = rng.uniform(-3, 3, n)
    zhi = zlo + rng.choice([0.0, rng.uniform(0, 4)], n)
    if op == "Clip":
        lo, hi = float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))  # lo > hi: ONNX pins the value at hi
        node = Node("c", "Clip", "", ["z", "lo", "hi"], ["y"])
        constants = {"lo": np.float64(lo), "hi": np.float64(hi)}
        low, high = np.full(n, lo), np.full(n, hi)
    elif op == "ChannelClip":
        low = rng.uniform(-2, 1, n)
        high = low + rng.uniform(0, 2, n)
        node = Node("c", "ChannelClip", "robaudit", ["z"], ["y"], {"low": low, "high": high})
        constants = {}
    else:
        node = Node("g", "NanGuard", "robaudit", ["z"], ["y"])
        constants = {}
    s_lo, s_hi = node_chord_slopes(node, zlo, zhi, constants)
    for t in itertools.combinations([0.0, 0.13, 0.5, 0.77, 1.0], 2):
        u, z = zlo + t[0] * (zhi - zlo), zlo + t[1] * (zhi - zlo)
        if op == "NanGuard":
            gu, gz = u, z
        else:
            gu, gz = (SESSIONS[op].run(None, {"x": v, "lo": np.asarray(low if op == "ChannelClip" else low[0]),
                                               "hi": np.asarray(high if op == "ChannelClip" else high[0])})[0]
                      for v in (u, z))
        moved = u != z
        slope = np.where(moved, (gu - gz) / np.where(moved, u - z, 1.0), s_lo)
        assert np.all(slope >= s_lo - 1e-12) and np.all(slope <= s_hi + 1e-12), (op, slope, s_lo, s_hi)
    if op != "NanGuard":
        pinned_lo = np.minimum(low, high) if op == "Clip" else low
        inside = (zlo >= pinned_lo) & (zhi <= high) & (high >= low)
        beyond = (zhi <= pinned_lo) | (zlo >= high)
        assert np.all(s_lo[inside] == 1.0) and np.all(s_hi[beyond] == 0.0)


@pytest.mark.parametrize("per_channel", [False, True])
@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(2, 4), min_size=2, max_size=2),
    st.sampled_from(["relu", "tanh"]),
    st.sampled_from(["crash", "byzantine"]),
    st.sampled_from([None, 0.05]),
    st.integers(0, 2**31),
)
def test_certificates_of_restricted_chains_hold(tmp_path_factory, per_channel, hidden, last, mode, radius, seed):
    chain = _restricted_chain(hidden, last, 3.0, seed % 1000, per_channel, -0.2)
    path = tmp_path_factory.mktemp("cert") / "restricted.onnx"
    path.write_bytes(chain.model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=(-0.5, 2.5))
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(0.1, 0.9, (3, 3)).astype(np.float32)
    certifier = Certifier(net, failure, inputs, radius)
    for counts in ([1, 0], [0, 1], [1, 1]):
        for i, x in enumerate(inputs):
            points = [x.astype(np.float64)]
            if radius is not None:
                points += [np.clip(x + radius * np.array(s), 0, 1) for s in itertools.product([-1, 1], repeat=3)]
            worst = _errors(chain, hidden, _rows(hidden, counts, failure.failure_range, points, rng)).max()
            bound = certifier.box(i, counts).bound
            assert worst <= bound * (1 + 1e-5) + 1e-6, (counts, i, worst, bound)


def _cancelling_chain(tmp_path):
    """x → h1 = relu(x) → h2 = relu([1, 1]·h1) restricted per neuron to [0, 2] and [0, 0.5] → y = h2_a − h2_b.
    At x = 1 crashing h1 moves h2_a by 1 and the clipped h2_b by 0.5: y moves by 0.5 (paths cancel only when
    the clip is read as slope 1)."""
    model = _model(
        [
            ("fc1", "x", np.ones((1, 1)), np.zeros(1), "Relu", "h1"),
            ("fc2", "h1", np.ones((2, 1)), np.zeros(2), "Relu", "h2"),
            ("fc3", "h2", np.array([[1.0, -1.0]]), np.zeros(1), None, "y"),
        ]
    )
    model = insert_restrictions(model, {"h2": (np.array([0.0, 0.0]), np.array([2.0, 0.5]))})
    path = tmp_path / "cancel.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort_session(with_fault_inputs(model, ["h1"], [1]))
    one = np.ones((1, 1), np.float32)
    runs = [session.run(["y"], {"x": one, "keep_0": keep, "inject_0": 0 * one})[0] for keep in (0 * one, one)]
    return load_network(path, NetworkOptions())[1], float(abs(runs[0] - runs[1]).max())


def test_a_clip_read_as_slope_one_is_caught(tmp_path, monkeypatch) -> None:
    net, measured = _cancelling_chain(tmp_path)
    assert measured == pytest.approx(0.5)
    x = np.ones((1, 1), np.float32)
    assert Certifier(net, FailureModel.crash(), x).box(0, [1, 0]).bound >= measured * (1 - 1e-6)
    original = certify.node_chord_slopes

    def slope_one(node, lo, hi, *constants):
        found = original(node, lo, hi, *constants)
        return (np.ones_like(lo), np.ones_like(lo)) if node.op_type == "ChannelClip" else found

    monkeypatch.setattr(certify, "node_chord_slopes", slope_one)
    assert Certifier(net, FailureModel.crash(), x).box(0, [1, 0]).bound < measured * 0.5
