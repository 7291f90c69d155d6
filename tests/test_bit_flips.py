"""Bit flips and stuck-at bits in stored values (docs/method.md §2.3): bounds against flips done
in numpy on the stored representation (int8/uint8 codes, float32 words) and applied to the
model with an independent instrumentation (``ort_faults``), run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, cli_json, dense_chain, run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ort_faults import FaultRunner
from test_rounding import rounded_chain

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions

SAMPLES = ROOT / "sample_models"
CNN_INT8 = SAMPLES / "digits_cnn_int8.onnx"
CNN_FLOAT = SAMPLES / "digits_cnn.onnx"


def site_values(model: onnx.ModelProto, values: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The clean values of ``values`` on inputs ``x`` (the model with them as extra outputs)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    copy.graph.output.extend([onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in values])
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(values, {copy.graph.input[0].name: x.astype(np.float32)})


def flip_code(y: np.ndarray, scale: float, zp: int, signed: bool, bit: int, stuck: int | None = None) -> np.ndarray:
    """The dequantized value after flipping (or sticking) bit ``bit`` of the stored code of y."""
    dtype = np.int8 if signed else np.uint8
    q = np.clip(np.rint(y / scale) + zp, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    raw = q.view(np.uint8)
    mask = np.uint8(1 << bit)
    raw = raw ^ mask if stuck is None else (raw | mask if stuck else raw & ~mask)
    return (raw.view(dtype).astype(np.float64) - zp) * scale


def flip_float(y: np.ndarray, bit: int) -> np.ndarray:
    """y (float32) with bit ``bit`` of its IEEE-754 word flipped."""
    words = np.asarray(y, np.float32).copy().view(np.uint32)
    return (words ^ np.uint32(1 << bit)).view(np.float32).astype(np.float64)


def bounds(path: Path, failure: FailureModel, counts: list[int]) -> tuple[float, float]:
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    analysis = Analysis(network, failure)
    return PaperBound(analysis).fep(counts), TightBound(analysis).fep(counts)


def _qdq_params(model: onnx.ModelProto, value: str) -> tuple[float, int, bool]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == value)
    zp = inits[dq.input[2]]
    return float(inits[dq.input[1]]), int(zp), zp.dtype == np.int8


def measured_flips(model, values, x, flip, layer: int, neurons: np.ndarray) -> float:
    """Largest output change when ``flip`` is applied to neuron neurons[j] of ``layer`` on input j."""
    shapes = [tuple(v.shape[1:]) for v in site_values(model, values, x[:1])]
    runner = FaultRunner(model, values, shapes)
    clean = runner.clean(x).astype(np.float64)
    y = site_values(model, values, x)[layer].reshape(len(x), -1)
    keeps = [np.ones((len(x),) + s) for s in shapes]
    repls = [np.zeros((len(x),) + s) for s in shapes]
    rows = np.arange(len(x))
    keep = keeps[layer].reshape(len(x), -1)
    repl = repls[layer].reshape(len(x), -1)
    keep[rows, neurons] = 0.0
    repl[rows, neurons] = flip(y[rows, neurons])
    with np.errstate(invalid="ignore"):
        out = runner.run(x, keeps, repls).astype(np.float64)
        error = np.abs(out - clean)
    return float(np.inf) if not np.all(np.isfinite(error)) else float(error.max())


@pytest.fixture(scope="module")
def digits_cnn():
    x = np.load(SAMPLES / "digits_cnn_inputs.npz")["x"][:64]
    return onnx.load(CNN_INT8), x


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer=st.integers(0, 2), bit=st.one_of(st.none(), st.integers(0, 7)), stuck=st.sampled_from([None, 0, 1]),
       seed=st.integers(0, 1000))
def test_int8_bit_flip_bound_covers_real_flips(digits_cnn, layer, bit, stuck, seed) -> None:
    """Every flipped/stuck bit of an int8 code, at every neuron tried, stays within the bound."""
    model, x = digits_cnn
    _, network = load_network(CNN_INT8, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    scale, zp, signed = _qdq_params(model, values[layer])
    neurons = np.random.default_rng(seed).integers(0, network.hidden_layers[layer].neurons, len(x))
    counts = [0, 0, 0]
    counts[layer] = 1
    failure = FailureModel.bit_flip(bit) if stuck is None else FailureModel.stuck_at(stuck, bit)
    paper, tight = bounds(CNN_INT8, failure, counts)
    for b in ([bit] if bit is not None else range(8)):
        measured = measured_flips(model, values, x, lambda y, b=b: flip_code(y, scale, zp, signed, b, stuck),
                                  layer, neurons)
        assert measured <= min(paper, tight) * (1 + 1e-5) + 1e-5, (b, measured, paper, tight)


def test_int8_bit_bound_halved_is_caught(tmp_path) -> None:
    """On an equal-weight QDQ chain the flip of bit B moves the output by about P·2^B·s: δ/2 is exceeded."""
    dims = [3, 3, 3, 2]
    weights = [np.full((dims[i + 1], dims[i]), 0.3) for i in range(3)]
    model = rounded_chain(weights, [np.zeros(d) for d in dims[1:]], "qdq", [0.01, 0.01, 0.01])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.ones((3, 3), np.float32)
    for bit in range(5, 8):  # at lower bits the rounding terms are as large as the flip itself
        _, tight = bounds(path, FailureModel.bit_flip(bit), [1, 0])
        measured = measured_flips(model, ["y0", "y1"], x, lambda y, b=bit: flip_code(y, 0.01, 0, False, b), 0,
                                  np.arange(3))
        assert tight / 2 < measured <= tight * (1 + 1e-5) + 1e-6, (bit, measured, tight)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer=st.integers(0, 2), bit=st.sampled_from([0, 5, 12, 22, 31]), seed=st.integers(0, 1000))
def test_float_mantissa_and_sign_flips_within_bound(layer, bit, seed) -> None:
    """Mantissa and sign bits of a float32 have a finite bound, and real flips stay within it."""
    model = onnx.load(CNN_FLOAT)
    x = np.load(SAMPLES / "digits_cnn_inputs.npz")["x"][:64]
    _, network = load_network(CNN_FLOAT, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    neurons = np.random.default_rng(seed).integers(0, network.hidden_layers[layer].neurons, len(x))
    counts = [0, 0, 0]
    counts[layer] = 1
    paper, tight = bounds(CNN_FLOAT, FailureModel.bit_flip(bit), counts)
    measured = measured_flips(model, values, x, lambda y: flip_float(y, bit), layer, neurons)
    assert measured <= min(paper, tight) * (1 + 1e-5) + 1e-5


def test_float_exponent_flip_is_unbounded_and_really_is() -> None:
    """bound --bit-flip on a float model: unbounded with the reason; a real exponent flip gives Inf/NaN or huge."""
    report = cli_json("bound", CNN_FLOAT, "--bit-flip", 1)
    assert report["fep"] is None and report["fep_tight"] is None
    assert any("unbounded" in note and "harden" in note for note in report["notes"])
    model = onnx.load(CNN_FLOAT)
    _, network = load_network(CNN_FLOAT, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    x = np.load(SAMPLES / "digits_cnn_inputs.npz")["x"][:32]
    y = site_values(model, values, x)[0].reshape(len(x), -1)
    neurons = np.argmax((y > 0.01) & (y < 2.0), axis=1)  # in (0, 2): flipping exponent bit 30 gives ≥ 2^64, Inf or NaN
    assert np.all((y[np.arange(len(x)), neurons] > 0.01) & (y[np.arange(len(x)), neurons] < 2.0))
    assert measured_flips(model, values, x, lambda v: flip_float(v, 30), 0, neurons) > 1e10


def test_int8_bit_flip_is_finite_from_the_cli() -> None:
    report = cli_json("bound", CNN_INT8, "--bit-flip", 1, "-e", 1000)
    assert report["fep"] is not None and report["fep"] < 1e6
    assert report["settings"]["mode"] == "bit_flip" and report["settings"]["bit"] is None
    one_bit = cli_json("bound", CNN_INT8, "--bit-flip", 1, "--bit", 0)
    assert one_bit["fep"] < report["fep"]


def test_check_policy_bit_flip_modes(tmp_path) -> None:
    """A ``check`` policy in bit_flip mode: the int8 model passes, the float one fails with the remedy."""
    import json

    from conftest import run_cli

    policy = tmp_path / "robaudit.yaml"
    policy.write_text(
        "models:\n"
        f"  - path: {CNN_INT8}\n    epsilon: 500\n    mode: bit_flip\n    require: {{bit_flip: 1}}\n"
        f"  - path: {CNN_FLOAT}\n    epsilon: 500\n    mode: stuck_at\n    stuck_at: 1\n    require: {{stuck_at: 1}}\n"
    )
    proc = run_cli("check", "--policy", policy, "--format", "json", expect=1)
    report = json.loads(proc.stdout)
    assert [m["passed"] for m in report["models"]] == [True, False], report["models"]
    assert report["models"][1]["requirements"][0]["remedy"]["unbounded"] == ["conv1", "conv2", "fc1"]


def test_check_command_line_flags_for_bit_faults(tmp_path) -> None:
    """``check --require-bit-flip N`` / ``--require-stuck-at N`` with ``--bit`` and ``--stuck-at`` (they were policy
    keys only): the sign bit stuck at 0 cannot move LeNet's ReLU outputs (every value ≥ 0 keeps its sign), so every
    neuron of every layer is tolerated; stuck at 1 it negates them and the check fails; the flags give the
    verdicts and counts of the same policy written in a file; a nonsense value is one line, exit 2."""
    import json

    from conftest import run_in_process

    lenet = SAMPLES / "lenet.onnx"
    neurons = [la.neurons for la in load_network(lenet, NetworkOptions())[1].hidden_layers]
    zero = json.loads(run_in_process("check", lenet, "-e", 0.5, "--require-stuck-at", 1, "--bit", 31,
                                     "--stuck-at", 0, "-f", "json").stdout)
    verdict = zero["models"][0]["requirements"][0]
    assert (verdict["key"], verdict["mode"], verdict["status"]) == ("require.stuck_at", "stuck_at", "pass")
    assert verdict["achieved"] == max(neurons), verdict
    one = run_in_process("check", lenet, "-e", 0.5, "--require-stuck-at", 1, "--bit", 31, "--stuck-at", 1, expect=1)
    assert "require.stuck_at" in one.stdout and "FAILED" in one.stdout
    flags = json.loads(run_in_process("check", lenet, "-e", 20, "--require-bit-flip", 1, "--bit", 22, "-f", "json",
                                      expect=None).stdout)
    policy = tmp_path / "robaudit.yaml"
    policy.write_text(f"models:\n  - path: {lenet}\n    epsilon: 20\n    bit: 22\n    require: {{bit_flip: 1}}\n")
    written = json.loads(run_in_process("check", "--policy", policy, "-f", "json", expect=None).stdout)
    assert flags["models"][0]["requirements"][0]["mode"] == "bit_flip"
    for key in ("status", "achieved", "required"):
        assert flags["models"][0]["requirements"][0][key] == written["models"][0]["requirements"][0][key], key
    # the one requirement's mode is the report's: its settings name the bit (they said crash)
    assert (flags["models"][0]["settings"]["mode"], flags["models"][0]["settings"]["bit"]) == ("bit_flip", 22)
    for extra, said in ((("--require-stuck-at", 1, "--bit", 31), "stuck-at bits need the value they are stuck at"),
                        (("--require-crash", 1, "--bit", 31), "--bit applies to bit flips and stuck-at bits"),
                        (("--require-bit-flip", 1, "--stuck-at", 0), "--stuck-at applies to stuck-at bits")):
        refused = run_in_process("check", lenet, "-e", 1, *extra, expect=2)  # was a silent choice or ignored
        assert said in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    bad = run_in_process("check", lenet, "-e", 1, "--require-stuck-at", 1, "--stuck-at", 2, expect=2)
    assert bad.stderr.strip() == "robaudit: invalid value for '--stuck-at': must be 0 or 1, got 2"
    negative = run_in_process("check", lenet, "-e", 1, "--require-bit-flip", -1, expect=2)
    assert "'--require-bit-flip': must be ≥ 0" in negative.stderr and negative.stderr.count("\n") == 1
    policy.write_text(f"models:\n  - path: {lenet}\n    epsilon: 1\n    bit: 40\n    require: {{bit_flip: 1}}\n")
    outside = run_in_process("check", "--policy", policy, expect=2)
    assert "--bit (a policy's 'bit') must be in 0..31 for float32 values, got 40" in outside.stderr


def _inject_json(*args: object) -> dict:
    return cli_json("inject", CNN_INT8, "--inputs", SAMPLES / "digits_cnn_inputs.npz", "-q", "--in-process", *args)


# the worst search moves the input with flips too (a few seconds each): two of the four in `make test-slow`
@pytest.mark.parametrize("extra", [(), pytest.param(("--bit", 6), marks=pytest.mark.slow), ("--stuck-at", 0),
                                   pytest.param(("--bit", 2, "--stuck-at", 1), marks=pytest.mark.slow)])
def test_inject_bit_flip_matches_numpy_flips_and_stays_within_bound(digits_cnn, extra) -> None:
    """inject --bit-flip flips the stored codes in the graph: its worst sets, redone with numpy flips of the
    int8/uint8 codes and an independent instrumentation, give the same errors; all lie within the bound."""
    model, _ = digits_cnn
    report = _inject_json("--bit-flip", 1, "--search", "worst", "--trials", 40, *extra)
    assert not report["violation"]
    vector = report["vectors"][0]
    assert vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
    _, network = load_network(CNN_INT8, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    x_all = np.load(SAMPLES / "digits_cnn_inputs.npz")["x"]
    stuck = None if "--stuck-at" not in extra else int(extra[extra.index("--stuck-at") + 1])
    for fault_set in vector["worst"][:3]:
        x = x_all[fault_set["input_index"] : fault_set["input_index"] + 1]
        shapes = [tuple(v.shape[1:]) for v in site_values(model, values, x)]
        visible = onnx.ModelProto.FromString(model.SerializeToString())
        visible.graph.output.extend([onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                                     for v in values])
        runner = FaultRunner(visible, values, shapes)
        keeps = [np.ones((1,) + s) for s in shapes]
        repls = [np.zeros((1,) + s) for s in shapes]
        names = [la.name for la in network.hidden_layers]
        for fault in sorted(fault_set["faults"], key=lambda f: names.index(f["layer"])):
            layer = names.index(fault["layer"])
            scale, zp, signed = _qdq_params(model, values[layer])
            if "--bit" in extra:
                assert set(fault["bits"]) == {int(extra[extra.index("--bit") + 1])}
            # the stored value is the one the earlier faults left: flip that
            stored = runner.run(x, keeps, repls, output=values[layer]).astype(np.float64).reshape(-1)
            for neuron, bit in zip(fault["neurons"], fault["bits"], strict=True):
                keeps[layer].reshape(-1)[neuron] = 0.0
                repls[layer].reshape(-1)[neuron] = flip_code(stored[neuron : neuron + 1], scale, zp, signed, bit,
                                                             stuck)[0]
        error = float(np.abs(runner.run(x, keeps, repls).astype(np.float64) - runner.clean(x)).max())
        assert abs(error - fault_set["error"]) <= 1e-4 * max(1.0, error), (error, fault_set)


def test_inject_bit_flip_on_float_layers_reports_unbounded() -> None:
    """Unprotected float32 layers: exponent flips really give Inf/NaN, and the bound says unbounded."""
    report = cli_json("inject", CNN_FLOAT, "--bit-flip", 1, "--bit", 30, "--search", "worst", "--trials", 20,
                      "--inputs", SAMPLES / "digits_cnn_inputs.npz", "-q", "--in-process")
    vector = report["vectors"][0]
    assert vector["bound"] is None and not report["violation"]
    assert str(vector["measured"]["max"]) == "inf"  # reports write a non-finite error as "inf"


def replay_float_flips(model: onnx.ModelProto, values: list[str], names: list[str], x: np.ndarray, fault_set,
                       stuck: int | None = None) -> float:
    """The error of a reported fault set, redone with numpy flips of the float32 words of the stored values."""
    shapes = [tuple(v.shape[1:]) for v in site_values(model, values, x)]
    visible = onnx.ModelProto.FromString(model.SerializeToString())
    visible.graph.output.extend([onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in values])
    runner = FaultRunner(visible, values, shapes)
    keeps = [np.ones((1,) + s) for s in shapes]
    repls = [np.zeros((1,) + s) for s in shapes]
    for fault in sorted(fault_set["faults"], key=lambda f: names.index(f["layer"])):
        layer = names.index(fault["layer"])
        stored = runner.run(x, keeps, repls, output=values[layer]).reshape(-1)
        for neuron, bit in zip(fault["neurons"], fault["bits"], strict=True):
            word = stored[neuron : neuron + 1].astype(np.float32).view(np.uint32)
            mask = np.uint32(1 << bit)
            word = word ^ mask if stuck is None else (word | mask if stuck else word & ~mask)
            keeps[layer].reshape(-1)[neuron] = 0.0
            repls[layer].reshape(-1)[neuron] = word.view(np.float32)[0]
    with np.errstate(invalid="ignore"):
        return float(np.abs(runner.run(x, keeps, repls).astype(np.float64) - runner.clean(x)).max())


@pytest.fixture(scope="module")
def hardened_cnn(tmp_path_factory) -> Path:
    from conftest import run_cli

    hard = tmp_path_factory.mktemp("hard") / "hard.onnx"
    run_cli("harden", CNN_FLOAT, "--inputs", SAMPLES / "digits_cnn_inputs.npz", "-o", hard)
    return hard


@pytest.mark.parametrize("extra", [(), ("--bit", 30), pytest.param(("--bit", 12), marks=pytest.mark.slow),
                                   ("--bit", 31), ("--stuck-at", 1, "--bit", 29)])
def test_inject_float_bit_flips_match_numpy_on_hardened_model(hardened_cnn, extra) -> None:
    """On a hardened (NaN-guarded Clip) float model, inject's in-graph float32 flips equal numpy's flips of
    the IEEE-754 words, and stay within the finite bound."""
    hard = hardened_cnn
    data = SAMPLES / "digits_cnn_inputs.npz"
    report = cli_json("inject", hard, "--bit-flip", 1, "--search", "worst", "--trials", 30, "--inputs", data, "-q",
                      "--in-process", *extra)
    vector = report["vectors"][0]
    assert vector["bound"] is not None and not report["violation"]
    assert vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
    model = onnx.load(hard)
    _, network = load_network(hard, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    names = [la.name for la in network.hidden_layers]
    x_all = np.load(data)["x"]
    stuck = None if "--stuck-at" not in extra else int(extra[extra.index("--stuck-at") + 1])
    for fault_set in vector["worst"][:3]:
        x = x_all[fault_set["input_index"] : fault_set["input_index"] + 1]
        error = replay_float_flips(model, values, names, x, fault_set, stuck)
        assert abs(error - fault_set["error"]) <= 1e-4 * max(1.0, error), (error, fault_set)


def _guarded(constant: float) -> onnx.ModelProto:
    """x ∈ [0, 1] → h = Relu(x + 1) ∈ [1, 2] → Where(IsNaN(h), c, h) → Clip(0, 3) → y (an attack's model)."""
    h = onnx.helper
    values = (("w0", [[1.0]]), ("b0", [1.0]), ("c", constant), ("lo", 0.0), ("hi", 3.0), ("w1", [[1.0]]), ("b1", [0.0]))
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in values]
    nodes = [h.make_node("Gemm", ["x", "w0", "b0"], ["z"]), h.make_node("Relu", ["z"], ["h"]),
             h.make_node("IsNaN", ["h"], ["n"]), h.make_node("Where", ["n", "c", "h"], ["g"]),
             h.make_node("Clip", ["g", "lo", "hi"], ["p"]), h.make_node("Gemm", ["p", "w1", "b1"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_a_nan_guard_whose_constant_is_nan_guards_nothing(tmp_path) -> None:
    """Where(IsNaN(h), NaN, h) lets NaN through: bit 30 of h = 1.5 makes it NaN and onnxruntime's output is NaN. Such a
    guard was read as NaN-safe (a finite bound of 2, an independent attack); it is refused in one line now, while the
    same guard with the constant 0 keeps its finite bound, which the real flips respect."""
    bad, good = tmp_path / "nan.onnx", tmp_path / "zero.onnx"
    onnx.save(_guarded(np.nan), bad)
    onnx.save(_guarded(0.0), good)
    runner = FaultRunner(_guarded(np.nan), ["h"], [(1,)])
    x = np.array([[0.5]], np.float32)
    stored = runner.run(x, [np.ones((1, 1))], [np.zeros((1, 1))], output="y")  # y = h here
    assert np.isnan(runner.run(x, [np.zeros((1, 1))], [flip_float(stored.reshape(-1), 30).reshape(1, 1)]))
    proc = run_cli("bound", bad, "--bit-flip", 1, "--bit", 30, "-e", 1, expect=2)
    assert "IsNaN" in proc.stderr and "NaN" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    report = cli_json("bound", good, "--bit-flip", 1, "--bit", 30, "-e", 1)
    assert report["fep_tight"] is not None and report["fep_tight"] >= 1.5  # clip(flip) ∈ [0, 3] against h ∈ [1, 2]


def test_a_value_that_may_pass_the_largest_float32_is_refused(tmp_path) -> None:
    """x ∈ [0, 10] → h0 = Relu(10³⁷·x) → h1 = Relu(3·h0) → y = h1: clean values stay below 3.1·10³⁸, but bit 22 of
    h0 = 10³⁸ makes it 1.5·10³⁸ and h1 overflows to +inf in onnxruntime, where a float64 bound stays finite (an
    attack: 4.5·10³⁸). Refused in one line, like float16's overflow."""
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
             (("w0", [[1e37]]), ("b0", [0.0]), ("w1", [[3.0]]), ("b1", [0.0]), ("w2", [[1.0]]), ("b2", [0.0]))]
    nodes = [h.make_node("Gemm", ["x", "w0", "b0"], ["p0"]), h.make_node("Relu", ["p0"], ["h0"]),
             h.make_node("Gemm", ["h0", "w1", "b1"], ["p1"]), h.make_node("Relu", ["p1"], ["h1"]),
             h.make_node("Gemm", ["h1", "w2", "b2"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    runner = FaultRunner(model, ["h0"], [(1,)])
    x = np.array([[10.0]], np.float32)
    assert np.isfinite(runner.clean(x)).all()
    assert np.isinf(runner.run(x, [np.zeros((1, 1))], [flip_float(np.float32([1e38]), 22).reshape(1, 1)])).all()
    proc = run_cli("bound", path, "--bit-flip", 1, "--bit", 22, "--input-range", "0,10", "-e", 1, expect=2)
    assert "largest float32 value" in proc.stderr and "'p1'" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["bound", "inject"])
def test_a_wrong_number_of_flip_counts_names_bit_flip(command) -> None:
    """It named --crash/--byzantine, which the command line did not use (a new-user trial)."""
    from conftest import run_in_process

    proc = run_in_process(command, CNN_FLOAT, "--bit-flip", "1,2", "-e", "1", expect=2)
    assert "2 counts given (--bit-flip)" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_stuck_at_needs_its_value_and_bit_alone_means_a_flip() -> None:
    """``bound --mode stuck_at`` without ``--stuck-at`` ran bit flips silently: now one line, exit 2; ``--bit B``
    alone means a flip of bit B (as ``--stuck-at`` alone means a stuck bit; it said to add --bit-flip), the same
    report as ``--bit-flip 1 --bit B``; ``--crash 1 --bit 3`` is still refused."""
    from conftest import run_in_process

    proc = run_in_process("bound", CNN_FLOAT, "--mode", "stuck_at", expect=2)
    assert proc.stderr.strip() == "robaudit: --mode stuck_at needs --stuck-at 0|1, the value the bit is stuck at"
    implied = cli_json("bound", CNN_FLOAT, "--bit", 22)
    given = cli_json("bound", CNN_FLOAT, "--bit-flip", 1, "--bit", 22)
    assert (implied["settings"]["mode"], implied["settings"]["bit"]) == ("bit_flip", 22)
    def counted(report: dict) -> list:
        return [[la[k] for k in ("delta", "max_failures", "max_failures_tight")] for la in report["layers"]]

    assert counted(implied) == counted(given)
    assert implied["uniform"] == given["uniform"]
    for other in (("--crash", 1), ("--mode", "crash"), ("--capacity", 1)):  # --bit beside another mode: refused
        both = run_in_process("bound", CNN_FLOAT, *other, "--bit", 3, expect=2)
        assert "--bit and --stuck-at apply to stored-value faults" in both.stderr, other


def _stuck_at_0(values: np.ndarray, bit: int) -> np.ndarray:
    words = np.asarray(values, np.float32).view(np.uint32) & ~np.uint32(1 << bit)
    return words.view(np.float32).astype(np.float64)


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-1e3, 1e3), width=st.floats(0.0, 2e3), bit=st.integers(0, 31), seed=st.integers(0, 2**16))
@example(lo=-5.0, width=2.0, bit=31, seed=0)  # the sign of negative values only: |v| is above the box
def test_a_bit_stuck_at_0_stays_in_the_faulty_box_of_its_value(lo, width, bit, seed) -> None:
    """The faulty box of a stored float32 with a bit stuck at 0 (``_flipped_hull`` with the terms of
    ``Analysis.float_flip_terms``: within c·|v|max + t of v, and between 0 and v or at |v|) holds every value the
    stuck bit leaves, computed on the float32 words; a hull without |v| misses the sign bit's."""
    from robaudit.graph.ibp import _flipped_hull
    from robaudit.graph.ops import Interval

    hi = np.float32(lo + width)
    box = Interval(np.array([np.float32(lo)], np.float64), np.array([hi], np.float64))
    values = np.random.default_rng(seed).uniform(box.lo[0], box.hi[0], 200).astype(np.float32)
    values = np.concatenate([values, np.float32([box.lo[0], box.hi[0]])])
    m, subnormal = 23, 2.0**-149
    terms = (2.0 ** (bit - m), 2.0**bit * subnormal) if bit < m else ((2.0, 0.0) if bit == 31 else (1.0, 0.0))
    stuck = _stuck_at_0(values, bit)
    for c, t in (terms, (2.0, 2.0 ** (m - 1) * subnormal)):  # this bit's terms, and any bit's
        hull = _flipped_hull(box, c, t, True)
        assert np.all(stuck >= hull.lo[0]) and np.all(stuck <= hull.hi[0]), (bit, c, t)
    without_sign = min(float(_flipped_hull(box, *terms, True).hi[0]), max(float(box.hi[0]), 0.0))
    if bit == 31 and box.lo[0] < 0 and -box.lo[0] > max(float(box.hi[0]), 0.0):
        assert stuck.max() > without_sign  # the weakened hull (no |v|) is caught


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-1e3, 1e3), width=st.floats(0.0, 2e3), stuck=st.sampled_from([None, 0, 1]), seed=st.integers(0, 99))
def test_the_sign_bit_stays_in_the_mirror_hull_of_its_value(lo, width, stuck, seed) -> None:
    """The sign bit flipped, stuck at 0 or at 1 (float32 words) leaves −v, |v| or −|v|: inside the faulty box
    ``_flipped_hull`` gives with ``sign``, which is the closed form [min(lo, −hi), max(hi, −lo)] (within the
    widening by 2|v|max)."""
    from robaudit.graph.ibp import _flipped_hull
    from robaudit.graph.ops import Interval

    hi = np.float32(lo + width)
    box = Interval(np.array([np.float32(lo)], np.float64), np.array([hi], np.float64))
    values = np.random.default_rng(seed).uniform(box.lo[0], box.hi[0], 200).astype(np.float32)
    values = np.concatenate([values, np.float32([box.lo[0], box.hi[0]])])
    words = values.view(np.uint32)
    mask = np.uint32(1 << 31)
    changed = words ^ mask if stuck is None else (words & ~mask if stuck == 0 else words | mask)
    moved = changed.view(np.float32).astype(np.float64)
    hull = _flipped_hull(box, 2.0, 0.0, stuck == 0, True)
    assert np.all(moved >= hull.lo[0]) and np.all(moved <= hull.hi[0])
    assert hull.lo[0] >= min(box.lo[0], -box.hi[0]) and hull.hi[0] <= max(box.hi[0], -box.lo[0])


@pytest.mark.parametrize("flag", [("--stuck-at", "0"), ("--bit", "3")])
def test_bound_reads_stuck_at_or_bit_alone_as_one_fault_per_layer(tmp_path, flag):
    """README: "--bit B or --stuck-at V alone mean one such fault per layer" — bound printed no vector then
    (a new-user trial's finding), inject did."""
    path = dense_chain([4, 3, 3, 2], ["relu", "relu"]).save(tmp_path)
    alone = cli_json("bound", path, *flag, "--format", "json")
    given = cli_json("bound", path, "--bit-flip", "1", *flag, "--format", "json")
    assert alone["fep"] is not None and alone["fep"] == given["fep"]
    assert [la["failures"] for la in alone["layers"]] == [1, 1]
