"""``robaudit inject`` and ``robaudit bound --empirical`` as a user runs them (subprocess).

Soundness: on every sample model the measured error stays below the bound; the docs/method.md §3.1
network reaches it; reports are reproducible; violations exit 1 loudly; bad inputs exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLES, cli_json, dense_chain, describe, run_in_process
from test_inject import equal_weight_fep

pytestmark = pytest.mark.cli

LAYER_KEYS = {"name", "kind", "neurons", "max_weight", "lipschitz", "delta", "max_failures"}


def test_paper_mlp_crash_2_table():
    proc = run_in_process("inject", SAMPLES / "paper_mlp_sigmoid.onnx", "--crash", "2")
    assert "fault injection" in proc.stdout and "best/bound" in proc.stdout, describe(proc)
    assert "[2, 2]" in proc.stdout and "ok" in proc.stdout, describe(proc)
    assert proc.stderr == "", describe(proc)  # no progress bar when stderr is not a terminal


@pytest.mark.parametrize(
    ("model", "args"),
    [
        ("paper_mlp_sigmoid", ["--crash", "2", "--search", "worst"]),
        ("paper_mlp_sigmoid", ["--byzantine", "3,2", "--capacity", "2"]),
        ("digits_mlp", ["--crash", "3", "--inputs", SAMPLES / "digits_inputs.npz"]),
        ("lenet", ["--crash", "2", "--samples", "16", "--trials", "50"]),
        ("lenet", ["--byzantine", "1", "--failure-range", "-1,3", "--search", "worst", "--trials", "20"]),
        ("resnet_small", ["--crash", "1", "--samples", "8", "--trials", "30"]),
        ("resnet_small_bn", ["--crash", "2", "--layer", "block2.conv1", "--samples", "8", "--search", "worst"]),
        ("mobilenet_se", ["--byzantine", "2", "--capacity", "1", "--samples", "8", "--trials", "30"]),
        ("text_gru", ["--byzantine", "1", "--capacity", "1", "--samples", "32", "--search", "worst"]),
        ("encoder", ["--crash", "1", "--samples", "32", "--search", "worst"]),
    ],
)
def test_sample_models_stay_below_the_bound(model, args):
    report = cli_json("inject", SAMPLES / f"{model}.onnx", *args)
    assert report["violation"] is False
    assert 0 < report["measured"]["max"] <= report["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
    assert report["bound"] == min(report["fep_paper"], report["fep_tight"])
    # the ratio is the bracket's: best found (a moved input counts for the worst search) over the bound
    best = report["bracket"]["best_found"]
    assert best >= report["measured"]["max"] and best <= report["bound"] * (1 + 1e-5) + report["margin"]["absolute"]
    assert report["ratio"] == pytest.approx(best / report["bound"])


def test_report_keys_and_layers():
    data = np.load(SAMPLES / "digits_inputs.npz")
    report = cli_json(
        "inject",
        SAMPLES / "digits_mlp.onnx",
        "--crash",
        "1,2",
        "--inputs",
        SAMPLES / "digits_inputs.npz",
        "--labels",
        SAMPLES / "digits_inputs.npz",
        "--trials",
        "20",
    )
    for key in ("schema_version", "robaudit_version", "model", "settings", "layers", "measured", "bound"):
        assert key in report, sorted(report)
    assert set(report["measured"]) == {"max", "mean", "p95"}
    assert {"path", "sha256", "producer", "opset"} <= set(report["model"])
    assert report["settings"]["mode"] == "crash" and report["settings"]["input_range"] == [0.0, 1.0]
    assert [la["name"] for la in report["layers"]] == ["MatMul", "MatMul1"]
    assert all(LAYER_KEYS <= set(la) for la in report["layers"])
    assert report["failures"] == [1, 2]
    assert report["inputs"]["count"] == len(data["x"]) and report["inputs"]["clean_accuracy"] == 1.0
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["flip_rate"] <= 1
    worst = report["vectors"][0]["worst"][0]
    assert [f["layer"] for f in worst["faults"]] == ["MatMul", "MatMul1"]
    assert [len(f["neurons"]) for f in worst["faults"]] == [1, 2]
    assert worst["error"] == report["measured"]["max"]


def test_same_seed_identical_report(tmp_path):
    args = ["inject", SAMPLES / "lenet.onnx", "--byzantine", "1", "--capacity", "1", "--samples", "8", "--trials", "20"]
    first, second = cli_json(*args, "--seed", "7"), cli_json(*args, "--seed", "7")
    assert first == second
    other = cli_json(*args, "--seed", "8")
    assert other["measured"] != first["measured"]


def test_worst_search_reaches_fep_on_the_spec_network(tmp_path):
    sizes = [5, 4, 6, 2]
    path = dense_chain(sizes, ["relu", "relu"], const_weight=0.4).save(tmp_path)
    ones = tmp_path / "ones.npy"
    np.save(ones, np.ones((2, 5), np.float32))
    report = cli_json("inject", path, "--crash", "2,3", "--search", "worst", "--inputs", ones)
    fep = equal_weight_fep(sizes, 0.4, [2, 3])
    assert report["bound"] == pytest.approx(fep, rel=1e-5)
    assert report["measured"]["max"] == pytest.approx(fep, rel=0.01)
    assert report["violation"] is False


def test_violation_exits_1_loudly(tmp_path):
    """--activation-bound asserts |y| ≤ Y; a false assumption makes the bound too small."""
    report_file = tmp_path / "r.json"
    proc = run_in_process(
        "inject",
        SAMPLES / "paper_mlp_sigmoid.onnx",
        "--crash",
        "2",
        "--activation-bound",
        "0.01",
        "--output",
        report_file,
        expect=1,
    )
    assert "WARNING: measured error" in proc.stderr and "exceeds" in proc.stderr, describe(proc)
    assert "VIOLATION" in proc.stdout, describe(proc)
    report = json.loads(report_file.read_text())
    assert report["violation"] is True and report["measured"]["max"] > report["bound"]


def test_a_synapse_campaign_is_titled_and_quoted_as_one(tmp_path):
    """Synapse failures alone fail no neuron: the title says 'crash synapses' (it said 'crash') and the ε line quotes
    the synapse counts beside the [0, 0, …] neuron counts (a new-user trial)."""
    args = ["--synapse", "3", "--samples", "8", "--trials", "20", "-e", "0.001", "-q"]
    proc = run_in_process("inject", SAMPLES / "lenet.onnx", *args, expect=0)
    assert "(random search, crash synapses)" in " ".join(proc.stdout.split()), proc.stdout
    assert "not ε-robust for [0, 0, 0, 0], synapses [0, 0, 3, 3]" in proc.stdout, proc.stdout


def test_a_violation_under_a_too_small_activation_bound_names_the_layer_that_exceeds_it():
    """--activation-bound 2 on the digits CNN, whose layers reach far more: the violation warning says which
    layer's computed range passes the assumed bound (it said only 'a defect, or a violated assumption')."""
    args = ["--crash", "1", "--activation-bound", "2", "--inputs", SAMPLES / "digits_cnn_inputs.npz", "--search",
            "worst", "-e", "1", "-q"]
    proc = run_in_process("inject", SAMPLES / "digits_cnn.onnx", *args, expect=1)
    assert "WARNING: measured error" in proc.stderr and "--activation-bound 2 assumes |y| ≤ 2" in proc.stderr
    assert "may reach" in proc.stderr, proc.stderr


def test_an_npz_without_arrays_says_so(tmp_path):
    np.savez(tmp_path / "empty.npz")
    proc = run_in_process("inject", SAMPLES / "lenet.onnx", "--crash", "1", "--inputs", tmp_path / "empty.npz",
                          expect=2)
    assert "holds no array" in proc.stderr and "several" not in proc.stderr, proc.stderr


def test_synapse_and_layer_selection():
    args = ["--synapse", "3", "--layer", "classifier.3", "--samples", "8", "--trials", "20"]
    report = cli_json("inject", SAMPLES / "lenet.onnx", *args)
    assert report["failures"] == [0, 0, 0, 0] and report["synapses"] == [0, 0, 0, 3]
    faults = report["vectors"][0]["worst"][0]["faults"]
    assert faults[0]["layer"] == "classifier.3" and len(faults[0]["synapses"]) == 3
    assert report["violation"] is False and report["measured"]["max"] > 0


def test_bad_inputs_exit_2(tmp_path):
    """A few files through the real command; tests/test_inject_inputs.py covers every rule."""
    import re

    nan = np.random.default_rng(0).uniform(0, 1, (4, 16)).astype(np.float32)
    nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "shape.npy", np.zeros((4, 15), np.float32))
    np.save(tmp_path / "labels3.npy", np.zeros(3, np.int64))
    cases = [
        (["--inputs", tmp_path / "nan.npy"], "NaN or Inf values \\(first in sample 2\\)"),
        (["--inputs", tmp_path / "shape.npy"], "shape \\[4, 15\\]; the model's input needs \\[N, 16\\]"),
        (["--inputs", tmp_path / "missing.npz"], "does not exist"),
        (["--labels", tmp_path / "labels3.npy"], "--labels needs --inputs"),
    ]
    for args, message in cases:
        proc = run_in_process("inject", SAMPLES / "paper_mlp_sigmoid.onnx", *args, expect=2)
        assert re.search(message, proc.stderr), describe(proc)
        assert proc.stderr.startswith("robaudit: ") and "Traceback" not in proc.stderr, describe(proc)
        assert proc.stderr.count("\n") == 1, describe(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--crash", "13"], "has 12"),
        (["--crash", "1,2,3"], "3 counts"),
        (["--search", "best"], "--search"),
        (["--layer", "nope"], "no hidden layer named 'nope'"),
        (["--crash", "1", "--capacity", "2"], "apply to byzantine"),
        (["--byzantine", "1"], "--capacity C or --failure-range"),
        (["--crash", "1", "--radius", "0.1"], "add --search worst"),  # was ignored by the random search
    ],
)
def test_bad_options_exit_2(args, message):
    proc = run_in_process("inject", SAMPLES / "paper_mlp_sigmoid.onnx", *args, expect=2)
    assert message in proc.stderr, describe(proc)


def test_bound_empirical():
    report = cli_json("bound", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.5", "--empirical", "--trials", "20")
    assert set(report["empirical"]) == {"fc1", "fc2"}
    for layer in report["layers"]:
        entry = report["empirical"][layer["name"]]
        counts = [c["failures"] for c in entry["counts"]]
        assert counts == [layer["max_failures"], layer["max_failures"] + 1]
        tolerated = entry["counts"][0]
        assert tolerated["measured"] <= tolerated["bound"] * (1 + 1e-5) + 1e-6 and not tolerated["violation"]
        assert tolerated["bound"] <= 0.5 * (1 + 1e-9)
    table = run_in_process("bound", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.5", "--empirical", "--trials", "20")
    assert "measured" in table.stdout and "@" in table.stdout, describe(table)


def test_bound_empirical_reads_the_model_once(monkeypatch, tmp_path):
    """bound --empirical (with an inputs file) measures on the network it bounded: the file is read once."""
    import robaudit.bounds.audit as audit

    reads = []
    original = audit.load_model
    monkeypatch.setattr(audit, "load_model", lambda path: reads.append(path) or original(path))
    x = np.random.default_rng(0).uniform(0, 1, (6, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = cli_json("bound", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.5", "--inputs", tmp_path / "x.npy",
                      "--trials", "5")
    assert len(reads) == 1, reads
    entry = report["empirical"]["fc1"]
    assert entry["summary"] == " · ".join(f"{c['measured']:.4g} @{c['failures']}" for c in entry["counts"])
    assert "x.npy, each layer failing alone" in " ".join(report["notes"])  # measured on the file given


def _image_model(path) -> None:
    """x [N, 1, 4, 4] → Conv 3×3 (pad 1) → Relu → Conv 3×3 (pad 1) → y [N, 1, 4, 4]: an image output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (1, 2, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "image", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_an_image_output_has_no_flip_rate(tmp_path):
    """An arg-max over an image's pixels means nothing: no flip rate (null, '-' in the table) where a class vector
    has one (a new-user trial read 'flips 60.3%' on an autoencoder)."""
    _image_model(tmp_path / "image.onnx")
    report = cli_json("inject", tmp_path / "image.onnx", "--crash", "1", "--trials", "20", "--samples", "8")
    assert report["flip_rate"] is None and all(v["flip_rate"] is None for v in report["vectors"])
    assert report["measured"]["max"] > 0
    table = run_in_process("inject", tmp_path / "image.onnx", "--crash", "1", "--trials", "20", "--samples", "8")
    row = next(line for line in table.stdout.splitlines() if line.startswith("│ [1]"))
    assert "%" not in row, row
    classes = cli_json("inject", SAMPLES / "lenet.onnx", "--crash", "1", "--trials", "5", "--samples", "4")
    assert 0 <= classes["flip_rate"] <= 1


def test_the_random_search_reports_each_worst_set_once(tmp_path):
    """Random fault sets are drawn with replacement: with 2 neurons and 1 crash there are 2 sets, each drawn many
    times; the report's worst sets list each once (a new-user trial saw one listed twice)."""
    import onnx
    from onnx import TensorProto
    from test_float16 import half_network

    model = half_network([np.ones((2, 2)), np.ones((2, 1))], [np.zeros(2), np.zeros(1)], ["Relu"], True, None,
                         elem=TensorProto.FLOAT)
    onnx.save(model, tmp_path / "two.onnx")
    report = cli_json("inject", tmp_path / "two.onnx", "--crash", 1, "--search", "random", "--trials", 40,
                      "--in-process", "-q")
    worst = report["vectors"][0]["worst"]
    keys = [tuple(tuple(f["neurons"]) for f in entry["faults"]) for entry in worst]
    assert len(worst) == 2 and len(set(keys)) == 2, worst


def test_one_synapse_count_spread_over_dense_layers_is_said_with_its_vector():
    """inject puts one --synapse N into the dense layers only (the synapses it can fail); bound puts it into every
    hidden layer. The report now says which vector it measured, and its bound is bound's for that vector (a new-user
    trial compared 5.31 with bound --synapse 1's 53.13)."""
    model = SAMPLES / "digits_cnn.onnx"
    report = cli_json("inject", model, "--synapse", 1, "--samples", 4, "--trials", 10, "--in-process")
    spread = report["vectors"][0]["synapses"]
    kinds = [la["kind"] for la in cli_json("inspect", model)["layers"] if not la["is_output"]]
    assert spread == [1 if kind == "dense" else 0 for kind in kinds] and 0 in spread
    vector = ",".join(map(str, spread))
    assert any(f"`bound --synapse {vector}`" in note for note in report["notes"])
    bound = cli_json("bound", model, "--synapse", vector)
    assert report["vectors"][0]["bound"] == pytest.approx(bound["fep_tight"], rel=1e-12)
    explicit = cli_json("inject", model, "--synapse", vector, "--samples", 4, "--trials", 10, "--in-process")
    assert not any("dense layers only" in note for note in explicit["notes"])
