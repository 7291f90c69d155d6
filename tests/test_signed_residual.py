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
import os

import numpy as np
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from ort_faults import FaultRunner

import robaudit.bounds.certify as certify
import robaudit.bounds.relational as relational
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


def rule_lowers_soundly(tmp_path, mode: str, seeds, vectors, monkeypatch, knob: str) -> list[bool]:
    """The tightened bound of §5.6 itself (not its minimum with the other bounds), with the rule whose budget is
    the environment variable ``knob`` turned off and on, against the independent injector; per draw, whether the
    rule lowered it (it must never raise it)."""
    from robaudit.bounds.tightened import tightened_signed_bound

    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    lowered = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        model = _residual(rng, 3, "dense", 2.5)
        bound = _bound(_save(model, tmp_path), failure)
        assert bound.signed is not None
        for counts in vectors:
            stacked = bound.layer_terms(counts)
            ceiling = np.full(stacked.shape[1], np.inf)
            monkeypatch.setenv(knob, "0")
            before = tightened_signed_bound(bound.signed, counts, stacked, ceiling)
            monkeypatch.delenv(knob)
            found = tightened_signed_bound(bound.signed, counts, stacked, ceiling)
            assert before is not None and found is not None
            worst = _worst(model, 3, counts, failure.failure_range, rng)
            assert worst <= found.max() * (1 + 1e-5) + 1e-6, (seed, mode, counts, worst, found.max())
            assert np.all(found <= before * (1 + 1e-12) + 1e-12)
            lowered.append(float(found.max()) < float(before.max()) * (1 - 1e-6))
    return lowered


@settings(max_examples=6, deadline=None, derandomize=True)
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


def _without_new_rules(patch) -> None:
    """The signed pass as it was: absolute fallback at stand-alone activations and reductions, no relaxation."""
    patch.setattr(certify, "node_chord_slopes", lambda node, lo, hi, *constants: None)
    patch.setattr(certify, "LINEAR_REDUCTIONS", ("AveragePool",))
    patch.setenv("ROBAUDIT_RELATIONAL_BUDGET", "0")


def test_the_rules_lower_the_bound(tmp_path, monkeypatch):
    """On random residual networks the stand-alone and reduction rules, then the relaxation of the gated
    deviation network, then its pre-gate boxes tightened by their own back-substitution, make ``fep_tight``
    smaller in some draws (never larger, but for the last step, whose boxes only shrink)."""
    lowered, relaxed, refined = [], [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        path = _save(_residual(rng, 3, ["dense", "mean"][seed % 2], 2.0), tmp_path)
        full = _bound(path, FailureModel.crash())
        with monkeypatch.context() as patch:
            patch.setattr(relational, "refine_cost", lambda net, origin: np.inf)
            unrefined = _bound(path, FailureModel.crash())
            patch.setenv("ROBAUDIT_RELATIONAL_BUDGET", "0")
            rules_only = _bound(path, FailureModel.crash())
            _without_new_rules(patch)
            before = _bound(path, FailureModel.crash())
        for counts in VECTORS:
            new, middle, old = full.fep(counts), rules_only.fep(counts), before.fep(counts)
            assert new <= middle * (1 + 1e-9) and middle <= old * (1 + 1e-12), (seed, counts, new, middle, old)
            lowered.append(middle < old * (1 - 1e-6))
            relaxed.append(new < middle * (1 - 1e-6))
            refined.append(new < unrefined.fep(counts) * (1 - 1e-6))
    assert any(lowered) and any(relaxed) and any(refined), (lowered, relaxed, refined)


def _halved(node, lo, hi, *constants):
    slopes = ORIGINAL_SLOPES(node, lo, hi, *constants)
    return None if slopes is None else (slopes[0] / 2, slopes[1] / 2)


def _no_zero_side(node, lo, hi, *constants):
    slopes = ORIGINAL_SLOPES(node, lo, hi, *constants)
    return None if slopes is None else (slopes[1], slopes[1])


def _one_sided_lines(a, b, lo, hi):
    """The gate lines as if every pre-gate deviation were ≥ 0: t between a·s and b·s, no chord."""
    return a + 0 * lo, 0 * lo, b + 0 * lo, 0 * lo


def _shrunk_bounds(self, origin):
    lower, upper = ORIGINAL_BOUNDS(self, origin)
    mid, rad = (lower + upper) / 2, (upper - lower) / 2
    return mid - 0.9 * rad, mid + 0.9 * rad


ORIGINAL_SLOPES = certify.node_chord_slopes
ORIGINAL_BOUNDS = relational.GatedDeviations.coefficient_bounds
WEAKENED = {
    "stand-alone slopes halved": [(certify, "node_chord_slopes", _halved), (relational, "node_chord_slopes", _halved),
                                  (os.environ, "ROBAUDIT_RELATIONAL_BUDGET", "0")],
    "stand-alone ReLU without its 0 side": [(certify, "node_chord_slopes", _no_zero_side),
                                            (os.environ, "ROBAUDIT_RELATIONAL_BUDGET", "0")],
    "gate lines without the chord": [(relational, "gate_lines", _one_sided_lines)],
    "relaxed coefficients shrunk 10 %": [(relational.GatedDeviations, "coefficient_bounds", _shrunk_bounds)],
}


@pytest.mark.parametrize("weakened", list(WEAKENED))
def test_weakened_rules_are_caught(weakened, tmp_path, monkeypatch):
    """The same injection finds errors above the bound once a rule is weakened (some draw among a few
    networks); the rules as they are hold on the same draws."""
    caught = False
    for seed in range(16):
        rng = np.random.default_rng(seed)
        model = _residual(rng, 2, "dense", 2.0)
        path = _save(model, tmp_path)
        for counts in ([1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]):
            worst = _worst(model, 2, counts, (0.0, 0.0), np.random.default_rng(seed))
            assert worst <= _bound(path, FailureModel.crash()).fep(counts) * (1 + 1e-5) + 1e-6
            with monkeypatch.context() as patch:
                for owner, name, value in WEAKENED[weakened]:
                    if owner is os.environ:
                        patch.setenv(name, value)
                    else:
                        patch.setattr(owner, name, value)
                weak = _bound(path, FailureModel.crash()).fep(counts)
            if worst > weak * (1 + 1e-5) + 1e-6:
                caught = True
                break
        if caught:
            break
    assert caught


def _conv_residual(rng: np.random.Generator, channels: int, scale: float):
    """x[1, 3, 3] → h1 = relu(conv1 x) → h2 = conv2 h1 → r1 = relu(h1 + h2) → GlobalAveragePool → Flatten →
    y = fc r (3×3 kernels, padding 1: every layer [channels, 3, 3])."""
    nodes, inits = [], []

    def conv(name: str, x: str, c_in: int, out: str) -> None:
        w = rng.normal(0.0, scale / np.sqrt(9 * c_in), (channels, c_in, 3, 3))
        b = rng.normal(0.0, 0.3, channels)
        inits.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                      numpy_helper.from_array(b.astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1, 1, 1, 1]))

    conv("conv1", "x", 1, "z1")
    nodes.append(helper.make_node("Relu", ["z1"], ["h1"], name="act1"))
    conv("conv2", "h1", channels, "h2")
    nodes += [helper.make_node("Add", ["h1", "h2"], ["s1"], name="add1"),
              helper.make_node("Relu", ["s1"], ["r1"], name="merge1"),
              helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat")]
    w = rng.normal(0.0, 1.0, (2, channels))
    inits.extend([numpy_helper.from_array(w.astype(np.float32), "fc_w"),
                  numpy_helper.from_array(np.zeros(2, np.float32), "fc_b")])
    nodes.append(helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "conv_residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    return make_model(graph)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(st.sampled_from(["crash", "byzantine"]), st.floats(1.0, 3.0), st.integers(0, 2**31))
def test_conv_residual_is_sound(tmp_path_factory, mode, scale, seed):
    """Convolutions, a residual merge and a global average pool: every failure set of one or two neurons
    of either layer and 150 random sets of one neuron in each, against the independent injector."""
    rng = np.random.default_rng(seed)
    model = _conv_residual(rng, 2, scale)
    path = _save(model, tmp_path_factory.mktemp("conv"))
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    bound = _bound(path, failure)
    assert bound.signed is not None and all(r is not None for r in bound.signed.relational[0])
    a, b = failure.failure_range
    runner = FaultRunner(model, ["h1", "h2"], [(2, 3, 3), (2, 3, 3)])
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=9)))[rng.choice(512, 16, replace=False)]
    x = np.concatenate([corners, rng.uniform(0, 1, (16, 9))]).reshape(-1, 1, 3, 3)
    clean = runner.clean(x).astype(np.float64)
    sets = {(1, 0): [((i,), ()) for i in range(18)], (0, 1): [((), (i,)) for i in range(18)],
            (2, 0): [(c, ()) for c in itertools.combinations(range(18), 2)],
            (1, 1): [((int(i),), (int(j),)) for i, j in rng.integers(0, 18, (150, 2))]}
    for counts, choices in sets.items():
        worst = 0.0
        for choice in choices:
            keeps, repls = [], []
            for chosen in choice:
                keep, repl = np.ones((len(x), 18)), np.zeros((len(x), 18))
                keep[:, list(chosen)] = 0.0
                repl[:, list(chosen)] = rng.choice([a, b], (len(x), len(chosen)))
                keeps.append(keep.reshape(-1, 2, 3, 3))
                repls.append(repl.reshape(-1, 2, 3, 3))
            worst = max(worst, float(np.abs(runner.run(x, keeps, repls).astype(np.float64) - clean).max()))
        fep = bound.fep(list(counts))
        assert worst <= fep * (1 + 1e-5) + 1e-6, (mode, scale, counts, worst, fep)


def test_coefficient_bounds_hold_every_chord_slope(tmp_path):
    """κ_i(λ) computed in plain numpy for λ at random vertices and interior points of the chord-slope box
    lies in the relaxed [lower, upper] of every origin neuron and output (dense residual network)."""
    assert not _kappa_outside(tmp_path)


def test_chordless_gate_lines_are_caught_by_the_coefficient_check(tmp_path, monkeypatch):
    monkeypatch.setattr(relational, "gate_lines", _one_sided_lines)
    assert _kappa_outside(tmp_path)


def _kappa_outside(tmp_path) -> bool:
    """Whether some κ_i(λ) (numpy, random λ in the box) falls outside the relaxed bounds."""
    rng = np.random.default_rng(3)
    model = _residual(rng, 3, "dense", 2.5)
    path = _save(model, tmp_path)
    bound = _bound(path, FailureModel.crash())
    net = bound.network
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    w2, w3, w4, w5 = (weights[f"fc{n}_w"] for n in (2, 3, 4, 5))
    hidden = bound.analysis.hidden
    assert bound.signed is not None
    faulty = bound.analysis.faulty()  # the boxes of the signed pass: clean-and-faulty hulls
    hull = {v: (np.minimum(box.lo, faulty[v].lo).ravel(), np.maximum(box.hi, faulty[v].hi).ravel())
            for v, box in net.clean.items()}

    def relu_box(lo, hi):  # chord slopes of a ReLU over [lo, hi], written again
        return np.where(lo >= 0, 1.0, 0.0), np.where(hi > 0, 1.0, 0.0)

    by_name = {node.output[0]: node for node in model.graph.node}
    l3 = relu_box(*hull["z3"])
    r1 = relu_box(*hull[by_name["r1"].input[0]])
    r2 = relu_box(*hull[by_name["r2"].input[0]])
    relaxed = bound.signed.relational[0][0]
    assert relaxed is not None
    lower, upper = relaxed  # origin: the first hidden layer, no later failure
    for trial in range(400):
        pick = [np.where(rng.random(lo.size) < 0.5, lo, hi) if trial % 2 else lo + (hi - lo) * rng.random(lo.size)
                for lo, hi in (l3, r1, r2)]
        lam3, lam_r1, lam_r2 = pick
        kappa = w5 @ np.diag(lam_r2) @ (np.eye(3) + w4 @ np.diag(lam3) @ w3) @ np.diag(lam_r1) @ (np.eye(3) + w2)
        if np.any(kappa < lower - 1e-9) or np.any(kappa > upper + 1e-9):
            return True
    assert hidden[0].neurons == 3
    return False
