"""Cuts at a normalization's output (docs/method.md §4.1, "Cuts at a normalization's output"): whatever
fails before a LayerNorm / RMSNorm, its output stays in its clean-and-faulty hull and each normalized
group moves by at most 2√n in the 2-norm (times |γ|), so the failures behind it cost at most
Σ_g min(Σ_j P·W, 2√n·‖P⊙|γ|‖₂).

* two hand-built models where the cut is exact: the 2-norm radius (a group flipped to its opposite,
  8·σ/√(σ² + ε)) and the widths (one element from +√3 to −√3), both reached by onnxruntime; each
  rule weakened by 10 % gives a bound below the measured error;
* random networks with a LayerNorm (the op, or written out op by op) or an RMSNorm between layers
  (hypothesis): every failure set, byzantine values at the ends and random, corner and random
  inputs, run in onnxruntime, stay within ``fep_tight``, and the cut is what binds in some.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import failure_rows, fault_errors, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import robaudit.bounds.ranges as ranges
import robaudit.bounds.tight as tight
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import affine

EPSILON = 1e-5


def _const(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _dense(name: str, x: str, w: np.ndarray, b: np.ndarray, out: str, act: str | None) -> tuple[list, list]:
    """Gemm (W [out, in]) and its activation."""
    pre = f"{name}_pre" if act else out
    nodes = [helper.make_node("Gemm", [x, f"{name}_w", f"{name}_b"], [pre], name=name, transB=1)]
    if act:
        nodes.append(helper.make_node(act, [pre], [out], name=f"{name}_act"))
    return nodes, [_const(f"{name}_w", w), _const(f"{name}_b", b)]


def _normalization(kind: str, x: str, out: str, gamma: np.ndarray, beta: np.ndarray) -> tuple[list, list]:
    """LayerNormalization (the op), the same written out op by op, or an RMSNorm written out; γ, β last."""
    inits = [_const("gamma", gamma), _const("beta", beta), _const("eps", EPSILON), _const("two", 2.0)]
    if kind == "layernorm":
        node = helper.make_node("LayerNormalization", [x, "gamma", "beta"], [out], axis=-1, epsilon=EPSILON)
        return [node], inits
    nodes = []
    if kind == "decomposed":
        nodes += [
            helper.make_node("ReduceMean", [x], ["mu"], axes=[-1], keepdims=1),
            helper.make_node("Sub", [x, "mu"], ["d"]),
        ]
        centred = "d"
    else:
        centred = x
    nodes += [
        helper.make_node("Pow", [centred, "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["sigma"]),
        helper.make_node("Div", [centred, "sigma"], ["z"]),
        helper.make_node("Mul", ["z", "gamma"], ["zg"]),
        helper.make_node("Add", ["zg", "beta"], [out]),
    ]
    return nodes, inits


def _model(parts: list[tuple[list, list]], inputs: int, outputs: int):
    nodes = [n for part, _ in parts for n in part]
    inits = [i for _, part in parts for i in part]
    graph = helper.make_graph(
        nodes,
        "normalized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        inits,
    )
    return make_model(graph)


def _measured(model, values: list[str], sizes: list[int], rows) -> float:
    """max over ``rows`` (x, keeps, injects) of max_k |F̃_k − F_k|, by onnxruntime."""
    return float(fault_errors(model, values, sizes, rows).max())


def _bound(path, failure: FailureModel, counts: list[int]) -> float:
    _, net = load_network(path, NetworkOptions())
    return TightBound(Analysis(net, failure)).fep(counts)


def _one_layer_then_norm(tmp_path, name: str, b: np.ndarray, w_in: np.ndarray, w_out: np.ndarray):
    """h = relu(w_in·x + b) (4 neurons, the failure site), z = LayerNorm(h) (γ = 1, β = 0), y = w_out·z."""
    parts = [
        _dense("fc1", "x", w_in.reshape(4, 1), b, "h", "Relu"),
        _normalization("layernorm", "h", "z", np.ones(4), np.zeros(4)),
        ([helper.make_node("MatMul", ["z", "w_out"], ["y"], name="head")], [_const("w_out", w_out.reshape(4, 1))]),
    ]
    model = _model(parts, 1, 1)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return model, path


def test_the_norm_radius_is_exact_when_a_group_flips_and_a_shrunk_radius_is_caught(tmp_path, monkeypatch):
    # clean h = (1, 0, 1, 0) for every x: z = (1, −1, 1, −1)·s, s = ½/√(¼ + ε); failures send (0, 1, 0, 1):
    # z̃ = −z, and y = (1, −1, 1, −1)·z moves by 8·s, what 2√n·‖w_out‖₂ = 2·2·2 gives up to s
    alternating = np.array([1.0, -1, 1, -1])
    model, path = _one_layer_then_norm(tmp_path, "flip", np.array([1.0, 0, 1, 0]), np.zeros(4), alternating)
    failure = FailureModel.byzantine(failure_range=(0.0, 1.0))
    rows = [(np.array([0.5]), [np.zeros(4)], [np.array([0.0, 1, 0, 1])])]
    measured = _measured(model, ["h"], [4], rows)
    assert measured == pytest.approx(8 * 0.5 / np.sqrt(0.25 + EPSILON), rel=1e-6)
    bound = _bound(path, failure, [4])
    assert measured <= bound <= 8.0 * (1 + 2e-6), (measured, bound)
    monkeypatch.setattr(tight, "normalization_cuts", lambda an: [])
    # the output's box by the 2-norm of the normalized rows (method.md §13.1, in IBP and in the back-substitution)
    # gives the output cut the same 8 here: without all three, the sensitivity products
    monkeypatch.setattr(affine, "normalized_image", lambda box, x, weight, bias: box)
    monkeypatch.setattr(ranges, "_over_normalized_rows", lambda grad, box: np.full(grad.shape[0], np.inf))
    assert _bound(path, failure, [4]) > 1.2 * bound
    monkeypatch.undo()
    shrunk = tight.NormalizationCut.cost

    def weakened(self, sens):
        self.radius *= 0.9
        return shrunk(self, sens)

    monkeypatch.setattr(tight.NormalizationCut, "cost", weakened)
    assert _bound(path, failure, [4]) < measured * (1 - 0.05)


def test_the_widths_are_exact_when_one_element_swings_and_shrunk_widths_are_caught(tmp_path, monkeypatch):
    # h = (x, 0, 0, 0): z_1 = (3x/4)/√(3x²/16 + ε) ≈ √3 at x = 1; failures send h̃ = (0, 1, 1, 1), z̃_1 ≈ −√3;
    # y = z_1 moves by 2√3 = the width of z_1's hull, below the radius 2√n·|w| = 4 (the output cut of
    # §4.1 finds 2√3 here too; the widths shrunk are caught through the minimum of both)
    first = np.array([1.0, 0, 0, 0])
    model, path = _one_layer_then_norm(tmp_path, "swing", np.zeros(4), first, first)
    failure = FailureModel.byzantine(failure_range=(0.0, 1.0))
    rows = [(np.array([1.0]), [np.zeros(4)], [np.array([0.0, 1, 1, 1])])]
    measured = _measured(model, ["h"], [4], rows)
    assert measured == pytest.approx(2 * np.sqrt(3.0), rel=1e-4)
    bound = _bound(path, failure, [4])
    assert measured <= bound * (1 + 1e-6) and bound <= 2 * np.sqrt(3.0) * (1 + 1e-5), (measured, bound)
    original = tight.normalization_cuts

    def shrunk(analysis):
        cuts = original(analysis)
        for cut in cuts:
            cut.widths = 0.9 * cut.widths
        return cuts

    monkeypatch.setattr(tight, "normalization_cuts", shrunk)
    assert _bound(path, failure, [4]) < measured * (1 - 0.05)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    st.sampled_from(["layernorm", "decomposed", "rms"]),
    st.sampled_from(["crash", "byzantine"]),
    st.sampled_from(["Relu", "Tanh", None]),
    st.booleans(),
    st.booleans(),
    st.floats(2.0, 8.0),
    st.integers(0, 2**31),
)
def test_normalization_cuts_are_sound(tmp_path_factory, kind, mode, second, after, skip, scale, seed):
    """fc1 (ReLU) → fc2 → normalization → [fc3 (ReLU)] → output, the output also reading fc1 when ``skip``
    (fc1 then has a path around the cut: its failures count outside it)."""
    rng = np.random.default_rng(seed)
    parts = [
        _dense("fc1", "x", rng.normal(0, scale, (3, 2)), rng.normal(0, 1, 3), "h1", "Relu"),
        _dense("fc2", "h1", rng.normal(0, scale, (4, 3)), rng.normal(0, 1, 4), "h2", second),
        _normalization(kind, "h2", "n", rng.uniform(0.2, 2.0, 4) * rng.choice([-1, 1], 4), rng.normal(0, 1, 4)),
    ]
    values, sizes, last = ["h1", "h2"], [3, 4], "n"
    if after:
        parts.append(_dense("fc3", "n", rng.normal(0, scale, (3, 4)), rng.normal(0, 1, 3), "h3", "Relu"))
        values, sizes, last = values + ["h3"], sizes + [3], "h3"
    reads = sizes[-1] if after else 4
    if skip:  # the output layer reads [last, h1]
        parts.append(([helper.make_node("Concat", [last, "h1"], ["both"], axis=1)], []))
        last, reads = "both", reads + 3
    head = [helper.make_node("MatMul", [last, "w_out"], ["y"], name="head")]
    inits = [_const("w_out", rng.normal(0, 1, (reads, 2)))]
    parts.append((head, inits))
    model = _model(parts, 2, 2)
    path = tmp_path_factory.mktemp("norm") / "net.onnx"
    path.write_bytes(model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    assert [la.output_value for la in net.hidden_layers] == values
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=(-2.0, 3.0))
    inputs = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=2)]
    inputs += list(rng.uniform(0, 1, (10, 2)))
    bound = TightBound(Analysis(net, failure))
    for counts in ([1, 1, 0], [0, 2, 0], [2, 4, 0], [1, 1, 1]):
        counts = counts[: len(sizes)]
        fep = bound.fep(counts)
        worst = _measured(model, values, sizes, failure_rows(sizes, counts, failure.failure_range, inputs, rng))
        assert worst <= fep * (1 + 1e-5) + 1e-6, (kind, mode, second, after, skip, counts, worst, fep)


def test_the_cut_binds_on_some_random_networks(tmp_path, monkeypatch):
    """The property test above exercises the cut: on these draws it lowers the bound (else it would test
    nothing new) — against the bound without it and without the output's box by the 2-norm of the normalized rows
    (method.md §13.1), which on a LayerNorm right before the output gives the output cut a similar figure."""
    lowered = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        parts = [
            _dense("fc1", "x", rng.normal(0, 3, (3, 2)), rng.normal(0, 1, 3), "h1", "Relu"),
            _dense("fc2", "h1", rng.normal(0, 3, (4, 3)), rng.normal(0, 1, 4), "h2", None),
            _normalization("layernorm", "h2", "n", rng.uniform(0.2, 2.0, 4), rng.normal(0, 1, 4)),
            _dense("out", "n", rng.normal(0, 1, (2, 4)), rng.normal(0, 1, 2), "y", None),
        ]
        path = tmp_path / f"net{seed}.onnx"
        path.write_bytes(_model(parts, 2, 2).SerializeToString())
        failure = FailureModel.byzantine(failure_range=(-2.0, 3.0))
        with_cut = _bound(path, failure, [2, 2])
        with monkeypatch.context() as patched:
            patched.setattr(tight, "normalization_cuts", lambda an: [])
            patched.setattr(affine, "normalized_image", lambda box, x, weight, bias: box)
            patched.setattr(ranges, "_over_normalized_rows", lambda grad, box: np.full(grad.shape[0], np.inf))
            without = _bound(path, failure, [2, 2])
        assert with_cut <= without
        lowered += with_cut < 0.9 * without
    assert lowered >= 3


def test_a_bound_that_is_the_outputs_whole_reach_says_so(tmp_path):
    """The 'flip' model: y = (1, −1, 1, −1)·z with z a LayerNorm's output lies in [−4, 4] whatever fails (2√n·‖w‖₂
    reached), so one failure in [0, 1] and four give the same bound, 8 — the report says it is the output's whole reach
    (width 8, by hand); a bound below the reach (the sample LeNet) gets no such note."""
    import json

    from conftest import SAMPLES, run_in_process

    _, path = _one_layer_then_norm(tmp_path, "flip", np.array([1.0, 0, 1, 0]), np.zeros(4), np.array([1.0, -1, 1, -1]))
    for count in ("1", "4"):
        report = json.loads(run_in_process("bound", path, "--byzantine", count, "--failure-range", "0,1", "-q",
                                           "--format", "json").stdout)
        notes = [n for n in report["notes"] if "whole reach" in n]
        assert report["fep"] == pytest.approx(8.0, rel=1e-4) and len(notes) == 1 and "width 8," in notes[0]
    lenet = json.loads(run_in_process("bound", SAMPLES / "lenet.onnx", "--crash", "1", "-q", "--format", "json").stdout)
    assert not any("whole reach" in n for n in lenet["notes"])
