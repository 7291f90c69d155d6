"""Cuts of the tight bound (docs/method.md §4.1): a hidden layer's output whose every element
moves by at most the width of its clean-and-faulty hull stops the sensitivity products.

* ``covered_layers`` on a residual graph, against the sets read off the graph by hand;
* a steep Tanh layer after a ReLU layer: the cut bound is exactly the largest error, which
  onnxruntime reaches; the cut widths shrunk by 10 % give a bound below that error;
* random ReLU → Tanh/Sigmoid chains with large weights (hypothesis): every failure set,
  byzantine values at the ends of the range and many inputs, run in onnxruntime, stay
  within ``fep_tight``, and the cut is what binds in most of them.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import dense_chain, failure_rows, fault_errors, make_model, ort_session, with_fault_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import robaudit.bounds.tight as tight
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound, covered_layers
from robaudit.graph.network import NetworkOptions


def _gemm(name: str, x: str, w: np.ndarray, b: np.ndarray, out: str) -> tuple[list, list]:
    inits = [
        numpy_helper.from_array(np.asarray(w, np.float32), f"{name}_w"),
        numpy_helper.from_array(np.asarray(b, np.float32), f"{name}_b"),
    ]
    return [helper.make_node("Gemm", [x, f"{name}_w", f"{name}_b"], [out], name=name, transB=1)], inits


def _model(layers: list, out="y", width=1):
    """Gemm (+ activation) per entry (name, input, W [out, in], b, activation op, output value);
    an entry that is a NodeProto is added as it is."""
    nodes, inits = [], []
    for item in layers:
        if not isinstance(item, tuple):
            nodes.append(item)
            continue
        name, x, w, b, act, value = item
        pre = f"{name}_pre" if act else value
        new_nodes, new_inits = _gemm(name, x, w, b, pre)
        nodes += new_nodes
        inits += new_inits
        if act:
            nodes.append(helper.make_node(act, [pre], [value], name=f"{name}_act"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layers[0][2].shape[1]])]
    graph = helper.make_graph(
        nodes, "cuts", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width])], inits
    )
    return make_model(graph)


def test_covered_layers_on_a_residual_graph(tmp_path):
    eye = np.eye(3)
    model = _model(
        [
            ("fc1", "x", eye, np.zeros(3), "Relu", "h1"),
            ("fc2", "h1", eye, np.zeros(3), "Relu", "h2"),
            helper.make_node("Add", ["h1", "h2"], ["s"], name="skip"),
            ("fc3", "s", eye, np.zeros(3), "Relu", "h3"),
            ("fc4", "h3", np.ones((1, 3)), np.zeros(1), None, "y"),
        ]
    )
    path = tmp_path / "residual.onnx"
    path.write_bytes(model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    names = [la.name for la in net.hidden_layers]
    covers = [{names[i] for i in cover} for cover in covered_layers(net, net.hidden_layers)]
    # fc1 reaches the Add directly and through fc2: only fc3's output separates it from the output
    assert covers == [{"fc1"}, {"fc2"}, {"fc1", "fc2", "fc3"}], (names, covers)


def _steep_tanh(tmp_path):
    """h = relu(x); t_j = tanh(100·(h − ½)), j = 1, 2; y = t_1 + t_2, x ∈ [0, 1]."""
    model = _model(
        [
            ("fc1", "x", np.ones((1, 1)), np.zeros(1), "Relu", "h"),
            ("fc2", "h", np.full((2, 1), 100.0), np.full(2, -50.0), "Tanh", "t"),
            ("fc3", "t", np.ones((1, 2)), np.zeros(1), None, "y"),
        ]
    )
    path = tmp_path / "steep.onnx"
    path.write_bytes(model.SerializeToString())
    return model, path


def _crash_first_neuron(model) -> float:
    """|ΔF| at x = 1 when h crashes, by onnxruntime."""
    session = ort_session(with_fault_inputs(model, ["h"], [1]))
    feed = {"x": np.ones((2, 1), np.float32), "keep_0": np.array([[0.0], [1.0]], np.float32)}
    feed["inject_0"] = np.zeros((2, 1), np.float32)
    faulty, clean = session.run(["y"], feed)[0].astype(np.float64)
    return float(abs(faulty[0] - clean[0]))


def test_cut_is_exact_on_a_steep_tanh_and_a_shrunk_width_is_caught(tmp_path, monkeypatch):
    model, path = _steep_tanh(tmp_path)
    measured = _crash_first_neuron(model)
    assert measured == pytest.approx(4.0, rel=1e-6)  # both tanh flip from +1 to −1
    _, net = load_network(path, NetworkOptions())
    analysis = Analysis(net, FailureModel.crash())
    bound = TightBound(analysis).fep([1, 0])
    without = TightBound(analysis, use_ranges=False).fep([1, 0])
    assert without >= 40 * measured  # the sensitivity products alone: 2·100·δ = 200
    assert measured <= bound * (1 + 1e-6) and bound <= measured * (1 + 1e-6)
    original = tight.cut_widths
    monkeypatch.setattr(tight, "cut_widths", lambda an: [0.9 * w for w in original(an)])
    weakened = TightBound(Analysis(net, FailureModel.crash())).fep([1, 0])
    assert weakened < measured * (1 - 0.05), (weakened, measured)


def _errors(chain, sizes, rows) -> np.ndarray:
    """max_k |F̃_k − F_k| per row (x, keeps, injects) of a dense chain, by onnxruntime (other tests import it)."""
    return fault_errors(chain.model, chain.hidden_outputs, sizes, rows)


def _rows(sizes, counts, failure_range, inputs, rng):
    """Every failure set with ``counts`` per layer, each failed value at an end of the range or random (three draws
    per set and input unless the range is one value; other tests import it)."""
    a, b = failure_range
    return failure_rows(sizes, counts, failure_range, inputs, rng, draws=1 if a == b else 3)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(2, 4), min_size=2, max_size=2),
    st.sampled_from(["tanh", "sigmoid"]),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(2.0, 8.0),
    st.integers(0, 2**31),
)
def test_cuts_are_sound_on_saturating_chains(tmp_path_factory, hidden, last, mode, scale, seed):
    sizes = [3, *hidden, 2]
    chain = dense_chain(sizes, ["relu", last], seed=seed % 1000, weight_scale=scale, bias_scale=1.0)
    path = chain.save(tmp_path_factory.mktemp("cut"))
    _, net = load_network(path, NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.5)
    analysis = Analysis(net, failure)
    rng = np.random.default_rng(seed)
    corners = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=3)]
    inputs = corners + list(rng.uniform(0, 1, (24, 3)))
    bound, products = TightBound(analysis), TightBound(analysis, use_ranges=False)
    binds = []
    for counts in ([1, 0], [1, 1], [2, 1], [0, 2]):
        fep = bound.fep(counts)
        worst = float(_errors(chain, hidden, _rows(hidden, counts, failure.failure_range, inputs, rng)).max())
        assert worst <= fep * (1 + 1e-5) + 1e-6, (sizes, last, mode, counts, worst, fep)
        binds.append(fep < products.fep(counts) * (1 - 1e-9))
    assert any(binds)  # the cut, not the slopes, is what the check exercises


@pytest.mark.parametrize(("seed", "last"), [(4, "sigmoid"), (7, "tanh")])
def test_shrunk_cut_widths_are_caught_on_saturating_chains(seed, last, tmp_path, monkeypatch):
    hidden = [3, 3]
    chain = dense_chain([3, *hidden, 2], ["relu", last], seed=seed, weight_scale=5.0, bias_scale=1.0)
    path = chain.save(tmp_path)
    _, net = load_network(path, NetworkOptions())
    rng = np.random.default_rng(seed)
    inputs = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=3)]
    inputs += list(rng.uniform(0, 1, (24, 3)))
    worst = float(_errors(chain, hidden, _rows(hidden, [1, 1], (0.0, 0.0), inputs, rng)).max())
    assert worst <= TightBound(Analysis(net, FailureModel.crash())).fep([1, 1]) * (1 + 1e-5)
    original = tight.cut_widths
    monkeypatch.setattr(tight, "cut_widths", lambda an: [0.9 * w for w in original(an)])
    assert worst > TightBound(Analysis(net, FailureModel.crash())).fep([1, 1]) * (1 + 1e-5)
