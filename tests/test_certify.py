"""Per-input certificates (``robaudit.bounds.certify``, docs/method.md §7).

Soundness: for random networks (dense chains, residual pairs, conv chains; relu,
sigmoid, tanh, hardswish), every failure model (crash, symmetric and asymmetric
byzantine) and inputs with and without ``--radius``, an *independent* search
(``soundness_nets``: its own numpy forward pass with failures, sharing no code with
robaudit) tries every failure set with the given counts, byzantine values at every
vertex of [a, b]^F plus interior draws, and — with a radius — the corners of the input
box and random points in it. No error it finds may exceed the certificate of that input,
and no failure set it tries may change the arg-max of a certified input.

On the trained digits MLP (``sample_models/digits_mlp.onnx``, logits) the same holds for
every pair of crashed neurons (one per hidden layer, all 512 pairs) at 30 inputs, with a
numpy forward pass read from the ONNX initializers.

A weakened copy (chord slopes halved, the signed pre-activation deviations halved, or the
certificate × 0.9) must be caught by the same search: the tests can fail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, cli_json, run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from soundness_nets import (
    all_neuron_sets,
    configs_for,
    faults_for,
    forward,
    random_chain,
    random_conv,
    random_residual,
    random_summed,
    to_onnx,
)

import robaudit.bounds.certify as certify_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier, certify_inputs
from robaudit.bounds.fep import FailureModel
from robaudit.errors import OptionError
from robaudit.graph.network import NetworkOptions

#: Float64 tolerance: robaudit and the search compute the same reals from float32 weights.
REL64 = 1e-9


def _mode(kind: str) -> tuple[tuple[float, float], FailureModel]:
    if kind == "crash":
        return (0.0, 0.0), FailureModel.crash()
    if kind == "byzantine":
        return (-1.0, 1.0), FailureModel.byzantine(1.0)
    return (-0.25, 1.5), FailureModel.byzantine(None, (-0.25, 1.5))


def _spec(topology: str, acts: list[str], rng: np.random.Generator):
    if topology == "chain":
        return random_chain(rng, 3, [4, 3], 3, acts, 1.0)
    if topology == "residual":
        return random_residual(rng, 3, 3, 3, acts, "relu", 1.0)
    if topology == "summed":
        return random_summed(rng, 3, 3, 3, 3, acts, 1.0)
    return random_conv(rng, (1, 4, 4), [(2, 2, 1, 0), (2, 2, 1, 0)], acts, 3, 1.0)


def _network(spec):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        onnx.save(to_onnx(spec), str(path))
        return load_network(path, NetworkOptions(input_range=(0.0, 1.0)))[1]


def _search(spec, counts, frange, points, rng) -> tuple[np.ndarray, np.ndarray]:
    """(largest error, whether some failure set changes the arg-max) per point, by exhaustion."""
    configs = configs_for(all_neuron_sets(spec.sizes, counts), [tuple(() for _ in counts)], frange, rng, 2)
    clean, _ = forward(spec, points)
    faults = faults_for(spec, configs, len(points))
    x = np.tile(points, (len(configs),) + (1,) * (points.ndim - 1))
    faulty, _ = forward(spec, x, faults)
    faulty = faulty.reshape(len(configs), len(points), -1)
    err = np.abs(faulty - clean[None]).max(axis=2).max(axis=0)
    flipped = (faulty.argmax(axis=2) != clean.argmax(axis=1)[None]).any(axis=0)
    return err, flipped


def _box_points(x: np.ndarray, radius: float | None, rng: np.random.Generator) -> np.ndarray:
    if radius is None:
        return x[None].astype(np.float64)
    n = x.size
    signs = rng.choice([-1.0, 1.0], size=(12, n))
    corners = x.reshape(1, -1) + radius * signs
    inner = x.reshape(1, -1) + rng.uniform(-radius, radius, (12, n))
    pts = np.clip(np.vstack([x.reshape(1, -1), corners, inner]), 0.0, 1.0)
    # kept in float64: a float32 cast rounds a corner x ± r outward by up to half an ulp,
    # i.e. outside the certified box (a found 'violation' of 1.6e-8 was exactly that)
    return pts.reshape((-1,) + x.shape)


def _violations(spec, counts, kind, radius, seed) -> list[str]:
    rng = np.random.default_rng(seed)
    frange, model = _mode(kind)
    network = _network(spec)
    inputs = rng.uniform(0.0, 1.0, (5,) + spec.in_shape).astype(np.float32)
    certifier = Certifier(network, model, inputs, radius)
    found = []
    for i, x in enumerate(inputs):
        box = certifier.box(i, counts)
        err, flipped = _search(spec, counts, frange, _box_points(x, radius, rng), rng)
        if err.max() > box.bound * (1 + REL64) + REL64:
            found.append(f"input {i}: error {err.max():.9g} > certificate {box.bound:.9g}")
        if box.certified(1.0) and flipped.any():
            found.append(f"input {i}: certified but a failure set changes the arg-max")
    return found


CASES = st.tuples(
    st.sampled_from(["chain", "residual", "summed", "conv"]),
    st.lists(st.sampled_from(["relu", "sigmoid", "tanh", "hardswish"]), min_size=2, max_size=2),
    st.sampled_from(["crash", "byzantine", "asymmetric"]),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.sampled_from([None, 0.05]),
    st.integers(0, 2**31),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(CASES)
def test_no_error_above_the_certificate(case) -> None:
    """The default suite's examples are fixed (a random draw of large conv cases once took 229 s);
    the slow variant below draws 200 fresh ones."""
    check_no_error_above_the_certificate(case)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CASES)
def test_no_error_above_the_certificate_thorough(case) -> None:
    check_no_error_above_the_certificate(case)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(CASES.map(lambda case: ("summed", *case[1:])))
def test_no_error_above_the_certificate_of_a_sum_layer(case) -> None:
    """act(A·h + B·x): one failure site (docs/method.md §1.4), certified against the same exhaustive search."""
    check_no_error_above_the_certificate(case)


def check_no_error_above_the_certificate(case) -> None:
    topology, acts, kind, counts, radius, seed = case
    spec = _spec(topology, acts, np.random.default_rng(seed))
    counts = [min(c, n) for c, n in zip(counts, spec.sizes, strict=True)]
    assert _violations(spec, counts, kind, radius, seed) == []


def _weakened_is_caught(monkeypatch, weaken) -> int:
    weaken(monkeypatch)
    caught = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        spec = _spec(["chain", "residual", "conv"][seed % 3], ["relu", "relu"], rng)
        caught += bool(_violations(spec, [1, 1], ["crash", "byzantine"][seed % 2], None, seed))
    return caught


def test_halved_slopes_are_caught(monkeypatch) -> None:
    real = certify_module.chord_slopes

    def halved(monkeypatch):
        monkeypatch.setattr(certify_module, "chord_slopes", lambda *a: tuple(s * 0.5 for s in real(*a)))

    assert _weakened_is_caught(monkeypatch, halved) > 0


def test_shrunk_certificate_is_caught(monkeypatch) -> None:
    real = certify_module.LocalCertifier.certify_box

    def shrunk(monkeypatch):
        def box(self, *args):
            b = real(self, *args)
            return certify_module.BoxBound(b.per_output * 0.9, b.predicted, b.margins, b.drops * 0.9)

        monkeypatch.setattr(certify_module.LocalCertifier, "certify_box", box)

    assert _weakened_is_caught(monkeypatch, shrunk) > 0


def test_halved_signed_deviations_are_caught(monkeypatch) -> None:
    """The pre-activation deviations of §7.2 bounded by the signed pass ("Signed deviations"): halved, the
    faulty intervals miss real faulty values, a slope looks exact where a ReLU switches, and real failures
    exceed the certificate."""
    real = certify_module.LocalCertifier._signed_preact_deviation

    def halved(monkeypatch):
        monkeypatch.setattr(certify_module.LocalCertifier, "_signed_preact_deviation",
                            lambda self, *args: 0.5 * real(self, *args))

    assert _weakened_is_caught(monkeypatch, halved) > 0


# --------------------------------------------------------------------------- a trained network


def _digits_numpy():
    """(weights, biases) of the digits MLP read from the ONNX initializers (MatMul + Add per layer)."""
    model = onnx.load(str(SAMPLES / "digits_mlp.onnx"))
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            layers.append([inits[node.input[1]], None])
        elif node.op_type == "Add" and layers and layers[-1][1] is None:
            layers[-1][1] = inits[node.input[1]].reshape(-1)
    return layers


def _digits_forward(layers, x, kill1=None, kill2=None):
    h = x
    for index, (w, b) in enumerate(layers):
        h = h @ w + b
        if index < len(layers) - 1:
            h = np.maximum(h, 0.0)
            kill = kill1 if index == 0 else kill2
            if kill is not None:
                h = h.copy()
                h[np.arange(len(h)), kill] = 0.0
    return h


def test_trained_digits_every_crash_pair() -> None:
    data = np.load(SAMPLES / "digits_inputs.npz")
    x = data["x"][:30]
    _, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    result = certify_inputs(network, FailureModel.crash(), x, [1, 1], 1.0, layer_counts=False)
    layers = _digits_numpy()
    clean = _digits_forward(layers, x.astype(np.float64))
    worst = np.zeros(len(x))
    flipped = np.zeros(len(x), bool)
    n1, n2 = layers[0][0].shape[1], layers[1][0].shape[1]
    for i in range(n1):
        for j in range(n2):
            faulty = _digits_forward(layers, x.astype(np.float64), np.full(len(x), i), np.full(len(x), j))
            worst = np.maximum(worst, np.abs(faulty - clean).max(axis=1))
            flipped |= faulty.argmax(axis=1) != clean.argmax(axis=1)
    bounds = np.array([c.bound for c in result.inputs])
    assert np.all(worst <= bounds * (1 + REL64) + REL64), (worst / bounds).max()
    certified = np.array([c.certified for c in result.inputs])
    assert not np.any(certified & flipped)
    # tightness: the certificate is within 2x of the exhaustive worst case on a trained MLP
    assert bounds.max() <= 2.0 * worst.max(), (bounds.max(), worst.max())


# --------------------------------------------------------------------------- the command


def test_certify_report_keys(tmp_path) -> None:
    report = tmp_path / "c.json"
    run_in_process(
        "certify", SAMPLES / "digits_mlp.onnx", "--inputs", SAMPLES / "digits_inputs.npz",
        "--labels", f"{SAMPLES / 'digits_inputs.npz'}:labels", "--crash", "1", "--output-tensor", "add_result2",
        "-q", "-o", report,
    )
    import json

    data = json.loads(report.read_text())
    assert {"max_bound", "certified_fraction", "certified_accuracy"} <= set(data)
    assert all("max_failures_certified" in la for la in data["layers"])
    every = {"name", "kind", "neurons", "max_weight", "lipschitz", "delta", "max_failures"}  # every report's columns
    assert all(every <= set(la) for la in data["layers"]), data["layers"]
    bound = json.loads(
        run_in_process(
            "bound", SAMPLES / "digits_mlp.onnx", "--output-tensor", "add_result2", "-q", "--format", "json"
        ).stdout
    )
    for mine, theirs in zip(data["layers"], bound["layers"], strict=True):
        for key in ("kind", "max_weight", "lipschitz", "delta"):
            assert mine[key] == pytest.approx(theirs[key]) if key != "kind" else mine[key] == theirs[key], key
    assert all({"bound", "certified"} <= set(entry) for entry in data["inputs"])
    assert len(data["inputs"]) == 200
    assert data["max_bound"] == max(e["bound"] for e in data["inputs"])


@pytest.mark.parametrize(
    ("arrays", "extra", "needle"),
    [
        ({"x": np.full((3, 64), 2.0, np.float32)}, [], "outside the input range"),
        ({"x": np.full((3, 64), np.nan, np.float32)}, [], "NaN"),
        ({"x": np.zeros((3, 63), np.float32)}, [], "shape"),
        ({"x": np.zeros((3, 64), np.float32), "labels": np.zeros(2, np.int64)}, ["labels"], "2 labels for 3 inputs"),
        ({"x": np.zeros((3, 64), np.float32)}, ["--radius", "0"], "--radius"),
        ({"x": np.zeros((3, 64), np.float32)}, ["--radius", "-1"], "--radius"),
        ({"x": np.zeros((3, 64), np.float32)}, ["--radius", "1.5"], "--radius"),
    ],
)
def test_bad_input_is_one_line(tmp_path, arrays, extra, needle) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    args = ["--labels", f"{path}:labels"] if extra[:1] == ["labels"] else extra
    proc = run_in_process("certify", SAMPLES / "digits_mlp.onnx", "--inputs", f"{path}:x", *args, "-q", expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


# --------------------------------------------------------------------------- check policies


def _policy(tmp_path, certified: str) -> None:
    import shutil

    shutil.copy(SAMPLES / "digits_mlp.onnx", tmp_path / "m.onnx")
    shutil.copy(SAMPLES / "digits_inputs.npz", tmp_path / "val.npz")
    (tmp_path / "robaudit.yaml").write_text(
        "models:\n  - path: m.onnx\n    epsilon: 0.5\n    output: add_result2\n    inputs: val.npz\n"
        f"    require:\n      certified: {certified}\n"
    )


def test_check_certified_fraction(tmp_path) -> None:
    """The policy's verdict is the fraction ``certify`` reports on the same inputs (computed independently here)."""
    _, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    x = np.load(SAMPLES / "digits_inputs.npz")["x"]
    fraction = certify_inputs(network, FailureModel.crash(), x, [1, 1], 0.5, layer_counts=False).certified_fraction
    assert fraction < 0.95
    _policy(tmp_path, "{crash: 0, min_fraction: 1.0}")
    run_in_process("check", cwd=tmp_path, expect=0)
    _policy(tmp_path, "{crash: 1, min_fraction: 0.95}")
    proc = run_in_process("check", "--format", "json", cwd=tmp_path, expect=1)
    assert "require.certified" in proc.stdout
    table = run_in_process("check", "-q", cwd=tmp_path, expect=1).stdout  # fractions as percentages, not "≥ 1"
    assert "certified ≥ 95.0%" in table and f"{fraction:.1%}" in table, table
    # the inputs named as the models are, relative to the working directory (stable across CI checkouts)
    assert "inputs of val.npz:x certified" in " ".join(table.split()) and str(tmp_path) not in table, table
    _policy(tmp_path, "{crash: 1, min_fraction: 0.95, radius: 0.01, typo: 1}")
    proc = run_in_process("check", cwd=tmp_path, expect=2)
    assert "typo" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("tail", ["sigmoid", "tanh"])
def test_certificates_of_a_bounded_output_are_capped_at_its_width(tail, tmp_path) -> None:
    """A Sigmoid (Tanh) output moves by at most 1 (2) whatever fails: the certificates said 1.536 on an autoencoder
    with a Sigmoid output (a new-user trial), above what the output can move; only a Softmax was capped."""
    from conftest import dense_chain

    path = dense_chain([4, 6, 3], ["relu"], output_activation=tail, weight_scale=3.0).save(tmp_path)
    _, network = load_network(path, NetworkOptions())
    width = {"sigmoid": 1.0, "tanh": 2.0}[tail]
    assert network.output_width == width
    x = np.random.default_rng(0).uniform(0, 1, (5, 4)).astype(np.float32)
    result = certify_inputs(network, FailureModel.byzantine(100.0), x, [3], 0.1, None)
    # the local bound alone is far above it (byzantine values ±100, weights ±3); the domain-wide one is just below
    assert result.max_bound <= width and result.max_bound == pytest.approx(width, rel=1e-6)
    assert all(r.bound <= width for r in result.inputs)


def _product_net(seed: int, path: Path) -> None:
    """x [4] → tanh(W1·x) ⊙ tanh(W2·x) → tanh(W3·p) → W4·h [3]: a product of two branches, where the local
    relaxation over a wide box is looser than the domain-wide sensitivities."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weights = {"w1": (4, 8), "w2": (4, 8), "w3": (8, 8), "w4": (8, 3)}
    inits = [
        numpy_helper.from_array(rng.uniform(-2, 2, shape).astype(np.float32), name) for name, shape in weights.items()
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["z1"]), helper.make_node("Tanh", ["z1"], ["h1"]),
        helper.make_node("MatMul", ["x", "w2"], ["z2"]), helper.make_node("Tanh", ["z2"], ["h2"]),
        helper.make_node("Mul", ["h1", "h2"], ["p"]),
        helper.make_node("MatMul", ["p", "w3"], ["z3"]), helper.make_node("Tanh", ["z3"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_no_certificate_exceeds_the_domain_wide_bound(tmp_path, seed) -> None:
    """Every box certify bounds lies in the input domain, so its certificate is at most what `bound` proves
    for the whole domain (docs/method.md §7.4); with a radius of 0.3 the local relaxation of this product
    network read 12.1 where `bound --crash 1` reads 9.29."""
    import json

    path = tmp_path / "product.onnx"
    _product_net(seed, path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (20, 4)).astype(np.float32))
    domain = json.loads(run_in_process("bound", path, "--crash", "1", "-q", "--format", "json").stdout)
    local = json.loads(
        run_in_process(
            "certify", path, "--inputs", tmp_path / "x.npy", "--crash", "1", "--radius", "0.3", "--no-layer-counts",
            "-q", "--format", "json",
        ).stdout
    )
    assert local["max_bound"] <= domain["fep"] * (1 + 1e-12)


def test_layer_counts_not_searched_read_so(tmp_path):
    """--no-layer-counts leaves max_failures_certified unsearched: null and 'not searched', not −1/'none', which
    mean that not even 0 failures keep every input certified (a new-user trial read it so)."""

    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:5]
    np.save(tmp_path / "x.npy", x)
    args = ("certify", SAMPLES / "digits_mlp.onnx", "--inputs", tmp_path / "x.npy", "--crash", 1, "--no-layer-counts")
    report = cli_json(*args)
    assert all(la["max_failures_certified"] is None for la in report["layers"])
    assert "not searched" in run_in_process(*args).stdout
    searched = cli_json(*args[:-1])
    assert all(isinstance(la["max_failures_certified"], int) for la in searched["layers"])


@pytest.mark.parametrize("failures", [[1], [1, 1, 1], [1, -1]])
def test_a_failure_vector_of_the_wrong_length_is_refused_in_one_line(failures) -> None:
    """The library function names what it needs (one count per hidden layer) instead of an IndexError deep inside."""
    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:2]
    _, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    with pytest.raises(OptionError, match="one per hidden layer"):
        certify_inputs(network, FailureModel.crash(), x, failures, 1.0, layer_counts=False)


def test_check_certified_takes_one_count_per_hidden_layer(tmp_path) -> None:
    """``certified: {crash: [0, 1]}`` as ``certify --crash 0,1`` and ``empirical.failures`` take it (a new-user trial
    saw it refused as "must be an integer count"); the fraction is certify's for that vector."""
    _, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    x = np.load(SAMPLES / "digits_inputs.npz")["x"]
    fraction = certify_inputs(network, FailureModel.crash(), x, [0, 1], 0.5, layer_counts=False).certified_fraction
    _policy(tmp_path, "{crash: [0, 1], min_fraction: 0.0}")
    report = " ".join(run_in_process("check", "--format", "json", cwd=tmp_path, expect=0).stdout.split())
    assert f"{fraction:.1%} of" in report and "crash failures [0, 1] per hidden layer" in report, report
    _policy(tmp_path, "{crash: [0, 1, 1], min_fraction: 0.0}")
    proc = run_in_process("check", cwd=tmp_path, expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 hidden layers" in lines[0] and "[0, 1, 1]" in lines[0], proc.stderr


def test_no_certificate_exceeds_the_refined_bound_of_its_vector(tmp_path, monkeypatch) -> None:
    """`bound` refines the Fep of the one vector it reports (the output cut and signed terms on the faulty boxes of
    exactly those counts, docs/method.md §4.1); certify caps its certificates with that same figure. On the sample
    pre-LN encoder a new user's trial (nu26) read certificates of 10.77 beside `bound --crash 1`'s 10.53: without
    the refinement the cap is caught above it."""
    import json

    path = SAMPLES / "encoder.onnx"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (5, 4, 4)).astype(np.float32))
    args = ("certify", path, "--inputs", tmp_path / "x.npy", "--crash", "1", "--no-layer-counts", "-q", "--format",
            "json")
    domain = json.loads(run_in_process("bound", path, "--crash", "1", "-q", "--format", "json").stdout)
    assert json.loads(run_in_process(*args).stdout)["max_bound"] <= domain["fep"] * (1 + 1e-12)
    monkeypatch.setattr(certify_module.TightBound, "refined_per_output", lambda self, failures: None)
    assert json.loads(run_in_process(*args).stdout)["max_bound"] > domain["fep"] * (1 + 1e-6)
