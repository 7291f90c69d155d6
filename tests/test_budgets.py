"""The work budgets of the range, signed and relational passes and the size, memory and thread limits are read
from the environment each time they are used (not at import), and a value out of their domain (a budget that is
not a number ≥ 0, a limit that is not an integer ≥ its least value) is one line, exit 2."""

from __future__ import annotations

import pytest
from conftest import SAMPLES, run_cli

from robaudit import limits
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.ranges import tighten_network
from robaudit.bounds.signed import signed_applies
from robaudit.errors import OptionError
from robaudit.graph.network import NetworkOptions

BUDGETS = {
    "ROBAUDIT_CROWN_BUDGET": (limits.crown_budget, 3e9),
    "ROBAUDIT_ALPHA_BUDGET": (limits.alpha_budget, 3e9),
    "ROBAUDIT_SIGNED_BUDGET": (limits.signed_budget, 2e8),
    "ROBAUDIT_RELATIONAL_BUDGET": (limits.relational_budget, 5e9),
    "ROBAUDIT_TIGHTENED_BUDGET": (limits.tightened_budget, 6e10),
    "ROBAUDIT_SPLIT_BUDGET": (limits.split_budget, 3e9),
    "ROBAUDIT_SHARED_BUDGET": (limits.shared_budget, 2e8),
    "ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET": (limits.domain_certificate_budget, 3e9),
}


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_each_budget_is_read_when_used(name, monkeypatch):
    read, default = BUDGETS[name]
    monkeypatch.delenv(name, raising=False)
    assert read() == default
    monkeypatch.setenv(name, "1.5e3")
    assert read() == 1500.0
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(OptionError, match=name):
            read()


#: name: (reader, default, its least value, the value the reader gives for the least value)
INTEGER_LIMITS = {
    "ROBAUDIT_MAX_MODEL_BYTES": (limits.max_model_bytes, 2**31 - 1, 1, 1),
    "ROBAUDIT_MAX_EXTERNAL_BYTES": (limits.max_external_bytes, 8 * 2**30, 0, 0),
    "ROBAUDIT_MAX_INPUTS_BYTES": (limits.max_inputs_bytes, 2**31, 1, 1),
    "ROBAUDIT_TIGHT_MEMORY_MB": (limits.tight_memory_bytes, 2048 * 2**20, 0, 0),
    "ROBAUDIT_THREADS": (limits.bound_threads, None, 1, 1),
}


@pytest.mark.parametrize("name", sorted(INTEGER_LIMITS))
def test_each_integer_limit_is_read_when_used(name, monkeypatch):
    read, default, least, least_read = INTEGER_LIMITS[name]
    monkeypatch.delenv(name, raising=False)
    if default is not None:  # the thread count's default is the machine's (test_threaded_pass)
        assert read() == default
    monkeypatch.setenv(name, str(least))
    assert read() == least_read
    for bad in ("lots", "1.5", str(least - 1), "-5"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(OptionError, match=f"{name} must be an integer ≥ {least}, got '{bad}'"):
            read()


def _network():
    return load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions())[1]


def test_the_range_budgets_reach_the_range_pass(monkeypatch):
    """Set after import, the budgets still decide: no CROWN budget leaves IBP everywhere, no α budget
    repeats nothing, the defaults reach the input and repeat some back-substitutions."""
    default = tighten_network(_network(), "crown")
    assert any(reached for _, reached in default.windows.values()) and any(default.repeats.values())
    monkeypatch.setenv("ROBAUDIT_ALPHA_BUDGET", "0")
    plain = tighten_network(_network(), "crown")
    assert not any(plain.repeats.values())
    monkeypatch.setenv("ROBAUDIT_CROWN_BUDGET", "0")
    ibp = tighten_network(_network(), "crown")
    assert not any(reached for _, reached in ibp.windows.values())


def test_the_signed_budget_reaches_the_signed_pass(monkeypatch):
    analysis = Analysis(_network(), FailureModel.crash())
    assert signed_applies(analysis)
    monkeypatch.setenv("ROBAUDIT_SIGNED_BUDGET", "0")
    assert not signed_applies(analysis)


def test_a_bad_budget_is_one_line_exit_2():
    proc = run_cli("bound", SAMPLES / "digits_mlp.onnx", expect=None,
                   env={"ROBAUDIT_SIGNED_BUDGET": "lots"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "ROBAUDIT_SIGNED_BUDGET" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_a_negative_memory_budget_is_one_line_exit_2():
    """It was taken as the smallest budget without a word (a typo would silently loosen the bound)."""
    proc = run_cli("bound", SAMPLES / "digits_mlp.onnx", expect=None, env={"ROBAUDIT_TIGHT_MEMORY_MB": "-5"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "robaudit: ROBAUDIT_TIGHT_MEMORY_MB must be an integer ≥ 0, got '-5'"
