"""Certificates under bit flips and stuck-at bits (``certify --bit-flip``, docs/method.md §7.2, "Stored-value
faults"): at each input, a failed neuron sends its stored value ỹ — which the failures upstream already moved —
with one bit flipped or stuck, ỹ' = ỹ + e, |e| ≤ δ(ỹ) over the box of ỹ.

The reference flips the stored float32 or float16 words in numpy, layer after layer on the values the earlier
faults left, and runs the model in onnxruntime (``test_float16_bit_flips.exhaustive_flip_error``), over every
failure set. The weakened copies — δ taken over the clean box (the deviation a flipped value carries dropped),
the signed pass's ±δ halved — are exceeded on hand-derived chains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli_json, run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from ort_faults import FaultRunner
from test_bit_flips import CNN_INT8, SAMPLES, _qdq_params, flip_code, site_values
from test_float16 import draw_mlp, half_network
from test_float16_bit_flips import exhaustive_flip_error

from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier, LocalCertifier
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions

FLOAT32_BITS = [0, 5, 12, 20, 21, 22, 31]
FLOAT16_BITS = [0, 4, 8, 9, 15]


def _network(path: Path):
    return load_network(path, NetworkOptions(input_range=(0.0, 1.0)))[1]


def _failure(bit: int | None, stuck: int | None) -> FailureModel:
    return FailureModel.bit_flip(bit) if stuck is None else FailureModel.stuck_at(stuck, bit)


def _local_bound(network, failure: FailureModel, x: np.ndarray, counts: list[int]) -> float:
    """The certificate's bound at the point ``x`` [1, n] from the local analysis alone (no domain bound)."""
    certifier = Certifier(network, failure, x.astype(np.float32))
    certifier._prepare(None)
    box = certifier.local.certify_box(certifier._clean[0], certifier._centers[0], counts, False, None)
    return box.bound


@st.composite
def certify_flip_case(draw):
    hidden, inputs, seed, rng, _, weights, biases, activations = draw_mlp(draw)
    counts = [draw(st.integers(0, min(2, n))) for n in hidden]
    half = draw(st.booleans())
    bit = draw(st.sampled_from(FLOAT16_BITS if half else FLOAT32_BITS))
    stuck = draw(st.sampled_from([None, 0, 1]))
    points = rng.uniform(0, 1, (3, inputs))
    points[0] = draw(st.sampled_from([0.0, 1.0]))  # a corner, where ReLUs sit on their kinks
    return weights, biases, activations, counts, half, bit, stuck, points


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(certify_flip_case())
def test_certificates_cover_every_flip_set(tmp_path_factory, case) -> None:
    """At each input point, the local certificate's bound covers every set of counts[l] neurons per layer with bit B
    of their stored word (float32, or float16 in onnxruntime's float16 kernels) flipped or stuck — and so does the
    bound the command reports (the smaller of it and the domain-wide one)."""
    weights, biases, activations, counts, half, bit, stuck, points = case
    elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    model = half_network(weights, biases, activations, True, None, elem)
    path = tmp_path_factory.mktemp("certflip") / "m.onnx"
    onnx.save(model, path)
    network, failure = _network(path), _failure(bit, stuck)
    sizes = [w.shape[1] for w in weights[:-1]]
    dtype = np.float16 if half else np.float32
    certifier = Certifier(network, failure, points.astype(np.float32), classes=False)
    for i, x in enumerate(points):
        x = x.astype(dtype).astype(np.float32)[None]  # the point the model reads
        measured = exhaustive_flip_error(model, sizes, counts, x.astype(dtype), bit, stuck, dtype)
        local = _local_bound(network, failure, x, counts)
        reported = certifier.box(i, counts).bound
        for bound in (local, reported):
            assert measured <= bound * (1 + 1e-5) + 1e-6, (measured, local, reported, case)


def _carry_chain(elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x ∈ [0, 1] → h0 = Relu(0.5·x) → h1 = Relu(1.334·h0) → y = h1 (float32): at x = 1, bit 22 of h0 = 0.5 flips it
    to 0.75, h1 = 1.0005 — above 1, so bit 22 now adds 0.5 (of the clean 0.667 it would add 0.25) — to 1.5005,
    against the clean h1 = 0.667: an error of 0.8335."""
    weights = [np.array([[0.5]]), np.array([[1.334]]), np.array([[1.0]])]
    return half_network(weights, [np.zeros(1)] * 3, ["Relu", "Relu"], True, None, elem)


def test_a_flip_of_a_moved_value_is_bounded_over_its_faulty_box(tmp_path, monkeypatch) -> None:
    """The chain above: onnxruntime measures 0.8335 and the certificate covers it (P·δ: 1.334·0.25 + 2⁻¹·1.0005,
    within 0.1 %); with δ of the second flip over the clean box (2⁻¹·0.667) the bound would be 0.667, below it."""
    model = _carry_chain()
    path = tmp_path / "carry.onnx"
    onnx.save(model, path)
    x = np.ones((1, 1), np.float32)
    measured = exhaustive_flip_error(model, [1, 1], [1, 1], x, 22, None, np.float32)
    h1 = np.float32(np.float32(1.334) * np.float32(0.75))
    assert measured == pytest.approx(float(h1) + 0.5 - 0.5 * 1.334, rel=1e-6)  # bit 22 of a value in [1, 2): + 0.5
    network, failure = _network(path), FailureModel.bit_flip(22)
    bound = _local_bound(network, failure, x, [1, 1])
    assert measured <= bound * (1 + 1e-6) and bound <= measured * 1.001, (bound, measured)
    original = LocalCertifier.stored_delta

    def over_the_clean_box(self, layer, stored):
        clean = self._clean_box[layer.output_value]
        return original(self, layer, type(stored)(clean.lo.reshape(-1), clean.hi.reshape(-1)))

    real_state = LocalCertifier.state

    def keeping_the_clean_boxes(self, clean, failures):
        self._clean_box = clean
        return real_state(self, clean, failures)

    monkeypatch.setattr(LocalCertifier, "state", keeping_the_clean_boxes)
    monkeypatch.setattr(LocalCertifier, "stored_delta", over_the_clean_box)
    weakened = _local_bound(network, failure, x, [1, 1])
    assert weakened < 0.67 < measured, weakened


def test_a_sign_flip_is_bounded_where_exact_and_a_halved_signed_term_is_caught(tmp_path, monkeypatch) -> None:
    """x → h0 = Relu(0.5·x) → y = h0: at x = 1 the sign flip of h0 = 0.5 moves y by exactly 1.0 — the certificate's
    bound (both its absolute and its signed pass); the signed pass with ±δ/2 would certify 0.5."""
    model = half_network([np.array([[0.5]]), np.array([[1.0]])], [np.zeros(1)] * 2, ["Relu"], True, None,
                         TensorProto.FLOAT)
    path = tmp_path / "sign.onnx"
    onnx.save(model, path)
    x = np.ones((1, 1), np.float32)
    measured = exhaustive_flip_error(model, [1], [1], x, 31, None, np.float32)
    assert measured == 1.0
    network, failure = _network(path), FailureModel.bit_flip(31)
    assert _local_bound(network, failure, x, [1]) == pytest.approx(1.0, rel=1e-9)
    real_totals = LocalCertifier._signed_totals

    def halved(self, coefficients, st, failures, rows):
        st.delta = [d / 2 for d in st.delta]
        return real_totals(self, coefficients, st, failures, rows)

    monkeypatch.setattr(LocalCertifier, "_signed_totals", halved)
    weakened = _local_bound(network, failure, x, [1])
    assert weakened == pytest.approx(0.5, rel=1e-9) and weakened < measured


def test_certify_command_takes_bit_flips(tmp_path) -> None:
    """``certify --bit-flip N --bit B`` / ``--stuck-at V``: the report's settings name the fault; a flip of bit 22
    certifies more of the digits CNN's inputs than one crash (it moves a value by at most half of it); an exponent
    bit is unbounded, nothing certified, and the note says why; --bit without --bit-flip is one line, exit 2."""
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    model, inputs = samples / "digits_cnn.onnx", samples / "digits_cnn_inputs.npz"
    common = ("--inputs", inputs, "--no-layer-counts", "-q")
    crash = cli_json("certify", model, *common, "--crash", 1)
    flip = cli_json("certify", model, *common, "--bit-flip", 1, "--bit", 22)
    assert (flip["settings"]["mode"], flip["settings"]["bit"]) == ("bit_flip", 22)
    assert flip["certified_fraction"] > crash["certified_fraction"] and flip["max_bound"] < crash["max_bound"]
    stuck = cli_json("certify", model, *common, "--bit-flip", 1, "--bit", 31, "--stuck-at", 0)
    assert stuck["settings"]["mode"] == "stuck_at" and stuck["settings"]["stuck"] == 0
    # the sign stuck at 0 moves only negative values: the ReLU outputs of the hidden layers keep theirs
    assert stuck["max_bound"] == 0.0 and stuck["certified_fraction"] == 1.0
    exponent = cli_json("certify", model, *common, "--bit-flip", 1, "--bit", 30)
    assert exponent["certified_fraction"] == 0.0 and exponent["max_bound"] == "inf"
    assert any("exponent bit can make a value ±Inf or NaN" in note for note in exponent["notes"])
    proc = run_in_process("certify", model, *common, "--crash", 1, "--bit", 3, expect=2)
    assert proc.stderr.strip() == "robaudit: --bit and --stuck-at apply to stored-value faults; add --bit-flip N"


def test_a_policy_certificate_under_bit_flips_counts_the_flip(tmp_path) -> None:
    """``check`` with ``require.certified: {bit_flip: 1}`` and the policy's ``bit``: on x → h0 = Relu(0.5·x) → y = h0
    at x = 1, a sign flip moves y by 1.0 (onnxruntime; a crash would move it by 0.5): at ε = 0.6 the input is not
    certified, at ε = 1.0 it is (the certificate is exact here)."""
    model = half_network([np.array([[0.5]]), np.array([[1.0]])], [np.zeros(1)] * 2, ["Relu"], True, None,
                         TensorProto.FLOAT)
    onnx.save(model, tmp_path / "sign.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 1), np.float32))
    assert exhaustive_flip_error(model, [1], [1], np.ones((1, 1), np.float32), 31, None, np.float32) == 1.0
    for epsilon, verdict in ((0.6, 1), (1.0, 0)):
        (tmp_path / "robaudit.yaml").write_text(
            f"models:\n  - path: sign.onnx\n    epsilon: {epsilon}\n    bit: 31\n    inputs: x.npy\n"
            "    require: {certified: {bit_flip: 1, classes: false}}\n"
        )
        proc = run_in_process("check", "--policy", tmp_path / "robaudit.yaml", "-f", "json", expect=verdict)
        import json

        found = json.loads(proc.stdout)["models"][0]["requirements"][0]
        assert (found["mode"], found["achieved"]) == ("bit_flip", 1.0 - verdict), found


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(bit=st.one_of(st.none(), st.integers(0, 7)), stuck=st.sampled_from([None, 0, 1]), seed=st.integers(0, 999))
def test_int8_certificates_cover_flipped_codes(bit, stuck, seed) -> None:
    """The int8 digits CNN (QDQ): at 4 of its inputs, one neuron per hidden layer with bit B of its int8/uint8 code
    flipped or stuck (numpy flips of the codes, each on the value the earlier faults left, run in onnxruntime; any
    bit: every bit tried), 40 random sets per input and every single neuron of fc1 alone: none exceeds the
    certificate at that input."""
    model = onnx.load(CNN_INT8)
    network = _network(CNN_INT8)
    hidden = network.hidden_layers
    values = [la.output_value for la in hidden]
    x_all = np.load(SAMPLES / "digits_cnn_inputs.npz")["x"][:4]
    failure = FailureModel.stuck_at(stuck, bit) if stuck is not None else FailureModel.bit_flip(bit)
    certifier = Certifier(network, failure, x_all)
    visible = onnx.ModelProto.FromString(model.SerializeToString())
    visible.graph.output.extend([onnx.helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in values])
    shapes = [tuple(v.shape[1:]) for v in site_values(model, values, x_all[:1])]
    runner = FaultRunner(visible, values, shapes)
    params = [_qdq_params(model, v) for v in values]
    rng = np.random.default_rng(seed)
    bits = range(8) if bit is None else [bit]

    def error(x, chosen, flip_bit) -> float:
        keeps = [np.ones((1,) + s) for s in shapes]
        repls = [np.zeros((1,) + s) for s in shapes]
        for layer, neuron in chosen:
            stored = runner.run(x, keeps, repls, output=values[layer]).astype(np.float64).reshape(-1)
            keeps[layer].reshape(-1)[neuron] = 0.0
            repls[layer].reshape(-1)[neuron] = flip_code(stored[neuron : neuron + 1], *params[layer], flip_bit,
                                                         stuck)[0]
        return float(np.abs(runner.run(x, keeps, repls).astype(np.float64) - runner.clean(x)).max())

    for i in range(len(x_all)):
        x = x_all[i : i + 1]
        every = certifier.box(i, [1, 1, 1]).bound
        sets = [[(layer, int(rng.integers(la.neurons))) for layer, la in enumerate(hidden)] for _ in range(40)]
        worst = max(error(x, chosen, int(rng.choice(bits))) for chosen in sets)
        assert 0 < worst <= every * (1 + 1e-5) + 1e-6, (i, worst, every)
        last = certifier.box(i, [0, 0, 1]).bound
        alone = max(error(x, [(2, n)], b) for n in range(hidden[2].neurons) for b in bits)
        assert alone <= last * (1 + 1e-5) + 1e-6, (i, alone, last)
