"""The certificate of the whole input domain for one failure vector (docs/method.md §7.8): §7's local certificate
with the domain as the box, taken by ``bound`` and ``inject`` (``CombinedBound.fep_vector``).

The reference runs every failure set (and every value sent, every flipped bit) in onnxruntime, through the
independent instrumentation of ``ort_faults``, on a grid of the domain, its corners and random points. A certificate
over a box shrunk by 10 % is exceeded; the certificate never decreases when a count grows (the searches of the
inverse problems rely on it).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from test_float16 import draw_mlp, exhaustive_error, half_network
from test_float16_bit_flips import exhaustive_flip_error

from robaudit.bounds.audit import load_network
from robaudit.bounds.bound import make_bounds
from robaudit.bounds.certify import LocalCertifier, domain_certificate
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import Interval

CAPACITY = 2.0


def _network(path: Path):
    return load_network(path, NetworkOptions(input_range=(0.0, 1.0)))[1]


def _points(size: int, seed: int) -> np.ndarray:
    """A grid of 7 points per axis (corners included) and 40 random points of [0, 1]^size."""
    grid = np.array(list(itertools.product(np.linspace(0.0, 1.0, 7), repeat=size)))
    return np.concatenate([grid, np.random.default_rng(seed).uniform(0, 1, (40, size))]).astype(np.float32)


@st.composite
def domain_case(draw):
    hidden, inputs, seed, _, _, weights, biases, activations = draw_mlp(draw)
    counts = [draw(st.integers(0, min(2, n))) for n in hidden]
    if not any(counts):
        counts[-1] = 1
    mode = draw(st.sampled_from(["crash", "byzantine", "bit_flip", "stuck_at"]))
    bit = draw(st.sampled_from([12, 21, 22, 31]))
    return weights, biases, activations, counts, mode, bit, seed


def _measured(model, weights, counts, mode: str, bit: int, points: np.ndarray) -> float:
    sizes = [w.shape[1] for w in weights[:-1]]
    if mode == "crash":
        return exhaustive_error(model, sizes, counts, points, (0.0,), np.float32)
    if mode == "byzantine":
        return exhaustive_error(model, sizes, counts, points, (-CAPACITY, 0.0, CAPACITY), np.float32)
    stuck = None if mode == "bit_flip" else 1
    return exhaustive_flip_error(model, sizes, counts, points, bit, stuck, np.float32)


def _failure(mode: str, bit: int) -> FailureModel:
    return {
        "crash": FailureModel.crash(),
        "byzantine": FailureModel.byzantine(CAPACITY),
        "bit_flip": FailureModel.bit_flip(bit),
        "stuck_at": FailureModel.stuck_at(1, bit),
    }[mode]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(domain_case())
def test_the_domain_certificate_covers_every_failure_set_everywhere(tmp_path_factory, case) -> None:
    """Random float32 MLPs (ReLU, LeakyReLU, Tanh, Sigmoid), crash, byzantine (C = 2: −C, 0, C sent), bit flips and
    bits stuck at 1: the certificate of the domain, and ``bound``'s figure for the vector, cover every failure set
    at every point of a grid of the domain and 40 random ones; the certificate grows with every count."""
    weights, biases, activations, counts, mode, bit, seed = case
    model = half_network(weights, biases, activations, True, None, TensorProto.FLOAT)
    path = tmp_path_factory.mktemp("domain") / "m.onnx"
    onnx.save(model, path)
    network = _network(path)
    analysis = Analysis(network, _failure(mode, bit))
    certificate = domain_certificate(analysis, counts)
    assert certificate is not None  # small MLPs: it applies and is cheap
    figure = make_bounds(analysis)[1].fep_vector(counts)
    measured = _measured(model, weights, counts, mode, bit, _points(weights[0].shape[0], seed))
    for bound in (certificate, figure):
        assert measured <= bound * (1 + 1e-5) + 1e-6, (measured, certificate, figure, case)
    for layer, f in enumerate(counts):  # one count more (where the layer has room): never a smaller certificate
        if f < weights[layer].shape[1]:
            more = list(counts)
            more[layer] += 1
            assert domain_certificate(analysis, more) >= certificate * (1 - 1e-12), (layer, more)


def _chain() -> onnx.ModelProto:
    """x ∈ [0, 1] → h0 = Relu(x) → y = h0: one crash moves y by x, most (1) at x = 1."""
    return half_network([np.array([[1.0]]), np.array([[1.0]])], [np.zeros(1)] * 2, ["Relu"], True, None,
                        TensorProto.FLOAT)


def test_a_certificate_of_a_shrunk_domain_is_exceeded(tmp_path, monkeypatch) -> None:
    """On the chain above the certificate is exact (1.0, a crash at x = 1); over the domain shrunk by 10 % about its
    centre ([0.05, 0.95]) it would be 0.95, below what onnxruntime measures."""
    onnx.save(_chain(), tmp_path / "chain.onnx")
    network = _network(tmp_path / "chain.onnx")
    measured = exhaustive_error(_chain(), [1], [1], np.array([[1.0]], np.float32), (0.0,), np.float32)
    assert measured == 1.0
    analysis = Analysis(network, FailureModel.crash())
    assert domain_certificate(analysis, [1]) == pytest.approx(1.0, rel=1e-9)
    real = LocalCertifier.certify_box

    def shrunk(self, clean, center, failures, classes, domain=None):
        box = self.clean_values({
            name: Interval(0.5 + 0.9 * (b.lo - 0.5), 0.5 + 0.9 * (b.hi - 0.5))
            for name, b in clean.items() if name in self.network.input_boxes
        })
        return real(self, box, center, failures, classes, domain)

    monkeypatch.setattr(LocalCertifier, "certify_box", shrunk)
    weakened = domain_certificate(analysis, [1])
    assert weakened == pytest.approx(0.95, rel=1e-6) and weakened is not None and weakened < measured


def test_bound_and_inject_take_the_certificate(tmp_path, monkeypatch) -> None:
    """``bound --bit-flip 1 --bit 22`` on the digits CNN reports the domain certificate (69.08, against 170.8 with the
    budget 0, where the certificate is not taken), and ``inject --search worst`` compares with it and finds nothing
    above it."""
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    model = samples / "digits_cnn.onnx"
    report = cli_json("bound", model, "--bit-flip", 1, "--bit", 22)
    monkeypatch.setenv("ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET", "0")
    without = cli_json("bound", model, "--bit-flip", 1, "--bit", 22)
    monkeypatch.delenv("ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET")
    network = _network(model)
    certificate = domain_certificate(Analysis(network, FailureModel.bit_flip(22)), [1, 1, 1])
    assert report["fep_tight"] == pytest.approx(certificate, rel=1e-9) and certificate < 0.5 * without["fep_tight"]
    injected = cli_json("inject", model, "--bit-flip", 1, "--bit", 22, "--search", "worst", "--trials", 30,
                        "--inputs", samples / "digits_cnn_inputs.npz", "-q", "--in-process")
    vector = injected["vectors"][0]
    assert vector["bound"] == pytest.approx(certificate, rel=1e-9) and not injected["violation"]
    assert 0 < vector["measured"]["max"] <= vector["bound"]


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(domain_case())
def test_counts_the_certificate_extends_are_tolerated(tmp_path_factory, case) -> None:
    """At ε just above the certificate of one failure per layer, the uniform count is at least 1 (the searches extend
    their counts by the certificate, which never decreases as counts grow) — and every vector below (1, …, 1)
    really keeps the output within ε: exhaustive failure sets on a grid of the domain, in onnxruntime."""
    weights, biases, activations, _, mode, bit, seed = case
    model = half_network(weights, biases, activations, True, None, TensorProto.FLOAT)
    path = tmp_path_factory.mktemp("extend") / "m.onnx"
    onnx.save(model, path)
    analysis = Analysis(_network(path), _failure(mode, bit))
    ones = [1] * len(activations)
    epsilon = domain_certificate(analysis, ones) * 1.01 + 1e-9
    assert make_bounds(analysis)[1].max_uniform(epsilon) >= 1
    points = _points(weights[0].shape[0], seed)
    for vector in itertools.product([0, 1], repeat=len(ones)):
        if any(vector):
            assert _measured(model, weights, list(vector), mode, bit, points) <= epsilon, (vector, case)


def test_the_uniform_count_of_the_sigmoid_sample_comes_from_the_certificate(monkeypatch) -> None:
    """The README's sigmoid MLP at ε = 0.5: §4's bounds alone give a uniform count of 0 (budget 0), the certificate
    of (1, 1), 0.4982 ≤ 0.5, gives 1; that of (2, 2) is above ε, and the count stops there."""
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    analysis = Analysis(_network(samples / "paper_mlp_sigmoid.onnx"), FailureModel.crash())
    assert domain_certificate(analysis, [1, 1]) <= 0.5 < domain_certificate(analysis, [2, 2])
    assert make_bounds(analysis)[1].max_uniform(0.5) == 1
    monkeypatch.setenv("ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET", "0")
    assert make_bounds(analysis)[1].max_uniform(0.5) == 0
