"""ONNX GRU and LSTM (docs/method.md §14): the unrolled graph against onnxruntime's own op, the
product rule of the gates against exhaustive evaluation, and the refusals."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.errors import UnsupportedModelError
from robaudit.graph.onnx_graph import build_graph
from robaudit.graph.ops import Interval
from robaudit.graph.ops.recurrent_cell import update_coefficients, update_interval
from robaudit.graph.recurrent import unroll_recurrent

GATES = {"GRU": 3, "LSTM": 4}


def cell_model(
    op: str,
    steps: int,
    batch: int,
    features: int,
    hidden: int,
    direction: str,
    rng: np.random.Generator,
    *,
    bias: bool = True,
    initial: bool = False,
    linear_before_reset: int = 0,
    scale: float = 1.0,
    **attrs,
) -> onnx.ModelProto:
    """One GRU/LSTM node with X (and initial states when ``initial``) as graph inputs, every output used."""
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    inits = [
        numpy_helper.from_array(
            (scale * rng.standard_normal((dirs, gates * hidden, features))).astype(np.float32), "W"
        ),
        numpy_helper.from_array((scale * rng.standard_normal((dirs, gates * hidden, hidden))).astype(np.float32), "R"),
    ]
    inputs = ["X", "W", "R"]
    if bias:
        inits.append(
            numpy_helper.from_array((scale * rng.standard_normal((dirs, 2 * gates * hidden))).astype(np.float32), "B")
        )
        inputs.append("B")
    else:
        inputs.append("")
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, features])]
    inputs.append("")  # sequence_lens
    if initial:
        names = ["h0"] + (["c0"] if op == "LSTM" else [])
        inputs += names
        graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dirs, batch, hidden]) for n in names]
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    if op == "GRU":
        attrs["linear_before_reset"] = linear_before_reset
    node = helper.make_node(op, inputs, outputs, name="cell", hidden_size=hidden, direction=direction, **attrs)
    graph = helper.make_graph(
        [node],
        "cell",
        graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unrolled(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its recurrent node unrolled by robaudit (shapes from the graph inputs)."""
    graph = build_graph(model)
    shapes = {i.name: tuple(i.dims) for i in graph.inputs}

    def inputs_of(g, node):
        return [
            None if not v else Interval(np.zeros(shapes[v]), np.zeros(shapes[v])) if v in shapes else g.initializers[v]
            for v in node.inputs
        ]

    new = unroll_recurrent(graph, inputs_of, lambda node: "cell")
    protos = [n.proto for n in new.nodes]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in new.initializers.items()]
    out = helper.make_graph(protos, "unrolled", list(model.graph.input), list(model.graph.output), inits)
    return helper.make_model(out, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@settings(max_examples=30, deadline=None)
@given(
    op=st.sampled_from(["GRU", "LSTM"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    steps=st.integers(1, 4),
    batch=st.integers(1, 3),
    features=st.integers(1, 4),
    hidden=st.integers(1, 4),
    bias=st.booleans(),
    initial=st.booleans(),
    linear_before_reset=st.integers(0, 1),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_unrolled_cell_matches_onnxruntime(
    op, direction, steps, batch, features, hidden, bias, initial, linear_before_reset, scale, seed
):
    """Every output (Y, Y_h, Y_c) of the unrolled graph equals onnxruntime's GRU/LSTM to float32 rounding."""
    rng = np.random.default_rng(seed)
    model = cell_model(
        op, steps, batch, features, hidden, direction, rng,
        bias=bias, initial=initial, linear_before_reset=linear_before_reset, scale=scale,
    )  # fmt: skip
    dirs = 2 if direction == "bidirectional" else 1
    feeds = {"X": rng.uniform(-2, 2, (steps, batch, features)).astype(np.float32)}
    if initial:
        feeds["h0"] = rng.uniform(-1, 1, (dirs, batch, hidden)).astype(np.float32)
        if op == "LSTM":
            feeds["c0"] = rng.uniform(-2, 2, (dirs, batch, hidden)).astype(np.float32)
    expected = run(model, feeds)
    got = run(unrolled(model), feeds)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize(
    ("op", "attrs", "words"),
    [
        ("GRU", {"clip": 1.0}, "clip"),
        ("GRU", {"activations": ["Relu", "Tanh"]}, "activations [Relu, Tanh]"),
        ("LSTM", {"input_forget": 1}, "input_forget"),
        ("LSTM", {"layout": 1}, "layout=1"),
    ],
)
def test_unsupported_forms_are_refused_by_name(op, attrs, words):
    model = cell_model(op, 2, 1, 2, 2, "forward", np.random.default_rng(0), **attrs)
    with pytest.raises(UnsupportedModelError) as caught:
        unrolled(model)
    message = str(caught.value)
    assert f"unsupported op '{op}'" in message and "node 'cell'" in message and words in message


# --------------------------------------------------------------------------- the GRU state update


def _boxes(rng: np.random.Generator, size: int):
    """Clean boxes of z (inside [0, 1]), n and h, and a faulty box of z holding the clean one."""
    z = np.sort(rng.uniform(0, 1, (2, size)), axis=0)
    zf = np.stack([rng.uniform(0, z[0]), rng.uniform(z[1], 1)])
    n = np.sort(rng.uniform(-1, 1, (2, size)), axis=0)
    h = np.sort(rng.uniform(-2, 2, (2, size)), axis=0)
    return Interval(*z), Interval(*zf), Interval(*n), Interval(*h)


def _points(rng: np.random.Generator, box: Interval, count: int) -> np.ndarray:
    """Corners and uniform points of a box, [count, size]."""
    corners = np.where(rng.random((count, *box.lo.shape)) < 0.5, box.lo, box.hi)
    inner = rng.uniform(box.lo, box.hi, (count, *box.lo.shape))
    return np.where(rng.random((count, 1)) < 0.5, corners, inner)


def _update(z, n, h):
    return (1 - z) * n + z * h


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_update_interval_and_coefficients_hold(seed):
    """y = (1 − z)·n + z·h: every value lies in its interval, every change within c_n|Δn| + c_h|Δh| + c_z|Δz|
    (z̃ from the faulty box of z, n, h clean, ñ, h̃ anywhere)."""
    rng = np.random.default_rng(seed)
    z, zf, n, h = _boxes(rng, 6)
    box = update_interval(z, n, h)
    c_n, c_h, c_z = update_coefficients(zf, n, h)
    zs, ns, hs = _points(rng, z, 400), _points(rng, n, 400), _points(rng, h, 400)
    values = _update(zs, ns, hs)
    assert np.all(values >= box.lo - 1e-12) and np.all(values <= box.hi + 1e-12)
    z2 = _points(rng, zf, 400)
    n2, h2 = ns + rng.uniform(-2, 2, ns.shape), hs + rng.uniform(-2, 2, hs.shape)
    change = np.abs(_update(z2, n2, h2) - values)
    assert np.all(change <= c_n * np.abs(n2 - ns) + c_h * np.abs(h2 - hs) + c_z * np.abs(z2 - zs) + 1e-12)


@pytest.mark.parametrize("weakened", ["interval", "c_n", "c_h", "c_z"])
def test_weakened_update_rule_is_caught(weakened):
    """The same checks with the interval shrunk by 10 % or one coefficient × 0.9 fail."""
    rng = np.random.default_rng(0)
    z, zf, n, h = _boxes(rng, 6)
    zs, ns, hs = _points(rng, z, 2000), _points(rng, n, 2000), _points(rng, h, 2000)
    values = _update(zs, ns, hs)
    if weakened == "interval":
        box = update_interval(z, n, h)
        mid, half = (box.lo + box.hi) / 2, 0.9 * (box.hi - box.lo) / 2
        assert np.any((values < mid - half) | (values > mid + half))
        return
    c_n, c_h, c_z = update_coefficients(zf, n, h)
    factors = {name: 0.9 if name == weakened else 1.0 for name in ("c_n", "c_h", "c_z")}
    z2 = _points(rng, zf, 2000)
    # one deviation at a time: the coefficient alone must cover it
    dn = np.where(weakened == "c_n", rng.choice([-1.0, 1.0], ns.shape), 0.0)
    dh = np.where(weakened == "c_h", rng.choice([-1.0, 1.0], hs.shape), 0.0)
    z2 = z2 if weakened == "c_z" else np.where(rng.random(zs.shape) < 0.5, zf.lo, zf.hi)
    zs_used = zs if weakened == "c_z" else z2
    change = np.abs(_update(z2, ns + dn, hs + dh) - _update(zs_used, ns, hs))
    limit = (
        factors["c_n"] * c_n * np.abs(dn)
        + factors["c_h"] * c_h * np.abs(dh)
        + factors["c_z"] * c_z * np.abs(z2 - zs_used)
    )
    assert np.any(change > limit + 1e-12)


# --------------------------------------------------------------------------- initial states as inputs


def state_model(path, op: str = "GRU", direction: str = "forward") -> None:
    """x [1, 4, 3] → Transpose → GRU/LSTM with its initial states as graph inputs → Y_h → MatMul."""
    rng = np.random.default_rng(0)
    dirs, hidden, gates = (2 if direction == "bidirectional" else 1), 5, GATES[op]
    inits = [
        numpy_helper.from_array((0.5 * rng.standard_normal((dirs, gates * hidden, 3))).astype(np.float32), "W"),
        numpy_helper.from_array((0.5 * rng.standard_normal((dirs, gates * hidden, hidden))).astype(np.float32), "R"),
        numpy_helper.from_array((0.5 * rng.standard_normal((dirs * hidden, 2))).astype(np.float32), "Wo"),
        numpy_helper.from_array(np.array([1, dirs * hidden], np.int64), "flat"),
    ]
    states = ["h0"] + (["c0"] if op == "LSTM" else [])
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node(op, ["xt", "W", "R", "", "", *states], ["", "hT"], hidden_size=hidden, direction=direction),
        helper.make_node("Transpose", ["hT"], ["hb"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["hb", "flat"], ["h"]),
        helper.make_node("MatMul", ["h", "Wo"], ["y"], name="out"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])] + [
        helper.make_tensor_value_info(s, TensorProto.FLOAT, [dirs, 1, hidden]) for s in states
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize(("op", "direction"), [("GRU", "forward"), ("LSTM", "reverse")])
def test_initial_states_as_inputs(tmp_path, op, direction):
    """Ranged states are bounded over their whole box (at least the bound of any held value, which
    ``inject --search worst`` stays under); inject refuses a ranged state in one line."""
    from conftest import run_in_process

    path = tmp_path / "state.onnx"
    state_model(path, op, direction)
    states = ["h0"] + (["c0"] if op == "LSTM" else [])
    ranged = [f for s in states for f in ("--input-range", f"{s}=-1,1")]
    wide = json.loads(run_in_process("bound", path, "--crash", "1", *ranged, "--format", "json").stdout)["fep"]
    rng = np.random.default_rng(0)
    for trial in range(1):
        held = []
        for s in states:
            value = tmp_path / f"{s}{trial}.npy"
            np.save(value, rng.uniform(-1, 1, (2 if direction == "bidirectional" else 1, 1, 5)).astype(np.float32))
            held += ["--input-value", f"{s}={value}"]
        narrow = json.loads(run_in_process("bound", path, "--crash", "1", *held, "--format", "json").stdout)["fep"]
        assert narrow <= wide * (1 + 1e-9)
        report = json.loads(
            run_in_process(
                "inject", path, "--crash", "1", *held, "--samples", "16", "--search", "worst", "--format", "json"
            ).stdout
        )
        (vector,) = report["vectors"]
        assert vector["violation"] is False and 0 < vector["measured"]["max"] <= vector["bound"]
    refused = run_in_process("inject", path, "--crash", "1", *ranged, expect=2)
    assert "recurrent state input '" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_bidirectional_state_input_is_refused_in_one_line(tmp_path):
    from conftest import run_in_process

    path = tmp_path / "state.onnx"
    state_model(path, "GRU", "bidirectional")
    refused = run_in_process("bound", path, "--crash", "1", expect=2)
    assert "unsupported op 'GRU'" in refused.stderr and "initial state 'h0'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_time_first_graph_input_is_refused_in_one_line(tmp_path):
    from conftest import run_in_process

    path = tmp_path / "cell.onnx"
    onnx.save(cell_model("GRU", 3, 1, 2, 2, "forward", np.random.default_rng(0)), path)
    refused = run_in_process("bound", path, "--crash", "1", "--output", "Y_h", expect=2)
    assert "unsupported op 'GRU' at node 'cell'" in refused.stderr and "batch first" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def one_step_gru(path) -> float:
    """x ∈ [0, 1] → GRU (one step, one unit, constant update gate z = σ(0.5)) → y = h; returns the largest
    |h| over the domain, which is what crashing the unit changes y by (h = (1 − z)·tanh(2x − 0.5))."""
    w = np.zeros((1, 3, 1), np.float32)
    w[0, 2, 0] = 2.0
    b = np.zeros((1, 6), np.float32)
    b[0, 0], b[0, 2] = 0.5, -0.5
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.zeros((1, 3, 1), np.float32), "R"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "flat"),
        numpy_helper.from_array(np.ones((1, 1), np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["xt", "W", "R", "B"], ["", "hT"], hidden_size=1, name="gru"),
        helper.make_node("Reshape", ["hT", "flat"], ["h"]),
        helper.make_node("MatMul", ["h", "one"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    z = 1 / (1 + np.exp(-0.5))
    return float(np.max(np.abs((1 - z) * np.tanh(2 * np.linspace(0, 1, 10001) - 0.5))))


@pytest.mark.parametrize("weakened", [False, True])
def test_one_step_gru_bound_is_exact_and_a_shrunk_range_is_caught(tmp_path, monkeypatch, weakened):
    """Crashing the one unit of a one-step GRU changes y by |h| at most, exactly the bound; with the
    update's interval shrunk by 10 % the bound falls below that change."""
    from robaudit.bounds.audit import load_network
    from robaudit.bounds.fep import Analysis, FailureModel
    from robaudit.bounds.tight import TightBound
    from robaudit.graph.network import NetworkOptions
    from robaudit.graph.ops import recurrent_cell

    if weakened:
        exact = recurrent_cell.update_interval

        def shrunk(z, n, h):
            box = exact(z, n, h)
            mid, half = (box.lo + box.hi) / 2, 0.45 * (box.hi - box.lo)
            return Interval(mid - half, mid + half)

        monkeypatch.setattr(recurrent_cell, "update_interval", shrunk)
    path = tmp_path / "gru1.onnx"
    worst = one_step_gru(path)
    _, network = load_network(path, NetworkOptions(ranges="ibp"))
    bound = TightBound(Analysis(network, FailureModel.crash())).fep([1])
    if weakened:
        assert bound < worst * (1 - 1e-3)
    else:
        assert worst <= bound <= worst * (1 + 1e-6)


# --------------------------------------------------------------------------- soundness on random cells


def _onnx_cell(op, form, x, w, r, b, failed, hidden):
    """numpy forward of an ONNX GRU/LSTM (its own gate order), x [batch, T, I] batch first; hidden unit
    j = d·H + i sends failed[j] at every step. Returns Y as [batch, T, D, H]."""
    dirs = w.shape[0]
    batch, steps = x.shape[:2]
    out = np.zeros((batch, steps, dirs, hidden))
    for d in range(dirs):
        h, c = np.zeros((batch, hidden)), np.zeros((batch, hidden))
        order = range(steps - 1, -1, -1) if form["direction"] == "reverse" or d == 1 else range(steps)
        wb, rb = np.split(b[d], 2)
        for t in order:
            gx = x[:, t] @ w[d].T + wb
            if op == "GRU":
                gh = h @ r[d].T + rb
                z = 1 / (1 + np.exp(-(gx[:, :hidden] + gh[:, :hidden])))
                rr = 1 / (1 + np.exp(-(gx[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])))
                if form["linear_before_reset"]:
                    n = np.tanh(gx[:, 2 * hidden :] + rr * gh[:, 2 * hidden :])
                else:
                    n = np.tanh(gx[:, 2 * hidden :] + (rr * h) @ r[d][2 * hidden :].T + rb[2 * hidden :])
                h = (1 - z) * n + z * h
            else:
                g = gx + h @ r[d].T + rb
                i, o, f = (1 / (1 + np.exp(-g[:, k * hidden : (k + 1) * hidden])) for k in range(3))
                c = f * c + i * np.tanh(g[:, 3 * hidden :])
                h = o * np.tanh(c)
            h = h.copy()
            for unit, value in failed.items():
                if unit // hidden == d:
                    h[:, unit % hidden] = value
            out[:, t, d] = h
    return out


def random_classifier(path, op, form, steps, features, hidden, rng):
    """x [1, T, I] → Transpose → GRU/LSTM → Y → every step's state → MatMul → 2 outputs; returns the weights."""
    dirs = 2 if form["direction"] == "bidirectional" else 1
    gates = GATES[op]
    w = rng.uniform(-1.5, 1.5, (dirs, gates * hidden, features)).astype(np.float32)
    r = rng.uniform(-1.5, 1.5, (dirs, gates * hidden, hidden)).astype(np.float32)
    b = rng.uniform(-1, 1, (dirs, 2 * gates * hidden)).astype(np.float32)
    wo = rng.uniform(-1, 1, (steps * dirs * hidden, 2)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"), (wo, "Wo"))]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
    attrs = {"linear_before_reset": form["linear_before_reset"]} if op == "GRU" else {}
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node(op, ["xt", "W", "R", "B"], ["Y"], hidden_size=hidden, direction=form["direction"], **attrs),
        helper.make_node("Transpose", ["Y"], ["yb"], perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["yb", "flat"], ["states"]),
        helper.make_node("MatMul", ["states", "Wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return [a.astype(np.float64) for a in (w, r, b, wo)]


@settings(max_examples=12, deadline=None)
@given(
    op=st.sampled_from(["GRU", "LSTM"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    linear_before_reset=st.integers(0, 1),
    failed=st.integers(1, 2),
    mode=st.sampled_from(["crash", "byzantine"]),
    seed=st.integers(0, 2**16),
)
def test_every_failure_set_stays_under_the_bound(
    tmp_path_factory, op, direction, linear_before_reset, failed, mode, seed
):
    """Random cells (2 steps, 2 units per direction): every set of ``failed`` units, failing at every
    step with each extreme of the failure range, on domain corners and random inputs, computed by an
    independent numpy forward of the ONNX op, is under the bound (tight and paper)."""
    from robaudit.bounds.audit import load_network
    from robaudit.bounds.fep import Analysis, FailureModel, PaperBound
    from robaudit.bounds.tight import TightBound
    from robaudit.graph.network import NetworkOptions

    rng = np.random.default_rng(seed)
    form = {"direction": direction, "linear_before_reset": linear_before_reset}
    steps, features, hidden = 2, 2, 2
    path = tmp_path_factory.mktemp("cell") / "cell.onnx"
    w, r, b, wo = random_classifier(path, op, form, steps, features, hidden, rng)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=(-0.5, 1.0))
    _, network = load_network(path, NetworkOptions())
    (layer,) = network.hidden_layers
    analysis = Analysis(network, failure)
    tight, paper = TightBound(analysis).fep([failed]), PaperBound(analysis).fep([failed])
    corners = np.array(np.meshgrid(*[[0.0, 1.0]] * (steps * features))).reshape(steps * features, -1).T
    x = np.concatenate([corners, rng.uniform(0, 1, (64, steps * features))]).reshape(-1, steps, features)

    def output(chosen):
        return _onnx_cell(op, form, x, w, r, b, chosen, hidden).reshape(len(x), -1) @ wo

    clean = output({})
    np.testing.assert_allclose(run(onnx.load(path), {"x": x.astype(np.float32)})[0], clean, atol=1e-4)  # the same model
    extremes = [0.0] if mode == "crash" else [-0.5, 1.0]
    worst = 0.0
    for units in itertools.combinations(range(layer.neurons), failed):
        for values in itertools.product(extremes, repeat=failed):
            worst = max(worst, float(np.abs(output(dict(zip(units, values, strict=True))) - clean).max()))
    assert worst > 0
    assert worst <= tight * (1 + 1e-9) and worst <= paper * (1 + 1e-9), (worst, tight, paper)


@pytest.mark.parametrize("weakened", [False, True])
def test_later_steps_count_and_dropping_them_is_caught(tmp_path, monkeypatch, weakened):
    """An LSTM without recurrent weights (R = 0) whose output sums its three steps' states: crashing its
    unit changes y by the sum of three states, so the sensitivities of the later steps must add to the
    first step's; with them dropped the bound falls below the real change."""
    from robaudit.bounds import tight
    from robaudit.bounds.audit import load_network
    from robaudit.bounds.fep import Analysis, FailureModel
    from robaudit.bounds.slack import FLOAT32_RELATIVE
    from robaudit.graph.network import NetworkOptions

    if weakened:
        monkeypatch.setattr(tight, "tied_index", lambda hidden: {})
    steps = 3
    w = np.full((1, 4, 1), 2.0, np.float32)
    b = np.concatenate([np.ones(4), np.zeros(4)]).reshape(1, 8).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.zeros((1, 4, 1), np.float32), "R"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
        numpy_helper.from_array(np.ones((steps, 1), np.float32), "sum"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["xt", "W", "R", "B"], ["Y"], hidden_size=1),
        helper.make_node("Transpose", ["Y"], ["yb"], perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["yb", "flat"], ["states"]),
        helper.make_node("MatMul", ["states", "sum"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    path = tmp_path / "lstm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.ones((1, steps, 1), np.float32)  # every gate largest: every state largest
    worst = float(run(onnx.load(path), {"x": x})[0][0, 0])  # crash: y = Σ h_t becomes 0
    _, network = load_network(path, NetworkOptions(ranges="ibp"))
    bound = tight.TightBound(Analysis(network, FailureModel.crash())).fep([1])
    if weakened:
        assert bound < worst / (1 + FLOAT32_RELATIVE)
    else:
        # the output cut of the boxes (§14.2) makes the bound exact here: onnxruntime's float32 sum may round
        # above the real-arithmetic bound, within inject's float32 allowance (docs/method.md §10.2)
        assert worst <= bound * (1 + FLOAT32_RELATIVE)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"B": np.ones((1, 7), np.float32)}, "bias B [1, 7] is not [1, 12]"),
        ({"W": np.ones((1, 5, 2), np.float32)}, "weights W [1, 5, 2]"),
    ],
)
def test_weights_of_the_wrong_shape_are_refused_by_name(change, words):
    model = cell_model("GRU", 2, 1, 2, 2, "forward", np.random.default_rng(0))
    for tensor in model.graph.initializer:
        if tensor.name in change:
            tensor.CopyFrom(numpy_helper.from_array(change[tensor.name], tensor.name))
    with pytest.raises(UnsupportedModelError) as caught:
        unrolled(model)
    assert "unsupported op 'GRU' at node 'cell'" in str(caught.value) and words in str(caught.value)


def test_a_cell_computing_in_float16_is_refused_by_name(tmp_path):
    """A GRU whose input and weights are float16 (a ``.half()`` export) rounds inside every step: refused naming the
    cell (an attack helper's float16 GRU got "unsupported op 'Cast' at node 'x/input/to_float16'", robaudit's own
    rounding of the input)."""
    from conftest import run_in_process

    model = cell_model("GRU", 3, 1, 2, 2, "forward", np.random.default_rng(0))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init).astype(np.float16), init.name))
    for info in [*model.graph.input, *model.graph.output]:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    path = tmp_path / "cell16.onnx"
    onnx.save(model, path)
    refused = run_in_process("bound", path, "--crash", "1", "--output", "Y_h", expect=2)
    assert "node 'cell' (GRU) computes in float16" in refused.stderr and "float32 model" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
