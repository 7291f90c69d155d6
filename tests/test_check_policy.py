"""The ``check`` policy reader (robaudit/policy.py), in process: layout, merging, every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLES

from robaudit.errors import PolicyError
from robaudit.gate.policy import Overrides, Requirement, load_policy

MLP = SAMPLES / "paper_mlp_sigmoid.onnx"


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project with exports/a.onnx, exports/b.onnx and a policy directory beside them."""
    (tmp_path / "exports").mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(MLP, tmp_path / "exports" / name)
    (tmp_path / "exports" / "notes.txt").write_text("not a model")
    return tmp_path


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_spec_example_layout_with_glob_relative_to_the_policy_file(project):
    policy_file = write_yaml(
        project / "ci" / "robaudit.yaml",
        {
            "models": [
                {
                    "path": "../exports/*.onnx",
                    "epsilon": 0.05,
                    "mode": "crash",
                    "method": "tight",
                    "input_range": [0, 1],
                    "require": {"crash": 1, "layers": {"fc1": 3}, "total": 2},
                }
            ]
        },
    )
    policy = load_policy(policy_file, cwd=project)
    (entry,) = policy.models
    assert entry.paths == ("exports/a.onnx", "exports/b.onnx")  # relative to the cwd, sorted, .txt not matched
    assert entry.epsilon == 0.05 and entry.method == "tight" and entry.input_range == (0.0, 1.0)
    assert entry.requirements == (
        Requirement("require.crash", "uniform", "crash", 1),
        Requirement("require.layers.fc1", "layer", "crash", 3, "fc1"),
        Requirement("require.total", "total", "crash", 2),
    )
    assert entry.modes == ("crash",)


def test_top_level_settings_are_defaults_and_entries_win(project):
    write_yaml(
        project / "robaudit.yaml",
        {
            "epsilon": 0.1,
            "method": "paper",
            "require": {"crash": 1, "layers": {"fc1": 2}},
            "models": ["exports/a.onnx", {"path": "exports/b.onnx", "epsilon": 0.3, "require": {"layers": {"2": 1}}}],
        },
    )
    a, b = load_policy(None, cwd=project).models  # found in the working directory
    assert (a.epsilon, a.method, b.epsilon, b.method) == (0.1, "paper", 0.3, "paper")
    assert [r.key for r in a.requirements] == ["require.crash", "require.layers.fc1"]
    assert [r.key for r in b.requirements] == ["require.crash", "require.layers.fc1", "require.layers.2"]


def test_flags_win_over_the_file(project):
    write_yaml(
        project / "robaudit.yaml", {"epsilon": 0.1, "models": [{"path": "exports/a.onnx", "require": {"crash": 1}}]}
    )
    overrides = Overrides(epsilon=0.7, method="paper", require_crash=4, require_layers=(("fc2", 2),))
    (entry,) = load_policy(None, overrides, cwd=project).models
    assert entry.epsilon == 0.7 and entry.method == "paper"
    assert {r.key: r.count for r in entry.requirements} == {"require.crash": 4, "require.layers.fc2": 2}


def test_pyproject_table_is_read_with_tomllib(project):
    (project / "pyproject.toml").write_text(
        "[tool.black]\nline-length = 100\n\n[tool.robaudit]\nepsilon = 0.2\nmode = 'byzantine'\ncapacity = 1.5\n"
        "[[tool.robaudit.models]]\npath = 'exports/*.onnx'\nrequire = { byzantine = 1, crash = 2, total = 3 }\n"
    )
    policy = load_policy(None, cwd=project)
    assert policy.source == "pyproject.toml [tool.robaudit]"
    (entry,) = policy.models
    assert entry.mode == "byzantine" and entry.capacity == 1.5 and len(entry.paths) == 2
    assert entry.modes == ("byzantine", "crash")
    assert [(r.kind, r.mode, r.count) for r in entry.requirements] == [
        ("uniform", "crash", 2),
        ("uniform", "byzantine", 1),
        ("total", "byzantine", 3),
    ]


def test_robaudit_yaml_is_preferred_to_pyproject(project):
    (project / "pyproject.toml").write_text("[tool.robaudit]\nepsilon = 0.2\nmodels = ['exports/a.onnx']\n")
    write_yaml(project / "robaudit.yaml", {"epsilon": 0.9, "models": ["exports/b.onnx"], "require": {"crash": 0}})
    policy = load_policy(None, cwd=project)
    assert policy.source == "robaudit.yaml" and policy.models[0].epsilon == 0.9


def test_command_line_models_take_the_file_defaults(project):
    write_yaml(project / "robaudit.yaml", {"epsilon": 0.4, "require": {"total": 1}, "models": ["exports/a.onnx"]})
    (entry,) = load_policy(None, Overrides(models=("exports/b.onnx",)), cwd=project).models
    assert entry.paths == ("exports/b.onnx",) and entry.epsilon == 0.4
    assert [r.key for r in entry.requirements] == ["require.total"]


def test_a_command_line_model_named_by_an_entry_takes_that_entry(project):
    """``check exports/a.onnx`` checks a.onnx as ``check`` would under the policy: the entry naming it gives
    its ε, requirements and files (relative to the policy file); a new-user trial had the entry ignored and
    'missing key epsilon' asked for."""
    shutil.copy(SAMPLES / "digits_inputs.npz", project / "ci_inputs.npz")
    write_yaml(
        project / "robaudit.yaml",
        {
            "epsilon": 0.4,
            "models": [
                {"path": "exports/a.onnx", "epsilon": 2.5, "inputs": "ci_inputs.npz", "require": {"crash": 2}},
                {"path": "exports/*.onnx", "require": {"total": 3}},
            ],
        },
    )
    (project / "sub").mkdir()
    policy = load_policy(project / "robaudit.yaml", Overrides(models=("../exports/a.onnx",)), cwd=project / "sub")
    first, second = policy.models  # a.onnx is named by both entries: checked under each
    assert first.paths == second.paths == (str((project / "exports" / "a.onnx").resolve()),)
    assert (first.epsilon, second.epsilon) == (2.5, 0.4)
    assert first.inputs == (project / "ci_inputs.npz").resolve()
    assert [r.key for r in first.requirements] == ["require.crash"]
    assert [r.key for r in second.requirements] == ["require.total"]
    assert policy.notes[0].startswith(str((project / "exports" / "a.onnx").resolve()) + ": the settings of")


def test_a_command_line_glob_splits_between_named_and_unnamed_files(project):
    shutil.copy(MLP, project / "exports" / "c.onnx")
    write_yaml(
        project / "robaudit.yaml",
        {"epsilon": 0.4, "require": {"crash": 0}, "models": [{"path": "exports/b.onnx", "epsilon": 3.0}]},
    )
    named, rest = load_policy(None, Overrides(models=("exports/*.onnx",)), cwd=project).models
    assert (named.paths, named.epsilon) == (("exports/b.onnx",), 3.0)
    assert (rest.paths, rest.epsilon) == (("exports/a.onnx", "exports/c.onnx"), 0.4)
    assert named.pattern == rest.pattern == "exports/*.onnx"


def test_a_command_line_model_named_by_no_entry_says_so_when_nothing_is_required(project):
    entry = {"path": "exports/a.onnx", "epsilon": 1, "require": {"crash": 1}}
    write_yaml(project / "robaudit.yaml", {"models": [entry]})
    with pytest.raises(PolicyError, match=r"named by no entry of robaudit.yaml\): model 'exports/b.onnx': missing key"):
        load_policy(None, Overrides(models=("exports/b.onnx",)), cwd=project)
    flags = Overrides(models=("exports/b.onnx",), epsilon=1.0, require_total=1)
    (checked,) = load_policy(None, flags, cwd=project).models
    assert [r.key for r in checked.requirements] == ["require.total"]


def test_flags_alone_make_a_policy(project):
    overrides = Overrides(models=(str(project / "exports" / "a.onnx"),), epsilon=1.0, require_total=2)
    policy = load_policy(None, overrides, cwd=project / "exports")
    assert policy.source == "command line"
    assert policy.models[0].paths == ("a.onnx",)


def test_empirical_block_resolves_its_files(project):
    shutil.copy(SAMPLES / "digits_inputs.npz", project / "inputs.npz")
    write_yaml(
        project / "robaudit.yaml",
        {
            "epsilon": 1,
            "models": [{"path": "exports/a.onnx", "empirical": {"inputs": "inputs.npz", "failures": [1, 0]}}],
        },
    )
    (entry,) = load_policy(None, cwd=project).models
    assert entry.empirical.inputs == (project / "inputs.npz").resolve()
    assert entry.empirical.failures == (1, 0) and entry.empirical.max_error is None


# --------------------------------------------------------------------------- refusals


def refused(project: Path, data, overrides: Overrides = Overrides()) -> str:
    write_yaml(project / "robaudit.yaml", data)
    with pytest.raises(PolicyError) as info:
        load_policy(None, overrides, cwd=project)
    message = str(info.value)
    assert "\n" not in message
    return message


ENTRY = {"path": "exports/a.onnx", "require": {"crash": 1}}


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"epsilon": 1, "models": [{**ENTRY, "epsilom": 1}]}, ["'models[0].epsilom'", "did you mean 'epsilon'"]),
        ({"epsilon": 1, "modles": [ENTRY]}, ["'modles'", "did you mean 'models'"]),
        ({"epsilon": 1, "models": [{**ENTRY, "require": {"crash": 1, "totl": 2}}]}, ["'models[0].require.totl'"]),
        ({"epsilon": 1, "models": [{**ENTRY, "empirical": {"inputs": "x", "failures": 1, "seeds": 1}}]}, ["seeds"]),
        ({"epsilon": True, "models": [ENTRY]}, ["'epsilon'", "must be a number"]),
        ({"epsilon": "0.1", "models": [ENTRY]}, ["'epsilon'", "must be a number", "text"]),
        ({"epsilon": -0.1, "models": [ENTRY]}, ["'epsilon'", "positive"]),
        ({"epsilon": 0, "models": [ENTRY]}, ["'epsilon'", "positive"]),
        ({"epsilon": float("inf"), "models": [ENTRY]}, ["'epsilon'", "finite"]),
        ({"models": [ENTRY]}, ["missing key 'epsilon'"]),
        ({"epsilon": 1, "models": [{**ENTRY, "mode": "crashed"}]}, ["'models[0].mode'", "crash, byzantine"]),
        ({"epsilon": 1, "models": [{**ENTRY, "method": "exact"}]}, ["'models[0].method'", "paper, tight"]),
        ({"epsilon": 1, "models": [{**ENTRY, "input_range": [1, 0]}]}, ["'models[0].input_range'", "LO ≤ HI"]),
        ({"epsilon": 1, "models": [{**ENTRY, "input_range": 1}]}, ["'models[0].input_range'", "two numbers"]),
        ({"epsilon": 1, "models": [{**ENTRY, "input_shape": [3, 0]}]}, ["'models[0].input_shape'"]),
        ({"epsilon": 1, "models": [{**ENTRY, "require": {"crash": 1.5}}]}, ["'models[0].require.crash'", "integer"]),
        ({"epsilon": 1, "models": [{**ENTRY, "require": {"crash": -1}}]}, ["'models[0].require.crash'", "≥ 0"]),
        ({"epsilon": 1, "models": [{**ENTRY, "require": {"layers": ["fc1"]}}]}, ["'models[0].require.layers'"]),
        (
            {"epsilon": 1, "models": [{**ENTRY, "require": {"layers": {"fc1": "3"}}}]},
            ["'models[0].require.layers.fc1'"],
        ),
        ({"epsilon": 1, "models": [{**ENTRY, "require": 3}]}, ["'models[0].require'", "mapping"]),
        ({"epsilon": 1, "models": [{"path": "exports/a.onnx"}]}, ["nothing is required"]),
        ({"epsilon": 1, "models": [{"require": {"crash": 1}}]}, ["'models[0].path'"]),
        ({"epsilon": 1, "models": []}, ["'models'", "non-empty list"]),
        ({"epsilon": 1, "models": "exports/a.onnx"}, ["'models'", "non-empty list"]),
        ({"epsilon": 1, "models": [3]}, ["'models[0]'"]),
        ({"epsilon": 1, "models": [{**ENTRY, "path": "exports/c.onnx"}]}, ["'models[0].path'", "does not exist"]),
        ({"epsilon": 1, "models": [{**ENTRY, "path": "out/*.onnx"}]}, ["'models[0].path'", "matches no file"]),
        ({"epsilon": 1, "models": [{**ENTRY, "require": {"byzantine": 1}}]}, ["capacity", "failure_range"]),
        ({"epsilon": 1, "models": [{**ENTRY, "capacity": 1}]}, ["apply to byzantine"]),
        ({"epsilon": 1, "mode": "byzantine", "capacity": 1, "failure_range": [-1, 1], "models": [ENTRY]}, ["not both"]),
        ({"epsilon": 1, "models": [{**ENTRY, "empirical": {"failures": 1}}]}, ["'models[0].empirical.inputs'"]),
        (
            {"epsilon": 1, "models": [{**ENTRY, "empirical": {"inputs": "none.npz", "failures": 1}}]},
            ["'models[0].empirical.inputs'", "does not exist"],
        ),
        ([ENTRY], ["must hold a mapping"]),
    ],
)
def test_invalid_policy_names_the_key_and_the_reason(project, data, needles):
    message = refused(project, data)
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (Overrides(epsilon=0.0), ["'--epsilon'", "positive"]),
        (Overrides(require_crash=-2), ["'--require-crash'", "≥ 0"]),
        (Overrides(require_layers=(("fc1", -1),)), ["'--require-layer fc1'"]),
        (Overrides(method="exact"), ["'--method'"]),
        (Overrides(input_range=(2.0, 1.0)), ["'--input-range'"]),
    ],
)
def test_invalid_flags_name_the_flag(project, overrides, needles):
    message = refused(project, {"epsilon": 1, "models": [ENTRY]}, overrides)
    for needle in needles:
        assert needle in message, message


def test_no_policy_and_no_model(tmp_path):
    with pytest.raises(PolicyError, match="no policy"):
        load_policy(None, Overrides(epsilon=1), cwd=tmp_path)


def test_missing_or_tableless_policy_files(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "absent.yaml", cwd=tmp_path)
    (tmp_path / "other.toml").write_text("[tool.black]\nx = 1\n")
    with pytest.raises(PolicyError, match=r"no \[tool.robaudit\]"):
        load_policy(tmp_path / "other.toml", cwd=tmp_path)
    (tmp_path / "bad.toml").write_text("[tool.robaudit\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(tmp_path / "bad.toml", cwd=tmp_path)


def test_an_empty_policy_file_says_it_is_empty(tmp_path):
    (tmp_path / "robaudit.yaml").write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="robaudit.yaml' is empty"):
        load_policy(None, cwd=tmp_path)


def test_malformed_yaml_names_the_line(tmp_path):
    (tmp_path / "robaudit.yaml").write_text("epsilon: 1\nmodels: [\n  path: x\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"robaudit.yaml' is not valid YAML at line \d"):
        load_policy(None, cwd=tmp_path)


def test_flags_alone_need_epsilon_and_a_requirement(project):
    model = str(project / "exports" / "a.onnx")
    with pytest.raises(PolicyError, match="missing key 'epsilon'"):
        load_policy(None, Overrides(models=(model,), require_crash=1), cwd=project)
    with pytest.raises(PolicyError, match="nothing is required"):
        load_policy(None, Overrides(models=(model,), epsilon=1.0), cwd=project)
    (entry,) = load_policy(None, Overrides(models=(model,), epsilon=1.0, has_baseline=True), cwd=project).models
    assert entry.requirements == ()


def test_a_pyproject_table_beside_robaudit_yaml_is_said_to_be_unread(tmp_path) -> None:
    """Both files in the directory: robaudit.yaml is the policy, and the report says the other is not read
    (a new-user trial had its pyproject policy ignored without a word)."""
    import shutil

    from conftest import SAMPLES, run_in_process

    from robaudit.gate.policy import load_policy

    shutil.copy(SAMPLES / "digits_mlp.onnx", tmp_path / "m.onnx")
    (tmp_path / "robaudit.yaml").write_text("models:\n  - path: m.onnx\n    epsilon: 5.0\n    require: {crash: 0}\n")
    assert load_policy(None, cwd=tmp_path).notes == ()
    (tmp_path / "pyproject.toml").write_text('[tool.robaudit]\nmodels = [{path = "m.onnx", epsilon = 1.0}]\n')
    policy = load_policy(None, cwd=tmp_path)
    assert policy.source == "robaudit.yaml"
    assert policy.notes and "[tool.robaudit] in pyproject.toml is not read" in policy.notes[0]
    proc = run_in_process("check", cwd=tmp_path)
    assert "robaudit: note: [tool.robaudit] in pyproject.toml is not read" in proc.stderr


def test_the_policy_is_found_in_a_parent_folder_up_to_the_repository_root(project):
    """check run from a subfolder reads the project's policy (as ruff and pytest find theirs; a new-user trial got
    'no policy' one folder down), its paths still relative to the file; the search stops at a folder holding
    .git."""
    write_yaml(project / "robaudit.yaml", {"epsilon": 1, "models": [ENTRY]})
    deeper = project / "exports" / "sub"
    deeper.mkdir()
    policy = load_policy(None, cwd=deeper)
    assert policy.source.endswith("robaudit.yaml")
    (model,) = policy.models
    assert [Path(p).resolve() for p in model.paths] == [(project / "exports" / "a.onnx").resolve()]
    (deeper / ".git").mkdir()  # a repository of its own below the project: its root ends the search
    with pytest.raises(PolicyError, match="no policy"):
        load_policy(None, Overrides(epsilon=1), cwd=deeper)


def test_the_source_says_command_line_whenever_a_flag_sets_something(project):
    """'robaudit.yaml + command line' when a flag sets a model, a setting or a requirement (a new-user trial saw it
    for a model path but not for -e 40, which overrode the file's ε); a baseline alone is not the policy's."""
    write_yaml(project / "robaudit.yaml", {"epsilon": 1, "models": [ENTRY]})
    assert load_policy(None, cwd=project).source == "robaudit.yaml"
    assert load_policy(None, Overrides(has_baseline=True), cwd=project).source == "robaudit.yaml"
    for overrides in (Overrides(epsilon=40.0), Overrides(require_crash=2), Overrides(models=("exports/a.onnx",))):
        assert load_policy(None, overrides, cwd=project).source == "robaudit.yaml + command line", overrides


def test_a_missing_file_of_an_entry_is_named_as_the_models_are(project, monkeypatch):
    """Relative to the working directory, as model paths are (it was absolute: a new-user trial's finding)."""
    monkeypatch.chdir(project)
    data = {"epsilon": 1, "models": [{**ENTRY, "empirical": {"inputs": "data/none.npz", "failures": 1}}]}
    message = refused(project, data)
    assert "file 'data/none.npz' does not exist" in message, message
