"""The output cut of the tight bound (docs/method.md §4.1, "The output cut") and the faulty ranges carried
through the failure sites (docs/method.md §5.3, "Through the failure sites").

The cut is checked on its own (not through the minimum with the other bounds, so that it is what
each check exercises) against independent fault injection:

* small random SE-style networks (conv-ReLU, GAP, dense-ReLU, dense-Sigmoid gate, channel product,
  strided conv-ReLU, output), run by the numpy implementation of ``test_gate_product`` (checked there
  against onnxruntime): every failure set of small vectors (random ones past 3,000), failed values at
  the ends of the range and inside, box corners and random inputs;
* random ReLU → ReLU/Tanh dense chains, run by onnxruntime with the failed values injected
  (``conftest.with_fault_inputs``), every failure set, values at the ends of the range;
* a fan-in chain where the cut is exactly the error onnxruntime measures (the boxes alone give twice
  that): weakened copies are caught there — the failure terms halved (in the general cut and in the
  per-vector one), the cut shrunk by 10 %.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import dense_chain, ort_session, with_fault_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate_product import SENet, _inputs, _network, worst_errors
from test_tight_cuts import _errors, _model, _rows

import robaudit.bounds.ranges as ranges
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import OutputCut, TightBound
from robaudit.graph.network import NetworkOptions

#: Failure vectors of the SE nets (conv, squeeze, gate, last conv).
SE_COUNTS = ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1], [0, 2, 0, 0], [2, 0, 1, 1])


def _check_se(net: SENet, network, failure: FailureModel, rng, vectors=SE_COUNTS) -> tuple[list[bool], list[float]]:
    """Assert every error found is within the output cut (general and per vector); per vector, whether
    the cut is below the sensitivity sum, and the largest error over the cut."""
    analysis = Analysis(network, failure)
    cut = OutputCut.build(analysis)
    assert cut is not None
    sums = TightBound(analysis)
    inputs = _inputs(rng)
    binds, ratios = [], []
    for counts in vectors:
        counts = [min(c, n) for c, n in zip(counts, net.sizes, strict=True)]
        worst = worst_errors(net, counts, failure.failure_range, inputs, rng).max()
        general, design = cut.bound(counts).max(), cut.design(counts).max()
        assert worst <= general * (1 + 1e-5) + 1e-5, (counts, worst, general)
        assert worst <= design * (1 + 1e-5) + 1e-5, (counts, worst, design)
        binds.append(min(general, design) < sums.sums(counts).max() * (1 - 1e-9))
        ratios.append(worst / min(general, design))
    return binds, ratios


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(2, 3), st.sampled_from(["crash", "byzantine"]), st.floats(0.5, 2.0), st.integers(0, 2**31))
def test_output_cut_is_sound_on_random_se_nets(tmp_path_factory, channels, mode, scale, seed):
    net = SENet(channels, 2, seed=seed % 10_000, scale=scale)
    network, _ = _network(net, tmp_path_factory.mktemp("se"))
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(float(1 + seed % 3))
    binds, _ = _check_se(net, network, failure, np.random.default_rng(seed))
    assert any(binds)  # the cut is below the sensitivity sums somewhere: the check can fail


def _chain_check(hidden, last, mode, scale, seed, directory) -> list[bool]:
    sizes = [3, *hidden, 2]
    chain = dense_chain(sizes, ["relu", last], seed=seed % 1000, weight_scale=scale, bias_scale=1.0)
    _, net = load_network(chain.save(directory), NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.5)
    analysis = Analysis(net, failure)
    cut, sums = OutputCut.build(analysis), TightBound(analysis)
    assert cut is not None
    rng = np.random.default_rng(seed)
    inputs = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=3)]
    inputs += list(rng.uniform(0, 1, (16, 3)))
    binds = []
    for counts in ([1, 0], [0, 1], [1, 1], [2, 1]):
        counts = [min(c, n) for c, n in zip(counts, hidden, strict=True)]
        worst = float(_errors(chain, hidden, _rows(hidden, counts, failure.failure_range, inputs, rng)).max())
        general, design = cut.bound(counts).max(), cut.design(counts).max()
        assert worst <= general * (1 + 1e-5) + 1e-6, (sizes, last, mode, counts, worst, general)
        assert worst <= design * (1 + 1e-5) + 1e-6, (sizes, last, mode, counts, worst, design)
        binds.append(min(general, design) < sums.sums(counts).max() * (1 - 1e-9))
    return binds


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(2, 4), min_size=2, max_size=2),
    st.sampled_from(["relu", "tanh"]),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(0.5, 3.0),
    st.integers(0, 2**31),
)
def test_output_cut_is_sound_on_random_chains(tmp_path_factory, hidden, last, mode, scale, seed):
    binds = _chain_check(hidden, last, mode, scale, seed, tmp_path_factory.mktemp("chain"))
    assert len(binds) == 4


def test_output_cut_is_sound_and_binds_on_fixed_chains(tmp_path_factory):
    binds = [
        any(_chain_check([3, 3], last, mode, 2.0, seed, tmp_path_factory.mktemp("binds")))
        for seed, last, mode in [(1, "relu", "crash"), (2, "tanh", "byzantine")]
    ]
    assert any(binds)


def test_output_cut_is_sound_on_a_fixed_se_net(tmp_path):
    net = SENet(2, 2, seed=7)
    network, _ = _network(net, tmp_path)
    vectors = ([0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1])
    binds, _ = _check_se(net, network, FailureModel.byzantine(1.0), np.random.default_rng(7), vectors)
    assert any(binds)


def test_failure_terms_bound_what_the_sites_send():
    """A site's gains: max(0, Λ_i(a − φ̃hi_i), Λ_i(b − φ̃lo_i)) ≥ Λ_i·(v − φ(z̃)) for every v in [a, b]
    and every faulty pre-activation z̃ in its box, written out here with loops."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        lo = rng.uniform(-3, 1, 4)
        hi = lo + rng.uniform(0, 3, 4)
        a, b = sorted(rng.uniform(-2, 2, 2))
        coef = rng.normal(0, 1, (3, 4))
        healthy_lo, healthy_hi = np.maximum(lo, 0), np.maximum(hi, 0)
        gains = np.maximum(0, np.maximum(coef * (a - healthy_hi), coef * (b - healthy_lo)))
        for row in range(3):
            for i in range(4):
                for z in np.linspace(lo[i], hi[i], 7):
                    for v in (a, b, (a + b) / 2):
                        assert coef[row, i] * (v - max(z, 0.0)) <= gains[row, i] + 1e-12


def _fan_in_chain(tmp_path):
    """h = relu([1, 1]ᵀ·x) (two neurons), g = relu(h_1 + h_2), y = g, x ∈ [0, 1]: crashing one h at
    x = 1 moves y by exactly 1, and the joint lines give exactly 1 (the boxes alone give 2)."""
    model = _model(
        [
            ("fc1", "x", np.ones((2, 1)), np.zeros(2), "Relu", "h"),
            ("fc2", "h", np.ones((1, 2)), np.zeros(1), "Relu", "g"),
            ("fc3", "g", np.ones((1, 1)), np.zeros(1), None, "y"),
        ]
    )
    path = tmp_path / "fan_in.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort_session(with_fault_inputs(model, ["h"], [2]))
    feed = {"x": np.ones((2, 1), np.float32), "keep_0": np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)}
    feed["inject_0"] = np.zeros((2, 2), np.float32)
    faulty, clean = session.run(["y"], feed)[0].astype(np.float64)
    return load_network(path, NetworkOptions())[1], float(abs(faulty[0] - clean[0]))


def test_output_cut_is_exact_on_a_fan_in_chain(tmp_path):
    net, measured = _fan_in_chain(tmp_path)
    assert measured == pytest.approx(1.0, rel=1e-6)
    analysis = Analysis(net, FailureModel.crash())
    cut = OutputCut.build(analysis)
    assert cut is not None
    for found in (cut.bound([1, 0]).max(), cut.design([1, 0]).max(), TightBound(analysis).fep([1, 0])):
        assert measured <= found * (1 + 1e-6) and found <= measured * (1 + 1e-6), found


def test_halved_failure_terms_are_caught(tmp_path, monkeypatch):
    net, measured = _fan_in_chain(tmp_path)
    original = ranges._Ranges._site_terms
    monkeypatch.setattr(ranges._Ranges, "_site_terms", lambda self, layer, grad: 0.5 * original(self, layer, grad))
    cut = OutputCut.build(Analysis(net, FailureModel.crash()))
    assert measured > cut.bound([1, 0]).max() * (1 + 1e-5), cut.bound([1, 0])
    assert measured > cut.design([1, 0]).max() * (1 + 1e-5), cut.design([1, 0])


def test_cut_shrunk_is_caught(tmp_path, monkeypatch):
    net, measured = _fan_in_chain(tmp_path)
    original = OutputCut._bound
    monkeypatch.setattr(OutputCut, "_bound", lambda self, *args: 0.9 * original(self, *args))
    cut = OutputCut.build(Analysis(net, FailureModel.crash()))
    assert measured > cut.bound([1, 0]).max() * (1 + 1e-5), cut.bound([1, 0])


def test_output_cut_is_off_on_copies_with_kept_ranges(tmp_path):
    """``design`` scales one layer's weights with the original ranges kept: those boxes are not the copy's,
    so the cut must not read them (it would cap the hypothetical bound at the original output's box)."""
    from robaudit.graph.scaling import Ranges, scaled_network

    net, _ = _fan_in_chain(tmp_path)
    assert OutputCut.build(Analysis(net, FailureModel.crash())) is not None
    kept = scaled_network(net, {net.hidden_layers[0].name: 3.0}, Ranges.KEPT)
    assert OutputCut.build(Analysis(kept, FailureModel.crash())) is None
    assert TightBound(Analysis(kept, FailureModel.crash())).output_cut is None


def test_cut_is_monotone_and_under_its_total_curve(tmp_path):
    """Non-decreasing in every f_l (the inverse problems search it as such), and the total-budget curve at F
    is at least the cut of every vector with Σ f_l ≤ F (docs/method.md §6.3)."""
    chain = dense_chain([3, 4, 3, 2], ["relu", "tanh"], seed=5, weight_scale=2.0, bias_scale=1.0)
    _, net = load_network(chain.save(tmp_path), NetworkOptions())
    for failure in (FailureModel.crash(), FailureModel.byzantine(1.5)):
        cut = OutputCut.build(Analysis(net, failure))
        assert cut is not None
        curve = cut.curve(7).max(axis=0)
        vectors = list(itertools.product(range(5), range(4)))
        values = {v: cut.bound(list(v)).max() for v in vectors}
        assert len(set(values.values())) > 3  # the failure terms move it
        for (f1, f2), value in values.items():
            for g1, g2 in ((f1 + 1, f2), (f1, f2 + 1)):
                if (g1, g2) in values:
                    assert values[(g1, g2)] >= value * (1 - 1e-12), ((f1, f2), (g1, g2))
            if 0 < f1 + f2 <= 7:
                assert curve[f1 + f2] >= value * (1 - 1e-12), ((f1, f2), curve[f1 + f2], value)
