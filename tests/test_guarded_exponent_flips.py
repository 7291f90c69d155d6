"""Guarded sites under exponent-bit faults (docs/method.md §2.3, "Guarded sites"), and the cuts that hold every
flip set without the carry factor (§2.3, §4.1).

A flipped (or set) exponent bit may leave ±Inf or NaN in a stored float; where a NaN-guarded Clip is the site's only
reader (what ``harden`` writes), the guard maps any word into [low, high], so the failed neuron acts as one sending
a value of [low, high]: the faulty boxes, the cuts and the output cut then apply as for byzantine neurons. Checked
against every flip set of random hardened float32 and float16 chains (numpy flips of the words before the guard,
run in onnxruntime): the bounds, the output cut on its own and the faulty boxes at the guards' outputs; a guard
range shrunk by 10 % and a halved radius are caught where the cut is exact (a closed form by hand).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from ort_faults import FaultRunner
from test_float16 import half_network
from test_float16_bit_flips import _visible, exhaustive_flip_error
from test_output_cut_flips import _analysis, _inputs, _random_chain

from robaudit.applications.harden import channel_ranges, insert_restrictions
from robaudit.bounds.fep import Analysis
from robaudit.bounds.tight import OutputCut, TightBound
from robaudit.graph.ops import Interval

#: exponent bits (flipped, or stuck at 1) of float32 and float16 words: each may leave ±Inf or NaN.
EXPONENT_BITS = {"float32": [30, 29, 26, 23], "float16": [14, 13, 10]}


def _seen(model: onnx.ModelProto, values: list[str], x: np.ndarray, elem: int) -> list[np.ndarray]:
    """The values ``values`` of ``model`` on ``x`` (onnxruntime)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    del copy.graph.output[:]
    copy.graph.output.extend([onnx.helper.make_tensor_value_info(v, elem, None) for v in values])
    return onnxruntime.InferenceSession(copy.SerializeToString()).run(values, {"x": x})


def _hardened(weights, biases, activations, word: str, per_channel: bool, margin: float, seed: int):
    """A chain with every hidden layer restricted by ``harden``'s rewrite to its range on 64 inputs, each end
    moved out by ``margin`` times its width (in where ``margin`` < 0: clean values clipped too)."""
    elem, dtype = (TensorProto.FLOAT, np.float32) if word == "float32" else (TensorProto.FLOAT16, np.float16)
    model = half_network(weights, biases, activations, True, None, elem=elem)
    values = [f"h{i}" for i in range(len(activations))]
    x = _inputs(64, weights[0].shape[0], seed + 1, dtype)
    ranges = {}
    for value, seen in zip(values, _seen(model, values, x, elem), strict=True):
        seen = seen.astype(np.float64)
        low, high = channel_ranges(seen, "dense") if per_channel else (float(seen.min()), float(seen.max()))
        width = np.subtract(high, low)
        ranges[value] = (low - margin * width, high + margin * width)
    return insert_restrictions(model, ranges, dtype), dtype


@st.composite
def guarded_case(draw):
    hidden = draw(st.lists(st.integers(2, 3), min_size=1, max_size=3))
    weights, biases, activations, seed = _random_chain(draw, hidden)
    word = draw(st.sampled_from(["float32", "float32", "float16"]))
    bit = draw(st.sampled_from(EXPONENT_BITS[word]))
    stuck = draw(st.sampled_from([None, None, 1]))
    per_channel = draw(st.booleans())
    margin = draw(st.sampled_from([-0.3, 0.0, 0.2]))
    counts = [draw(st.integers(0, min(2, n))) for n in hidden]
    return weights, biases, activations, word, bit, stuck, per_channel, margin, counts, seed


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(guarded_case())
def test_guarded_exponent_flips_stay_under_the_bound_and_the_cut(tmp_path_factory, case) -> None:
    weights, biases, activations, word, bit, stuck, per_channel, margin, counts, seed = case
    model, dtype = _hardened(weights, biases, activations, word, per_channel, margin, seed)
    path = tmp_path_factory.mktemp("guarded") / "m.onnx"
    onnx.save(model, path)
    analysis = _analysis(path, bit, stuck)
    assert analysis.stored_values_bounded()  # every site guarded: the boxes and cuts apply
    sizes = [w.shape[1] for w in weights[:-1]]
    measured = exhaustive_flip_error(model, sizes, counts, _inputs(20, 2, seed, dtype), bit, stuck, dtype)
    tight = TightBound(analysis)
    assert np.isfinite(measured)
    assert measured <= tight.fep(counts) * (1 + 1e-4) + 1e-5, (measured, case)
    assert measured <= tight.refined(counts) * (1 + 1e-4) + 1e-5, (measured, case)
    cut = OutputCut.build(analysis)
    if cut is None:  # a float16 model rounds inside: no output cut (docs/method.md §4.1)
        assert word == "float16"
    elif any(counts):
        alone = float(cut.bound(counts).max()) * analysis.carry_factor(counts)
        assert measured <= alone * (1 + 1e-5) + 1e-6, (measured, alone, case)


def _guard_outputs(model: onnx.ModelProto) -> list[str]:
    """The guards' outputs (the values the hidden layers' readers see), in layer order."""
    return [n.output[0] for n in model.graph.node if n.op_type in ("Clip", "Min")]


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(guarded_case())
def test_the_guards_outputs_stay_in_their_faulty_boxes(tmp_path_factory, case) -> None:
    """Any word at every site at once — ±Inf, NaN, huge, any sign — leaves each guard's output inside the faulty box
    there (the boxes hold every failure set)."""
    weights, biases, activations, word, bit, stuck, per_channel, margin, _, seed = case
    model, dtype = _hardened(weights, biases, activations, word, per_channel, margin, seed)
    path = tmp_path_factory.mktemp("boxes") / "m.onnx"
    onnx.save(model, path)
    faulty = _analysis(path, bit, stuck).faulty()
    guards = _guard_outputs(model)
    assert len(guards) == len(activations)
    sizes = [w.shape[1] for w in weights[:-1]]
    values = [f"h{i}" for i in range(len(sizes))]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    runner = FaultRunner(_visible(model, guards, elem), values, [(n,) for n in sizes], dtype)
    x = _inputs(20, 2, seed, dtype)
    rng = np.random.default_rng(seed)
    words = np.array([np.inf, -np.inf, np.nan, 6e4, -6e4, 0.0, 1.0, -1.0])
    keeps = [np.zeros((len(x), n)) for n in sizes]
    for _ in range(4):
        repls = [rng.choice(words, (len(x), n)) for n in sizes]
        for guard in guards:
            with np.errstate(invalid="ignore"):
                seen = runner.run(x, keeps, repls, output=guard).astype(np.float64).reshape(len(x), -1)
            box = faulty[guard]
            assert np.all(seen >= box.lo.reshape(1, -1) - 1e-6), (guard, seen.min(axis=0), box.lo)
            assert np.all(seen <= box.hi.reshape(1, -1) + 1e-6), (guard, seen.max(axis=0), box.hi)


def _guarded_chain(tmp_path):
    """x ∈ [0, 1]² → h = Relu(x₁ + x₂) ∈ [0, 2] → Clip(Where(IsNaN(h), −1, h), −1, 3) → y = 3·g. Bit 30 set in a
    small h > 0 gives a huge word or +Inf, clipped to 3: y moves by 3·(3 − h), up to 9; g stays in [−1, 3]."""
    model = half_network([np.ones((2, 1)), np.array([[3.0]])], [np.zeros(1), np.zeros(1)], ["Relu"], True, None,
                         elem=TensorProto.FLOAT)
    model = insert_restrictions(model, {"h0": (-1.0, 3.0)})
    path = tmp_path / "guarded.onnx"
    onnx.save(model, path)
    return model, path


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_the_bound_is_reached_at_a_guard_and_a_shrunk_guard_is_caught(tmp_path, monkeypatch) -> None:
    model, path = _guarded_chain(tmp_path)
    x = np.concatenate([_inputs(8, 2, 0, np.float32), [[0.001, 0.0]]]).astype(np.float32)
    measured = exhaustive_flip_error(model, [1], [1], x, 30, None, np.float32)
    assert measured == pytest.approx(3.0 * (3.0 - 0.001), rel=1e-5)
    analysis = _analysis(path, 30, None)
    cut = OutputCut.build(analysis)
    assert cut is not None and float(cut.bound([1]).max()) == pytest.approx(9.0, rel=1e-6)
    assert TightBound(analysis).fep([1]) == pytest.approx(9.0, rel=1e-6)
    guard = _guard_outputs(model)[0]
    assert analysis.faulty()[guard].lo.item() == -1.0 and analysis.faulty()[guard].hi.item() == 3.0
    original = Analysis.guarded_range

    def shrunk(self, layer):
        low, high = original(self, layer)
        return low + 0.1 * (high - low), high - 0.1 * (high - low)

    monkeypatch.setattr(Analysis, "guarded_range", shrunk)
    weakened = _analysis(path, 30, None)
    assert weakened.faulty()[guard].hi.item() < 3.0 - 0.3
    narrowed = OutputCut.build(weakened)
    assert narrowed is not None and float(narrowed.bound([1]).max()) < measured * 0.95


@settings(max_examples=40, deadline=None)
@given(st.floats(-5, 5), st.floats(0, 5), st.floats(0, 1), st.floats(0, 1))
def test_the_guarded_radius_holds_the_guards_whole_range(tmp_path_factory, lo, width, at, to) -> None:
    """At the guard of [−1, 3], |s − ỹ| ≤ r for every stored ỹ of the box [lo, hi] and every value s the guard may
    give: r is the closed form max(|3 − lo|, |hi + 1|), which a corner reaches."""
    _, path = _guarded_chain(tmp_path_factory.mktemp("radius"))
    analysis = _analysis(path, 30, None)
    hi = lo + width
    radius = analysis.flip_radius(analysis.hidden[0], Interval(np.array([[lo]]), np.array([[hi]])))
    assert radius.item() == pytest.approx(max(abs(3.0 - lo), abs(hi + 1.0)))
    stored, value = lo + at * width, -1.0 + 4.0 * to
    assert abs(value - stored) <= radius.item() * (1 + 1e-12) + 1e-12


def test_a_guard_read_by_another_op_too_keeps_the_bound_unbounded(tmp_path) -> None:
    """Where the site has a second reader, the ±Inf or NaN a flip leaves reaches it: no guarded site, no cut."""
    model, _ = _guarded_chain(tmp_path)
    graph = model.graph
    graph.node.append(onnx.helper.make_node("Add", ["y", "h0"], ["leak"]))
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("leak", TensorProto.FLOAT, None))
    path = tmp_path / "leak.onnx"
    onnx.save(model, path)
    analysis = _analysis(path, 30, None)
    assert not analysis.stored_values_bounded() and OutputCut.build(analysis) is None


@st.composite
def mantissa_chain(draw):
    hidden = draw(st.lists(st.integers(1, 2), min_size=2, max_size=3))
    weights, biases, activations, seed = _random_chain(draw, hidden)
    bit = draw(st.sampled_from([22, 21, 20, 31]))
    stuck = draw(st.sampled_from([None, None, 1]))
    return weights, biases, activations, bit, stuck, seed


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mantissa_chain())
def test_the_last_layers_cut_holds_every_flip_set_without_the_carry_factor(tmp_path_factory, case) -> None:
    """The cut at a chain's last hidden layer, Σ_j P[k, j]·W_j, has every failing layer behind it: it holds every
    flip set as it is, the earlier flips' deviations included (docs/method.md §2.3), so the bound takes it without
    the carry factor — checked on its own against a flip in every layer (the carry factor's case), every choice."""
    weights, biases, activations, bit, stuck, seed = case
    model = half_network(weights, biases, activations, True, None, elem=TensorProto.FLOAT)
    path = tmp_path_factory.mktemp("carry") / "m.onnx"
    onnx.save(model, path)
    analysis = _analysis(path, bit, stuck)
    sizes = [w.shape[1] for w in weights[:-1]]
    counts = [1] * len(sizes)
    measured = exhaustive_flip_error(model, sizes, counts, _inputs(30, 2, seed, np.float32), bit, stuck, np.float32)
    tight = TightBound(analysis)
    last = float(tight.cut_cost[len(sizes) - 1].max())
    assert measured <= last * (1 + 1e-5) + 1e-6, (measured, last, case)
    assert measured <= tight.fep(counts) * (1 + 1e-5) + 1e-6, (measured, case)


def test_a_cut_holding_every_failing_layer_is_taken_without_the_carry_factor(tmp_path, monkeypatch) -> None:
    """x ∈ [0, 1] → h0 = Relu(3x + 1) → h1 = Tanh(2·h0) → y = h1, bit 22 in both layers (carry factor 1.5), the output
    cut left out (it would bind first): the bound is the last layer's cut itself — the hull width of h1 — not 1.5
    times it (4.45 before)."""
    weights, biases = [np.array([[3.0]]), np.array([[2.0]]), np.ones((1, 1))], [np.ones(1), np.zeros(1), np.zeros(1)]
    model = half_network(weights, biases, ["Relu", "Tanh"], True, None, elem=TensorProto.FLOAT)
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(OutputCut, "build", classmethod(lambda cls, analysis: None))
    analysis = _analysis(path, 22, None)
    assert analysis.carry_factor([1, 1]) == pytest.approx(1.5)
    tight = TightBound(analysis)
    clean, faulty = analysis.network.clean["h1"], analysis.faulty()["h1"]
    width = float(max(clean.hi.max(), faulty.hi.max()) - min(clean.lo.min(), faulty.lo.min()))
    assert float(tight.cut_cost[1].max()) == pytest.approx(width)
    assert float(tight.sums([1, 1]).max()) > 1.4 * width  # the sums alone are looser
    assert tight.fep([1, 1]) <= width * (1 + 1e-9)
    measured = exhaustive_flip_error(model, [1, 1], [1, 1], _inputs(200, 1, 0, np.float32), 22, None, np.float32)
    assert 0 < measured <= tight.fep([1, 1])
