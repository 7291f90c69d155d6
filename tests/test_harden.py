"""Range restriction (docs/method.md §1.3, §9.2): ``harden`` on the trained digits CNN, the
protected δ against onnxruntime's Clip, and bit flips at every position of a hardened float
model against flips done in numpy on the float32 words."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, cli_json, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_bit_flips import bounds, flip_float, measured_flips, site_values

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import FailureModel, protected_delta
from robaudit.graph.network import NetworkOptions

SAMPLES = ROOT / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
DATA = SAMPLES / "digits_cnn_inputs.npz"


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    path = tmp_path_factory.mktemp("harden") / "hard.onnx"
    report = cli_json("harden", CNN, "--inputs", DATA, "--labels", DATA, "-o", path, "--margin", 0.05)
    return path, report


def test_harden_keeps_accuracy_and_tolerates_more(hardened) -> None:
    path, report = hardened
    assert abs(report["accuracy_after"] - report["accuracy_before"]) <= 0.005
    assert report["agreement"] >= 0.995
    assert report["fep_after"] < report["fep_before"]
    assert report["bit_flip_before"] is None and report["bit_flip_after"] is not None
    before = cli_json("bound", CNN, "-e", 20)
    after = cli_json("bound", path, "-e", 20)
    counts = [(b["max_failures"], a["max_failures"]) for b, a in zip(before["layers"], after["layers"], strict=True)]
    assert all(a >= b for b, a in counts) and any(a > b for b, a in counts), counts


def test_hardened_model_protects_every_layer(hardened) -> None:
    path, _ = hardened
    _, network = load_network(path, NetworkOptions())
    assert [la.name for la in network.hidden_layers] == ["conv1", "conv2", "fc1"]
    assert all(network.protections[la.output_value].nan_safe for la in network.hidden_layers)


@pytest.fixture(scope="module")
def clip_session():
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        "clip",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [None]), ("lo", []), ("hi", []))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])

    def clip(x, lo, hi):
        feed = {"x": np.asarray(x, np.float32), "lo": np.array(lo, np.float32), "hi": np.array(hi, np.float32)}
        return session.run(None, feed)[0]

    return clip


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    a=st.floats(-50, 50), span=st.floats(0, 50), ylo=st.floats(-20, 20), yspan=st.floats(0, 20),
    lo=st.floats(-10, 10), width=st.floats(0.1, 10),
)
def test_protected_delta_against_onnxruntime_clip(clip_session, a, span, ylo, yspan, lo, width) -> None:
    """|Clip(v) − Clip(y)| ≤ δ for every failed value v ∈ [a, b] and clean y ∈ [ylo, yhi]."""
    rng = np.random.default_rng(0)
    b, yhi, hi = a + span, ylo + yspan, lo + width
    v = np.concatenate([[a, b], rng.uniform(a, b, 200)])
    y = np.concatenate([[yhi, ylo], rng.uniform(ylo, yhi, 200)])
    change = np.abs(clip_session(v, lo, hi).astype(np.float64) - clip_session(y, lo, hi))
    delta = protected_delta((a, b), ylo, yhi, (lo, hi))
    assert np.all(change <= delta + 1e-5)


def test_protected_delta_shrunk_is_caught(clip_session) -> None:
    """A Clip range shrunk by 10 % in the rule gives δ below real changes."""
    lo, hi = -1.0, 3.0
    caught = 0
    for a, b, ylo, yhi in ((-10, 10, 0, 1), (0, 0, 0.5, 5), (5, 9, -4, -2)):
        v, y = np.array([a, b], float), np.array([yhi, ylo], float)
        change = np.abs(clip_session(v, lo, hi).astype(np.float64) - clip_session(y, lo, hi)).max()
        weak = protected_delta((a, b), ylo, yhi, (lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo)))
        caught += change > weak + 1e-6
    assert caught == 3


@settings(max_examples=8, deadline=None, derandomize=True)
@given(layer=st.integers(0, 2), seed=st.integers(0, 1000))
def test_hardened_bit_flips_at_every_position_within_bound(hardened, layer, seed) -> None:
    """Every bit of a float32 neuron, exponent and sign included, flipped on real inputs: within the bound."""
    path, _ = hardened
    model = onnx.load(path)
    x = np.load(DATA)["x"][:48]
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    neurons = np.random.default_rng(seed).integers(0, network.hidden_layers[layer].neurons, len(x))
    counts = [0, 0, 0]
    counts[layer] = 1
    paper, tight = bounds(path, FailureModel.bit_flip(), counts)
    assert tight < 1e6
    worst = 0.0
    for bit in range(32):
        worst = max(worst, measured_flips(model, values, x, lambda y, b=bit: flip_float(y, b), layer, neurons))
    assert worst <= min(paper, tight) * (1 + 1e-5) + 1e-5, (worst, paper, tight)
    assert site_values(model, values, x[:1])  # the sites are the layer outputs before their guard


def test_harden_refuses_bad_margin(tmp_path) -> None:
    proc = run_cli("harden", CNN, "--inputs", DATA, "-o", tmp_path / "h.onnx", "--margin", -1, expect=2)
    assert "--margin" in proc.stderr and "Traceback" not in proc.stderr
