"""Zeroed gates whose chord-slope interval holds 0 need no failure term (docs/method.md §5.7).

In the counted gated deviation network of docs/method.md §5.5 a failed neuron of a later failing layer is a
gate λ_j = 0. Where λ_j's interval [a_j, b_j] already holds 0 (a ReLU whose hull straddles 0), that is a
point of the λ box the gate lines cover, so :class:`ZeroedDeviations` charges it no failure term.

* κ_1(λ, S) written again in numpy on the dense residual network of ``tests/test_signed_residual.py``
  (origin the first hidden layer; the later failing layers include the ReLU layer h3, whose zeroed gates
  are now free) for random chord slopes at vertices and inside the box and random zeroed sets of at most
  f_m neurons per later layer stays in the enclosure, for :class:`ZeroedDeviations` and
  :class:`TightenedDeviations`;
* the rule narrows that enclosure and lowers the vector's bound in some draws, never widens or raises it;
* random residual networks run by the independent injector of ``tests/ort_faults.py`` (every failure set of
  vectors whose later failing layers include ReLU layers, failed values at the ends of the range and
  random, box corners and random inputs) stay within the counted bound and the tightened bound themselves;
* caught by the κ check: the rule applied where the interval does not hold 0 (every gate with b_j ≥ 0 free:
  the identity sites h2, h4 of slope exactly 1 lose their failure terms).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import test_zeroed_signed as zeroed_tests
from test_signed_residual import _bound, _residual, _save, _worst

from robaudit.bounds import tightened, zeroed
from robaudit.bounds.fep import FailureModel
from robaudit.bounds.tightened import TightenedDeviations, tightened_signed_bound
from robaudit.bounds.zeroed import ZeroedDeviations, open_gates, vector_signed_bound

#: Vectors whose later failing layers include the ReLU layer h3 (sites h1-h4).
LATER_RELU = ([1, 0, 1, 0], [1, 0, 2, 0], [1, 1, 2, 1], [0, 1, 1, 0], [2, 0, 2, 1])


def _never_open(a, b):
    """The rule off: every zeroed gate charged its failure term (the counted rule of §5.5 as it was)."""
    return np.zeros(np.broadcast_shapes(np.shape(a), np.shape(b)), bool)


def _open_if_not_negative(a, b):
    """Weakened copy: a gate counted free whenever b ≥ 0, whether or not [a, b] holds 0."""
    return np.broadcast_to(np.asarray(b) >= 0.0, np.broadcast_shapes(np.shape(a), np.shape(b)))


def _patch(monkeypatch, rule) -> None:
    monkeypatch.setattr(zeroed, "open_gates", rule)
    monkeypatch.setattr(tightened, "open_gates", rule)


def test_open_gates_read_the_interval():
    a = np.array([0.0, -0.5, 0.2, 1.0, -1.0, 0.0])
    b = np.array([1.0, 0.5, 1.0, 1.0, -0.2, 0.0])
    assert open_gates(a, b).tolist() == [True, True, False, False, False, True]


@pytest.mark.parametrize("deviations", [ZeroedDeviations, TightenedDeviations])
def test_coefficients_hold_with_free_zeroed_relu_gates(deviations, monkeypatch):
    monkeypatch.setattr(zeroed_tests, "ZeroedDeviations", deviations)
    for counts in LATER_RELU[1:4]:
        for seed in range(2):
            assert not zeroed_tests._kappa_outside(counts, seed), (deviations.__name__, counts, seed)


def test_freeing_the_gate_is_caught_where_its_interval_lacks_zero(monkeypatch):
    _patch(monkeypatch, _open_if_not_negative)
    vectors = ([1, 1, 0], [1, 1, 1])
    assert any(zeroed_tests._chain_kappa_outside(counts, seed) for counts in vectors for seed in range(4))


def _enclosures(seed: int, counts: list[int], monkeypatch) -> tuple[float, float]:
    """Total width of the counted enclosure of κ (origin h1) with the rule and without it."""
    model = _residual(np.random.default_rng(seed), 3, "dense", 2.5)
    with tempfile.TemporaryDirectory() as tmp:
        bound = _bound(_save(model, Path(tmp)), FailureModel.crash())
    signed = bound.signed
    assert signed is not None
    hidden = bound.analysis.hidden
    failing = {id(hidden[j]): counts[j] for j in (1, 2, 3) if counts[j] > 0}
    widths = []
    for rule in (open_gates, _never_open):
        with monkeypatch.context() as patch:
            _patch(patch, rule)
            deviations = ZeroedDeviations(bound.network, signed.exact_slopes, signed.hulls, failing)
            lower, upper = deviations.coefficient_bounds(hidden[0])
        widths.append(float((upper - lower).sum()))
    return widths[0], widths[1]


def test_the_rule_narrows_the_enclosure(monkeypatch):
    pairs = [_enclosures(seed, counts, monkeypatch) for seed in range(3) for counts in ([1, 0, 2, 0], [1, 1, 2, 1])]
    assert all(new <= old * (1 + 1e-12) + 1e-12 for new, old in pairs), pairs
    assert any(new < old * (1 - 1e-6) for new, old in pairs), pairs


@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_counted_and_tightened_bounds_are_sound(tmp_path, mode, monkeypatch):
    """The bounds themselves (not their minimum with the other bounds) against the independent injector;
    the rule never raises them and lowers one in some draw."""
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    lowered = []
    for seed in range(2):
        rng = np.random.default_rng(100 + seed)
        model = _residual(rng, 3, "dense", 2.5)
        bound = _bound(_save(model, tmp_path), failure)
        assert bound.signed is not None
        for counts in LATER_RELU[:3]:
            stacked = bound.layer_terms(counts)
            outputs = stacked.shape[1]
            counted = vector_signed_bound(bound.signed, counts, stacked)
            found = tightened_signed_bound(bound.signed, counts, stacked, np.full(outputs, np.inf))
            assert counted is not None and found is not None
            worst = _worst(model, 3, counts, failure.failure_range, rng)
            for value in (counted.max(), found.max()):
                assert worst <= value * (1 + 1e-5) + 1e-6, (seed, mode, counts, worst, value)
            with monkeypatch.context() as patch:
                _patch(patch, _never_open)
                before = vector_signed_bound(bound.signed, counts, stacked)
            assert before is not None
            assert np.all(counted <= before * (1 + 1e-12) + 1e-12)
            lowered.append(float(counted.max()) < float(before.max()) * (1 - 1e-6))
    assert any(lowered), lowered
