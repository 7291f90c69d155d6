"""Signed terms through residual merges (docs/method.md §4.5): a stand-alone activation (the ReLU after a
residual ``Add``) carries the signed coefficients through its chord slopes, and averages and sums
(``ReduceMean``, ``GlobalAveragePool``) through their exact linear adjoint.

* small random residual ReLU networks (two blocks ``relu(h + fc(relu(fc(h))))``, a dense or a mean
  head; crash and byzantine): every failure set, failed values at the ends of the range and random,
  box corners and random inputs, run in onnxruntime by the independent injector of
  ``tests/ort_faults.py``, stay within ``fep_tight``; the new rules lower the bound in some draws;
* the same check with the stand-alone chord slopes halved, or with the 0 side of a switching ReLU
  dropped (slope 1 only), finds faults above the bound.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from ort_faults import FaultRunner

import robaudit.bounds.certify as certify
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions

#: Hidden layers: fc1 (ReLU), fc2 (none), merge; fc3 (ReLU), fc4 (none), merge.
SITES = ["h1", "h2", "h3", "h4"]
VECTORS = ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1], [2, 0, 0, 0])


def _residual(rng: np.random.Generator, width: int, head: str, scale: float):
    """x[3] → h1 = relu(fc1 x) → h2 = fc2 h1 → r1 = relu(h1 + h2) → h3 = relu(fc3 r1) → h4 = fc4 h3 →
    r2 = relu(r1 + h4) → y = fc5 r2 (``dense``) or fc5 mean(r2) (``mean``)."""
    nodes, inits = [], []

    def gemm(name: str, x: str, n_in: int, n_out: int, out: str) -> None:
        w = rng.normal(0.0, scale / np.sqrt(n_in), (n_out, n_in))
        b = rng.normal(0.0, 0.3, n_out)
        inits.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                      numpy_helper.from_array(b.astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Gemm", [x, f"{name}_w", f"{name}_b"], [out], name=name, transB=1))

    gemm("fc1", "x", 3, width, "z1")
    nodes.append(helper.make_node("Relu", ["z1"], ["h1"], name="act1"))
    gemm("fc2", "h1", width, width, "h2")
    nodes += [helper.make_node("Add", ["h1", "h2"], ["s1"], name="add1"),
              helper.make_node("Relu", ["s1"], ["r1"], name="merge1")]
    gemm("fc3", "r1", width, width, "z3")
    nodes.append(helper.make_node("Relu", ["z3"], ["h3"], name="act3"))
    gemm("fc4", "h3", width, width, "h4")
    nodes += [helper.make_node("Add", ["r1", "h4"], ["s2"], name="add2"),
              helper.make_node("Relu", ["s2"], ["r2"], name="merge2")]
    if head == "mean":
        nodes.append(helper.make_node("ReduceMean", ["r2"], ["m"], name="mean", axes=[1], keepdims=1))
        gemm("fc5", "m", 1, 2, "y")
    else:
        gemm("fc5", "r2", width, 2, "y")
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    return make_model(graph)


def _inputs(rng: np.random.Generator, count: int = 24) -> np.ndarray:
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=3)))
    return np.concatenate([corners, rng.uniform(0, 1, (count, 3))])


def _worst(model, width: int, counts: list[int], failure_range: tuple[float, float], rng) -> float:
    """max over every failure set with ``counts`` per site, failed values at the ends of the range and one
    random, and the inputs of :func:`_inputs`, of max_k |F̃_k − F_k|, by onnxruntime (tests/ort_faults.py)."""
    a, b = failure_range
    runner = FaultRunner(model, SITES, [(width,)] * len(SITES))
    x = _inputs(rng)
    clean = runner.clean(x).astype(np.float64)
    sets = [list(itertools.combinations(range(width), min(f, width))) for f in counts]
    worst = 0.0
    for choice in itertools.product(*sets):
        for _ in range(1 if a == b else 4):
            keeps, repls = [], []
            for chosen in choice:
                keep, repl = np.ones((len(x), width)), np.zeros((len(x), width))
                keep[:, list(chosen)] = 0.0
                repl[:, list(chosen)] = rng.choice([a, b, rng.uniform(a, b)], (len(x), len(chosen)))
                keeps.append(keep)
                repls.append(repl)
            faulty = runner.run(x, keeps, repls).astype(np.float64)
            worst = max(worst, float(np.abs(faulty - clean).max()))
    return worst


def _bound(path, failure: FailureModel) -> TightBound:
    _, net = load_network(path, NetworkOptions())
    return TightBound(Analysis(net, failure))


def _save(model, directory) -> str:
    path = directory / "residual.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    st.integers(2, 3),
    st.sampled_from(["dense", "mean"]),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(1.0, 3.0),
    st.integers(0, 2**31),
)
def test_signed_residual_terms_are_sound(tmp_path_factory, width, head, mode, scale, seed):
    rng = np.random.default_rng(seed)
    model = _residual(rng, width, head, scale)
    path = _save(model, tmp_path_factory.mktemp("residual"))
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    bound = _bound(path, failure)
    assert bound.signed is not None
    for counts in VECTORS:
        worst = _worst(model, width, counts, failure.failure_range, rng)
        fep = bound.fep(counts)
        assert worst <= fep * (1 + 1e-5) + 1e-6, (width, head, mode, scale, counts, worst, fep)


def test_the_rules_lower_the_bound(tmp_path, monkeypatch):
    """On random residual networks the stand-alone and reduction rules make the signed terms (and so
    ``fep_tight``) smaller in some draws: without them every coefficient after a merge loses its sign."""
    lowered = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        path = _save(_residual(rng, 3, ["dense", "mean"][seed % 2], 2.0), tmp_path)
        with_rules = _bound(path, FailureModel.crash())
        with monkeypatch.context() as patch:
            patch.setattr(certify, "node_chord_slopes", lambda node, lo, hi: None)
            patch.setattr(certify, "LINEAR_REDUCTIONS", ("AveragePool",))
            without = _bound(path, FailureModel.crash())
        for counts in VECTORS:
            new, old = with_rules.fep(counts), without.fep(counts)
            assert new <= old * (1 + 1e-12), (seed, counts, new, old)  # only ever tighter
            lowered.append(new < old * (1 - 1e-6))
    assert any(lowered)


def _halved(node, lo, hi):
    slopes = ORIGINAL(node, lo, hi)
    return None if slopes is None else (slopes[0] / 2, slopes[1] / 2)


def _no_zero_side(node, lo, hi):
    slopes = ORIGINAL(node, lo, hi)
    return None if slopes is None else (slopes[1], slopes[1])


ORIGINAL = certify.node_chord_slopes


@pytest.mark.parametrize("weakened", [_halved, _no_zero_side])
def test_weakened_stand_alone_slopes_are_caught(weakened, tmp_path, monkeypatch):
    """The same injection finds errors above the bound once the stand-alone ReLU's chord slopes are
    halved, or lose the 0 of a ReLU that may switch (some draw among a few networks)."""
    caught = False
    for seed in range(12):
        rng = np.random.default_rng(seed)
        model = _residual(rng, 2, "dense", 2.0)
        path = _save(model, tmp_path)
        for counts in ([1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]):
            worst = _worst(model, 2, counts, (0.0, 0.0), np.random.default_rng(seed))
            assert worst <= _bound(path, FailureModel.crash()).fep(counts) * (1 + 1e-5) + 1e-6
            with monkeypatch.context() as patch:
                patch.setattr(certify, "node_chord_slopes", weakened)
                weak = _bound(path, FailureModel.crash()).fep(counts)
            if worst > weak * (1 + 1e-5) + 1e-6:
                caught = True
                break
        if caught:
            break
    assert caught
