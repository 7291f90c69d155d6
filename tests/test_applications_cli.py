"""``robaudit precision | wait | design`` through the real command, and the plots.

Round trips: the shrink factor of ``design`` written to a copy makes ``bound`` report
the required tolerance; every ``--check`` run measures at most the bound (onnxruntime
on sample models with real inputs, conv layers and folded BatchNorm included).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLES, cli_json, describe, run_cli, run_in_process
from test_applications import build_chain, save

from robaudit.bounds.audit import BoundOptions, compute_bound
from robaudit.errors import PlotError

pytestmark = pytest.mark.cli

COMMON_LAYER_KEYS = {"name", "kind", "neurons", "max_weight", "lipschitz", "delta", "max_failures"}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR)."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_header(report: dict, command: str) -> None:
    for key in ("schema_version", "robaudit_version", "model", "settings", "layers"):
        assert key in report, f"{command} report lacks '{key}': {sorted(report)}"
    assert {"path", "sha256", "producer", "opset"} <= set(report["model"])
    assert {"mode", "epsilon", "method", "input_range", "capacity"} <= set(report["settings"])


def assert_check_ok(report: dict) -> None:
    check = report["check"]
    assert check["ok"], json.dumps(check, indent=1)
    for run in check["runs"]:
        assert run["measured"]["max"] <= run["bound"] + check["tolerance"], run
    assert max(run["measured"]["max"] for run in check["runs"]) > 0, "the simulation changed nothing"


# --------------------------------------------------------------------------- reports


def test_precision_report_has_the_spec_keys():
    report = cli_json("precision", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.05")
    assert_header(report, "precision")
    assert report["settings"]["method"] == "tight"  # one default method everywhere, as in bound
    for layer in report["layers"]:
        assert COMMON_LAYER_KEYS | {"bits", "range", "bits_together"} <= set(layer)
    assert isinstance(report["uniform_bits"], int)
    assert set(report["formats"]) == {"fp16", "bf16", "int8"}


def test_wait_report_has_the_spec_keys():
    report = cli_json("wait", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.5")
    assert_header(report, "wait")
    for layer in report["layers"]:
        assert COMMON_LAYER_KEYS | {"wait_for", "fan_in", "wait_for_together"} <= set(layer)
        assert 0 <= layer["wait_for"] <= layer["fan_in"]


def test_wait_explains_its_columns_and_an_empty_together():
    """The table's d, bound per signal and may ignore columns had no legend, and where no layer may ignore a
    signal together it printed "(bound 0)" (a new-user trial)."""
    text = run_in_process("wait", SAMPLES / "digits_mlp.onnx", "-e", "50").stdout
    legend = " ".join(text[text.index("legend:") : text.index("settings:")].split())  # as wrapped, joined
    for fragment in ("d: the most one missing signal", "bound per signal: the bound", "may ignore:", "wait for:"):
        assert fragment in legend, text
    assert "nothing to bound" in legend and "(bound 0)" not in legend, text
    report = cli_json("wait", SAMPLES / "digits_mlp.onnx", "-e", "50")
    assert all(la["wait_for_together"] == la["fan_in"] for la in report["layers"])
    assert report["layers"][0]["wait_for"] < 64  # alone the first layer may ignore one


def test_design_report_has_the_spec_keys(tmp_path):
    out = tmp_path / "report.yaml"
    proc = run_in_process("design", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.5", "--tolerate", "1", "--output", out)
    assert "shrink factor" in proc.stdout, describe(proc)
    import yaml

    report = yaml.safe_load(out.read_text())
    assert_header(report, "design")
    for layer in report["layers"]:
        assert COMMON_LAYER_KEYS | {"max_weight_allowed", "tolerate"} <= set(layer)
    assert report["shrink_factor"] > 0
    assert report["output_layer"]["name"] == "fc3"


# --------------------------------------------------------------------------- design round trip


@pytest.mark.parametrize(
    "model,tolerate,method,epsilon",
    [
        ("chain", "1", "paper", "0.3"),
        ("chain", "2,1", "tight", "0.2"),
        ("digits_mlp.onnx", "1", "paper", "0.05"),
        ("lenet.onnx", "1", "tight", "1"),
    ],
)
def test_design_shrink_factor_makes_bound_report_the_tolerance(tmp_path, model, tolerate, method, epsilon):
    if model == "chain":
        source = save(build_chain([6, 5, 4, 3], "Relu", seed=11)[0], tmp_path)
    else:
        source = SAMPLES / model
    scaled = tmp_path / "scaled.onnx"
    args = ("-e", epsilon, "--method", method)
    proc = run_in_process("design", source, *args, "--tolerate", tolerate, "--write", scaled, "--check", "-f", "json",
                   expect=None)
    design = json.loads(proc.stdout)
    assert design["shrink_factor"] < 1, "the test needs a model that does not tolerate the failures yet"
    assert design["fep"] > float(epsilon)
    check = design["check"]
    assert check["fep"] <= float(epsilon) * (1 + 1e-9), check
    # confirmed only when the scaled model also predicts what the original does (exit 1 otherwise)
    assert check["ok"] == (check["agreement"] == 1.0) and proc.returncode == (0 if check["ok"] else 1), check
    bound = cli_json("bound", scaled, *args, "--crash", tolerate)
    assert bound["fep"] <= float(epsilon) * (1 + 1e-9), bound["fep"]
    counts = [int(c) for c in tolerate.split(",")]
    if len(counts) == 1:
        assert bound["uniform"]["max_failures"] >= counts[0]
    options = BoundOptions(epsilon=float(epsilon), method=method, failures=tuple(counts))
    assert compute_bound(source, options).fep > float(epsilon), "the original model should not tolerate it"


# --------------------------------------------------------------------------- --check on real models


@pytest.mark.parametrize(
    "args",
    [
        ("precision", "digits_mlp.onnx", "-e", "0.05", "--inputs", SAMPLES / "digits_inputs.npz"),
        ("precision", "lenet.onnx", "-e", "0.5", "--method", "tight", "--inputs", SAMPLES / "lenet_inputs.npz"),
        ("precision", "resnet_small_bn.onnx", "-e", "1", "--weights", "--check", "--samples", "16"),
        ("precision", "mobilenet_se.onnx", "-e", "1", "--method", "tight", "--check", "--samples", "16"),
        ("wait", "digits_mlp.onnx", "-e", "200", "--method", "tight", "--inputs", SAMPLES / "digits_inputs.npz"),
        ("wait", "lenet.onnx", "-e", "1e4", "--method", "tight", "--check", "--samples", "20", "--trials", "3"),
    ],
)
def test_check_never_measures_above_the_bound(args):
    command, model, *rest = args
    report = cli_json(command, SAMPLES / model, *rest)
    if command == "wait":
        assert any(layer["wait_for"] < layer["fan_in"] for layer in report["layers"]), "nothing was dropped"
    assert_check_ok(report)


def test_check_on_inputs_outside_the_domain_says_so(tmp_path):
    x = np.full((4, 16), 3.0, np.float32)
    np.save(tmp_path / "x.npy", x)
    report = cli_json("precision", SAMPLES / "paper_mlp_sigmoid.onnx", "--inputs", tmp_path / "x.npy")
    assert any("outside the input range" in note for note in report["check"]["notes"])


# --------------------------------------------------------------------------- plots


def test_precision_plot_is_a_png_of_the_expected_size(tmp_path):
    target = tmp_path / "bits.png"
    run_in_process(
        "precision", SAMPLES / "paper_mlp_sigmoid.onnx", "-e", "0.05", "--check", "--samples", "20", "--plot", target
    )
    assert png_size(target) == (960, 600)


def test_failure_plot_has_labels_log_scale_legend_and_points(tmp_path):
    from robaudit.formats.plot import plot_failure_curves, save_png

    curves = {"fc1": ([1, 2, 3], [0.01, 0.02, 0.03]), "fc2": ([1, 2, 3], [0.05, 0.1, 0.15])}
    measured = {"fc1": ([1, 2, 3], [0.002, 0.0, 0.01])}
    figure = plot_failure_curves(curves, 0.04, measured, title="tiny")
    ax = figure.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "failed neurons in each failing layer (other layers intact)"
    assert "bound" in ax.get_ylabel()
    assert ax.get_title() == "tiny"
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"fc1 Fep", "fc2 Fep", "fc1 measured", "ε = 0.04", "measured 0 (drawn at the bottom)"} <= set(labels)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["fc1 measured"].get_ydata()) == [0.002, 0.01]
    assert list(lines["ε = 0.04"].get_ydata()) == [0.04, 0.04]
    path = save_png(figure, tmp_path / "f.png")
    assert png_size(path) == (960, 600)


def test_missing_matplotlib_is_a_plot_error(monkeypatch):
    from robaudit.formats import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotError, match=r"matplotlib is not installed; pip install 'robaudit\[plot\]'"):
        plot.plot_failure_curves({"a": ([1], [1.0])}, 0.1)


def test_missing_matplotlib_exits_2_with_one_line(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
        "from robaudit.cli import main\n"
        f"sys.exit(main(['precision', {str(SAMPLES / 'paper_mlp_sigmoid.onnx')!r}, '--plot', "
        f"{str(tmp_path / 'p.png')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip() == "robaudit: matplotlib is not installed; pip install 'robaudit[plot]'", describe(proc)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args,message",
    [
        (("design", "paper_mlp_sigmoid.onnx", "--tolerate", "1,2,3"), "hidden layers"),
        (("design", "paper_mlp_sigmoid.onnx", "--tolerate", "1", "--write", "x.txt"), "--write"),
        (("design", "paper_mlp_sigmoid.onnx", "--tolerate", "50,1"), "which has 12"),
        (("precision", "paper_mlp_sigmoid.onnx", "--method", "exact"), "--method"),
        (("precision", "paper_mlp_sigmoid.onnx", "--plot", "p.jpg"), ".png"),
        (("wait", "paper_mlp_sigmoid.onnx", "--check", "--trials", "0"), "--trials"),
        (("precision", "paper_mlp_sigmoid.onnx", "--inputs", "lenet_inputs.npz"), "needs [N, 16]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    command, model, *rest = args
    rest = [str(SAMPLES / r) if r.endswith(".npz") else r for r in rest]
    proc = run_in_process(command, SAMPLES / model, *rest, expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robaudit: ") and message in lines[0], describe(proc)


def test_design_without_tolerate_is_a_usage_error():
    proc = run_in_process("design", SAMPLES / "paper_mlp_sigmoid.onnx", expect=2)
    assert "--tolerate" in proc.stderr, describe(proc)


@pytest.mark.parametrize(
    ("flags", "same_as"),
    [(["--crash", "2,1"], ["--tolerate", "2,1"]),
     (["--byzantine", "1", "--capacity", "2"], ["--tolerate", "1", "--mode", "byzantine", "--capacity", "2"])],
)
def test_design_takes_crash_and_byzantine_counts_as_every_command_does(flags, same_as):
    """``design --crash N`` / ``--byzantine N`` (the count syntax of bound, inject and certify) mean --tolerate N in
    that mode (a new-user trial got 'No such option: --crash (Possible options: --ranges)')."""
    model = SAMPLES / "paper_mlp_sigmoid.onnx"
    given, reference = cli_json("design", model, "-e", "0.5", *flags), cli_json("design", model, "-e", "0.5", *same_as)
    assert given["shrink_factor"] == reference["shrink_factor"] and given["settings"] == reference["settings"]
    assert [la["tolerate"] for la in given["layers"]] == [la["tolerate"] for la in reference["layers"]]


@pytest.mark.parametrize("flags", [["--crash", "1", "--tolerate", "1"], ["--crash", "1", "--byzantine", "1"],
                                   ["--crash", "1", "--mode", "byzantine", "--capacity", "1"]])
def test_design_refuses_two_failure_counts_or_a_contradicting_mode(flags):
    proc = run_in_process("design", SAMPLES / "paper_mlp_sigmoid.onnx", *flags, expect=2)
    assert len(proc.stderr.strip().splitlines()) == 1, describe(proc)


def test_design_says_when_a_single_tolerate_count_is_capped():
    """--tolerate 13 on layers of 12 and 8 neurons designs for 12 and 8, and says so (bound --crash 13 refuses)."""
    model = SAMPLES / "paper_mlp_sigmoid.onnx"
    report = cli_json("design", model, "--tolerate", "13", "-e", "5")
    assert [la["tolerate"] for la in report["layers"]] == [12, 8]
    assert any("capped" in note and "'fc1' (12)" in note and "'fc2' (8)" in note for note in report["notes"])
    plain = cli_json("design", model, "--tolerate", "2", "-e", "5")
    assert not any("capped" in note for note in plain["notes"])


def test_design_legend_says_what_none_means_when_it_appears() -> None:
    """A hidden layer whose own weights cannot bring the bound to ε shows 'none'; the legend then says why (a
    new-user trial found it explained for sigmoid layers only), and says nothing of it where no layer shows it."""
    import json

    from conftest import SAMPLES, run_in_process

    lenet = SAMPLES / "lenet.onnx"
    tight = run_in_process("design", lenet, "-e", 5, "--tolerate", 1)
    report = json.loads(run_in_process("design", lenet, "-e", 5, "--tolerate", 1, "-f", "json").stdout)
    assert any(la["max_weight_allowed"] is None for la in report["layers"])
    assert "none: even at 0 this layer's weights leave the bound above ε" in tight.stdout.replace("\n", " ")
    loose = run_in_process("design", lenet, "-e", 500, "--tolerate", 1)
    assert "none" not in loose.stdout


def test_design_says_unbounded_for_float_bit_flips_and_takes_stored_faults() -> None:
    """Any bit of a float32 word may flip into the exponent: the bound is unbounded, which design now says (it
    printed the placeholder 2e+300 and δ 1e+300, a new-user trial) with bound's remedy; --stuck-at and --bit are
    design's options too (its --mode stuck_at asked for a --stuck-at it did not have)."""
    model = SAMPLES / "paper_mlp_sigmoid.onnx"
    flips = cli_json("design", model, "-e", 0.5, "--mode", "bit_flip", "--tolerate", 1)
    assert flips["fep"] is None and all(la["delta"] is None for la in flips["layers"])
    assert any("unbounded for layers" in note for note in flips["notes"])
    crash = cli_json("design", model, "-e", 0.5, "--tolerate", 1)
    stuck = cli_json("design", model, "-e", 0.5, "--stuck-at", 0, "--tolerate", 1)
    assert stuck["settings"]["mode"] == "stuck_at" and stuck["settings"]["stuck"] == 0
    assert stuck["fep"] is not None and stuck["fep"] != crash["fep"]
    sign = cli_json("design", model, "-e", 0.5, "--bit", 31, "--tolerate", 1)  # a sign flip: |ỹ' − ỹ| = 2|ỹ|
    assert sign["settings"]["mode"] == "bit_flip" and sign["settings"]["bit"] == 31 and sign["fep"] is not None


def test_design_and_checks_remedy_name_the_same_shrink_factor() -> None:
    """For the same requirement design's factor and check's remedy agree: both read the scaled copy as `bound`
    reads it (CROWN ranges); design read it with interval ranges alone and said ×0.685 where check said ×0.707
    (a new-user trial)."""
    model = SAMPLES / "paper_mlp_sigmoid.onnx"
    design = cli_json("design", model, "-e", 0.5, "--tolerate", 2)
    proc = run_in_process("check", model, "-e", 0.5, "--require-crash", 2, "--format", "json", expect=1)
    remedy = json.loads(proc.stdout)["models"][0]["requirements"][0]["remedy"]
    assert design["shrink_factor"] == pytest.approx(remedy["shrink_factor"], rel=5e-3)
    assert design["fep_scaled"] <= 0.5 * (1 + 1e-6)


def test_precision_says_int8s_grid_is_the_domains_not_a_calibration_sets():
    """An int8 verdict that is not safe says which grid it is (a new-user trial took "int8 NOT safe" for a verdict on
    the int8 model quantize_static would write, calibrated on data); not for --weights, whose grid is the weights'."""
    shown = " ".join(run_cli("precision", "sample_models/paper_mlp_sigmoid.onnx", "-e", "0.001").stdout.split())
    assert "int8 not proven safe" in shown and "int8's grid spans each layer's range column" in shown, shown
    weights = run_cli("precision", "sample_models/paper_mlp_sigmoid.onnx", "-e", "0.001", "--weights").stdout
    assert "calibration" not in weights, weights
    safe = run_cli("precision", "sample_models/paper_mlp_sigmoid.onnx", "-e", "0.05").stdout
    assert "int8 safe" in " ".join(safe.split()) and "calibration" not in safe, safe
