"""What the tight bound keeps per output and layer, computed cheaply (docs/method.md §4.4).

The reduction of P·δ a cache-sized block of rows at a time: with blocks of one or two rows
the kept values, totals and per-neuron maxima equal full sorts, sums and maxima of the
dense P (``dense_sensitivities``: the same P all at once) and of ``tests/reference.py``;
a copy that keeps the per-neuron maximum of the last block only is caught.

The tight bound's first pass keeping few values per output:

On a large network the first pass keeps only the ``FIRST_KEPT`` largest P·δ per output and
layer; a search that asks for the sum of more runs the pass again keeping every value that
fits. Checked here on small networks with the first pass forced to keep one or two values:

* every sum the inverse problems read (per layer, per output, the total curve) is the sum of
  the f largest P·δ of the dense P of ``tests/reference.py`` (an independent implementation
  with explicit loops), exactly as far as values may be kept — and bit for bit what a bound
  that kept them all from the start gives;
* a copy that does not run the pass again (the smallest kept value standing in for the rest,
  sound but looser) is caught;
* the rule picks the short first pass only above ``LAZY_KEPT_ENTRIES`` entries of P, and
  ``bound`` at an ε where nothing is tolerated never runs the pass again.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense_chain
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Reference

import robaudit.bounds.tight as tight_module
from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
from robaudit.bounds.bound import CombinedBound, make_bounds
from robaudit.bounds.fep import Analysis, FailureModel, top_prefix_sums
from robaudit.bounds.tight import TightBound, dense_sensitivities
from robaudit.graph.network import NetworkOptions

SIZES = [4, 7, 6, 3]


def _analysis(tmp_path, seed: int, mode: str) -> tuple[Reference, Analysis]:
    path = dense_chain(SIZES, ["relu", "tanh"], seed=seed, weight_scale=1.5).save(tmp_path)
    failure_range = (0.0, 0.0) if mode == "crash" else (-2.0, 2.0)
    ref = Reference(path, failure_range=failure_range)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(2.0)
    _, network = load_network(path, NetworkOptions(ranges="ibp"))  # the reference uses IBP ranges
    return ref, Analysis(network, failure)


def _exact_sums(ref: Reference, i: int) -> np.ndarray:
    """[outputs, N + 1]: per output the sums of the f largest P·δ of the reference's dense P."""
    return top_prefix_sums(np.asarray(ref.sens[i]) * np.asarray(ref.neuron_deltas[i])[None, :], None)


class _NoSecondPass(TightBound):
    """Weakened: never runs the pass again; past the first kept values the smallest one stands in."""

    def _kept(self, i: int, f: int) -> int:
        return self._top[i].shape[1]

    def _widen(self) -> None:
        return None


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 50), first=st.integers(1, 2), mode=st.sampled_from(["crash", "byzantine"]))
def test_short_first_pass_gives_the_reference_sums(tmp_path_factory, seed, first, mode):
    ref, analysis = _analysis(tmp_path_factory.mktemp("m"), seed, mode)
    lazy = TightBound(analysis, first_kept=first)
    assert [t.shape[1] for t in lazy._top] == [first, first]  # the first pass kept only these
    for i, neurons in enumerate(ref.neurons):
        want = _exact_sums(ref, i)
        for f in range(neurons + 1):  # past the first kept values: the pass again, exact
            np.testing.assert_allclose(lazy.layer_sum(i, f), want[:, f], rtol=1e-10, atol=1e-12)
    assert [t.shape[1] for t in lazy._top] == ref.neurons  # widened to every neuron (they all fit)


@pytest.mark.parametrize("first", [1, 2])
def test_short_first_pass_is_bit_for_bit_the_full_one(tmp_path, first):
    _, analysis = _analysis(tmp_path, 3, "byzantine")
    full = TightBound(analysis)
    vectors = ([1, 0], [0, 1], [1, 1], [2, 1], [3, 3], [7, 6])
    for vector in vectors:  # a fresh bound per vector: whichever count first asks for more values
        lazy = TightBound(analysis, first_kept=first)
        np.testing.assert_array_equal(lazy.per_output(vector), full.per_output(vector))
        assert lazy.refined(vector) == full.refined(vector)
    for budget in (1, 2, 5, 13):
        lazy = TightBound(analysis, first_kept=first)
        np.testing.assert_array_equal(lazy.total_curve(budget), full.total_curve(budget))
    lazy = TightBound(analysis, first_kept=first)
    for got, want in zip(lazy.top, full.top, strict=True):  # the public lists: every value kept
        np.testing.assert_array_equal(got, want)
    for i in range(len(full.top)):
        np.testing.assert_array_equal(lazy.prefix[i], full.prefix[i])
        np.testing.assert_array_equal(lazy.total[i], full.total[i])
        np.testing.assert_array_equal(lazy.neuron_max[i], full.neuron_max[i])


def test_a_bound_that_does_not_run_the_pass_again_is_caught(tmp_path):
    ref, analysis = _analysis(tmp_path, 3, "byzantine")
    weakened = _NoSecondPass(analysis, first_kept=1)
    caught = False
    for i, neurons in enumerate(ref.neurons):
        want = _exact_sums(ref, i)
        for f in range(neurons + 1):
            got = weakened.layer_sum(i, f)
            assert np.all(got >= want[:, f] * (1 - 1e-10) - 1e-12)  # sound, only looser
            caught |= not np.allclose(got, want[:, f], rtol=1e-10, atol=1e-12)
    assert caught


def test_the_short_first_pass_is_taken_on_large_networks_only(tmp_path, monkeypatch):
    _, analysis = _analysis(tmp_path, 3, "crash")
    assert [t.shape[1] for t in TightBound(analysis)._top] == SIZES[1:3]  # small: every value at once
    monkeypatch.setattr(tight_module, "LAZY_KEPT_ENTRIES", 0)
    monkeypatch.setattr(tight_module, "FIRST_KEPT", 2)
    assert [t.shape[1] for t in TightBound(analysis)._top] == [2, 2]


def test_bound_where_nothing_is_tolerated_runs_one_pass(tmp_path, monkeypatch):
    """``FIRST_KEPT`` covers the total budget's first curve (64): at an ε where no count is tolerated the
    searches ask for nothing more; where counts are, they may, and the report is the same."""
    path = dense_chain([4, 80, 30, 3], ["relu", "tanh"], seed=3, weight_scale=1.5).save(tmp_path)
    loaded, network = load_network(path, NetworkOptions())
    monkeypatch.setattr(tight_module, "LAZY_KEPT_ENTRIES", 0)
    passes = []
    real = tight_module.SensitivityPass
    monkeypatch.setattr(tight_module, "SensitivityPass", lambda *a, **k: passes.append(1) or real(*a, **k))
    result = bound_network(network, BoundOptions(epsilon=1e-9, failures=(1,)), model_info(loaded))
    assert all(la.max_failures_tight <= 0 for la in result.layers)
    assert len(passes) == 1
    monkeypatch.setattr(tight_module, "FIRST_KEPT", 2)
    options = BoundOptions(epsilon=10.0, failures=(3,))
    lazy = bound_network(network, options, model_info(loaded))
    assert len(passes) == 3 and max(la.max_failures_tight for la in lazy.layers) > 2  # the pass again
    monkeypatch.setattr(tight_module, "LAZY_KEPT_ENTRIES", 2**40)
    assert bound_network(network, options, model_info(loaded)) == lazy


class _LastBlockMaximum(TightBound):
    """Weakened: the per-neuron maximum of each chunk is that of its last block of rows only."""

    def _keep(self, i, rows, sens, slope, columns=None, scaled=None):
        before = self.neuron_max[i].copy()
        super()._keep(i, rows, sens, slope, columns, scaled)
        last = sens[-1:] * self.deltas[i][None, :] if columns is None else None
        if last is not None:
            self.neuron_max[i] = np.maximum(before, last.max(axis=0))


def _blocked_figures(bound: TightBound, dense: list[np.ndarray]) -> bool:
    """Whether ``bound``'s kept values, totals and per-neuron maxima are those of the dense P."""
    same = True
    for i, p in enumerate(dense):
        weighted = p * bound.deltas[i][None, :]
        ordered = -np.sort(-weighted, axis=1)[:, : bound.top[i].shape[1]]
        same &= np.allclose(bound.top[i], ordered, rtol=1e-12, atol=0)
        same &= np.allclose(bound.total[i], weighted.sum(axis=1), rtol=1e-12, atol=0)
        same &= np.allclose(bound.neuron_max[i], weighted.max(axis=0), rtol=1e-12, atol=0)
    return bool(same)


@pytest.mark.parametrize("block", [1, 7, 2**16])
def test_blocks_of_rows_give_the_figures_of_the_whole_chunk(tmp_path, monkeypatch, block):
    from test_graph_ops import residual_net

    path = tmp_path / "m.onnx"
    path.write_bytes(residual_net(2).SerializeToString())
    _, network = load_network(path, NetworkOptions())
    analysis = Analysis(network, FailureModel.byzantine(1.5))
    dense = dense_sensitivities(analysis)
    monkeypatch.setattr(tight_module, "_KEEP_BLOCK_ELEMENTS", block)  # one row, a few rows, the whole chunk
    assert _blocked_figures(TightBound(analysis, first_kept=3), dense)
    assert _blocked_figures(TightBound(analysis), dense)


def test_blocks_of_rows_match_the_reference(tmp_path, monkeypatch):
    ref, analysis = _analysis(tmp_path, 5, "byzantine")
    monkeypatch.setattr(tight_module, "_KEEP_BLOCK_ELEMENTS", 1)  # every row a block of its own
    bound = TightBound(analysis)
    for i, neurons in enumerate(ref.neurons):
        want = _exact_sums(ref, i)
        for f in range(neurons + 1):
            np.testing.assert_allclose(bound.layer_sum(i, f), want[:, f], rtol=1e-10, atol=1e-12)
        weighted = np.asarray(ref.sens[i]) * np.asarray(ref.neuron_deltas[i])[None, :]
        np.testing.assert_allclose(bound.neuron_max[i], weighted.max(axis=0), rtol=1e-10, atol=1e-12)


def test_a_maximum_of_the_last_block_only_is_caught(tmp_path, monkeypatch):
    ref, analysis = _analysis(tmp_path, 5, "byzantine")
    dense = dense_sensitivities(analysis)
    monkeypatch.setattr(tight_module, "_KEEP_BLOCK_ELEMENTS", 1)
    assert not _blocked_figures(_LastBlockMaximum(analysis), dense)


# --------------------------------------------------------------------------- one evaluation per vector


class _KeyedByTotal(TightBound):
    """Weakened: remembers fep by the total count, so that two vectors with as many failures share one."""

    def fep(self, failures):
        key = (sum(int(f) for f in failures),)
        if key not in self._feps:
            self._feps[key] = float(self.per_output(failures).max()) * self.analysis.carry_factor(failures)
        return self._feps[key]


def _vectors(layers: int) -> list[list[int]]:
    return [[0] * layers] + [[f if j == i else 0 for j in range(layers)] for i in range(layers) for f in (1, 2)]


def test_remembered_feps_equal_fresh_ones_and_are_computed_once(tmp_path, monkeypatch):
    from robaudit.bounds.fep import PaperBound

    _, analysis = _analysis(tmp_path, 3, "byzantine")
    tight, paper = TightBound(analysis), PaperBound(analysis)
    asked = []
    real = TightBound._per_output_rows
    monkeypatch.setattr(TightBound, "_per_output_rows", lambda self, f: asked.append(tuple(f)) or real(self, f))
    vectors = _vectors(2)
    for _ in range(3):  # as the searches do: the same vectors again
        for vector in vectors:
            fresh = TightBound(analysis)
            assert tight.fep(vector) == fresh.fep(vector) == float(np.max(real(fresh, vector)))
            assert paper.fep(vector) == PaperBound(analysis).fep(vector)
            assert paper.fep_upto(vector) == PaperBound(analysis).fep_upto(vector)
    mine = [a for a in asked if a in {tuple(v) for v in vectors}]
    assert len(mine) == len(vectors) * (1 + 3)  # the remembering bound once per vector, each fresh one once more


def test_a_memo_that_mixes_up_vectors_is_caught(tmp_path):
    _, analysis = _analysis(tmp_path, 3, "byzantine")
    weakened = _KeyedByTotal(analysis)
    caught = False
    for vector in _vectors(2):
        caught |= weakened.fep(vector) != TightBound(analysis).fep(vector)
    assert caught


class _RefinedKeyedByTotal(CombinedBound):
    """Weakened: remembers the refined bound by the total count, so that two vectors with as many failures share one."""

    def fep_vector(self, failures):
        key = (sum(int(f) for f in failures),)
        if key not in self._refined:
            self._refined[key] = min(self.paper.fep(failures), self.tight.refined(failures), self.cap)
        return self._refined[key]


def test_a_vectors_refined_bound_is_computed_once_and_equals_a_fresh_one(tmp_path, monkeypatch):
    """``bound`` and ``inject`` ask for their vector's figure more than once; its refinement runs once per vector."""
    _, analysis = _analysis(tmp_path, 3, "crash")
    combined = make_bounds(analysis)[1]
    asked = []
    real = TightBound.refined
    monkeypatch.setattr(TightBound, "refined", lambda self, f: asked.append(tuple(f)) or real(self, f))
    vectors = _vectors(2)[1:]
    for _ in range(3):
        for vector in vectors:
            assert combined.fep_vector(vector) == make_bounds(analysis)[1].fep_vector(vector)
    mine = [a for a in asked if a in {tuple(v) for v in vectors}]
    assert len(mine) == len(vectors) * (1 + 3)  # the remembering bound once per vector, each fresh one once more
    assert len({combined.fep_vector(v) for v in vectors}) > 1  # the vectors' figures differ: a mixed-up memo shows


def test_a_memo_of_refined_bounds_that_mixes_up_vectors_is_caught(tmp_path):
    _, analysis = _analysis(tmp_path, 3, "crash")
    paper, tight = make_bounds(analysis)
    weakened = _RefinedKeyedByTotal(paper, tight.tight)
    caught = False
    for vector in _vectors(2)[1:]:
        caught |= weakened.fep_vector(vector) != make_bounds(analysis)[1].fep_vector(vector)
    assert caught


def test_sensitivities_past_float64_give_an_unbounded_total_without_a_warning(tmp_path):
    """P·δ beyond float64's range (the products through a transformer's attention can get there) is +inf, a bound
    reported as unbounded — in silence: numpy's reductions warn from numpy's own module, which the command line's
    filter did not cover (a new-user trial saw "RuntimeWarning: overflow encountered in reduce" from harden)."""
    _, analysis = _analysis(tmp_path, 0, "byzantine")
    bound = TightBound(analysis)
    neurons = analysis.hidden[0].neurons
    huge = np.full((2, neurons), 1e308)
    slope = np.ones(neurons)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bound._keep(0, slice(0, 2), huge, slope)
    assert np.all(np.isinf(bound.total[0][:2])) and np.all(np.isinf(bound._top[0][:2, 0]))


def _reference_largest(values: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` largest per row, sorted down: a full sort (independent of the selection)."""
    return -np.sort(-values, axis=1)[:, :width]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 5),
    n=st.integers(1, 2500),
    width=st.integers(1, 70),
    kind=st.sampled_from(["random", "few values", "sparse", "constant"]),
    seed=st.integers(0, 2**31),
)
def test_group_minima_select_the_same_largest_values(rows, n, width, kind, seed):
    """``_largest_sorted`` looks only at the groups of columns with the smallest minima of −P·δ (docs/method.md
    §4.4): the same numbers as a full sort, ties and zeros included."""
    rng = np.random.default_rng(seed)
    width = min(width, n)
    if kind == "random":
        values = rng.random((rows, n))
    elif kind == "few values":
        values = rng.integers(0, 4, (rows, n)).astype(np.float64)
    elif kind == "sparse":
        values = np.zeros((rows, n))
        values[:, rng.integers(0, n, 5)] = rng.random(5)
    else:
        values = np.repeat(rng.random((rows, 1)), n, axis=1)
    found = tight_module._largest_sorted(values.copy(), width)
    assert np.array_equal(found, _reference_largest(values, width))


def test_a_selection_from_too_few_groups_is_caught(monkeypatch):
    """Weakened: one group fewer than the width — the largest values spread over ``width`` groups are then missed."""
    block = tight_module._SELECT_BLOCK
    width = 8
    values = np.zeros((1, block * width * 8))
    # group g holds the columns g, g + G, g + 2G, … (G = n // block): columns 0 … width − 1 are in `width` groups
    values[0, :width] = np.arange(width, 0, -1)
    assert np.array_equal(tight_module._largest_sorted(values.copy(), width), _reference_largest(values, width))
    original = tight_module._candidates
    monkeypatch.setattr(tight_module, "_candidates", lambda v, w: original(v, w - 1))
    assert not np.array_equal(tight_module._largest_sorted(values.copy(), width), _reference_largest(values, width))
