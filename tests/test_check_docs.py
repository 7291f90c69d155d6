"""docs/ci.md and .pre-commit-hooks.yaml use commands and keys that really exist.

The policy, pyproject table, shell lines, GitHub Actions steps and pre-commit entries
are taken from the documentation itself and run in a scratch project built from the
sample models; each must be understood by robaudit (exit 0 or 1, never 2).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SAMPLES

pytestmark = pytest.mark.cli

DOC = ROOT / "docs" / "ci.md"


def blocks(language: str) -> list[str]:
    """The fenced code blocks of docs/ci.md in one language."""
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """The layout the documentation assumes: exports/*.onnx, models/classifier.onnx, data/val.npz, ci/."""
    for folder in ("exports", "models", "data", "ci"):
        (tmp_path / folder).mkdir()
    shutil.copy(SAMPLES / "paper_mlp_sigmoid.onnx", tmp_path / "exports" / "model.onnx")
    shutil.copy(SAMPLES / "digits_mlp.onnx", tmp_path / "models" / "classifier.onnx")
    shutil.copy(SAMPLES / "digits_inputs.npz", tmp_path / "data" / "val.npz")
    return tmp_path


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a documented command line with the venv's ``robaudit`` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY", "ROBAUDIT_DEBUG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_understood(proc: subprocess.CompletedProcess, command: str) -> None:
    assert proc.returncode in (0, 1), f"{command}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "check passed" in proc.stdout or "check FAILED" in proc.stdout, proc.stdout


def test_documented_policy_and_commands_run(project):
    (policy,) = [b for b in blocks("yaml") if "models:" in b]
    (project / "robaudit.yaml").write_text(policy, encoding="utf-8")
    commands = [line for b in blocks("sh") for line in b.splitlines() if line.startswith("robaudit ")]
    assert any("--report ci/robaudit-baseline.yaml" in c for c in commands)
    for command in commands:
        assert_understood(shell(command, project), command)
    (workflow,) = [yaml.safe_load(b) for b in blocks("yaml") if "runs-on" in b]
    steps = [s["run"] for s in workflow["jobs"]["robaudit"]["steps"] if "robaudit check" in s.get("run", "")]
    assert steps, workflow
    for command in steps:
        assert_understood(shell(command, project), command)
        assert (project / "robaudit-junit.xml").is_file() and (project / "robaudit-report.yaml").is_file()


def test_documented_pyproject_table_runs(project):
    (table,) = blocks("toml")
    (project / "pyproject.toml").write_text("[project]\nname = 'demo'\n\n" + table, encoding="utf-8")
    assert_understood(shell("robaudit check", project), "robaudit check")


def test_pre_commit_entries_run(project):
    (project / "robaudit.yaml").write_text("epsilon: 1.0\nmodels: [exports/model.onnx]\nrequire: {crash: 0}\n")
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    local = [h for b in blocks("yaml") if "repo: local" in b for r in yaml.safe_load(b)["repos"] for h in r["hooks"]]
    assert [h["id"] for h in hooks] == ["robaudit-check"] and [h["id"] for h in local] == ["robaudit-check"]
    for hook in (*hooks, *local):
        assert hook["pass_filenames"] is False
        assert re.search(hook["files"], "exports/model.onnx") and re.search(hook["files"], "robaudit.yaml")
        proc = shell(hook["entry"], project)
        assert proc.returncode == 0, f"{hook['entry']}\n{proc.stdout}\n{proc.stderr}"
