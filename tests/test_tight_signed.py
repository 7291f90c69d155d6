"""Signed terms of the tight bound (docs/method.md §4.1): the failures added layer by layer
from the last failing layer back, each term a signed linear form with interval coefficients.

* random dense chains (ReLU, LeakyReLU, Tanh, Sigmoid; crash and byzantine): every failure
  set, failed values at the ends of the range and random, corners and random inputs, run in
  onnxruntime, stay within ``fep_tight``; the signed terms are used and lower the bound;
* the same check with the chord slopes halved inside the signed pass finds violations.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import dense_chain
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tight_cuts import _errors, _rows

import robaudit.bounds.signed as signed
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions

COUNTS = ([1, 0], [2, 0], [1, 1], [0, 1], [2, 2])


def _inputs(rng: np.random.Generator, count: int = 40) -> list[np.ndarray]:
    corners = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=3)]
    return corners + list(rng.uniform(0, 1, (count, 3)))


@settings(max_examples=14, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(2, 4), min_size=2, max_size=2),
    st.lists(st.sampled_from(["relu", "leakyrelu", "tanh", "sigmoid"]), min_size=2, max_size=2),
    st.sampled_from(["crash", "byzantine"]),
    st.integers(0, 2**31),
)
def test_signed_terms_are_sound_on_random_chains(tmp_path_factory, hidden, acts, mode, seed):
    chain = dense_chain([3, *hidden, 2], acts, seed=seed % 1000, weight_scale=1.0, bias_scale=0.3)
    path = chain.save(tmp_path_factory.mktemp("signed"))
    _, net = load_network(path, NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    bound = TightBound(Analysis(net, failure))
    assert bound.signed is not None
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng)
    lower = []
    for counts in COUNTS:
        counts = [min(c, n) for c, n in zip(counts, hidden, strict=True)]
        fep = bound.fep(counts)
        worst = float(_errors(chain, hidden, _rows(hidden, counts, failure.failure_range, inputs, rng)).max())
        assert worst <= fep * (1 + 1e-5) + 1e-6, (hidden, acts, mode, counts, worst, fep)
        lower.append(fep < float(bound.sums(counts).max()) * (1 - 1e-9))
    assert any(lower)  # the signed terms (or a cut) are what the check exercises


@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_halved_chord_slopes_are_caught(mode, tmp_path, monkeypatch):
    hidden = [4, 3]
    chain = dense_chain([3, *hidden, 2], ["relu", "relu"], seed=0, weight_scale=1.0, bias_scale=0.3)
    path = chain.save(tmp_path)
    _, net = load_network(path, NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    rng = np.random.default_rng(0)
    worst = float(_errors(chain, hidden, _rows(hidden, [1, 0], failure.failure_range, _inputs(rng), rng)).max())
    assert worst <= TightBound(Analysis(net, failure)).fep([1, 0]) * (1 + 1e-5)
    original = signed.chord_slopes
    monkeypatch.setattr(signed, "chord_slopes", lambda *args: tuple(s / 2 for s in original(*args)))
    assert worst > TightBound(Analysis(net, failure)).fep([1, 0]) * (1 + 1e-5)
