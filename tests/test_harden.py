"""Range restriction (docs/method.md §1.3, §9.2): ``harden`` on the trained digits CNN, the
protected δ against onnxruntime's Clip, and bit flips at every position of a hardened float
model against flips done in numpy on the float32 words."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, cli_json, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_bit_flips import bounds, flip_float, measured_flips, site_values

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import FailureModel, protected_delta
from robaudit.graph.network import NetworkOptions

SAMPLES = ROOT / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
DATA = SAMPLES / "digits_cnn_inputs.npz"


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    path = tmp_path_factory.mktemp("harden") / "hard.onnx"
    report = cli_json("harden", CNN, "--inputs", DATA, "--labels", DATA, "-o", path, "--margin", 0.05)
    return path, report


def test_harden_keeps_accuracy_and_tolerates_more(hardened) -> None:
    path, report = hardened
    assert abs(report["accuracy_after"] - report["accuracy_before"]) <= 0.005
    assert report["agreement"] >= 0.995
    assert report["fep_after"] < report["fep_before"]
    assert report["bit_flip_before"] is None and report["bit_flip_after"] is not None
    before = cli_json("bound", CNN, "-e", 20)
    after = cli_json("bound", path, "-e", 20)
    counts = [(b["max_failures"], a["max_failures"]) for b, a in zip(before["layers"], after["layers"], strict=True)]
    assert all(a >= b for b, a in counts) and any(a > b for b, a in counts), counts


def test_hardened_model_protects_every_layer(hardened) -> None:
    path, _ = hardened
    _, network = load_network(path, NetworkOptions())
    assert [la.name for la in network.hidden_layers] == ["conv1", "conv2", "fc1"]
    assert all(network.protections[la.output_value].nan_safe for la in network.hidden_layers)


def test_inspect_shows_the_restricted_ranges(hardened) -> None:
    """``inspect`` on a hardened model gives each hidden layer's Clip range (``restricted_to``, and '→ Clip [lo, hi]'
    in the table) beside its computed range — the Clip's own constants in the written file; on the original, none."""
    path, _ = hardened
    model = onnx.load(path)
    constants = {t.name: float(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer if t.dims == []}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    expected = [(constants[n.input[1]], constants[n.input[2]]) for n in clips]
    report = cli_json("inspect", path)
    hidden = [la for la in report["layers"] if not la["is_output"]]
    assert [v for la in hidden for v in la["restricted_to"]] == pytest.approx([v for pair in expected for v in pair])
    table = run_cli("inspect", path).stdout
    assert table.count("→ Clip [") == len(hidden)
    assert all(la["restricted_to"] is None for la in cli_json("inspect", CNN)["layers"])


@pytest.fixture(scope="module")
def clip_session():
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        "clip",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [None]), ("lo", []), ("hi", []))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])

    def clip(x, lo, hi):
        feed = {"x": np.asarray(x, np.float32), "lo": np.array(lo, np.float32), "hi": np.array(hi, np.float32)}
        return session.run(None, feed)[0]

    return clip


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    a=st.floats(-50, 50), span=st.floats(0, 50), ylo=st.floats(-20, 20), yspan=st.floats(0, 20),
    lo=st.floats(-10, 10), width=st.floats(0.1, 10),
)
def test_protected_delta_against_onnxruntime_clip(clip_session, a, span, ylo, yspan, lo, width) -> None:
    """|Clip(v) − Clip(y)| ≤ δ for every failed value v ∈ [a, b] and clean y ∈ [ylo, yhi]."""
    rng = np.random.default_rng(0)
    b, yhi, hi = a + span, ylo + yspan, lo + width
    v = np.concatenate([[a, b], rng.uniform(a, b, 200)])
    y = np.concatenate([[yhi, ylo], rng.uniform(ylo, yhi, 200)])
    change = np.abs(clip_session(v, lo, hi).astype(np.float64) - clip_session(y, lo, hi))
    delta = protected_delta((a, b), ylo, yhi, (lo, hi))
    assert np.all(change <= delta + 1e-5)


def test_protected_delta_shrunk_is_caught(clip_session) -> None:
    """A Clip range shrunk by 10 % in the rule gives δ below real changes."""
    lo, hi = -1.0, 3.0
    caught = 0
    for a, b, ylo, yhi in ((-10, 10, 0, 1), (0, 0, 0.5, 5), (5, 9, -4, -2)):
        v, y = np.array([a, b], float), np.array([yhi, ylo], float)
        change = np.abs(clip_session(v, lo, hi).astype(np.float64) - clip_session(y, lo, hi)).max()
        weak = protected_delta((a, b), ylo, yhi, (lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo)))
        caught += change > weak + 1e-6
    assert caught == 3


@settings(max_examples=8, deadline=None, derandomize=True)
@given(layer=st.integers(0, 2), seed=st.integers(0, 1000))
def test_hardened_bit_flips_at_every_position_within_bound(hardened, layer, seed) -> None:
    """Every bit of a float32 neuron, exponent and sign included, flipped on real inputs: within the bound."""
    path, _ = hardened
    model = onnx.load(path)
    x = np.load(DATA)["x"][:48]
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    neurons = np.random.default_rng(seed).integers(0, network.hidden_layers[layer].neurons, len(x))
    counts = [0, 0, 0]
    counts[layer] = 1
    paper, tight = bounds(path, FailureModel.bit_flip(), counts)
    assert tight < 1e6
    worst = 0.0
    for bit in range(32):
        worst = max(worst, measured_flips(model, values, x, lambda y, b=bit: flip_float(y, b), layer, neurons))
    assert worst <= min(paper, tight) * (1 + 1e-5) + 1e-5, (worst, paper, tight)
    assert site_values(model, values, x[:1])  # the sites are the layer outputs before their guard


def test_harden_refuses_bad_margin(tmp_path) -> None:
    proc = run_cli("harden", CNN, "--inputs", DATA, "-o", tmp_path / "h.onnx", "--margin", -1, expect=2)
    assert "--margin" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("target", ["same", "missing folder", "not onnx"])
def test_harden_refuses_a_bad_output_path_and_keeps_the_model(target, tmp_path) -> None:
    """-o onto the model being read overwrote it without a word, into a missing folder was an "internal error"
    (a new-user trial): both are one line and exit 2, as design --write; the model file is unchanged."""
    model = tmp_path / "m.onnx"
    model.write_bytes(CNN.read_bytes())
    out = {"same": model, "missing folder": tmp_path / "nodir" / "h.onnx", "not onnx": tmp_path / "h.txt"}[target]
    proc = run_cli("harden", model, "--inputs", DATA, "-o", out, expect=2)
    assert proc.stderr.startswith("robaudit: --output") and proc.stderr.count("\n") == 1, proc.stderr
    assert "internal error" not in proc.stderr
    assert model.read_bytes() == CNN.read_bytes()


def test_harden_report_has_the_header_of_every_report(hardened) -> None:
    _, report = hardened
    assert report["schema_version"] == 1 and report["command"] == "harden"
    assert report["model"]["path"] == str(CNN) and len(report["model"]["sha256"]) == 64
    assert report["settings"]["epsilon"] == report["epsilon"] and report["settings"]["mode"] == "crash"


def test_the_counts_each_layer_tolerates_alone_are_bounds_on_both_models(hardened) -> None:
    """harden shows, per layer, what `bound` says of the original and of the hardened model."""
    path, report = hardened
    eps = report["epsilon"]
    before = [la["max_failures"] for la in cli_json("bound", CNN, "-e", eps)["layers"]]
    after = [la["max_failures"] for la in cli_json("bound", path, "-e", eps)["layers"]]
    assert report["alone_before"] == before and report["alone_after"] == after


def test_harden_writes_its_report_file_and_prints_the_table(tmp_path) -> None:
    proc = run_cli("harden", CNN, "--inputs", DATA, "-o", tmp_path / "h.onnx", "--report", tmp_path / "h.json")
    written = json.loads((tmp_path / "h.json").read_text())
    assert written["command"] == "harden" and written["output"] == str(tmp_path / "h.onnx")
    assert "crash failures tolerated alone" in proc.stdout and "settings: mode crash" in proc.stdout
    # no --margin: the check ran on the inputs the ranges came from, which the table says
    assert "(the very inputs the ranges came from; unseen ones beyond a range get clipped)" in proc.stdout
    widened = run_cli("harden", CNN, "--inputs", DATA, "-o", tmp_path / "w.onnx", "--margin", 0.05).stdout
    assert "arg-max agreement" in widened and "the very inputs" not in widened


# --------------------------------------------------------------------------- per-channel ranges


@pytest.fixture(scope="module")
def hardened_channels(tmp_path_factory):
    path = tmp_path_factory.mktemp("harden_pc") / "hard_pc.onnx"
    report = cli_json("harden", CNN, "--inputs", DATA, "--labels", DATA, "-o", path, "--margin", 0.05,
                      "--per-channel")
    return path, report


def test_per_channel_ranges_are_each_channels_range_on_the_inputs(hardened_channels) -> None:
    """The Max/Min constants are the per-channel min/max of the layer outputs (onnxruntime), widened by 5 %."""
    path, report = hardened_channels
    model = onnx.load(path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Max") == ops.count("Min") == 3 and "Clip" not in ops
    original = onnx.load(CNN)
    values = [layer["value"] for layer in report["layers"]]
    outputs = site_values(original, values, np.load(DATA)["x"])
    for index, (layer, y) in enumerate(zip(report["layers"], outputs, strict=True)):
        axes = (0, 2, 3) if y.ndim == 4 else (0,)
        lo, hi = y.min(axis=axes).astype(np.float64), y.max(axis=axes).astype(np.float64)
        width = np.where(hi > lo, hi - lo, np.maximum(np.maximum(np.abs(lo), np.abs(hi)), 1.0))
        low = inits[f"robaudit_harden/{index}/low"].reshape(-1)
        high = inits[f"robaudit_harden/{index}/high"].reshape(-1)
        np.testing.assert_allclose(low, lo - 0.05 * width, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(high, hi + 0.05 * width, rtol=1e-6, atol=1e-6)
        assert np.ptp(hi - lo) > 0.5, layer["name"]  # the channels really differ


def test_per_channel_harden_is_tighter_and_keeps_outputs(hardened, hardened_channels) -> None:
    _, layer_report = hardened
    path, report = hardened_channels
    assert report["max_output_change"] == 0.0 and report["agreement"] == 1.0
    assert report["accuracy_after"] == report["accuracy_before"]
    assert report["fep_after"] < layer_report["fep_after"]
    assert report["bit_flip_after"] < layer_report["bit_flip_after"]
    _, network = load_network(path, NetworkOptions())
    for layer in network.hidden_layers:
        guard = network.protections[layer.output_value]
        assert guard.nan_safe and np.shape(guard.low) == (layer.neurons,)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(layer=st.integers(0, 2), seed=st.integers(0, 1000))
def test_per_channel_bit_flips_at_every_position_within_bound(hardened_channels, layer, seed) -> None:
    """Every bit of a float32 neuron flipped on real inputs behind its channel's range: within the bound."""
    path, _ = hardened_channels
    model = onnx.load(path)
    x = np.load(DATA)["x"][:48]
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    neurons = np.random.default_rng(seed).integers(0, network.hidden_layers[layer].neurons, len(x))
    counts = [0, 0, 0]
    counts[layer] = 1
    paper, tight = bounds(path, FailureModel.bit_flip(), counts)
    worst = 0.0
    for bit in range(32):
        worst = max(worst, measured_flips(model, values, x, lambda y, b=bit: flip_float(y, b), layer, neurons))
    assert worst <= min(paper, tight) * (1 + 1e-5) + 1e-5, (worst, paper, tight)


def test_per_channel_range_shrunk_is_caught(hardened_channels) -> None:
    """The rule with every channel's range shrunk by 10 % gives a bound that real flips in fc1 exceed."""
    import dataclasses

    from robaudit.bounds.fep import Analysis
    from robaudit.bounds.tight import TightBound

    path, _ = hardened_channels
    model = onnx.load(path)
    x = np.load(DATA)["x"]
    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0)))
    values = [la.output_value for la in network.hidden_layers]
    for value, guard in list(network.protections.items()):
        width = np.asarray(guard.high) - np.asarray(guard.low)
        network.protections[value] = dataclasses.replace(guard, low=guard.low + 0.05 * width,
                                                         high=guard.high - 0.05 * width)
    weak = TightBound(Analysis(network, FailureModel.bit_flip(bit=30))).fep([0, 0, 1])
    worst = 0.0
    for neuron in range(network.hidden_layers[2].neurons):
        flips = lambda y: flip_float(y, 30)  # noqa: E731 - exponent bit: ±Inf, NaN or a huge value
        worst = max(worst, measured_flips(model, values, x, flips, 2, np.full(len(x), neuron)))
    assert worst > weak * (1 + 1e-3), (worst, weak)


@pytest.mark.parametrize("mode", [["--crash", "1,1,1"], ["--byzantine", "0,1,1", "--capacity", 100.0]])
def test_per_channel_bound_covers_worst_search(hardened_channels, mode) -> None:
    """Crash and byzantine faults behind per-channel ranges: the worst search stays within the bound."""
    path, _ = hardened_channels
    report = cli_json("inject", path, *mode, "--search", "worst", "--inputs", DATA, "--trials", 30, "-q",
                      "--in-process")
    assert not report["violation"]
    for vector in report["vectors"]:
        assert 0 < vector["measured"]["max"] <= vector["bound"] * (1 + 1e-5) + report["margin"]["absolute"]


def test_the_python_api_does_not_overwrite_the_model_either(tmp_path) -> None:
    """harden_model (and design's write) refuse the model's own path, not only the command line."""
    from robaudit.applications.harden import harden_model
    from robaudit.errors import OptionError

    model = tmp_path / "m.onnx"
    model.write_bytes(CNN.read_bytes())
    x = np.load(DATA)["x"][:4]
    with pytest.raises(OptionError, match="is the model being read"):
        harden_model(model, x, model)
    assert model.read_bytes() == CNN.read_bytes()


def test_harden_takes_a_model_onnx_checker_refuses(tmp_path) -> None:
    """A graph output declared without a shape fails onnx's checker, yet onnxruntime runs it (a user's export):
    harden writes the restricted copy instead of an internal error (a float16 trial found it); the copy runs."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(size=(4, 6)).astype(np.float32), "w2": rng.normal(size=(6, 2)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Relu", ["m"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="out")],
        "shapeless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.random((20, 4)).astype(np.float32))
    run_cli("harden", tmp_path / "m.onnx", "--inputs", tmp_path / "x.npy", "-o", tmp_path / "hard.onnx")
    session = ort.InferenceSession(str(tmp_path / "hard.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": rng.random((3, 4)).astype(np.float32)})[0].shape == (3, 2)


def test_certificates_of_the_hardened_model_keep_their_signs(hardened) -> None:
    """The guard's ops carry chord slopes in certify's signed pass (docs/method.md §7.3): the hardened CNN's
    largest certificate stays near the original's (46.65 against 37.06 while the signs were lost at every
    guard; the values the failures move past a restricted range make it a little wider, not narrower)."""
    path, _ = hardened
    before = cli_json("certify", CNN, "--inputs", DATA, "--crash", 1, "-e", 5, "-q")["max_bound"]
    after = cli_json("certify", path, "--inputs", DATA, "--crash", 1, "-e", 5, "-q")["max_bound"]
    assert after <= 1.12 * before, (before, after)


def test_a_hardened_model_hardens_again(tmp_path) -> None:
    """harden (and check's harden remedy) on a model harden wrote: its guards' names are taken, so the new ones
    get free names (it stopped on 'robaudit_harden/0/low initializer name is not unique'; a new-user trial)."""
    import onnx

    model, inputs = SAMPLES / "digits_cnn.onnx", SAMPLES / "digits_cnn_inputs.npz"
    cli_json("harden", model, "--inputs", inputs, "-o", tmp_path / "once.onnx")
    again = cli_json("harden", tmp_path / "once.onnx", "--inputs", inputs, "-o", tmp_path / "twice.onnx")
    assert again["max_output_change"] == 0.0 and again["agreement"] == 1.0
    names = [i.name for i in onnx.load(tmp_path / "twice.onnx").graph.initializer]
    assert len(names) == len(set(names)) and any(n.startswith("robaudit_harden/3/") for n in names)


def test_harden_refuses_inputs_outside_the_input_range(tmp_path) -> None:
    """Digits scaled to 0..16 against the default range [0, 1]: one line naming the range that covers them, exit 2,
    and nothing written (a new-user trial saw harden accept them and read its ranges off them)."""
    x = np.load(DATA)["x"] * 16.0
    np.save(tmp_path / "raw.npy", x.astype(np.float32))
    proc = run_cli("harden", CNN, "--inputs", tmp_path / "raw.npy", "-o", tmp_path / "h.onnx", expect=2)
    assert len(proc.stderr.strip().splitlines()) == 1 and "--input-range 0,16" in proc.stderr
    assert not (tmp_path / "h.onnx").exists()


def test_clips_that_never_bind_leave_the_ranges_as_they_were(tmp_path) -> None:
    """Restrictions about 200 times as wide as what the layers take on the inputs (``--margin 100``) change no
    value the domain reaches, so every range — the back-substitution passing the NaN guard as the identity it is on
    finite values (docs/method.md §2.3) — is within the original model's, and the bound is not higher (the audited
    output's range was [−378.7, 243.5] against [−269.3, 180.4] before: the guard stopped the back-substitution)."""
    path = tmp_path / "wide.onnx"
    report = cli_json("harden", CNN, "--inputs", DATA, "-o", path, "--margin", 100, "-e", 20)
    assert report["fep_after"] <= report["fep_before"] * (1 + 1e-9)
    _, original = load_network(CNN, NetworkOptions())
    _, wide = load_network(path, NetworkOptions())
    for value in [la.output_value for la in original.hidden_layers] + [original.output_name]:
        before, after = original.clean[value], wide.clean[value]
        assert np.all(after.lo >= before.lo - 1e-6 * (1 + np.abs(before.lo))), value
        assert np.all(after.hi <= before.hi + 1e-6 * (1 + np.abs(before.hi))), value


def test_a_higher_bound_after_is_said() -> None:
    from types import SimpleNamespace

    from robaudit.formats.apps import _worse_after

    assert "higher after (63.28 > 51.09)" in _worse_after(SimpleNamespace(fep_before=51.09, fep_after=63.28))
    assert _worse_after(SimpleNamespace(fep_before=51.09, fep_after=51.09)) == ""
    assert _worse_after(SimpleNamespace(fep_before=None, fep_after=3.0)) == ""
