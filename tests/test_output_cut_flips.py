"""The output cuts (docs/method.md §4.1, "The output cut", "Stored-value faults") for flipped and stuck bits of
stored floats: a failed neuron keeps its computed value plus e_i, |e_i| ≤ c·|ỹ_i| + t of its stored value's box
(§2.3), carried through the failure sites as a gain |Λ_i|·r_i; the hull widths of the faulty boxes cut as for
crashes.

Checked on their own (not through the minimum with the other bounds) against every flip set of random float32
and float16 chains — a later layer's flip hitting the value the earlier flips left, numpy flips of the words run
in onnxruntime — and through ``fep``; the flip radius halved is exceeded by a sign flip where the cut is exact.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from test_float16 import half_network
from test_float16_bit_flips import exhaustive_flip_error

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import OutputCut, TightBound
from robaudit.graph.network import NetworkOptions


def _inputs(count: int, size: int, seed: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=size)))
    return np.concatenate([corners, rng.uniform(0, 1, (count, size))]).astype(dtype)


def _analysis(path, bit: int, stuck: int | None) -> Analysis:
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    return Analysis(network, FailureModel.bit_flip(bit) if stuck is None else FailureModel.stuck_at(stuck, bit))


def _random_chain(draw, hidden: list[int]):
    """(weights, biases, activations, seed) of a drawn 2 → ``hidden`` → 2 chain for ``half_network``."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    dims = [2, *hidden, 2]
    scale = draw(st.sampled_from([0.7, 1.5, 3.0]))
    weights = [rng.normal(0, scale, (dims[i], dims[i + 1])) for i in range(len(dims) - 1)]
    biases = [rng.normal(0, 0.7, d) for d in dims[1:]]
    activations = [draw(st.sampled_from(["Relu", "Tanh", "LeakyRelu", "Sigmoid"])) for _ in hidden]
    return weights, biases, activations, seed


@st.composite
def flip_chain(draw):
    hidden = draw(st.lists(st.integers(2, 4), min_size=1, max_size=3))
    weights, biases, activations, seed = _random_chain(draw, hidden)
    word = draw(st.sampled_from(["float32", "float32", "float16"]))
    mantissa, sign = (23, 31) if word == "float32" else (10, 15)
    bit = draw(st.sampled_from([mantissa - 1, mantissa - 2, mantissa - 5, sign]))
    stuck = draw(st.sampled_from([None, None, 0, 1]))
    counts = [draw(st.integers(0, min(2, n))) for n in hidden]
    return weights, biases, activations, word, bit, stuck, counts, seed


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(flip_chain())
def test_the_output_cut_holds_for_every_flip_set(tmp_path_factory, case) -> None:
    weights, biases, activations, word, bit, stuck, counts, seed = case
    dtype, elem = (np.float32, TensorProto.FLOAT) if word == "float32" else (np.float16, TensorProto.FLOAT16)
    model = half_network(weights, biases, activations, True, None, elem=elem)
    path = tmp_path_factory.mktemp("cutflip") / "m.onnx"
    onnx.save(model, path)
    analysis = _analysis(path, bit, stuck)
    sizes = [w.shape[1] for w in weights[:-1]]
    measured = exhaustive_flip_error(model, sizes, counts, _inputs(24, 2, seed, dtype), bit, stuck, dtype)
    tight = TightBound(analysis)
    assert measured <= tight.fep(counts) * (1 + 1e-5) + 1e-6, (measured, case)
    assert measured <= tight.refined(counts) * (1 + 1e-5) + 1e-6, (measured, case)
    cut = OutputCut.build(analysis)
    if cut is None:  # a float16 model rounds inside: no cut (docs/method.md §4.1)
        assert word == "float16"
        return
    alone = float(cut.bound(counts).max()) * analysis.carry_factor(counts)  # the cut as it holds on its own
    assert measured <= alone * (1 + 1e-5) + 1e-6, (measured, alone, case)


def _sign_chain(tmp_path):
    """x ∈ [0, 1]² → h = Relu(x₁ + x₂) → y = 3·h: flipping h's sign moves y by 2·3·h, 12 at x = (1, 1)."""
    model = half_network([np.ones((2, 1)), np.array([[3.0]])], [np.zeros(1), np.zeros(1)], ["Relu"], True, None,
                         elem=TensorProto.FLOAT)
    path = tmp_path / "sign.onnx"
    onnx.save(model, path)
    return model, path


def test_the_cut_is_exact_on_a_sign_flip_and_a_halved_radius_is_caught(tmp_path, monkeypatch) -> None:
    model, path = _sign_chain(tmp_path)
    measured = exhaustive_flip_error(model, [1], [1], _inputs(4, 2, 0, np.float32), 31, None, np.float32)
    assert measured == pytest.approx(12.0)
    cut = OutputCut.build(_analysis(path, 31, None))
    assert cut is not None and float(cut.bound([1]).max()) == pytest.approx(12.0, rel=1e-6)
    original = Analysis.flip_radius
    monkeypatch.setattr(Analysis, "flip_radius", lambda self, layer, box: 0.5 * original(self, layer, box))
    halved = OutputCut.build(_analysis(path, 31, None))
    assert halved is not None and float(halved.bound([1]).max()) < measured * 0.75


def test_an_exponent_bit_keeps_the_cut_off(tmp_path) -> None:
    """An exponent bit may leave ±Inf or NaN at the site, outside every box: no cut, and the bound stays
    unbounded."""
    _, path = _sign_chain(tmp_path)
    analysis = _analysis(path, 30, None)
    assert OutputCut.build(analysis) is None and TightBound(analysis).fep([1]) >= 1e250
