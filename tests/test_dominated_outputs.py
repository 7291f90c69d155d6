"""Outputs the tight pass leaves unfinished, and the boxes' output cut on every network (docs/method.md §4.4,
"Dominated outputs"; §4.1, "The output cut").

* On random deep chains whose bound reaches the output cut (wide weights), ``TightBound(skip_dominated=True)`` —
  the outputs holding the largest cut back-propagated in full, the others only through the layers not saturated —
  gives bit for bit the figures of the full pass: every vector's bound, its refinement, the total curve, and the
  inverse problems of ``bound`` (per layer, uniform, total).
* The same with a plan forced on every layer whatever the probe found: the checks finish the pass wherever an
  unfinished output could raise a maximum, so the figures are still the full pass's. Two weakened copies are caught:
  without those checks (the figures differ), and with the skipped layers' P read as 0 instead of +∞ (figures below
  the full pass's: unsound). The bound with outputs left unfinished holds what onnxruntime measures.
* The boxes' cut (the faulty box with every neuron failing against the clean box) now bounds every non-recurrent
  network whose output cut lines are not built (IBP ranges, or too large): on out = h1 + h2, h = relu(x) on
  x ∈ [0, 1], two crashes reach 2 at x = 1, the bound is 2, and a copy with that cut shrunk 10 % is caught.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import dense_chain, failure_rows, fault_errors
from hypothesis import given, settings
from hypothesis import strategies as st

import robaudit.bounds.tight as tight_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.bound import CombinedBound, PaperMethod
from robaudit.bounds.dominated import (
    DominatedPlan,
    chunk_indices,
    dominates,
    other_chunks,
    probe_chunks,
    saturated_prefix,
)
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound
from robaudit.bounds.tight import BoxCut, TightBound
from robaudit.graph.network import NetworkOptions

SIZES = [3, 8, 8, 8, 8, 8, 8, 24]
ACTIVATIONS = ["relu", "tanh"] * 3
#: a budget small enough for chunks of a few outputs (8 chunks of 3: a probe and the rest)
MEMORY = 20_000


@pytest.fixture(autouse=True)
def _settings(monkeypatch):
    """The plan is for networks without the signed terms (too costly on the deep ones it is for): off here. Two
    threads on every machine: the chunks (and so the probe) do not depend on its cores."""
    monkeypatch.setenv("ROBAUDIT_SIGNED_BUDGET", "0")
    monkeypatch.setenv("ROBAUDIT_THREADS", "2")


def _chain(tmp_path, seed: int, ranges: str = "crown"):
    chain = dense_chain(SIZES, ACTIVATIONS, seed=seed, weight_scale=2.0)
    _, network = load_network(chain.save(tmp_path), NetworkOptions(ranges=ranges))
    return chain, network


def _figures(bound: TightBound, vectors) -> list:
    """Every figure over all outputs a report reads, in one list (compared bit for bit)."""
    return (
        [bound.fep(v) for v in vectors]
        + [bound.refined(v) for v in vectors]
        + list(bound.total_curve(8))
    )


def _vectors(network) -> list[list[int]]:
    """No failure, each layer alone (1 and 3 failures), pairs of layers, every layer, and a few drawn ones."""
    layers = len(network.hidden_layers)
    units = [[f if j == i else 0 for j in range(layers)] for i in range(layers) for f in (1, 3)]
    pairs = [[1 if j in (i, layers - 1 - i) else 0 for j in range(layers)] for i in range(layers // 2)]
    rng = np.random.default_rng(layers)
    drawn = [list(rng.integers(0, 3, layers)) for _ in range(4)]
    return [[0] * layers, *units, *pairs, [1] * layers, [2] * layers, *drawn]


@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 400), mode=st.sampled_from(["crash", "byzantine"]))
def test_unfinished_outputs_give_the_full_pass_figures(tmp_path_factory, seed, mode):
    _, network = _chain(tmp_path_factory.mktemp("d"), seed)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    skip = TightBound(Analysis(network, failure), MEMORY, skip_dominated=True)
    full = TightBound(Analysis(network, failure), MEMORY)
    assert skip._plan is not None and skip._plan.rest_rows.size > 0  # the bound saturates: a plan is made
    vectors = _vectors(network)
    assert _figures(skip, vectors) == _figures(full, vectors)
    paper = PaperMethod(PaperBound(Analysis(network, failure)))
    a, b = CombinedBound(paper, skip), CombinedBound(paper, full)
    for epsilon in (0.5, 5.0, 50.0):
        layers = [a.max_single(i, la.neurons, epsilon) for i, la in enumerate(network.hidden_layers)]
        assert layers == [b.max_single(i, la.neurons, epsilon) for i, la in enumerate(network.hidden_layers)]
        assert (a.max_uniform(epsilon), a.max_total(epsilon)) == (b.max_uniform(epsilon), b.max_total(epsilon))


class _NoChecks(TightBound):
    """Weakened: the figures over all outputs read the unfinished outputs' cuts, never finishing the pass."""

    def _checked(self, found, again, failures=None):
        return found


class _ZeroFill(TightBound):
    """Weakened: the skipped layers' P of the unfinished outputs left at 0 instead of +∞."""

    def _leave_unfinished(self, sweep, plan):
        if plan.stop_after is not None:
            sweep.run(other_chunks(len(sweep.chunks), plan.probe), stop_after=plan.stop_after)


def _every_layer(order, reach, ceiling):
    return list(order)


def test_a_forced_plan_is_finished_where_it_could_differ(tmp_path_factory, monkeypatch):
    """Every layer skipped whatever the probe found: the checks keep the full pass's figures; without them the
    figures differ, and with the skipped P read as 0 some fall below the full pass's (unsound)."""
    monkeypatch.setattr(tight_module, "saturated_prefix", _every_layer)
    caught = {"no checks": 0, "zeros below": 0}
    for seed in range(3):
        _, network = _chain(tmp_path_factory.mktemp("f"), seed)
        analysis = Analysis(network, FailureModel.crash())
        vectors = _vectors(network)
        full = _figures(TightBound(analysis, MEMORY), vectors)
        forced = TightBound(analysis, MEMORY, skip_dominated=True)
        assert forced._plan is not None and forced._plan.stop_after is None  # nothing back-propagated for the rest
        assert _figures(forced, vectors) == full
        caught["no checks"] += _figures(_NoChecks(analysis, MEMORY, skip_dominated=True), vectors) != full
        zeros = _figures(_ZeroFill(analysis, MEMORY, skip_dominated=True), vectors)
        caught["zeros below"] += any(z < f * (1 - 1e-9) for z, f in zip(zeros, full, strict=True))
    assert all(caught.values()), caught


def _measured(chain, counts: list[int]) -> float:
    """The largest error onnxruntime measures for ``counts`` crashed neurons per hidden layer (every set, inputs at
    the corners of the box and random ones)."""
    rng = np.random.default_rng(0)
    corners = [np.array(c, dtype=float) for c in itertools.product([0.0, 1.0], repeat=SIZES[0])]
    inputs = corners + [rng.uniform(0, 1, SIZES[0]) for _ in range(8)]
    rows = failure_rows(SIZES[1:-1], counts, (0.0, 0.0), inputs, rng)
    return float(fault_errors(chain.model, chain.hidden_outputs, SIZES[1:-1], rows).max())


def test_unfinished_bound_holds_what_onnxruntime_measures(tmp_path_factory):
    """The bound with outputs left unfinished against every single, double and one-per-layer crash set."""
    for seed in range(2):
        chain, network = _chain(tmp_path_factory.mktemp("m"), seed)
        bound = TightBound(Analysis(network, FailureModel.crash()), MEMORY, skip_dominated=True)
        for counts in ([1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2], [1, 0, 0, 0, 0, 1], [0, 2, 0, 0, 0, 0]):
            assert _measured(chain, counts) <= bound.fep(counts) * (1 + 1e-6)


# --------------------------------------------------------------------------- the helpers, by hand


def test_probe_takes_the_chunks_of_the_largest_cuts():
    chunks = [slice(0, 3), np.array([3, 5]), np.array([4, 6, 7])]
    envelope = np.array([1.0, 2.0, 3.0, 0.5, 9.0, 8.0, 0.1, 0.2])
    assert probe_chunks(chunks, envelope, 1) == (2,)  # element 4 (9.0) is in the third chunk
    assert probe_chunks(chunks, envelope, 2) == (2, 1)  # then element 5 (8.0) in the second
    assert probe_chunks(chunks, envelope, 5) == (2, 1, 0)
    assert list(chunk_indices(chunks, (2, 1))) == [3, 4, 5, 6, 7]
    assert other_chunks(3, (2, 0)) == [1]


def test_saturated_layers_are_a_run_from_the_first():
    reach = {0: 5.0, 1: 7.0, 2: 1.0, 3: 9.0}
    assert saturated_prefix([0, 1, 2, 3], reach.__getitem__, 5.0) == [0, 1]  # layer 3 reaches, but after 2
    assert saturated_prefix([0, 1, 2, 3], reach.__getitem__, 10.0) == []
    assert saturated_prefix([0, 1], {0: float("nan"), 1: 9.0}.__getitem__, 1.0) == []


def test_dominates_compares_column_by_column():
    plan = DominatedPlan((0,), np.array([0, 1]), np.array([2, 3]), (0,), None)
    assert dominates(np.array([[1.0, 5.0], [3.0, 1.0], [2.0, 4.0], [0.0, 5.0]]), plan)
    assert not dominates(np.array([[1.0, 5.0], [3.0, 1.0], [2.0, 6.0], [0.0, 5.0]]), plan)


# --------------------------------------------------------------------------- the boxes' cut on every network


def _two_crashes(tmp_path):
    chain = dense_chain([1, 2, 1], ["relu"], const_weight=1.0)
    _, network = load_network(chain.save(tmp_path), NetworkOptions(ranges="ibp"))  # no output-cut lines with IBP
    return chain, network


class _ShrunkBoxCut(BoxCut):
    """Weakened: the boxes' cut 10 % below what it is."""

    def __init__(self, analysis):
        super().__init__(analysis)
        self.value = 0.9 * self.value


def test_box_cut_bounds_a_network_without_lines(tmp_path, monkeypatch):
    chain, network = _two_crashes(tmp_path)
    bound = TightBound(Analysis(network, FailureModel.crash()))
    assert isinstance(bound.output_cut, BoxCut)  # IBP ranges: the lines are not built, the boxes are
    measured = _measured_small(chain)
    assert measured == pytest.approx(2.0)  # both neurons crash at x = 1: out goes from 2 to 0
    assert bound.fep([2]) == pytest.approx(2.0)
    monkeypatch.setattr(tight_module, "BoxCut", _ShrunkBoxCut)
    weakened = TightBound(Analysis(network, FailureModel.crash()))
    assert weakened.fep([2]) < measured - 0.1  # caught: below what onnxruntime measures


def _measured_small(chain) -> float:
    rows = failure_rows([2], [2], (0.0, 0.0), [np.array([x]) for x in np.linspace(0, 1, 11)], np.random.default_rng(0))
    return float(fault_errors(chain.model, chain.hidden_outputs, [2], rows).max())


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 400))
def test_box_cut_is_in_every_output_figure(tmp_path_factory, seed):
    """With IBP ranges every output's figure is at most its boxes' cut, and the bound holds onnxruntime's errors."""
    chain, network = _chain(tmp_path_factory.mktemp("b"), seed, ranges="ibp")
    analysis = Analysis(network, FailureModel.crash())
    bound = TightBound(analysis)
    clean, faulty = network.clean[network.tail_start], analysis.faulty()[network.tail_start]
    reach = network.tail_factor * np.maximum(faulty.hi - clean.lo, clean.hi - faulty.lo).reshape(-1)
    for counts in ([1, 0, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0], [1, 0, 0, 0, 0, 1]):
        assert np.all(bound.per_output(counts) <= reach * (1 + 1e-12))
        assert _measured(chain, counts) <= bound.fep(counts) * (1 + 1e-6)


def test_progress_counts_the_probe_and_the_rest_as_one_pass(tmp_path):
    """The probe's chunks and the others are reported as one count of every chunk (a bar that filled on the probe
    and started again would read as a second pass)."""
    from robaudit.bounds.progress import reporting

    _, network = _chain(tmp_path, 1)
    seen: list[tuple[int, int]] = []
    with reporting(lambda phase, done, total: seen.append((done, total))):
        bound = TightBound(Analysis(network, FailureModel.crash()), MEMORY, skip_dominated=True)
    assert bound._plan is not None
    total = seen[0][1]
    assert seen == [(done, total) for done in range(1, total + 1)]


def test_a_probe_of_every_chunk_leaves_nothing_to_plan(tmp_path, monkeypatch):
    """As many threads as chunks (a many-core machine: the chunks are rounded up to a multiple of the threads): the
    probe takes every chunk, and the bound is the full pass's, with no plan (an empty rest once failed to reduce)."""
    _, network = _chain(tmp_path, 1)
    analysis = Analysis(network, FailureModel.crash())
    monkeypatch.setenv("ROBAUDIT_THREADS", "8")
    bound = TightBound(analysis, 8 * MEMORY, skip_dominated=True)  # each thread's share: chunks of 3 outputs
    assert bound._plan is None
    vectors = _vectors(network)
    assert _figures(bound, vectors) == _figures(TightBound(analysis, 8 * MEMORY), vectors)  # the same chunks
