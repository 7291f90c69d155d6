"""What a new user meets first: ε in inject, hints, defaults, narrow terminals, help, files,
settings, inputs on another scale, names, plots, install noise, the Python API.

Every CLI test runs the real command as a subprocess; its output is in the assertion message.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, SAMPLES, cli_json, dense_chain, describe, run_in_process
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli_errors import assert_one_line_error, symbolic_models

MLP = SAMPLES / "paper_mlp_sigmoid.onnx"
LENET = SAMPLES / "lenet.onnx"
MOBILENET = SAMPLES / "mobilenet_se.onnx"
COMMANDS = ("inspect", "bound", "inject", "check", "precision", "wait", "design", "merge")


@pytest.fixture(scope="module")
def mlp_inputs(tmp_path_factory) -> Path:
    """64 inputs of the 16-feature sample MLP, inside [0, 1]."""
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, np.random.default_rng(1).uniform(0, 1, (64, 16)).astype(np.float32))
    return path


# --------------------------------------------------------------------------- 1. ε in inject


@pytest.mark.parametrize("epsilon", ["0.05", "50"])
def test_inject_marks_vectors_whose_measured_error_exceeds_epsilon(epsilon, mlp_inputs):
    args = ("inject", MLP, "--crash", "2", "--search", "worst", "-e", epsilon, "--inputs", mlp_inputs, "-q")
    proc = run_in_process(*args)
    report = cli_json(*args)
    (vector,) = report["vectors"]
    above = vector["measured"]["max"] > float(epsilon)
    assert vector["exceeds_epsilon"] is above and report["exceeds_epsilon"] is above, report["vectors"]
    assert vector["violation"] is False, "exceeding ε is not a violation of the bound"
    assert f"ε = {epsilon}" in proc.stdout, describe(proc)
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("│ [2, 2]")]
    status = row.strip("│ ").split("│")[-1].strip()
    if above:
        assert status == "> ε" and "not ε-robust for [2, 2]" in proc.stdout, describe(proc)
    else:
        assert status == "ok" and "every measured error ≤ ε" in proc.stdout, describe(proc)


def test_check_empirical_block_agrees_with_inject_on_epsilon(tmp_path, mlp_inputs):
    """The same inputs, search and seed: check's verdict fails exactly when inject says exceeds_epsilon."""
    report = cli_json(
        "inject", MLP, "--crash", "1", "--search", "worst", "--trials", "100", "--inputs", mlp_inputs, "-q"
    )
    measured = report["measured"]["max"]
    for epsilon, expect in ((measured * 0.5, 1), (measured * 2, 0)):
        policy = tmp_path / f"p{expect}.yaml"
        policy.write_text(
            f"epsilon: {epsilon!r}\nmodels:\n  - path: {MLP}\n    empirical:\n      inputs: {mlp_inputs}\n"
            "      failures: 1\n      search: worst\n      trials: 100\n",
            encoding="utf-8",
        )
        inject = cli_json(
            "inject",
            MLP,
            "--crash",
            "1",
            "--search",
            "worst",
            "--trials",
            "100",
            "-e",
            repr(epsilon),
            "--inputs",
            mlp_inputs,
            "-q",
        )
        proc = run_in_process("check", "--policy", policy, "--format", "json", expect=expect)
        check = json.loads(proc.stdout)
        (verdict,) = [r for r in check["models"][0]["requirements"] if r["key"] == "empirical.max_error"]
        assert (verdict["status"] == "fail") is inject["exceeds_epsilon"], (verdict, inject["vectors"][0])
        found = inject["vectors"][0]["bracket"]["best_found"]  # the moved input included, as exceeds_epsilon
        assert verdict["achieved"] == pytest.approx(found, rel=1e-6), (verdict, inject["vectors"][0]["bracket"])


# --------------------------------------------------------------------------- 2. all-zero hint, --activation-bound


def _hint_figures(stdout: str) -> tuple[float, float]:
    match = re.search(r"ε ≥ ([0-9.e+]+) would let each layer tolerate one failure alone; ε ≥ ([0-9.e+]+) one", stdout)
    assert match, stdout
    return float(match.group(1)), float(match.group(2))


def test_all_zero_counts_come_with_a_hint_whose_figures_hold():
    proc = run_in_process("bound", LENET, "-e", "0.5")
    report = cli_json("bound", LENET, "-e", "0.5")
    assert all(la["max_failures"] == 0 for la in report["layers"]) and report["uniform"]["max_failures"] == 0
    text = proc.stdout
    for fragment in ("hint: every count is 0", "certify", "--input-range", "harden", "gain", "δ"):
        assert fragment in text, describe(proc)
    assert len(report["hints"]) == 3, report["hints"]
    alone, together = _hint_figures(text)
    # The ε the hint names really lets every layer tolerate one failure (alone), and one in every layer.
    wider = cli_json("bound", LENET, "-e", repr(alone * 1.0001))
    assert all(la["max_failures"] >= 1 for la in wider["layers"]), wider["layers"]
    below = cli_json("bound", LENET, "-e", repr(alone * 0.999))
    assert any(la["max_failures"] == 0 for la in below["layers"]), below["layers"]
    assert cli_json("bound", LENET, "-e", repr(together * 1.0001))["uniform"]["max_failures"] >= 1
    # No hint when something is tolerated.
    assert cli_json("bound", MLP, "-e", "0.5")["hints"] == []


def test_a_model_of_one_failure_site_is_not_compared_with_a_median_layer():
    """One hidden layer (the GRU sample): the hint set it beside "the median layer's" — itself, 1× (a new-user
    trial); it now says it is the only failure site."""
    hints = cli_json("bound", SAMPLES / "text_gru.onnx", "-e", "0.1")["hints"]
    assert hints and "the only failure site" in hints[0] and "median" not in hints[0], hints


def test_synapses_that_alone_exceed_epsilon_get_their_own_hint():
    """With --synapse, counts of −1 ("none": not even 0 failed neurons beside the synapses) got the hint "every
    count is 0" (a new-user trial); the hint now names the synapses' own bound, which is the report's Fep for
    zero failed neurons, and says it is above ε."""
    report = cli_json("bound", MLP, "-e", "0.01", "--synapse", "2")
    assert all(la["max_failures"] == -1 for la in report["layers"]), report["layers"]
    assert len(report["hints"]) == 1 and "every count is 0" not in report["hints"][0], report["hints"]
    figure = float(re.search(r"give a bound of ([0-9.e+-]+) > ε = 0.01", report["hints"][0]).group(1))
    assert figure == pytest.approx(report["fep"], rel=1e-3) and report["failures"] == [0] * len(report["layers"])


def test_activation_bound_never_loosens_a_computed_range():
    plain = cli_json("bound", LENET, "-e", "500")
    loose = cli_json("bound", LENET, "-e", "500", "--activation-bound", "1e6")
    assert [la["delta"] for la in loose["layers"]] == [la["delta"] for la in plain["layers"]]
    assert [la["max_failures"] for la in loose["layers"]] == [la["max_failures"] for la in plain["layers"]]
    tight = cli_json("bound", LENET, "-e", "500", "--activation-bound", "1")
    for before, after in zip(plain["layers"], tight["layers"], strict=True):
        assert after["delta"] == pytest.approx(min(before["delta"], 1.0)), (before, after)
        assert after["max_failures"] >= before["max_failures"], (before, after)


# --------------------------------------------------------------------------- 3. one default, measured formats


def test_applications_default_to_tight_and_agree_with_bound():
    bound = cli_json("bound", MLP, "-e", "0.5")
    design = cli_json("design", MLP, "-e", "0.5", "--tolerate", "1")
    assert design["settings"]["method"] == "tight"
    assert [la["max_failures"] for la in design["layers"] if la.get("max_failures") is not None] == [
        la["max_failures"] for la in bound["layers"]
    ]
    for command in ("precision", "wait"):
        assert cli_json(command, MLP, "-e", "0.5")["settings"]["method"] == "tight"
    help_text = run_in_process("precision", "--help").stdout
    assert "tight (default" in help_text, help_text


def test_precision_measures_the_formats_it_judges(tmp_path):
    inputs = tmp_path / "digits.npz"
    with np.load(SAMPLES / "digits_inputs.npz") as data:
        np.savez(inputs, x=data["x"][:64])
    model = SAMPLES / "digits_mlp.onnx"
    proc = run_in_process("precision", model, "-e", "1", "--inputs", inputs)
    report = cli_json("precision", model, "-e", "1", "--inputs", inputs)
    runs = {run["config"].split(":")[0]: run["measured"] | {"bound": run["bound"]} for run in report["check"]["runs"]}
    for name in ("fp16", "bf16", "int8"):
        run = runs[name]
        assert 0 < run["max"] <= run["bound"] * (1 + 1e-5) + 1e-4, run
        assert run["bound"] == pytest.approx(report["formats"][name]["bound"]), (run, report["formats"][name])
    assert runs["fp16"]["max"] < runs["bf16"]["max"], runs  # 11 significant bits round less than 8
    for name, verdict in report["formats"].items():
        if not verdict["safe"] and not verdict["reason"]:
            word = "NOT safe" if runs[name]["max"] > 1 else "not proven safe"  # measured above ε = 1 or not
            assert f"{name} {word} (" in proc.stdout, describe(proc)
    assert any(not v["safe"] for v in report["formats"].values()), "the test needs a format the bound cannot prove"


# --------------------------------------------------------------------------- 4. narrow terminals


@pytest.mark.parametrize("command", ["inspect", "bound"])
def test_narrow_terminal_keeps_names_and_numbers_whole(command):
    proc = run_in_process(command, MOBILENET, "-e", "0.5", columns=80)
    report = cli_json(command, MOBILENET, "-e", "0.5")
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), describe(proc)
    assert "…" not in proc.stdout, describe(proc)
    rows = [line for line in lines if line.startswith("│")]
    for layer in report["layers"]:
        assert any(f" {layer['name']} " in row for row in rows), (layer["name"], proc.stdout)
        assert any(f" {layer['neurons']} " in row for row in rows), (layer["neurons"], proc.stdout)
    if command == "bound":
        for layer in report["layers"]:
            assert any(f" {layer['delta']:.4g} " in row for row in rows), (layer["delta"], proc.stdout)


def test_narrow_terminal_keeps_check_model_paths_whole(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    model = folder / "paper_mlp_sigmoid_export.onnx"
    model.write_bytes(MLP.read_bytes())
    proc = run_in_process(
        "check", model, "-e", "0.48", "--require-crash", "1", "--require-layer", "fc1=2", expect=1, columns=80
    )
    assert str(model) in proc.stdout.replace("\n", "") or str(model) in proc.stdout, describe(proc)
    assert "…" not in proc.stdout and all(len(line) <= 80 for line in proc.stdout.splitlines()), describe(proc)


# --------------------------------------------------------------------------- 5. help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_accepts_dash_h_has_examples_and_readable_metavars(command):
    proc = run_in_process(command, "-h")
    text = proc.stdout
    assert text.startswith(f"Usage: robaudit {command} "), describe(proc)
    assert "Examples:" in text and f"robaudit {command} " in text.split("Examples:")[1], describe(proc)
    assert "docs/method.md" in text, describe(proc)
    for bad in ("SPEC", "<str>", "<float>", "<int>", "<path>", "{model}", "{MODEL}"):
        assert bad not in text, (bad, text)
    assert run_in_process(command, "--help").stdout == text


def test_top_level_help_and_legends_under_tables():
    assert "Examples:" in run_in_process("-h").stdout
    proc = run_in_process("bound", MLP, "-e", "0.5", "--crash", "1")
    legend = [line for line in proc.stdout.splitlines() if line.startswith("legend:")]
    assert legend and all(sym in legend[0] for sym in ("K:", "δ:", "f:")), describe(proc)
    proc = run_in_process("inject", MLP, "--crash", "1", "--samples", "8", "-q")
    assert any(line.startswith("status: ok: measured ≤ ε") for line in proc.stdout.splitlines()), describe(proc)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("legend: max, mean, p95:") and "best/bound:" in line for line in lines), describe(proc)


# --------------------------------------------------------------------------- 6. files


def test_output_with_a_non_report_suffix_is_an_error(tmp_path):
    proc = run_in_process("bound", MLP, "-o", tmp_path / "out.txt", expect=None)
    assert_one_line_error(proc, "out.txt", ".yaml", ".yml", ".json", "--output-tensor")
    assert not (tmp_path / "out.txt").exists()


def test_every_written_file_is_announced(tmp_path):
    report = tmp_path / "r.yaml"
    proc = run_in_process("bound", MLP, "-e", "0.5", "-o", report)
    assert report.is_file() and f"wrote report to {report}" in proc.stderr, describe(proc)
    plot = tmp_path / "p.png"
    proc = run_in_process("bound", MLP, "-e", "0.5", "--plot", plot)
    assert plot.is_file() and f"wrote plot to {plot}" in proc.stderr, describe(proc)
    junit, summary = tmp_path / "j.xml", tmp_path / "c.json"
    proc = run_in_process("check", MLP, "-e", "0.5", "--require-layer", "fc1=1", "--junit", junit, "--report", summary)
    assert f"wrote JUnit XML to {junit}" in proc.stderr and f"wrote report to {summary}" in proc.stderr, describe(proc)
    scaled = tmp_path / "s.onnx"
    proc = run_in_process("design", MLP, "-e", "0.5", "--tolerate", "1", "--write", scaled)
    assert scaled.is_file() and f"scaled model written to {scaled}" in proc.stdout, describe(proc)


def test_pytorch_checkpoint_is_named_with_the_export_line(tmp_path):
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(3, 2)
    torch.save(layer.state_dict(), tmp_path / "digits.pt")
    proc = run_in_process("bound", tmp_path / "digits.pt", expect=None)
    assert_one_line_error(proc, "PyTorch checkpoint", "torch.onnx.export(")
    assert "unpack" not in proc.stderr


def test_inputs_that_are_a_script_are_not_blamed_on_pickles(tmp_path):
    script = tmp_path / "build.py"
    script.write_text("import numpy as np\n", encoding="utf-8")
    proc = run_in_process("inject", MLP, "--inputs", script, expect=None)
    assert_one_line_error(proc, "build.py", "text file", ".npy")
    assert "pickle" not in proc.stderr


# --------------------------------------------------------------------------- 7. settings


def test_input_shape_is_printed_and_the_missing_shape_message_uses_known_dims(tmp_path):
    _, cnn = symbolic_models(tmp_path)
    small = run_in_process("bound", cnn, "--input-shape", "1,8,8")
    large = run_in_process("bound", cnn, "--input-shape", "1,16,16")
    settings = [next(line for line in p.stdout.splitlines() if line.startswith("settings:")) for p in (small, large)]
    assert "input shape 1×1×8×8" in settings[0] and "input shape 1×1×16×16" in settings[1], settings
    proc = run_in_process("bound", cnn, expect=None)
    assert_one_line_error(proc, "--input-shape 1,H,W")
    assert "3,224,224" not in proc.stderr


# --------------------------------------------------------------------------- 9. inputs on another scale


def test_an_error_above_the_bound_on_inputs_outside_the_range_is_exit_2_not_a_failed_audit(tmp_path):
    """Images not scaled to [0, 1] (0..255) drive LeNet's error far above the bound, which makes no claim there:
    that was exit 1 ('the audit found a problem') and violation: true beside a note saying 'not a defect'.
    Now: the report as before, and exit 2 with one line giving the --input-range that covers the data."""
    x = np.load(SAMPLES / "lenet_inputs.npz")["x"][:20].astype(np.float32) * 255.0
    inputs, report = tmp_path / "x255.npy", tmp_path / "report.json"
    np.save(inputs, x)
    proc = run_in_process("inject", SAMPLES / "lenet.onnx", "--crash", "1", "--inputs", inputs, "-q",
                          "-o", report, expect=2)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("robaudit: wrote report")]
    assert len(lines) == 1 and lines[0].startswith("robaudit: measured error above the bound"), describe(proc)
    assert f"rerun with --input-range 0,{x.max():g}" in lines[0], describe(proc)
    written = json.loads(report.read_text())
    assert written["vectors"][0]["measured"]["max"] > written["vectors"][0]["bound"]  # the report loses nothing
    assert written["violation"] and written["outside_only"] and written["vectors"][0]["outside_only"]  # README says so
    inside = run_in_process("inject", SAMPLES / "lenet.onnx", "--crash", "1", "--inputs", inputs, "-q",
                            "--input-range", f"0,{x.max():g}", expect=None)
    assert inside.returncode in (0, 1), describe(inside)  # the bound over [0, 255] covers the data: its own verdict
    assert "outside" not in inside.stdout + inside.stderr


def test_a_violation_on_inputs_inside_the_range_is_never_masked_by_others_outside(tmp_path, monkeypatch):
    """Half the inputs scaled 0..255, half inside [0, 1]. With the real bound only the outside ones exceed it:
    exit 2. With a bound made too small (what a defect would look like) the inside ones exceed it too: that is
    a violation — the warning, VIOLATION and exit 1 — even though other inputs lie outside the range."""
    x = np.load(SAMPLES / "lenet_inputs.npz")["x"][:20].astype(np.float32)
    mixed = tmp_path / "mixed.npy"
    np.save(mixed, np.concatenate([x[:10] * 255.0, x[10:]]))
    args = ("inject", SAMPLES / "lenet.onnx", "--crash", "1", "--inputs", mixed, "-q")
    real = run_in_process(*args, expect=2)
    assert "WARNING" not in real.stderr and "above bound (inputs outside range)" in real.stdout, describe(real)
    from robaudit.injection import search

    monkeypatch.setattr(search.Campaign, "_bound", lambda self, vector: (1e-3, 1e-3))  # a defective bound
    broken = run_in_process(*args, expect=1)
    assert "WARNING: measured error" in broken.stderr and "VIOLATION" in broken.stdout, describe(broken)
    report = json.loads(run_in_process(*args, "--format", "json", expect=1).stdout)
    assert report["violation"] and not report["outside_only"] and not report["vectors"][0]["outside_only"]


def test_certify_on_inputs_scaled_0_255_names_the_range_to_use(tmp_path):
    """certify refuses inputs outside the domain (a certificate holds only inside it) and, as inject does, names
    the --input-range that covers them (a new-user trial)."""
    x = np.random.default_rng(2).integers(0, 256, (8, 16)).astype(np.float32)
    x[0, 0], x[0, 1] = 0.0, 255.0
    np.save(tmp_path / "x255.npy", x)
    proc = run_in_process("certify", MLP, "--crash", "1", "--inputs", tmp_path / "x255.npy", expect=2)
    assert len(proc.stderr.strip().splitlines()) == 1 and "--input-range 0,255 covers them" in proc.stderr, proc.stderr


def test_an_unknown_output_tensor_lists_the_models_outputs():
    proc = run_in_process("bound", MLP, "--output-tensor", "logits", expect=2)
    assert len(proc.stderr.strip().splitlines()) == 1 and "the model's outputs: 'y'" in proc.stderr, proc.stderr


def test_inputs_scaled_0_255_are_said_once_with_the_range_to_use(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (32, 16)).astype(np.float32)
    x[0, 0], x[0, 1] = 0.0, 255.0
    inputs = tmp_path / "x255.npy"
    np.save(inputs, x)
    proc = run_in_process("inject", MLP, "--crash", "1", "--search", "worst", "--inputs", inputs, "-q", expect=None)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, describe(proc)  # not above the bound on this model (see the next test)
    assert both.count("lie outside the input range") == 1, describe(proc)
    assert "--input-range 0,255" in both, describe(proc)
    blamed = [line for line in both.splitlines() if "defect" in line and not line.startswith("status:")]
    assert all("not a defect" in line for line in blamed), describe(proc)
    assert "VIOLATION" not in "".join(line for line in proc.stdout.splitlines() if line.startswith("│"))
    fixed = run_in_process(
        "inject", MLP, "--crash", "1", "--search", "worst", "--inputs", inputs, "-q", "--input-range", "0,255"
    )
    assert "outside" not in fixed.stdout + fixed.stderr, describe(fixed)
    report = cli_json("inject", MLP, "--crash", "1", "--inputs", inputs, "-q", "--input-range", "0,255")
    assert report["violation"] is False, report["vectors"]


# --------------------------------------------------------------------------- 10. names


def test_layers_read_as_index_and_name_and_conv_neurons_as_channel_y_x():
    proc = run_in_process("inspect", LENET)
    assert "#1 features.0: " in proc.stdout, describe(proc)
    args = ("inject", LENET, "--crash", "1", "--samples", "4", "--trials", "5", "-q")
    proc = run_in_process(*args)
    report = cli_json(*args)
    worst = report["vectors"][0]["worst"][0]["faults"][0]
    shape = cli_json("bound", LENET)["settings"]["input_shape"]
    assert worst["layer"] == "features.0" and shape == [1, 1, 28, 28]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("worst fault set"))
    match = re.search(r"#1 features\.0 neurons \(channel,y,x\) \[\((\d+),(\d+),(\d+)\)\]", line)
    assert match, line
    c, y, x = map(int, match.groups())
    # features.0 is a 6-channel 28×28 conv output (padding 2): flat index = (c·28 + y)·28 + x.
    assert (c * 28 + y) * 28 + x == worst["neurons"][0], (line, worst)
    assert "batch size 1" not in proc.stdout + proc.stderr, describe(proc)


def test_wrong_number_of_counts_names_both_numbers(tmp_path):
    model = dense_chain([4, 3, 3, 3, 2], ["relu", "relu", "relu"]).save(tmp_path)
    for command in ("bound", "inject"):
        proc = run_in_process(command, model, "--crash", "1,2", expect=None)
        assert_one_line_error(proc, "3 hidden layers, 2 counts given")


# --------------------------------------------------------------------------- 11. plots


def _captured_figures(monkeypatch) -> list:
    from robaudit.formats import plot

    figures: list = []
    monkeypatch.setattr(plot, "save_png", lambda figure, path: figures.append(figure) or path)
    return figures


def test_inject_plot_without_layer_draws_the_measured_point(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import robaudit
    from robaudit.bounds.audit import BoundOptions, load_network
    from robaudit.cli.plots import plot_inject
    from robaudit.graph.network import NetworkOptions

    figures = _captured_figures(monkeypatch)
    result = robaudit.inject(MLP, epsilon=0.5, crash=1, samples=8, trials=10, isolate=False)
    _, network = load_network(MLP, NetworkOptions())
    notes = plot_inject(network, BoundOptions(epsilon=0.5), result, tmp_path / "p.png")
    assert notes == []
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    point = lines["all layers together measured"]
    assert list(point.get_xdata()) == [1] and list(point.get_ydata()) == [result.vectors[0].measured.max], lines
    curve = lines["all layers together Fep"]  # the curve of the searches' bound; beside it, the vector's refined one
    from robaudit.bounds.bound import make_bound
    from robaudit.bounds.fep import Analysis, FailureModel

    searched = make_bound(Analysis(network, FailureModel.crash()), "tight").fep([1, 1])
    assert curve.get_ydata()[0] == pytest.approx(searched), (curve.get_ydata(), searched)
    assert result.vectors[0].bound <= searched * (1 + 1e-12)
    assert {"#1 fc1 Fep", "#2 fc2 Fep"} <= set(lines), set(lines)


def test_coinciding_precision_curves_stay_visible(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from robaudit.formats.plot import plot_curves

    same = ([1, 2, 3], [1.0, 0.5, 0.25])
    figure = plot_curves({"fc1": same, "all layers (uniform)": same}, 0.1, xlabel="bits")
    lines = [line for line in figure.axes[0].get_lines() if line.get_label() != "ε = 0.1"]
    styles = {line.get_label(): (line.get_linestyle(), line.get_zorder()) for line in lines}
    assert styles["fc1 bound"][0] != styles["all layers (uniform) bound"][0], styles
    assert styles["fc1 bound"][1] > styles["all layers (uniform) bound"][1], styles  # the layer is drawn on top


# --------------------------------------------------------------------------- 12. install noise


def test_install_and_test_output_are_quiet():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    filters = pyproject["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert any("legacy TorchScript-based ONNX export" in f for f in filters), filters
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = [line for line in makefile.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all("PYTHONWARNINGS=ignore" in line for line in installs), installs
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "download.pytorch.org/whl/cpu" in readme


# --------------------------------------------------------------------------- 13. the Python API


def _api_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/api.md has no python example"
    return blocks[-1]


def test_api_example_in_docs_runs():
    proc = subprocess.run([sys.executable, "-c", _api_example()], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "#1 fc1: tolerates 7 crashed neurons alone" in proc.stdout, describe(proc)
    assert "refused: model file 'missing.onnx' does not exist" in proc.stdout, describe(proc)


def test_api_matches_the_command_line_and_takes_a_model_proto():
    import robaudit

    expected = cli_json("bound", MLP, "-e", "0.5", "--crash", "1")
    from_path = robaudit.bound(MLP, epsilon=0.5, crash=1).to_dict()
    from_proto = robaudit.bound(onnx.load(MLP), epsilon=0.5, crash=[1, 1]).to_dict()
    for got in (from_path, from_proto):
        assert [la["max_failures"] for la in got["layers"]] == [la["max_failures"] for la in expected["layers"]]
        assert got["fep"] == pytest.approx(expected["fep"]), (got["fep"], expected["fep"])
    assert from_proto["model"]["path"] == "<in-memory model>"
    assert set(robaudit.__all__) >= {"bound", "inject", "check", "RobauditError", "BoundResult"}
    assert "certify" in robaudit.__all__ and callable(robaudit.certify)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r: r.bound("missing.onnx"), "ModelFileError"),
        (lambda r: r.bound(MLP, epsilon=-1), "OptionError"),
        (lambda r: r.bound(MLP, crash=[1, 2, 3]), "OptionError"),
        (lambda r: r.inject(MLP, inputs=np.full((2, 16), np.nan, np.float32), isolate=False), "InputDataError"),
        (lambda r: r.bound(42), "OptionError"),
        # arguments of the wrong kind (a new-user trial saw TypeError and numpy's broadcast ValueError)
        (lambda r: r.bound(MLP, crash=1.5), "OptionError"),
        (lambda r: r.bound(MLP, crash=True), "OptionError"),
        (lambda r: r.bound(MLP, crash="1"), "OptionError"),
        (lambda r: r.bound(MLP, epsilon="abc"), "OptionError"),
        (lambda r: r.bound(MLP, input_range=5), "OptionError"),
        (lambda r: r.bound(MLP, input_range=(0, "x")), "OptionError"),
    ],
)
def test_api_errors_are_one_hierarchy(call, error):
    import robaudit

    with pytest.raises(robaudit.RobauditError) as caught:
        call(robaudit)
    assert type(caught.value).__name__ == error or error in [c.__name__ for c in type(caught.value).__mro__]


def test_import_and_version_stay_light():
    code = (
        "import sys; import robaudit; from robaudit.cli import main; code = main(['--version']); "
        "print('MODULES', *sorted(sys.modules), code)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    modules = set(proc.stdout.splitlines()[-1].split()[1:-1])
    for heavy in ("robaudit.api", "robaudit.injection", "robaudit.gate", "onnxruntime", "robaudit.bounds"):
        assert heavy not in modules, (heavy, describe(proc))


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-12, 1e12))
def test_hint_thresholds_are_rounded_up(value):
    """The printed ε threshold is never below the figure it stands for, and at most one unit of its
    fourth significant digit above it (a threshold rounded to nearest printed 398.6 for 398.646)."""
    from robaudit.bounds.audit import _at_least

    shown = float(_at_least(value))
    assert value <= shown <= value * (1 + 1.001e-3)


def test_a_uniform_count_above_a_layers_size_says_it_is_capped(tmp_path):
    """At a large ε the uniform count is the largest layer's size (every smaller layer failing whole, method §6.2's
    min(f, N_l)); the line says so — 'uniform 8' beside a 3-neuron layer read as a contradiction (a new-user trial)."""
    path = dense_chain([4, 8, 3, 2], ["relu", "relu"]).save(tmp_path)
    loose = run_in_process("bound", path, "-e", "1e6")
    line = next(line for line in loose.stdout.splitlines() if line.startswith("uniform"))
    assert line.startswith("uniform (same count in every layer): 8 ") and "capped at each layer's size" in line
    tight = run_in_process("bound", path, "-e", "1e-6")
    assert "capped" not in next(line for line in tight.stdout.splitlines() if line.startswith("uniform"))


def test_a_wrong_feed_of_a_two_input_model_names_the_packed_layout(tmp_path):
    """Two inputs are fed as one packed vector per sample: a file of another width says which inputs make it up
    and how long each is (a new-user trial read only 'needs [N, 68]')."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "a"),
             numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "c")]
    nodes = [helper.make_node("MatMul", ["img", "a"], ["p"], name="fa"),
             helper.make_node("MatMul", ["meta", "b"], ["q"], name="fb"),
             helper.make_node("Add", ["p", "q"], ["s"]), helper.make_node("Relu", ["s"], ["h"]),
             helper.make_node("MatMul", ["h", "c"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3]),
                                             helper.make_tensor_value_info("meta", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "two.onnx")
    np.save(tmp_path / "x.npy", rng.random((4, 3)).astype(np.float32))
    proc = run_in_process("certify", tmp_path / "two.onnx", "--inputs", tmp_path / "x.npy", "--crash", "1", expect=2)
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "needs [N, 5]" in line and "'img' 3 + 'meta' 2" in line, line


def test_api_takes_numpy_counts_and_one_layer_name():
    """np.int64 counts and arrays are counts; ``layers="fc1"`` is one layer (it was split into letters)."""
    import robaudit

    plain = robaudit.bound(MLP, epsilon=0.5, crash=[1, 0])
    assert robaudit.bound(MLP, epsilon=0.5, crash=np.array([1, 0])).fep == plain.fep
    assert robaudit.bound(MLP, epsilon=0.5, crash=np.int64(1)).fep == robaudit.bound(MLP, epsilon=0.5, crash=1).fep
    assert robaudit.bound(MLP, epsilon=0.5, crash=[1, 0], input_range=np.array([0.0, 1.0])).fep == plain.fep
    names = [la.name for la in plain.layers]
    result = robaudit.inject(MLP, crash=1, layers=names[-1], samples=2, trials=5, isolate=False)
    assert list(result.vectors[0].failures) == [0] * (len(names) - 1) + [1]


def test_layers_named_by_a_bare_number_are_quoted(tmp_path):
    """nn.Sequential names its layers 0, 2, …: "one failure in #2 2 alone" and "#1 0 neurons [12]" read as counts
    (a new-user trial); such a name is quoted where a report numbers layers."""
    from onnx import TensorProto, helper, numpy_helper

    from robaudit.graph.layers import layer_label

    assert layer_label(2, "2") == "#2 '2'" and layer_label(1, "fc1") == "#1 fc1" and layer_label(None, "0") == "'0'"
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(-1, 1, s).astype(np.float32), n)
             for n, s in (("w0", (6, 4)), ("w2", (5, 6)), ("w4", (3, 5)))]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["a"], name="/0/Gemm", transB=1),
             helper.make_node("Relu", ["a"], ["b"], name="/1/Relu"),
             helper.make_node("Gemm", ["b", "w2"], ["c"], name="/2/Gemm", transB=1),
             helper.make_node("Relu", ["c"], ["d"], name="/3/Relu"),
             helper.make_node("Gemm", ["d", "w4"], ["y"], name="/4/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    report = cli_json("bound", path, "-e", "0.001")
    assert [la["name"] for la in report["layers"]] == ["0", "2"], report["layers"]
    assert "one failure in #1 '0' alone" in report["hints"][0] or "one failure in #2 '2' alone" in report["hints"][0]
    text = run_in_process("inject", path, "-e", "0.001", "--search", "worst", "--trials", "5", "--samples", "4").stdout
    assert "#1 '0' neurons" in text, text


def test_the_hint_on_a_bounded_output_does_not_offer_its_whole_width_as_advice():
    """On the digits MLP's probabilities one failure alone may already move the output across [0, 1] by the bounds:
    the hint says so instead of 'ε ≥ 1 would let each layer tolerate one failure' (true of any failure there)."""
    report = cli_json("bound", SAMPLES / "digits_mlp.onnx", "-e", "0.5")
    assert not any("would let each layer" in h for h in report["hints"]), report["hints"]
    assert any("across its whole width (1)" in h for h in report["hints"]), report["hints"]
