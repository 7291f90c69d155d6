"""The affine image of a normalization's output by the 2-norm of its rows (docs/method.md §13.1): x = γ⊙z + β with
‖z‖₂ ≤ √n (and Σ z = 0 for LayerNorm) puts (x @ W)_j within β·W_j ± √n·‖a_j‖₂, a_j = γ⊙W_j less its mean for
LayerNorm. Checked against numpy (points of LayerNorm/RMSNorm, and the point that reaches the radius) and against
onnxruntime (the boxes and the tight bound on models with a LayerNormalization op and a written-out RMSNorm);
the radius shrunk by 10 % and RMSNorm read as centred are caught."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import failure_rows, fault_errors, make_model, ort_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import robaudit.bounds.ranges as ranges_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.errors import UnsupportedModelError
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import affine
from robaudit.graph.ops.affine import normalized_image
from robaudit.graph.ops.base import Interval, NormalizedRows

WIDE = 1e9


def _normalize(x: np.ndarray, eps: float, centred: bool) -> np.ndarray:
    """Independent reference: LayerNorm (centred) or RMSNorm over the last axis, without γ and β."""
    if centred:
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def _image(gamma, beta, weight, bias, centred) -> Interval:
    """The rule's image of a box too wide to matter: the 2-norm alone decides."""
    n, m = weight.shape
    wide = NormalizedRows(np.full((1, n), -WIDE), np.full((1, n), WIDE), gamma=gamma, beta=beta, centred=centred)
    return normalized_image(Interval(np.full((1, m), -WIDE), np.full((1, m), WIDE)), wide, weight, bias)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12), m=st.integers(1, 5), centred=st.booleans(),
       eps=st.sampled_from([1e-12, 1e-5, 0.1]))
def test_every_normalized_row_lies_in_the_image(seed, n, m, centred, eps):
    rng = np.random.default_rng(seed)
    gamma, beta = rng.normal(size=n) * rng.choice([0.1, 1.0, 5.0]), rng.normal(size=n)
    weight, bias = rng.normal(size=(n, m)), rng.normal(size=m)
    image = _image(gamma, beta, weight, bias, centred)
    x = rng.normal(size=(400, n)) * rng.choice([1e-3, 1.0, 1e3], size=(400, 1))
    x[:50] = rng.normal(size=(50, n)) + 100 * rng.normal(size=(1, n))  # rows far from 0, little spread
    y = (gamma * _normalize(x, eps, centred) + beta) @ weight + bias
    slack = 1e-9 * (1 + np.abs(y))
    assert np.all(y >= image.lo - slack) and np.all(y <= image.hi + slack)


def _reaching_row(gamma, weight, column: int, centred: bool) -> np.ndarray:
    """An input whose normalized row z = √n·a/‖a‖ (a = γ⊙W_j, centred for LayerNorm) reaches the radius."""
    a = gamma * weight[:, column]
    if centred:
        a = a - a.mean()
    return 1e6 * a  # with ε ≪ var, normalizing a·t gives √n·a/‖a‖ (a centred has mean 0)


def test_the_radius_is_reached_and_shrinking_it_is_caught():
    rng = np.random.default_rng(7)
    n, m = 8, 3
    gamma, beta, weight = rng.normal(size=n), rng.normal(size=n), rng.normal(size=(n, m))
    for centred in (True, False):
        image = _image(gamma, beta, weight, None, centred)
        x = _reaching_row(gamma, weight, 1, centred)[None, :]
        y = (gamma * _normalize(x, 1e-12, centred) + beta) @ weight
        a = gamma * weight[:, 1] - (gamma * weight[:, 1]).mean() * centred
        assert math.isclose(y[0, 1], beta @ weight[:, 1] + math.sqrt(n) * np.linalg.norm(a), rel_tol=1e-9)
        assert y[0, 1] <= image.hi[0, 1] and y[0, 1] >= image.hi[0, 1] - 1e-6 * abs(image.hi[0, 1])
        centre = beta @ weight[:, 1]
        shrunk = centre + 0.9 * (image.hi[0, 1] - centre)
        assert y[0, 1] > shrunk


def test_rmsnorm_read_as_centred_is_caught():
    """Weakened: an RMSNorm's rows claimed to sum to 0 (LayerNorm's claim) — the centred radius is smaller, and a
    row of RMSNorm leaves it."""
    rng = np.random.default_rng(3)
    n, m = 8, 2
    gamma, beta, weight = rng.uniform(0.5, 1.5, n), np.zeros(n), np.abs(rng.normal(size=(n, m)))
    claimed = _image(gamma, beta, weight, None, centred=True)
    x = _reaching_row(gamma, weight, 0, centred=False)[None, :]
    y = (gamma * _normalize(x, 1e-12, centred=False) + beta) @ weight
    assert y[0, 0] > claimed.hi[0, 0]


def _normalized_model(seed: int, rms: bool, affine_shape: tuple[int, ...] = (6,)) -> onnx.ModelProto:
    """x [N, 3] → MatMul + Add 'h' [N, 6] (a layer) → LayerNormalization (op) or RMSNorm written out → MatMul + Add
    'g' [N, 4] (a layer) → Relu → MatMul → y [N, 2]."""
    rng = np.random.default_rng(seed)
    consts = {"W1": rng.normal(size=(3, 6)) * 2, "b1": rng.normal(size=6), "gamma": rng.normal(size=6),
              "beta": rng.normal(size=6), "W2": rng.normal(size=(6, 4)), "b2": rng.normal(size=4),
              "W3": rng.normal(size=(4, 2)), "eps": np.array(1e-5), "two": np.array(2.0)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h_m"], name="mm1"),
             helper.make_node("Add", ["h_m", "b1"], ["h"], name="add1")]
    if rms:
        nodes += [helper.make_node("Pow", ["h", "two"], ["sq"], name="sq"),
                  helper.make_node("ReduceMean", ["sq"], ["ms"], name="ms", axes=[-1], keepdims=1),
                  helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="ms_eps"),
                  helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms"),
                  helper.make_node("Div", ["h", "rms"], ["z"], name="z"),
                  helper.make_node("Mul", ["z", "gamma"], ["zg"], name="zg"),
                  helper.make_node("Add", ["zg", "beta"], ["normed"], name="normed")]
    else:
        nodes += [helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["normed"], name="ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["normed", "W2"], ["g_m"], name="mm2"),
              helper.make_node("Add", ["g_m", "b2"], ["g"], name="add2"),
              helper.make_node("Relu", ["g"], ["a"], name="relu2"),
              helper.make_node("MatMul", ["a", "W3"], ["y"], name="out")]
    consts["gamma"], consts["beta"] = consts["gamma"].reshape(affine_shape), consts["beta"].reshape(affine_shape)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "normalized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return make_model(graph, 17)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), rms=st.booleans())
def test_boxes_and_bound_hold_against_onnxruntime(tmp_path, seed, rms):
    """The box of the layer after the normalization holds onnxruntime's values, and the tight bound of crashes in
    'h' (before the normalization), 'g' (after it) and both holds every error onnxruntime measures."""
    model = _normalized_model(seed, rms)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    rng = np.random.default_rng(seed)
    inputs = np.concatenate([rng.integers(0, 2, (32, 3)), rng.random((32, 3))]).astype(np.float32)
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name="g"))
    seen = ort_session(probe).run(["g"], {"x": inputs})[0].astype(np.float64)
    box, slack = network.clean["g"], 1e-5 * (1 + np.abs(seen))
    assert np.all(seen >= box.lo - slack) and np.all(seen <= box.hi + slack)
    tight = TightBound(Analysis(network, FailureModel.crash()))
    for counts in ([1, 0], [0, 1], [2, 1]):
        rows = failure_rows([6, 4], counts, (0.0, 0.0), inputs[:6], rng)
        measured = fault_errors(model, ["h", "g"], [6, 4], rows).max()
        assert measured <= tight.fep(counts) * (1 + 1e-5) + 1e-6


def test_the_shrunk_radius_is_caught_on_onnxruntime_values(tmp_path, monkeypatch):
    """Weakened: the rule's radius shrunk by 10 % on a model whose normalized rows reach it (the layer before the
    normalization spans every direction): onnxruntime's values of the next layer leave the box."""
    model = _normalized_model(11, rms=False)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    inputs = np.random.default_rng(0).random((20000, 3)).astype(np.float32)
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name="g_m"))
    seen = ort_session(probe).run(["g_m"], {"x": inputs})[0].astype(np.float64)
    original = affine.normalized_image

    def shrunk(box, x, weight, bias):
        kept = original(box, x, weight, bias)
        centre = x.beta @ weight + (0.0 if bias is None else bias)
        return Interval(centre + 0.9 * (kept.lo - centre), centre + 0.9 * (kept.hi - centre))

    def outside() -> int:
        _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
        box = network.clean["g_m"]
        return int(np.sum((seen < box.lo - 1e-6) | (seen > box.hi + 1e-6)))

    assert outside() == 0
    monkeypatch.setattr(affine, "normalized_image", shrunk)
    assert outside() > 0


def _written_out_layernorm(seed: int) -> tuple[onnx.ModelProto, dict]:
    """x [N, 3] → MatMul + Add 'h' [N, 6] → LayerNorm written out (opset < 17 exporters) → Mul γ → Add β → MatMul W
    'g' [N, 4] → y; the constants."""
    rng = np.random.default_rng(seed)
    c = {"W1": rng.normal(size=(3, 6)) * 2, "b1": rng.normal(size=6), "gamma": rng.normal(size=6) * 3,
         "beta": rng.normal(size=6) * 2, "W2": rng.normal(size=(6, 4)), "eps": np.array(1e-5), "two": np.array(2.0),
         "ones": np.ones((4, 1))}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h_m"], name="mm1"),
             helper.make_node("Add", ["h_m", "b1"], ["h"], name="add1"),
             helper.make_node("ReduceMean", ["h"], ["mu"], name="mu", axes=[-1], keepdims=1),
             helper.make_node("Sub", ["h", "mu"], ["d"], name="d"),
             helper.make_node("Pow", ["d", "two"], ["sq"], name="sq"),
             helper.make_node("ReduceMean", ["sq"], ["var"], name="var", axes=[-1], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["var_eps"], name="var_eps"),
             helper.make_node("Sqrt", ["var_eps"], ["sd"], name="sd"),
             helper.make_node("Div", ["d", "sd"], ["z"], name="z"),
             helper.make_node("Mul", ["z", "gamma"], ["zg"], name="zg"),
             helper.make_node("Add", ["zg", "beta"], ["normed"], name="normed"),
             helper.make_node("MatMul", ["normed", "W2"], ["g"], name="mm2"),
             helper.make_node("MatMul", ["g", "ones"], ["y"], name="out")]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in c.items()]
    graph = helper.make_graph(nodes, "written", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    return make_model(graph, 13), {k: np.asarray(v, np.float32).astype(np.float64) for k, v in c.items()}


def _closed_form(c: dict) -> tuple[np.ndarray, np.ndarray]:
    """β·W ± √n·‖γ⊙W_j less its mean‖₂, by hand from the constants."""
    a = c["gamma"][:, None] * c["W2"]
    a = a - a.mean(axis=0, keepdims=True)
    radius = math.sqrt(6) * np.sqrt((a**2).sum(axis=0))
    centre = c["beta"] @ c["W2"]
    return centre - radius, centre + radius


def test_a_written_out_layernorm_with_its_own_mul_and_add_keeps_the_radius(tmp_path, monkeypatch):
    """γ and β applied by separate Mul and Add (exports before opset 17) carry the rows' γ and β along: the box of
    the next layer is within the closed form and holds onnxruntime's values; a copy that forgets to scale β by
    the Mul's scale is caught (onnxruntime's values leave the box)."""
    model, consts = _written_out_layernorm(4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    lo, hi = _closed_form(consts)
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    box = network.clean["g"]
    assert np.all(box.lo >= lo - 1e-6 * (1 + np.abs(lo))) and np.all(box.hi <= hi + 1e-6 * (1 + np.abs(hi)))
    inputs = np.random.default_rng(0).random((20000, 3)).astype(np.float32)
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name="g"))
    seen = ort_session(probe).run(["g"], {"x": inputs})[0].astype(np.float64)

    def outside() -> int:
        _, net = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
        return int(np.sum((seen < net.clean["g"].lo - 1e-5) | (seen > net.clean["g"].hi + 1e-5)))

    assert outside() == 0
    original = affine._along_last_axis
    calls: list = []

    def scale_forgotten(constant, x):  # each map asks for its scale, then its shift: the scale read as 1
        calls.append(constant)
        row = original(constant, x)
        return np.ones_like(row) if row is not None and len(calls) % 2 == 1 else row

    monkeypatch.setattr(affine, "_along_last_axis", scale_forgotten)
    assert outside() > 0


def test_a_scale_and_bias_of_shape_1_n_read_as_n(tmp_path):
    """LayerNormalization with γ, β [1, 6] on an input [N, 6] (onnxruntime accepts it; robaudit refused it): the
    box of the next layer holds onnxruntime's values, the tight bound its errors, and both equal those of the
    same model with γ, β [6]."""
    results = []
    for shape in ((1, 6), (6,)):
        model = _normalized_model(5, rms=False, affine_shape=shape)
        path = tmp_path / f"m{len(shape)}.onnx"
        onnx.save(model, path)
        _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
        rng = np.random.default_rng(2)
        inputs = np.concatenate([rng.integers(0, 2, (32, 3)), rng.random((32, 3))]).astype(np.float32)
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        probe.graph.output.append(onnx.ValueInfoProto(name="g"))
        seen = ort_session(probe).run(["g"], {"x": inputs})[0].astype(np.float64)
        box = network.clean["g"]
        assert np.all(seen >= box.lo - 1e-5) and np.all(seen <= box.hi + 1e-5)
        fep = TightBound(Analysis(network, FailureModel.crash())).fep([1, 1])
        measured = fault_errors(model, ["h", "g"], [6, 4], failure_rows([6, 4], [1, 1], (0.0, 0.0), inputs[:4], rng))
        assert measured.max() <= fep * (1 + 1e-5) + 1e-6
        results.append((box.lo, box.hi, fep))
    assert np.array_equal(results[0][0], results[1][0]) and results[0][2] == results[1][2]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), n=st.integers(2, 9), centred=st.booleans())
def test_back_substituted_lines_over_normalized_rows(seed, rows, n, centred):
    """The back-substitution's bound of grad·x over normalized rows (each row of x free): at least grad·x for rows
    normalized by numpy, and reached — to 10⁻⁹ — by each row's z = √n·a/‖a‖ (a = g⊙γ, centred for LayerNorm); a
    radius shrunk 10 % is caught by that point."""
    rng = np.random.default_rng(seed)
    gamma, beta = rng.normal(size=n) * 2, rng.normal(size=n)
    grad = rng.normal(size=(3, 1, rows, n))
    box = NormalizedRows(np.full((1, rows, n), -WIDE), np.full((1, rows, n), WIDE), gamma=gamma, beta=beta,
                         centred=centred)
    upper = ranges_module._over_normalized_rows(grad, box)
    x = gamma * _normalize(rng.normal(size=(200, rows, n)) * 3, 1e-5, centred) + beta
    values = np.einsum("krn,srn->ks", grad[:, 0], x)
    assert np.all(values <= upper[:, None] + 1e-9 * (1 + np.abs(upper[:, None])))
    a = grad[:, 0] * gamma
    if centred:
        a = a - a.mean(axis=-1, keepdims=True)
    z = math.sqrt(n) * a / np.linalg.norm(a, axis=-1, keepdims=True)
    reached = np.einsum("krn,krn->k", grad[:, 0], gamma * z + beta)
    scale = math.sqrt(n) * np.linalg.norm(a, axis=-1).sum(axis=-1) + np.abs(grad[:, 0] * beta).sum(axis=(1, 2))
    assert np.all(np.abs(reached - upper) <= 1e-8 * (1 + scale))
    centre = np.einsum("krn,n->k", grad[:, 0], beta)
    assert np.all(reached > centre + 0.9 * (upper - centre) + 1e-12)


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_a_negative_epsilon_is_refused(tmp_path, op):
    """ε < 0 makes |z| exceed √n (var + ε < var): every normalization rule assumes otherwise, so the model is
    refused in one line naming op and node (an attack helper measured z = ±3.16 against robaudit's box [1, −1])."""
    if op == "RMSNormalization":
        pytest.importorskip("onnx", minversion="1.18")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    node = helper.make_node(op, ["x", "gamma"], ["y"], name="norm", axis=-1, epsilon=-0.5)
    graph = helper.make_graph([node], "eps", [x], [y], [numpy_helper.from_array(np.ones(2, np.float32), "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23 if op == "RMSNormalization" else 17)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModelError, match="negative epsilon"):
        load_network(path, NetworkOptions(input_range=(0.0, 1.0)))


def _offset_layer_norm(tmp_path, offset: float):
    """x ∈ [0, 1] → h = Relu(x·w + offset) (4 neurons, w = [0, 1.775, 0, 0]) → LayerNormalization → y = z[1] (an
    attack helper's model)."""
    from onnx import TensorProto as TP

    weights = np.zeros((1, 4), np.float32)
    weights[0, 1] = 1.7751633
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"]), helper.make_node("Add", ["m0", "b0"], ["a0"]),
             helper.make_node("Relu", ["a0"], ["h0"]),
             helper.make_node("LayerNormalization", ["h0", "g", "be"], ["ln"], axis=-1, epsilon=1e-5),
             helper.make_node("Gather", ["ln", "one"], ["y"], axis=1)]
    arrays = {"w0": weights, "b0": np.full(4, offset, np.float32), "g": np.ones(4, np.float32),
              "be": np.zeros(4, np.float32), "one": np.array([1], np.int64)}
    inits = [numpy_helper.from_array(array, name) for name, array in arrays.items()]
    graph = helper.make_graph(nodes, "offset", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"offset{offset:g}.onnx"
    onnx.save(model, path)
    return model, path


def test_a_mean_far_above_the_spread_gets_a_note_where_onnxruntime_strays(tmp_path):
    """With a mean of 2·10⁶ and a spread below 1, onnxruntime's float32 LayerNormalization gives |z| = 2.0 where the
    exact value is at most √3 (the mean rounded to float32): bound says its exact-arithmetic rules may not cover
    it; with a mean of 1 it computes the exact value and nothing is said."""
    from conftest import cli_json

    for offset, strays in ((2098520.25, True), (1.0, False)):
        model, path = _offset_layer_norm(tmp_path, offset)
        session = onnxruntime.InferenceSession(model.SerializeToString())
        computed = float(session.run(None, {"x": np.array([[0.92]], np.float32)})[0].max())
        assert (computed > np.sqrt(3) * 1.01) == strays, computed
        notes = cli_json("bound", path, "--crash", "1", "-e", "1")["notes"]
        assert any("onnxruntime's float32 kernel" in n for n in notes) == strays, notes
