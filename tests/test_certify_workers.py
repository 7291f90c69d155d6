"""``certify --workers N`` (docs/method.md §7.5): the inputs are split into N contiguous slices
certified in separate processes, and the report is the same, bit for bit, whatever N — per-input
bounds, certified flags and the per-layer counts (the smallest count over the slices equals the
count over all inputs because certification is monotone in the count). ``check`` hands its
``--workers`` to the certificates of a policy's ``certified`` requirement. Bad worker counts are
one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SAMPLES, run_in_process

from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import certify_inputs
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions

#: Inputs of the digits sample that stay certified under one crash in the first layer (found
#: once, one input at a time), so that the per-layer count is not trivially −1 or 0.
PICKED = [0, 1, 2, 3, 4, 6, 7, 8, 10, 12, 13]


def test_same_result_whatever_the_workers() -> None:
    _, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    data = np.load(SAMPLES / "digits_inputs.npz")
    x, labels = data["x"][PICKED], data["labels"][PICKED]
    crash = FailureModel.crash()
    runs = [certify_inputs(network, crash, x, [1, 1], 0.5, None, labels, workers=n) for n in (1, 2, 3)]
    one = runs[0]
    # a layer count that is not trivial (some inputs certified, the count decided by the slices)
    assert any(la.max_failures_certified > 0 for la in one.layers)
    for other in runs[1:]:
        assert other.inputs == one.inputs  # dataclass equality: every float bit, flag and index
        assert other.layers == one.layers
        assert (other.max_bound, other.certified_fraction, other.certified_accuracy) == (
            one.max_bound, one.certified_fraction, one.certified_accuracy,
        )
    # the counts are those of the inputs one at a time (independent of how they are sliced)
    for idx, layer in enumerate(one.layers):
        single = [
            certify_inputs(network, crash, x[i : i + 1], [1, 1], 0.5).layers[idx]
            for i in range(len(x))
        ]
        counts = [s.max_failures_certified for s in single]
        assert layer.max_failures_certified == (-1 if min(counts) < 0 else min(counts))


def test_cli_report_identical_for_two_workers(tmp_path) -> None:
    args = [
        "certify", SAMPLES / "digits_mlp.onnx", "--inputs", SAMPLES / "digits_inputs.npz", "--crash", "1",
        "--output-tensor", "add_result2", "-q", "--format", "json",
    ]
    one = run_in_process(*args).stdout
    two = run_in_process(*args, "--workers", "2").stdout
    assert one == two
    assert len(json.loads(two)["inputs"]) == 200


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_bad_worker_count_is_one_line(value) -> None:
    proc = run_in_process(
        "certify", SAMPLES / "digits_mlp.onnx", "--inputs", SAMPLES / "digits_inputs.npz",
        "--output-tensor", "add_result2", "--workers", value, "-q", expect=2,
    )
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers" in lines[0], proc.stderr


def test_check_passes_its_workers_to_the_certificates(tmp_path, monkeypatch) -> None:
    """``check --workers 2`` on one model certifies in 2 processes, with the same verdict and report."""
    import robaudit.bounds.certify as certify_module
    from robaudit.gate.gate import run_check
    from robaudit.gate.policy import load_policy

    shutil.copy(SAMPLES / "digits_mlp.onnx", tmp_path / "m.onnx")
    shutil.copy(SAMPLES / "digits_inputs.npz", tmp_path / "val.npz")
    (tmp_path / "robaudit.yaml").write_text(
        "models:\n  - path: m.onnx\n    epsilon: 0.5\n    output: add_result2\n    inputs: val.npz\n"
        "    require:\n      certified: {crash: 1, min_fraction: 0.95}\n"
    )
    seen: list[int] = []
    real = certify_module.certify_inputs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("workers", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(certify_module, "certify_inputs", spy)
    policy = load_policy(tmp_path / "robaudit.yaml")
    results = [run_check(policy, with_remedy=False, workers=n) for n in (1, 2)]
    assert seen == [1, 2]
    verdicts = [[(v.key, v.status, v.achieved, v.detail) for m in r.models for v in m.verdicts] for r in results]
    assert verdicts[0] == verdicts[1] and any(rule == "require.certified" for rule, *_ in verdicts[0])


def test_a_script_without_the_main_guard_gets_robaudits_error(tmp_path) -> None:
    """Workers are fresh Pythons that import the calling script again: from a script without
    ``if __name__ == "__main__":`` the call ends in robaudit's InjectionRuntimeError naming the guard (it was
    a bare BrokenProcessPool traceback; a new-user trial ran docs/api.md's example style with workers=2)."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(
        "import numpy as np, robaudit\n"
        f"x = np.load({str(SAMPLES / 'digits_cnn_inputs.npz')!r})['x'][:4]\n"
        "try:\n"
        f"    robaudit.certify({str(SAMPLES / 'digits_cnn.onnx')!r}, x, crash=1, workers=2)\n"
        "except robaudit.InjectionRuntimeError as error:\n"
        "    print('CAUGHT', error)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "CAUGHT" in proc.stdout and '__name__ == "__main__"' in proc.stdout, proc.stdout + proc.stderr
