"""``robaudit check`` as CI runs it: the real command as a subprocess (README "A gate in CI").

Expected verdicts come from independent sources: the paper bound of the sigmoid MLP in
closed form from its initializers (docs/method.md §3.1), and for MobileNet the figures of a
separate ``robaudit bound`` run.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import SAMPLES, cli_json, describe, run_in_process
from onnx import numpy_helper

pytestmark = pytest.mark.cli

MLP = SAMPLES / "paper_mlp_sigmoid.onnx"
MOBILENET = SAMPLES / "mobilenet_se.onnx"


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch):
    """Never append to a real GitHub step summary when the suite itself runs in Actions."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(str(path)).graph.initializer}


def mlp_paper_figures() -> dict[str, float]:
    """Paper bound of paper_mlp_sigmoid (16→12→8→4, sigmoid, linear output), crash, docs/method.md §3.1.

    δ_l = 1 (sigmoid range (0, 1)), K = 1/4, fanout_2 = N_2 = 8, K_out = 1, so
    fc1 failing alone: Fep(f) = f·8·(1/4)·w2·w3; fc2 alone: Fep(f) = f·w3.
    """
    w = weights(MLP)
    w2, w3 = float(np.abs(w["fc2.weight"]).max()), float(np.abs(w["fc3.weight"]).max())
    return {"w2": w2, "w3": w3, "fc1_unit": 8 * 0.25 * w2 * w3, "fc2_unit": w3}


def write(directory: Path, name: str, data: dict) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def check_json(*args, expect: int, cwd: Path | None = None) -> dict:
    proc = run_in_process("check", *args, "--format", "json", expect=expect, cwd=cwd)
    return json.loads(proc.stdout)


def statuses(report: dict) -> dict[str, str]:
    return {f"{m['name']} {r['key']}": r["status"] for m in report["models"] for r in m["requirements"]}


# --------------------------------------------------------------------------- pass / fail


def test_layer_requirement_passes_and_fails_at_the_closed_form_count(tmp_path):
    fig = mlp_paper_figures()
    epsilon = 3.5 * fig["fc1_unit"]  # fc1 alone tolerates exactly 3 crashes
    assert math.floor(epsilon / fig["fc2_unit"]) == 3
    common = [MLP, "--method", "paper", "--epsilon", repr(epsilon)]
    ok = check_json(*common, "--require-layer", "fc1=3", "--require-layer", "2=3", expect=0)
    assert statuses(ok) == {
        "paper_mlp_sigmoid.onnx require.layers.fc1": "pass",
        "paper_mlp_sigmoid.onnx require.layers.2": "pass",
    }
    bad = check_json(*common, "--require-layer", "fc1=4", expect=1)
    (verdict,) = bad["models"][0]["requirements"]
    assert (verdict["required"], verdict["achieved"], verdict["status"]) == (4, 3, "fail"), verdict


def test_remedy_matches_the_closed_form_weight_targets(tmp_path):
    """fc1 failing alone: Fep = 4·8·(1/4)·w2·w3 is linear in w2 and in w3, quadratic in a common scale."""
    fig = mlp_paper_figures()
    epsilon = 3.5 * fig["fc1_unit"]
    report = check_json(MLP, "--method", "paper", "-e", repr(epsilon), "--require-layer", "fc1=4", expect=1)
    remedy = report["models"][0]["requirements"][0]["remedy"]
    targets = {t["layer"]: t for t in remedy["layers"]}
    assert set(targets) == {"fc1", "fc2"}, remedy  # the layer and the one reading its output
    assert targets["fc1"]["max_weight_allowed"] is None  # δ of a sigmoid layer does not shrink with its weights
    allowed = fig["w2"] * epsilon / (4 * fig["fc1_unit"])
    assert allowed / 1.01 <= targets["fc2"]["max_weight_allowed"] <= allowed * (1 + 1e-9), targets["fc2"]
    shrink = math.sqrt(epsilon / (4 * fig["fc1_unit"]))
    assert shrink / 1.01 <= remedy["shrink_factor"] <= shrink * (1 + 1e-9), remedy


def test_policy_file_on_mobilenet_matches_a_separate_bound_run(tmp_path):
    bound = cli_json("bound", MOBILENET, "--epsilon", "1")
    uniform, total = bound["uniform"]["max_failures"], bound["total"]["max_failures"]
    se = next(layer for layer in bound["layers"] if layer["name"] == "block.se.fc1")
    policy = {
        "epsilon": 1.0,
        "models": [
            {
                "path": str(MOBILENET),
                "require": {"crash": uniform, "total": total, "layers": {"block.se.fc1": se["max_failures"]}},
            }
        ],
    }
    write(tmp_path, "robaudit.yaml", policy)
    proc = run_in_process("check", expect=0, cwd=tmp_path)  # found in the working directory
    assert "check passed" in proc.stdout, describe(proc)
    policy["models"][0]["require"]["crash"] = uniform + 1
    write(tmp_path, "robaudit.yaml", policy)
    report = check_json(expect=1, cwd=tmp_path)
    assert statuses(report) == {
        "mobilenet_se.onnx require.crash": "fail",
        "mobilenet_se.onnx require.layers.block.se.fc1": "pass",
        "mobilenet_se.onnx require.total": "pass",
    }
    assert report["models"][0]["uniform"]["max_failures"] == uniform
    assert report["models"][0]["model"]["sha256"] == bound["model"]["sha256"]


def test_pyproject_policy_with_flags_winning(tmp_path):
    fig = mlp_paper_figures()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mlp.onnx").write_bytes(MLP.read_bytes())
    (tmp_path / "pyproject.toml").write_text(
        "[project]\nname = 'x'\n\n[tool.robaudit]\nmethod = 'paper'\nepsilon = 1e-9\n\n"
        "[[tool.robaudit.models]]\npath = 'models/*.onnx'\nrequire = { layers = { fc1 = 3 } }\n",
        encoding="utf-8",
    )
    run_in_process("check", expect=1, cwd=tmp_path)  # ε from the file: nothing is tolerated
    run_in_process("check", "--epsilon", repr(3.5 * fig["fc1_unit"]), expect=0, cwd=tmp_path)
    run_in_process("check", "--epsilon", repr(3.5 * fig["fc1_unit"]), "--require-layer", "fc1=4", expect=1,
                   cwd=tmp_path)


# --------------------------------------------------------------------------- CI outputs


def test_junit_has_one_failure_per_unmet_requirement_and_step_summary_gets_a_table(tmp_path, monkeypatch):
    fig = mlp_paper_figures()
    bound = cli_json("bound", MOBILENET, "--epsilon", "1")
    # a layer that tolerates fewer than all its neurons, so that one more is a requirement a remedy can meet
    target_layer = next(layer for layer in reversed(bound["layers"]) if layer["max_failures"] < layer["neurons"])
    policy = {
        "models": [
            {  # two unmet of four
                "path": str(MLP),
                "epsilon": 3.5 * fig["fc1_unit"],
                "method": "paper",
                "require": {"layers": {"fc1": 4, "fc2": 3}, "crash": 0, "total": 1000},
            },
            {  # one unmet of three
                "path": str(MOBILENET),
                "epsilon": 1.0,
                "require": {
                    "crash": bound["uniform"]["max_failures"],
                    "layers": {str(target_layer["index"]): target_layer["max_failures"] + 1},
                },
            },
        ]
    }
    policy_file = write(tmp_path, "gate.yaml", policy)
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit = tmp_path / "out" / "junit.xml"
    junit.parent.mkdir()
    report = tmp_path / "report.json"
    run_in_process("check", "--policy", policy_file, "--junit", junit, "--report", report, expect=1)

    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    failures = root.findall(".//testcase/failure")
    assert len(cases) == 6 and len(failures) == 3, ET.tostring(root, encoding="unicode")
    assert root.get("tests") == "6" and root.get("failures") == "3"
    failed_names = sorted(case.get("name") for case in cases if case.find("failure") is not None)
    assert failed_names == [
        f"require.layers.{target_layer['index']} (crash)",
        "require.layers.fc1 (crash)",
        "require.total (crash)",
    ]
    for case in cases:
        failure = case.find("failure")
        if failure is not None and "layers" in case.get("name"):
            assert "what it would take" in failure.text, failure.text

    data = json.loads(report.read_text())
    assert data["command"] == "check" and data["passed"] is False
    assert data["summary"] == {"models": 2, "requirements": 6, "failed": 3, "skipped": 0, "unusable": 0}

    text = summary.read_text(encoding="utf-8")
    assert text.startswith("# earlier step\n"), "the summary must be appended to, not overwritten"
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| model | requirement |") and set(rows[1]) <= set("|-: ")
    assert len(rows) == 2 + 6, text
    assert sum("❌" in row for row in rows[2:]) == 3, text


# --------------------------------------------------------------------------- unusable input → 2


def _assert_one_line_error(proc, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robaudit: "), describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    for needle in needles:
        assert needle in lines[0], describe(proc)


BAD_POLICIES = {
    "unknown key": (
        {"models": [{"path": "m.onnx", "epsilom": 0.1, "require": {"crash": 1}}]},
        ["'models[0].epsilom'", "epsilon"],
    ),
    "wrong type": (
        {"models": [{"path": "m.onnx", "epsilon": "0.1", "require": {"crash": 1}}]},
        ["'models[0].epsilon'", "number"],
    ),
    "epsilon zero": (
        {"epsilon": 0, "models": [{"path": "m.onnx", "require": {"crash": 1}}]},
        ["'epsilon'", "positive"],
    ),
    "missing model": (
        {"epsilon": 1, "models": [{"path": "absent.onnx", "require": {"crash": 1}}]},
        ["absent.onnx", "does not exist"],
    ),
    "empty glob": (
        {"epsilon": 1, "models": [{"path": "exports/*.onnx", "require": {"crash": 1}}]},
        ["exports/*.onnx", "matches no file"],
    ),
    "unknown layer": (
        {"epsilon": 1, "models": [{"path": "m.onnx", "require": {"layers": {"fc9": 1}}}]},
        ["fc9", "fc1"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_bad_policy_is_exit_2_with_one_line_naming_the_key(tmp_path, case):
    data, needles = BAD_POLICIES[case]
    (tmp_path / "m.onnx").write_bytes(MLP.read_bytes())
    write(tmp_path, "robaudit.yaml", data)
    _assert_one_line_error(run_in_process("check", expect=2, cwd=tmp_path), *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--epsilon", "-1", "--require-crash", "1"], ["--epsilon", "positive"]),
        (["--epsilon", "1", "--require-layer", "fc1"], ["--require-layer", "NAME=N"]),
    ],
)
def test_bad_flags_are_exit_2(args, needles):
    _assert_one_line_error(run_in_process("check", MLP, *args, expect=2), *needles)


def test_no_policy_anywhere_is_exit_2(tmp_path):
    _assert_one_line_error(run_in_process("check", expect=2, cwd=tmp_path), "no policy")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"not a model at all", "broken.onnx"), (b"version https://git-lfs.github.com/spec/v1\n", "LFS")],
)
def test_bad_model_is_exit_2(tmp_path, content, needle):
    (tmp_path / "broken.onnx").write_bytes(content)
    proc = run_in_process("check", tmp_path / "broken.onnx", "-e", "1", "--require-crash", "0", expect=2)
    _assert_one_line_error(proc, needle)


def _sign_model(path: Path) -> None:
    """x [1, 4] → MatMul → Sign → MatMul: an op robaudit has no rule for, on the audited path."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), f"w{i}") for i in (1, 2)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Sign", ["h"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_an_unusable_model_of_a_glob_is_named(tmp_path):
    """With a glob of exports, 'unsupported op Sign at node /Sign' alone did not say which export broke."""
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "good.onnx").write_bytes(MLP.read_bytes())
    _sign_model(tmp_path / "exports" / "sign.onnx")
    write(tmp_path, "robaudit.yaml", {"epsilon": 5, "models": [{"path": "exports/*.onnx", "require": {"crash": 1}}]})
    proc = run_in_process("check", expect=2, cwd=tmp_path)
    _assert_one_line_error(proc, "exports/sign.onnx: unsupported op 'Sign'")


def test_an_unusable_model_does_not_stop_the_others_or_their_reports(tmp_path):
    """A NaN-weight export among a glob's matches: the good model is still checked and every report is written
    (a CI job uploads them whatever the exit code), the broken one is an error row, entry and JUnit test case,
    its one line is on stderr, and the exit code is 2 (a new-user trial: no report and no table at all)."""
    import json
    import xml.etree.ElementTree as ET

    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "good.onnx").write_bytes(MLP.read_bytes())
    _sign_model(tmp_path / "exports" / "sign.onnx")
    write(tmp_path, "robaudit.yaml", {"epsilon": 5, "models": [{"path": "exports/*.onnx", "require": {"crash": 1}}]})
    proc = run_in_process("check", "-q", "--report", "rep.json", "--junit", "j.xml", expect=2, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("robaudit: wrote")]
    assert errors == [errors[0]] and "exports/sign.onnx: unsupported op 'Sign'" in errors[0], proc.stderr
    assert "ERROR" in proc.stdout and "good.onnx" in proc.stdout and "could not be checked" in proc.stdout
    report = json.loads((tmp_path / "rep.json").read_text())
    by_name = {entry["name"]: entry for entry in report["models"]}
    assert by_name["good.onnx"]["requirements"] and "error" not in by_name["good.onnx"]
    assert by_name["sign.onnx"]["passed"] is False and "Sign" in by_name["sign.onnx"]["error"]
    assert report["summary"]["unusable"] == 1 and report["passed"] is False
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("errors") == "1" and root.get("tests") == str(1 + len(by_name["good.onnx"]["requirements"]))
    assert [e.get("type") for e in root.iter("error")] == ["UnusableInput"]
    run_in_process("check", "exports/good.onnx", "--baseline", "rep.json", "-q", expect=None, cwd=tmp_path)
    # the broken export fixed: nothing to drop from, so the baseline requirement passes (it was 'skipped', exit 1)
    (tmp_path / "exports" / "sign.onnx").write_bytes(MLP.read_bytes())
    fixed = run_in_process("check", "--baseline", "rep.json", "-q", "--format", "json", expect=None, cwd=tmp_path)
    verdicts = {e["name"]: {r["key"]: r for r in e["requirements"]} for e in json.loads(fixed.stdout)["models"]}
    baseline = verdicts["sign.onnx"]["baseline"]
    assert baseline["status"] == "pass" and "could not check" in baseline["detail"], baseline


def test_an_unreadable_inputs_file_of_one_entry_is_that_models_error(tmp_path):
    """An entry's inputs file that is not an .npz (a review: 'internal error (BadZipFile)', no report): that model's
    ERROR row; the other entry is still checked and the report written; exit 2."""
    import json

    (tmp_path / "good.onnx").write_bytes(MLP.read_bytes())
    (tmp_path / "other.onnx").write_bytes(MLP.read_bytes())
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04junk")
    write(tmp_path, "robaudit.yaml", {"epsilon": 5, "models": [
        {"path": "good.onnx", "require": {"crash": 1}},
        {"path": "other.onnx", "inputs": "bad.npz", "require": {"crash": 100}}]})
    proc = run_in_process("check", "-q", "--report", "r.json", expect=2, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("robaudit: wrote")]
    assert len(errors) == 1 and "bad.npz" in errors[0] and "internal error" not in errors[0], proc.stderr
    entries = {e["name"]: e for e in json.loads((tmp_path / "r.json").read_text())["models"]}
    assert "error" in entries["other.onnx"] and entries["good.onnx"]["requirements"]


def test_empirical_errors_above_the_bound_only_outside_the_domain_are_unusable_input(tmp_path):
    """Inputs left at 0–16 for a [0, 1] model: an error above the bound measured only outside the domain, where
    the bound makes no claim, is unusable input (exit 2, the input_range that covers the data named), as for
    inject, not a failed 'error ≤ ε' requirement with exit 1 (a new-user trial)."""
    data = np.load(SAMPLES / "digits_cnn_inputs.npz")
    np.savez(tmp_path / "x16.npz", x=data["x"][:40] * 16)
    (tmp_path / "m.onnx").write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    write(tmp_path, "robaudit.yaml",
          {"models": [{"path": "m.onnx", "epsilon": 1000, "empirical": {"inputs": "x16.npz", "failures": 1}}]})
    proc = run_in_process("check", "-q", expect=2, cwd=tmp_path)
    _assert_one_line_error(proc, "outside the input range [0, 1]", "set input_range: [0, 16]")


def test_empirical_inputs_partly_outside_the_domain_pass_with_a_warning(tmp_path, monkeypatch):
    """Inputs × 1.2 for a [0, 1] model, error within the bound: the requirement passes, but the table, the
    step summary and the report say that the bound makes no claim on part of the data (a new-user trial saw
    it only inside the report's detail). A model that two entries name is one model in the summary line."""
    data = np.load(SAMPLES / "digits_cnn_inputs.npz")
    np.savez(tmp_path / "x12.npz", x=np.clip(data["x"][:40] * 1.2, 0, None))
    (tmp_path / "m.onnx").write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    empirical = {"inputs": "x12.npz", "failures": 1}
    write(tmp_path, "robaudit.yaml", {"epsilon": 1000, "models": [
        {"path": "m.onnx", "empirical": empirical}, {"path": "*.onnx", "require": {"crash": 0}}]})
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    proc = run_in_process("check", "-q", "--report", "r.json", cwd=tmp_path)
    warning = [line for line in proc.stdout.splitlines() if line.startswith("warning: m.onnx empirical.max_error")]
    outside = float((data["x"][:40] * 1.2 > 1 + 1e-6).mean())
    assert warning and f"{outside:.1%} of the elements" in proc.stdout, proc.stdout
    assert "set input_range: [0, 2]" in proc.stdout.replace("\n", " ")
    assert "check passed: 1 model(s), 2 requirement(s) met" in proc.stdout
    assert "⚠ warning" in summary.read_text() and "outside the input range" in summary.read_text()
    (entry, _) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert "outside the input range" in entry["requirements"][0]["warning"]


def test_an_unusable_model_two_entries_name_is_one_model_in_the_summary(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "bad.onnx").write_bytes(b"not a model")
    write(tmp_path, "robaudit.yaml", {"epsilon": 1, "require": {"crash": 0},
                                      "models": ["m/*.onnx", "m/bad.onnx"]})
    run_in_process("check", "-q", "--report", "r.json", expect=2, cwd=tmp_path)
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert (summary["models"], summary["unusable"]) == (1, 1), summary


def test_a_failed_requirement_says_why_in_the_step_summary(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    run_in_process("check", MLP, "--epsilon", "0.01", "--require-crash", "1", expect=1, cwd=tmp_path)
    assert "is not shown to keep Fep ≤ ε = 0.01" in summary.read_text(), summary.read_text()


def test_a_model_without_a_policy_file_says_none_was_found(tmp_path):
    proc = run_in_process("check", MLP, "--require-crash", "1", expect=2, cwd=tmp_path)
    assert "missing key 'epsilon'" in proc.stderr and "no robaudit.yaml or [tool.robaudit]" in proc.stderr


# --------------------------------------------------------------------------- baseline


def scaled_copy(source: Path, target: Path, factor: float) -> None:
    """The model with every weight (not bias) multiplied by ``factor``: a worse re-export."""
    model = onnx.load(str(source))
    weight_names = {node.input[1] for node in model.graph.node if node.op_type in ("Gemm", "MatMul", "Conv")}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in weight_names:
            scaled = numpy_helper.to_array(tensor) * np.float32(factor)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(scaled, tensor.name))
    onnx.save(model, str(target))


@pytest.mark.parametrize("source", [MLP, SAMPLES / "lenet.onnx"], ids=["mlp", "lenet"])
def test_baseline_catches_weights_scaled_by_two(tmp_path, source):
    epsilon = "2" if source == MLP else "1000"
    model = tmp_path / "export" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(source.read_bytes())
    flags = [model, "--epsilon", epsilon, "--require-crash", "0"]
    before_bound = cli_json("bound", model, "--epsilon", epsilon)
    run_in_process("check", *flags, "--report", tmp_path / "baseline.yaml", expect=0)
    same = check_json(*flags, "--baseline", tmp_path / "baseline.yaml", expect=0)
    assert statuses(same)["model.onnx baseline"] == "pass"

    scaled_copy(source, model, 2.0)  # the next export: same path, weights ×2
    after_bound = cli_json("bound", model, "--epsilon", epsilon)
    expected = [
        f"layer {b['name']} (crash) {b['max_failures']} → {a['max_failures']}"
        for b, a in zip(before_bound["layers"], after_bound["layers"], strict=True)
        if a["max_failures"] < b["max_failures"]
    ]
    assert expected, "the ×2 model must tolerate fewer failures somewhere for this test to mean anything"
    report = check_json(*flags, "--baseline", tmp_path / "baseline.yaml", expect=1)
    (verdict,) = [r for r in report["models"][0]["requirements"] if r["key"] == "baseline"]
    assert verdict["status"] == "fail"
    for drop in expected:
        assert drop in verdict["detail"], verdict


def test_baseline_with_other_settings_is_skipped_and_not_met(tmp_path):
    base = tmp_path / "base.json"
    run_in_process("check", MLP, "-e", "2", "--require-crash", "0", "--report", base, expect=0)
    report = check_json(MLP, "-e", "3", "--baseline", base, expect=1)
    (verdict,) = report["models"][0]["requirements"]
    assert verdict["status"] == "skip" and "other settings" in verdict["detail"], verdict
    assert "(epsilon 2 → 3)" in verdict["detail"], verdict  # which setting changed, not every setting
    assert report["passed"] is False and report["summary"]["skipped"] == 1, report["summary"]
    proc = run_in_process("check", MLP, "-e", "3", "--baseline", base, expect=1)
    assert "skipped" in proc.stdout and "check passed" not in proc.stdout, proc.stdout
    assert "--allow-skipped" in proc.stdout, proc.stdout
    report = check_json(MLP, "-e", "3", "--baseline", base, "--allow-skipped", expect=0)
    assert report["passed"] is True, report


def test_baseline_that_is_not_a_report_is_exit_2(tmp_path):
    (tmp_path / "old.yaml").write_text("just: text\n", encoding="utf-8")
    proc = run_in_process("check", MLP, "-e", "1", "--baseline", tmp_path / "old.yaml", expect=2)
    _assert_one_line_error(proc, "--baseline")


# --------------------------------------------------------------------------- other modes, empirical


def test_byzantine_requirement_matches_bound_with_the_same_capacity():
    byzantine = cli_json("bound", MLP, "--epsilon", "3", "--capacity", "2")
    crash = cli_json("bound", MLP, "--epsilon", "3")
    u_byz, u_crash = byzantine["uniform"]["max_failures"], crash["uniform"]["max_failures"]
    args = [MLP, "-e", "3", "--capacity", "2", "--require-byzantine", u_byz, "--require-crash", u_crash]
    report = check_json(*args, expect=0)
    achieved = {r["key"]: (r["mode"], r["achieved"]) for r in report["models"][0]["requirements"]}
    assert achieved == {"require.crash": ("crash", u_crash), "require.byzantine": ("byzantine", u_byz)}
    assert [m["settings"]["mode"] for m in report["models"][0]["other_modes"]] == ["byzantine"]
    check_json(MLP, "-e", "3", "--capacity", "2", "--require-byzantine", u_byz + 1, expect=1)


def _clean_accuracy(model: Path, inputs: Path) -> float:
    """Arg-max accuracy of the clean model with onnxruntime (independent of robaudit)."""
    import onnxruntime as ort

    data = np.load(inputs)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    scores = session.run(["probabilities"], {session.get_inputs()[0].name: data["x"]})[0]
    return float(np.mean(scores.argmax(axis=1) == data["labels"]))


def test_empirical_requirement(tmp_path):
    digits, inputs = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_inputs.npz"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.npz").write_bytes(inputs.read_bytes())
    accuracy = _clean_accuracy(digits, inputs)
    entry = {"path": str(digits), "epsilon": 0.5}
    # no failure: the faulty model is the clean one, error 0 and the clean accuracy
    empirical = {"inputs": "data/in.npz", "failures": 0, "max_error": 1.0e-9, "min_accuracy": accuracy}
    write(tmp_path, "robaudit.yaml", {"models": [{**entry, "empirical": empirical}]})
    report = check_json(expect=0, cwd=tmp_path)
    verdicts = {r["key"]: r for r in report["models"][0]["requirements"]}
    assert verdicts["empirical.max_error"]["achieved"] == 0.0
    assert verdicts["empirical.min_accuracy"]["achieved"] == pytest.approx(accuracy)
    # the accuracy row says which fault sets it is over (the worst search's are bad ones by design)
    assert "worst search's fault sets, bad ones by design" in verdicts["empirical.min_accuracy"]["detail"]
    # one crash per layer: some error, never above the bound of a separate `bound` run
    empirical = {"inputs": "data/in.npz", "failures": 1, "max_error": 1.0e-6, "trials": 20}
    write(tmp_path, "robaudit.yaml", {"models": [{**entry, "empirical": empirical}]})
    report = check_json(expect=1, cwd=tmp_path)
    (verdict,) = report["models"][0]["requirements"]
    fep = cli_json("bound", digits, "-e", "0.5", "--crash", "1")["fep"]
    assert 1e-6 < verdict["achieved"] <= fep * (1 + 1e-5), (verdict, fep)


def test_min_accuracy_without_labels_is_exit_2(tmp_path):
    np.save(tmp_path / "x.npy", np.load(SAMPLES / "digits_inputs.npz")["x"])
    empirical = {"inputs": "x.npy", "failures": 1, "min_accuracy": 0.5}
    write(
        tmp_path,
        "robaudit.yaml",
        {"epsilon": 1, "models": [{"path": str(SAMPLES / "digits_mlp.onnx"), "empirical": empirical}]},
    )
    _assert_one_line_error(run_in_process("check", expect=2, cwd=tmp_path), "min_accuracy", "labels")


def test_an_unbounded_bit_flip_requirement_gets_hardens_figure():
    """Any bit of a float word may flip into the exponent: no finite bound, and no weight scale helps; with
    --inputs check now runs the range restriction (harden) and says what it achieves, as for a crash requirement
    (it named harden without trying it; a new-user trial)."""
    args = ("check", SAMPLES / "digits_cnn.onnx", "-e", 200, "--require-bit-flip", 1,
            "--inputs", SAMPLES / "digits_cnn_inputs.npz")
    report = json.loads(run_in_process(*args, "--format", "json", expect=1).stdout)
    requirement = report["models"][0]["requirements"][0]
    assert requirement["achieved"] == 0 and requirement["remedy"]["unbounded"]
    hardened = requirement["remedy"]["hardened"]
    assert hardened["agreement"] == 1.0 and hardened["achieved"] >= 1 and hardened["meets"] is True
    assert "robaudit harden restricts" in run_in_process(*args, expect=1).stdout  # the table folds the rest
