"""The slope product formed by the reduction of a layer's P rows (docs/method.md §4.4).

The tight bound's pass (``SensitivityPass(..., fused=True)``) lets ``TightBound._keep`` write
P·slope of a layer a block of rows at a time, while the rows are in cache, and hands that
product to the layer's adjoint instead of forming ``grad · slope`` again:

* on random dense chains (random sizes, activations whose slopes are not all 1, crash and
  byzantine) every total Σ_i P[k, i]·δ_i equals the one of ``tests/reference.py`` (an
  independent implementation with explicit loops), and every kept value, total, per-neuron
  maximum, cut cost and synapse term is bit for bit that of the plain pass (``fused=False``);
* on the convolutional sample models (small planes, rectangles, residual merges, an
  image output) the fused and the plain pass give the same arrays, bit for bit;
* a copy that forms the product with its slope halved is caught by the reference comparison.

A block of one row is its own column minimum: the selection of its kept values reads whether a
column is zero through a view of the row itself (before reordering it), and equals a full sort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import dense_chain
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Reference

import robaudit.bounds.tight as tight_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel, top_prefix_sums
from robaudit.bounds.tight import TightBound, _row_tops
from robaudit.graph.network import NetworkOptions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SLOPED = ["tanh", "sigmoid", "elu", "leakyrelu", "hardsigmoid", "relu"]


def _chain(directory: Path, sizes: list[int], activations: list[str], seed: int, mode: str):
    path = dense_chain(sizes, activations, seed=seed, weight_scale=1.5).save(directory)
    failure_range = (0.0, 0.0) if mode == "crash" else (-2.0, 2.0)
    ref = Reference(path, failure_range=failure_range)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(2.0)
    _, network = load_network(path, NetworkOptions(ranges="ibp"))  # the reference uses IBP ranges
    return ref, Analysis(network, failure)


def _plain(monkeypatch) -> None:
    """TightBound's pass without the fused product (what every pass did before)."""
    real = tight_module.SensitivityPass
    monkeypatch.setattr(tight_module, "SensitivityPass", lambda *a, **k: real(*a, **{**k, "fused": False}))


def _arrays(bound: TightBound) -> list[np.ndarray]:
    return [*bound._top, *bound.total, *bound.neuron_max, *bound.cut_cost, *bound.synapse_terms]


def _totals_match_reference(bound: TightBound, ref: Reference) -> bool:
    for i in range(len(ref.neurons)):
        want = top_prefix_sums(np.asarray(ref.sens[i]) * np.asarray(ref.neuron_deltas[i])[None, :], None)[:, -1]
        if not np.allclose(bound.total[i], want, rtol=1e-9, atol=1e-12):
            return False
    return True


class _HalvedSlope(TightBound):
    """Weakened: the product handed to the adjoint carries half of each slope."""

    def _keep(self, i, rows, sens, slope, columns=None, scaled=None):
        super()._keep(i, rows, sens, slope, columns, scaled)
        if scaled is not None:
            scaled *= 0.5


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(2, 9), min_size=4, max_size=5),
    picks=st.lists(st.sampled_from(SLOPED), min_size=3, max_size=3),
    seed=st.integers(0, 100),
    mode=st.sampled_from(["crash", "byzantine"]),
)
def test_fused_pass_matches_the_reference_and_the_plain_pass(tmp_path_factory, sizes, picks, seed, mode):
    ref, analysis = _chain(tmp_path_factory.mktemp("m"), sizes, picks[: len(sizes) - 2], seed, mode)
    fused = TightBound(analysis)
    assert _totals_match_reference(fused, ref)
    with pytest.MonkeyPatch.context() as patch:
        _plain(patch)
        plain = TightBound(analysis)
    for got, want in zip(_arrays(fused), _arrays(plain), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_fused_product_is_taken(tmp_path, monkeypatch):
    """The chain's second hidden layer (sigmoid: slopes of 1/4 at most) hands its product to the adjoint."""
    _, analysis = _chain(tmp_path, [4, 6, 5, 3], ["tanh", "sigmoid"], 2, "crash")
    seen = []
    real = TightBound._keep

    def spy(self, i, rows, sens, slope, columns=None, scaled=None):
        seen.append((i, scaled is not None))
        real(self, i, rows, sens, slope, columns, scaled)

    monkeypatch.setattr(TightBound, "_keep", spy)
    TightBound(analysis)
    assert (1, True) in seen and (0, False) in seen  # the first layer's adjoint is not needed


@pytest.mark.parametrize("name", ["lenet", "resnet_small", "digits_cnn", "encoder"])
def test_fused_pass_is_bit_for_bit_the_plain_one_on_sample_models(name, monkeypatch):
    _, network = load_network(SAMPLES / f"{name}.onnx", NetworkOptions())
    analysis = Analysis(network, FailureModel.crash())
    fused = TightBound(analysis)
    _plain(monkeypatch)
    plain = TightBound(analysis)
    for got, want in zip(_arrays(fused), _arrays(plain), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_halved_slope_product_is_caught(tmp_path):
    ref, analysis = _chain(tmp_path, [4, 7, 6, 3], ["tanh", "sigmoid"], 3, "byzantine")
    assert _totals_match_reference(TightBound(analysis), ref)
    assert not _totals_match_reference(_HalvedSlope(analysis), ref)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(columns=st.integers(1, 60), unreached=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_one_row_tops_through_a_view_of_the_row_equal_a_full_sort(columns, unreached, seed):
    rng = np.random.default_rng(seed)
    values = rng.random((1, columns)).round(1)
    values[:, rng.random(columns) < unreached] = 0.0
    width = int(rng.integers(1, columns + 1))
    expected = np.sort(values, axis=1)[:, ::-1][:, :width]
    negated = -values
    np.testing.assert_array_equal(_row_tops(negated, negated[0], width, negated=True), expected)
