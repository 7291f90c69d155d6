"""``robaudit inject --replay``: the fault sets of an inject report, run again (subprocess, as a user runs it).

Replayed errors are compared with the recorded ones and with an independent injector
(``tests/ort_faults.py``, which shares no code with robaudit) fed the same fault sets
by hand; edited, foreign or mismatched reports are refused with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SAMPLES, cli_json, dense_chain, describe, run_in_process
from ort_faults import FaultRunner
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.cli

SIZES = [6, 8, 7, 3]


@pytest.fixture(scope="module")
def chain_files(tmp_path_factory):
    """A 6-8-7-3 relu/tanh chain, inputs for it, and a worst-search byzantine inject report on them."""
    folder = tmp_path_factory.mktemp("replay")
    chain = dense_chain(SIZES, ["relu", "tanh"], seed=3)
    model = chain.save(folder)
    inputs = folder / "x.npy"
    np.save(inputs, np.random.default_rng(5).uniform(0, 1, (24, SIZES[0])).astype(np.float32))
    report = folder / "worst.json"
    args = ["--byzantine", "2", "--failure-range", "-1,2", "--search", "worst", "--trials", "20"]
    run_in_process("inject", model, *args, "--inputs", inputs, "--report", report, "-q")
    return chain, model, inputs, report


def independent_error(chain, x: np.ndarray, layer_names: list[str], faults: list[dict]) -> float:
    """max over inputs of ‖F̃(x) − F(x)‖∞ with the set's neurons overwritten, by the test's own injector."""
    shapes = [(size,) for size in SIZES[1:-1]]
    runner = FaultRunner(chain.model, chain.hidden_outputs, shapes)
    keeps = [np.ones((len(x), *shape)) for shape in shapes]
    repls = [np.zeros((len(x), *shape)) for shape in shapes]
    for entry in faults:
        layer = layer_names.index(entry["layer"])
        for neuron, value in zip(entry["neurons"], entry["values"], strict=True):
            keeps[layer][:, neuron] = 0.0
            repls[layer][:, neuron] = value
    faulty, clean = runner.run(x, keeps, repls), runner.clean(x)
    return float(np.abs(faulty - clean).max())


def test_replay_reproduces_the_recorded_errors_and_an_independent_injector(chain_files):
    chain, model, inputs, report = chain_files
    recorded = json.loads(report.read_text())
    replayed = cli_json("inject", model, "--replay", report, "--inputs", inputs)
    sets = replayed["sets"]
    moved = [v["moved_input"] for v in recorded["vectors"] if v.get("moved_input")]
    worst = sum(len(v["worst"]) for v in recorded["vectors"])
    assert len(sets) == worst + len(moved) and worst > 1
    assert replayed["replay"]["reproduced"] is True and replayed["violation"] is False
    names = [layer["name"] for layer in recorded["layers"]]
    x = np.load(inputs)
    for entry, original in zip(sets[worst:], moved, strict=True):  # the worst search's moved input, on its own
        own = np.array(original["input"], np.float32).reshape((1,) + x.shape[1:])
        assert entry["recorded"]["input_index"] == -1
        assert entry["measured"]["max"] == pytest.approx(original["error"], rel=1e-6)
        independent = independent_error(chain, own, names, entry["faults"])
        assert entry["measured"]["max"] == pytest.approx(independent, rel=1e-5)
        assert entry["measured"]["max"] <= entry["bound"]
    for entry, original in zip(sets[:worst], recorded["vectors"][0]["worst"], strict=True):
        assert entry["faults"] == original["faults"]
        assert entry["recorded"] == {"error": original["error"], "input_index": original["input_index"]}
        assert entry["measured"]["max"] == pytest.approx(original["error"], rel=1e-6)
        assert entry["measured"]["max"] == pytest.approx(independent_error(chain, x, names, entry["faults"]), rel=1e-5)
        assert entry["measured"]["max"] <= entry["bound"]
        assert entry["bound"] == pytest.approx(recorded["vectors"][0]["bound"], rel=1e-12)


def test_the_replay_table_names_the_moved_input(chain_files):
    """The worst search's moved input is index −1 in the report; the table says '@moved' (it printed '@-1')."""
    _, model, inputs, report = chain_files
    table = run_in_process("inject", model, "--replay", report, "--inputs", inputs, "-q").stdout
    assert "@moved" in table and "@-1" not in table, table


def test_replay_of_synapse_sets_from_a_yaml_report_with_sampled_inputs(tmp_path):
    model = dense_chain([5, 6, 4, 2], ["relu", "relu"], seed=1).save(tmp_path)
    report = tmp_path / "synapses.yaml"
    run_in_process("inject", model, "--synapse", "2", "--crash", "0", "--samples", "20", "--seed", "9",
                   "--report", report)
    replayed = cli_json("inject", model, "--replay", report)
    recorded = yaml.safe_load(report.read_text())
    assert replayed["inputs"]["count"] == 20 and "seed 9" in replayed["inputs"]["source"]
    assert all(entry["reproduced"] for entry in replayed["sets"]), replayed["sets"]
    for entry, original in zip(replayed["sets"], recorded["vectors"][0]["worst"], strict=True):
        assert entry["faults"] == original["faults"] and entry["faults"][0]["synapses"]
        assert entry["measured"]["max"] == pytest.approx(original["error"], rel=1e-6)


def test_replay_reads_the_reports_inputs_file_and_says_other_inputs_once(chain_files, tmp_path):
    """The report used --inputs: a replay without them reads that file where the report names it and reproduces
    every error (it drew random samples, a new-user trial); the file gone, one line and exit 2; another file
    given, said once, in a note naming the report's file (not a warning per fault set)."""
    _, model, inputs, report = chain_files
    plain = run_in_process("inject", model, "--replay", report)
    assert "reproduced" in plain.stdout and "the report ran on" not in plain.stdout, describe(plain)
    assert cli_json("inject", model, "--replay", report)["replay"]["reproduced"] is True
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(6).uniform(0, 1, np.load(inputs).shape).astype(np.float32))
    proc = run_in_process("inject", model, "--replay", report, "--inputs", other)
    assert "run again" in proc.stdout and "differs" in proc.stdout, describe(proc)
    assert proc.stdout.count("note: the report ran on") == 1, describe(proc)
    assert "other inputs than the report's?" not in proc.stderr, describe(proc)
    (note,) = cli_json("inject", model, "--replay", report, "--inputs", other)["notes"]  # unwrapped
    assert note.startswith(f"the report ran on {inputs}") and note.endswith("pass the report's --inputs file")
    moved = tmp_path / "moved.npy"
    inputs.rename(moved)
    try:
        gone = run_in_process("inject", model, "--replay", report, expect=2)
        assert len(gone.stderr.strip().splitlines()) == 1 and "pass it with --inputs FILE" in gone.stderr, gone.stderr
    finally:
        moved.rename(inputs)


@pytest.mark.parametrize(
    "extra", [["-e", "0.01"], ["--input-range", "0,2"], ["--method", "paper"], ["--seed", "5"], ["--search", "worst"],
              ["--trials", "5"], ["--workers", "2"]]
)
def test_replay_refuses_every_setting_it_takes_from_the_report(chain_files, extra):
    """These were ignored without a word (a new-user trial): the replay runs the report's settings."""
    _, model, _, report = chain_files
    proc = run_in_process("inject", model, "--replay", report, *extra, expect=2)
    assert f"drop {extra[0] if extra[0] != '-e' else '--epsilon'}" in proc.stderr, describe(proc)


def test_replay_names_a_tensor_given_as_it_was_given(chain_files):
    """--output-tensor once (it was listed twice), and a tensor given as -o NAME as '--output NAME'."""
    _, model, _, report = chain_files
    proc = run_in_process("inject", model, "--replay", report, "--output-tensor", "y", expect=2)
    assert proc.stderr.count("--output-tensor") == 1, describe(proc)
    proc = run_in_process("inject", model, "--replay", report, "-o", "y", expect=2)
    assert "drop --output y" in proc.stderr, describe(proc)


def test_replay_with_an_inputs_file_of_a_report_that_drew_samples_says_so(chain_files, tmp_path):
    """The report drew its inputs; a replay given a file ran on other inputs: one note saying to drop --inputs (the
    warning per fault set asked for 'its --inputs file', which there was none of)."""
    _, model, inputs, _ = chain_files
    drawn = tmp_path / "drawn.json"
    run_in_process("inject", model, "--crash", "1", "--trials", "10", "-q", "-o", drawn)
    proc = run_in_process("inject", model, "--replay", drawn, "--inputs", inputs)
    assert "--inputs file" not in proc.stderr, describe(proc)
    (note,) = cli_json("inject", model, "--replay", drawn, "--inputs", inputs)["notes"]
    assert note.endswith("replay without --inputs (it draws the report's samples again)"), note


def edited(report: Path, tmp_path: Path, change) -> Path:
    data = json.loads(report.read_text())
    change(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _first_fault(data: dict) -> dict:
    return data["vectors"][0]["worst"][0]["faults"][0]


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda d: _first_fault(d).update(neurons=[999, 0]), ("neuron", "999")),
        (lambda d: _first_fault(d).update(values=[5.0, 5.0]), ("outside", "failure range")),
        (lambda d: _first_fault(d).update(layer="nowhere"), ("nowhere", "not a hidden layer")),
        (lambda d: _first_fault(d).update(neurons=[1], values=[0.0]), ("files it under",)),
        (lambda d: d["model"].update(sha256="0" * 64), ("SHA-256",)),
        (lambda d: d.update(command="bound"), ("not a report of 'robaudit inject'",)),
        (lambda d: d.pop("vectors"), ("vectors",)),
        (lambda d: _first_fault(d).update(neurons=["a", 0]), ("neuron index",)),
    ],
)
def test_edited_reports_are_refused(chain_files, tmp_path, change, fragments):
    _, model, inputs, report = chain_files
    path = edited(report, tmp_path, change)
    proc = run_in_process("inject", model, "--replay", path, "--inputs", inputs, expect=None)
    assert_one_line_error(proc, *fragments)


def test_replay_refuses_other_files_and_flags(chain_files, tmp_path):
    _, model, _, report = chain_files
    missing = tmp_path / "missing.json"
    assert_one_line_error(run_in_process("inject", model, "--replay", missing, expect=None), "does not exist")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not: [valid")
    proc = run_in_process("inject", model, "--replay", garbage, expect=None)
    assert_one_line_error(proc, "not a YAML or JSON report")
    proc = run_in_process("inject", model, "--replay", report, "--crash", "1", expect=None)
    assert_one_line_error(proc, "--replay", "--crash")
    other = SAMPLES / "paper_mlp_sigmoid.onnx"
    assert_one_line_error(run_in_process("inject", other, "--replay", report, expect=None), "SHA-256")


def test_the_replay_status_is_injects(chain_files):
    """A replayed error above the report's ε is '> ε', as in inject's own table (a new-user trial read the replay's
    'ok' — then "within the bound" — as "within ε"), with the legend under the table; the report's ε is the
    default 0.1, below every error this byzantine campaign records."""
    _, model, inputs, report = chain_files
    recorded = json.loads(report.read_text())
    epsilon = recorded["settings"]["epsilon"]
    errors = [w["error"] for v in recorded["vectors"] for w in v["worst"]]
    assert min(errors) > epsilon
    table = run_in_process("inject", model, "--replay", report, "--inputs", inputs, "-q", columns=240).stdout
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert rows and all("> ε" in row for row in rows), table
    assert any(line.startswith("status: ok: replayed ≤ ε") for line in table.splitlines()), table
