"""The worst search moving the input together with flipped and stuck bits (docs/method.md §8.2, §2.3).

* the joint search's numpy flips (``robaudit.injection.stored_flips``) against the tests' own flips of float32 and
  float16 words and int8/uint8 codes, at every bit position, flipped and stuck;
* ``inject --search worst`` on the digits CNN: the moved input's error is confirmed in onnxruntime, redone
  independently (numpy flips of the float32 words, ``ort_faults``), at least the best on the given inputs and
  within the bound; exponent bits keep the given inputs, with a note.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ROOT, cli_json
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bit_flips import flip_code, replay_float_flips
from test_float16_bit_flips import flip_half

from robaudit.bounds.audit import load_network
from robaudit.graph.network import NetworkOptions
from robaudit.graph.stored_words import FLOAT16, FLOAT32
from robaudit.injection.stored_flips import flipped_codes, flipped_words

SAMPLES = ROOT / "sample_models"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(["float32", "float16"]), st.sampled_from([None, 0, 1]), st.integers(0, 2**31))
def test_numpy_flips_of_float_words_match_the_tests_own(word, stuck, seed) -> None:
    rng = np.random.default_rng(seed)
    dtype, width, stored = (np.float32, 32, FLOAT32) if word == "float32" else (np.float16, 16, FLOAT16)
    values = np.concatenate([rng.normal(0, 3, 20), rng.normal(0, 1e-5, 4), [0.0, -0.0]]).astype(dtype)
    for bit in range(width):
        got = flipped_words(values.astype(np.float64), np.full(values.size, bit), stored, stuck)
        with np.errstate(invalid="ignore"):
            want = flip_half(values, bit, stuck, dtype).astype(np.float64)
        assert np.array_equal(got, want, equal_nan=True), (word, bit, stuck)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.booleans(), st.sampled_from([None, 0, 1]), st.integers(0, 2**31))
def test_numpy_flips_of_integer_codes_match_the_tests_own(signed, stuck, seed) -> None:
    rng = np.random.default_rng(seed)
    scale, zp = float(rng.uniform(0.01, 0.5)), int(rng.integers(-20, 20) if signed else rng.integers(0, 40))
    qmin, qmax = (-128, 127) if signed else (0, 255)
    values = rng.uniform((qmin - zp) * scale, (qmax - zp) * scale, 16)
    codes = (np.full(16, scale), np.full(16, float(zp)), qmin, qmax)
    for bit in range(8):
        got = flipped_codes(values, np.full(16, bit), codes, stuck)
        want = flip_code(values, scale, zp, signed, bit, stuck)
        assert np.allclose(got, want, rtol=0, atol=1e-12), (bit, stuck)


@pytest.mark.parametrize("extra", [("--bit", 31), pytest.param(("--bit", 22), marks=pytest.mark.slow),
                                   ("--stuck-at", 1, "--bit", 21)])
def test_the_worst_search_moves_the_input_with_flips(extra) -> None:
    data = SAMPLES / "digits_cnn_inputs.npz"
    model_path = SAMPLES / "digits_cnn.onnx"
    report = cli_json("inject", model_path, "--bit-flip", 1, "--search", "worst", "--trials", 60, "--inputs", data,
                      "-q", "--in-process", *extra)
    vector = report["vectors"][0]
    moved = vector["moved_input"]
    assert moved is not None, report["notes"]
    assert not report["violation"]
    assert moved["error"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
    assert moved["error"] >= vector["measured"]["max"] * (1 - 1e-6)  # the search starts from the best set
    bit = int(extra[extra.index("--bit") + 1])
    assert all(fault["bits"] == [bit] for fault in moved["faults"])
    _, network = load_network(model_path, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    names = [la.name for la in network.hidden_layers]
    x = np.array(moved["input"], np.float32).reshape((1,) + tuple(np.load(data)["x"].shape[1:]))
    assert 0.0 <= x.min() and x.max() <= 1.0
    stuck = int(extra[extra.index("--stuck-at") + 1]) if "--stuck-at" in extra else None
    independent = replay_float_flips(onnx.load(model_path), values, names, x, moved, stuck)
    assert independent == pytest.approx(moved["error"], rel=1e-4)


def test_exponent_bits_keep_the_given_inputs_with_a_note() -> None:
    report = cli_json("inject", SAMPLES / "digits_cnn.onnx", "--bit-flip", 1, "--bit", 30, "--search", "worst",
                      "--trials", 20, "--inputs", SAMPLES / "digits_cnn_inputs.npz", "-q", "--in-process")
    assert report["vectors"][0]["moved_input"] is None
    assert any("exponent bits" in note for note in report["notes"]), report["notes"]
