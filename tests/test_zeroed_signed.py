"""The signed terms of one failure vector with the later failed neurons counted (docs/method.md §5.5):
at most f_m gates of a later failing layer are 0, the others keep their chord slopes.

* κ_i written again in plain numpy (dense residual network: origin the first hidden layer, every later
  layer failing) for random chord slopes at vertices and inside their box and random sets of at most
  f_m zeroed neurons per later layer lies in the enclosure of :class:`ZeroedDeviations`; with the failure
  terms dropped or halved it does not;
* random residual ReLU networks, every failure set of vectors with later failures, failed values at the
  ends of the range and random, box corners and random inputs, run in onnxruntime by the independent
  injector of ``tests/ort_faults.py``, stay within the counted signed bound itself (not only its minimum
  with the other bounds), which lowers ``fep_tight`` of the vector in some draws and never raises it;
* the same injection finds errors above the counted bound with its failure terms dropped.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from ort_faults import FaultRunner
from test_signed_residual import _bound, _conv_residual, _residual, _save, _worst

from robaudit import limits
from robaudit.bounds.fep import FailureModel
from robaudit.bounds.zeroed import ZeroedDeviations, largest_sum, vector_signed_bound
from robaudit.errors import OptionError

#: Vectors with a failing layer after another failing one (the counted pass applies to them).
LATER = ([1, 1, 0, 0], [1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [2, 0, 1, 0])


def test_largest_sum_against_sorting():
    rng = np.random.default_rng(0)
    values = rng.random((4, 3, 7))
    for count in range(0, 9):
        expected = -np.sort(-values, axis=-1)[..., :count].sum(axis=-1)
        assert np.allclose(largest_sum(values, count) if count else 0.0, expected)


def _halved_terms(self, layer, coef):
    return 0.5 * ORIGINAL_TERMS(self, layer, coef)


ORIGINAL_TERMS = ZeroedDeviations._site_terms
WEAKENED = {
    "failure terms dropped": lambda self, layer, coef: 0.0,
    "failure terms halved": _halved_terms,
}


def _chain(rng: np.random.Generator, width: int, scale: float):
    """x[3] → h1 = relu(fc1 x) → h2 = fc2 h1 → h3 = fc3 h2 → y = fc4 h3 (sites h1-h3; h2 and h3 without
    activation: their chord slopes are exactly 1, so only the counted zeroed gates change κ)."""
    nodes, inits = [], []
    sizes = [(3, width), (width, width), (width, width), (width, 2)]
    for n, (n_in, n_out) in enumerate(sizes, start=1):
        w = rng.normal(0.0, scale / np.sqrt(n_in), (n_out, n_in))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"fc{n}_w"),
                  numpy_helper.from_array(rng.normal(0.0, 0.3, n_out).astype(np.float32), f"fc{n}_b")]
        x = "x" if n == 1 else f"h{n - 1}"
        out = "z1" if n == 1 else ("y" if n == 4 else f"h{n}")
        nodes.append(helper.make_node("Gemm", [x, f"fc{n}_w", f"fc{n}_b"], [out], name=f"fc{n}", transB=1))
        if n == 1:
            nodes.append(helper.make_node("Relu", ["z1"], ["h1"], name="act1"))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    return make_model(graph)


def _chain_kappa_outside(counts: list[int], seed: int) -> bool:
    """Whether κ_1(S) = w4·D3·w3·D2·w2 (numpy; every zeroed set |S_m| ≤ f_m of layers 2 and 3) falls outside
    the counted enclosure of the chain of :func:`_chain` (origin the first hidden layer)."""
    rng = np.random.default_rng(seed)
    model = _chain(rng, 3, 2.0)
    with tempfile.TemporaryDirectory() as tmp:
        bound = _bound(_save(model, Path(tmp)), FailureModel.crash())
    signed = bound.signed
    assert signed is not None
    hidden = bound.analysis.hidden
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    w2, w3, w4 = (weights[f"fc{n}_w"] for n in (2, 3, 4))
    failing = {id(hidden[j]): counts[j] for j in (1, 2) if counts[j] > 0}
    lower, upper = ZeroedDeviations(bound.network, signed.exact_slopes, signed.hulls, failing).coefficient_bounds(
        hidden[0]
    )
    for s2 in itertools.combinations(range(3), counts[1]):
        for s3 in itertools.combinations(range(3), counts[2]):
            d2, d3 = np.ones(3), np.ones(3)
            d2[list(s2)], d3[list(s3)] = 0.0, 0.0
            kappa = w4 @ np.diag(d3) @ w3 @ np.diag(d2) @ w2
            if np.any(kappa < lower - 1e-9) or np.any(kappa > upper + 1e-9):
                return True
    return False


def test_counted_coefficients_hold_on_a_chain():
    for seed in range(4):
        for counts in ([1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 2, 1]):
            assert not _chain_kappa_outside(counts, seed), (seed, counts)


def _kappa_outside(counts: list[int], seed: int = 3) -> bool:
    """Whether some κ_1(λ, S) (numpy; random λ in the chord-slope box, random zeroed sets |S_m| ≤ f_m)
    falls outside the counted enclosure, origin the first hidden layer, ``counts`` for layers 2-4."""
    rng = np.random.default_rng(seed)
    model = _residual(rng, 3, "dense", 2.5)
    with tempfile.TemporaryDirectory() as tmp:
        bound = _bound(_save(model, Path(tmp)), FailureModel.crash())
    signed = bound.signed
    assert signed is not None
    net, hidden = bound.network, bound.analysis.hidden
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    w2, w3, w4, w5 = (weights[f"fc{n}_w"] for n in (2, 3, 4, 5))
    hull = {v: (box.lo.ravel(), box.hi.ravel()) for v, box in signed.hulls.items()}

    def relu_box(lo, hi):  # chord slopes of a ReLU over [lo, hi], written again
        return np.where(lo >= 0, 1.0, 0.0), np.where(hi > 0, 1.0, 0.0)

    by_name = {node.output[0]: node for node in model.graph.node}
    boxes = [relu_box(*hull["z3"]), relu_box(*hull[by_name["r1"].input[0]]), relu_box(*hull[by_name["r2"].input[0]])]
    failing = {id(hidden[j]): counts[j] for j in (1, 2, 3) if counts[j] > 0}
    lower, upper = ZeroedDeviations(net, signed.exact_slopes, signed.hulls, failing).coefficient_bounds(hidden[0])
    for trial in range(600):
        lam3, lam_r1, lam_r2 = (
            np.where(rng.random(lo.size) < 0.5, lo, hi) if trial % 2 else lo + (hi - lo) * rng.random(lo.size)
            for lo, hi in boxes
        )
        keep = []
        for j in (1, 2, 3):  # at most f_m zeroed gates in each later layer
            mask = np.ones(3)
            mask[rng.permutation(3)[: rng.integers(0, counts[j] + 1)]] = 0.0
            keep.append(np.diag(mask))
        d2, d3, d4 = keep
        inner = np.eye(3) + d4 @ w4 @ d3 @ np.diag(lam3) @ w3
        kappa = w5 @ np.diag(lam_r2) @ inner @ np.diag(lam_r1) @ (np.eye(3) + d2 @ w2)
        if np.any(kappa < lower - 1e-9) or np.any(kappa > upper + 1e-9):
            return True
    return False


@pytest.mark.parametrize("counts", [[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 2, 0]])
def test_counted_coefficients_hold_every_zeroed_set(counts):
    assert not _kappa_outside(counts)


@pytest.mark.parametrize("weakened", list(WEAKENED))
def test_weakened_failure_terms_are_caught_by_the_coefficient_check(weakened, monkeypatch):
    monkeypatch.setattr(ZeroedDeviations, "_site_terms", WEAKENED[weakened])
    assert any(_chain_kappa_outside(counts, seed) for counts in ([1, 1, 0], [1, 1, 1]) for seed in range(4))


def _counted(bound, counts: list[int]) -> float | None:
    """The counted signed bound itself (max over outputs), without its minimum with the other bounds'
    per-output values but for the stored signed terms it is built from."""
    assert bound.signed is not None
    found = vector_signed_bound(bound.signed, counts, bound.layer_terms(counts))
    return None if found is None else float(found.max())


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    st.integers(2, 3),
    st.sampled_from(["dense", "mean"]),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(1.0, 3.0),
    st.integers(0, 2**31),
)
def test_counted_signed_bound_is_sound(tmp_path_factory, width, head, mode, scale, seed):
    rng = np.random.default_rng(seed)
    model = _residual(rng, width, head, scale)
    path = _save(model, tmp_path_factory.mktemp("zeroed"))
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    bound = _bound(path, failure)
    for counts in LATER:
        counted = _counted(bound, counts)
        assert counted is not None
        worst = _worst(model, width, counts, failure.failure_range, rng)
        assert worst <= counted * (1 + 1e-5) + 1e-6, (width, head, mode, scale, counts, worst, counted)
        assert bound.refined(counts) <= bound.fep(counts) * (1 + 1e-12)


def test_the_counted_bound_lowers_fep_tight(tmp_path):
    """In some draws the vector's bound drops below ``fep`` (whose signed terms open every later gate)."""
    lowered = []
    for seed in range(2):
        path = _save(_residual(np.random.default_rng(seed), 3, "dense", 2.0), tmp_path)
        bound = _bound(path, FailureModel.crash())
        for counts in LATER:
            lowered.append(bound.refined(counts) < bound.fep(counts) * (1 - 1e-6))
    assert any(lowered), lowered


def test_budget_zero_turns_it_off(tmp_path, monkeypatch):
    path = _save(_residual(np.random.default_rng(0), 3, "dense", 2.0), tmp_path)
    bound = _bound(path, FailureModel.crash())
    counted = bound.refined([1, 1, 1, 1])
    monkeypatch.setenv("ROBAUDIT_ZEROED_BUDGET", "0")
    assert _counted(bound, [1, 1, 1, 1]) is None
    assert counted <= bound.refined([1, 1, 1, 1]) <= bound.fep([1, 1, 1, 1])


def test_dropped_failure_terms_are_caught_by_injection(tmp_path, monkeypatch):
    """The injection finds errors above the counted bound once its failure terms are dropped (some draw);
    the rule as it is holds on the same draws."""
    caught = False
    for seed in range(24):
        model = _residual(np.random.default_rng(seed), 2, "dense", 2.0)
        path = _save(model, tmp_path)
        bound = _bound(path, FailureModel.crash())
        for counts in ([1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]):
            worst = _worst(model, 2, counts, (0.0, 0.0), np.random.default_rng(seed))
            counted = _counted(bound, counts)
            assert counted is not None and worst <= counted * (1 + 1e-5) + 1e-6
            with monkeypatch.context() as patch:
                patch.setattr(ZeroedDeviations, "_site_terms", WEAKENED["failure terms dropped"])
                weak = _counted(bound, counts)
            assert weak is not None
            if worst > weak * (1 + 1e-5) + 1e-6:
                caught = True
                break
        if caught:
            break
    assert caught


def test_the_budget_is_read_when_used(monkeypatch):
    monkeypatch.delenv("ROBAUDIT_ZEROED_BUDGET", raising=False)
    assert limits.zeroed_budget() == 5e9
    monkeypatch.setenv("ROBAUDIT_ZEROED_BUDGET", "2e3")
    assert limits.zeroed_budget() == 2000.0
    monkeypatch.setenv("ROBAUDIT_ZEROED_BUDGET", "lots")
    with pytest.raises(OptionError, match="ROBAUDIT_ZEROED_BUDGET"):
        limits.zeroed_budget()


@settings(max_examples=3, deadline=None, derandomize=True)
@given(st.sampled_from(["crash", "byzantine"]), st.floats(1.0, 3.0), st.integers(0, 2**31))
def test_counted_bound_on_a_conv_residual_is_sound(tmp_path_factory, mode, scale, seed):
    """Convolutions, a residual merge and a global average pool (the second site without activation, as in
    the trained ResNet): every pair of one failed neuron in each layer, failed values at the ends of the
    range, box corners and random inputs, against the independent injector and the counted bound itself."""
    rng = np.random.default_rng(seed)
    model = _conv_residual(rng, 2, scale)
    bound = _bound(_save(model, tmp_path_factory.mktemp("conv")), FailureModel.crash() if mode == "crash"
                   else FailureModel.byzantine(1.0))
    counted = _counted(bound, [1, 1])
    assert counted is not None
    a, b = bound.analysis.failure.failure_range
    runner = FaultRunner(model, ["h1", "h2"], [(2, 3, 3), (2, 3, 3)])
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=9)))[rng.choice(512, 12, replace=False)]
    x = np.concatenate([corners, rng.uniform(0, 1, (12, 9))]).reshape(-1, 1, 3, 3)
    clean = runner.clean(x).astype(np.float64)
    worst = 0.0
    for i, j in itertools.product(range(18), repeat=2):
        keeps, repls = [], []
        for chosen in (i, j):
            keep, repl = np.ones((len(x), 18)), np.zeros((len(x), 18))
            keep[:, chosen] = 0.0
            repl[:, chosen] = rng.choice([a, b], len(x))
            keeps.append(keep.reshape(-1, 2, 3, 3))
            repls.append(repl.reshape(-1, 2, 3, 3))
        worst = max(worst, float(np.abs(runner.run(x, keeps, repls).astype(np.float64) - clean).max()))
    assert worst <= counted * (1 + 1e-5) + 1e-6, (mode, scale, worst, counted)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.integers(2, 3),
    st.sampled_from(["dense", "mean"]),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(0.5, 4.0),
    st.integers(0, 2**31),
)
def test_counted_signed_bound_campaign(tmp_path_factory, width, head, mode, scale, seed):
    """The soundness check above on 40 draws (``make test-slow``)."""
    test_counted_signed_bound_is_sound.hypothesis.inner_test(tmp_path_factory, width, head, mode, scale, seed)
