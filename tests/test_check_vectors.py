"""A uniform requirement the searched count does not show, shown vector by vector (docs/method.md §6.2): ``check``
refines the bound of every vector ≤ (N, …, N) whose plain bound exceeds ε, as ``bound --crash v`` reports it.

A new-user trial saw ``bound lenet -e 300 --crash 1`` print 267.4 while ``check --require-crash 1`` failed the
model: the searched uniform count reads bounds that never decrease as a count grows, which one vector's
refinements do not enter. Expected verdicts come from separate ``bound --crash v`` runs of every vector.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import SAMPLES, cli_json, run_in_process

from robaudit.bounds.bound import MAX_LISTED_VECTORS, vectors_within

LENET = SAMPLES / "lenet.onnx"


def _bounds_of_every_vector() -> dict[tuple[int, ...], float]:
    """``bound --crash v`` (its reported fep) for every v ≤ (1, 1, 1, 1) of LeNet's four hidden layers."""
    found = {}
    for vector in itertools.product([0, 1], repeat=4):
        if any(vector):
            report = cli_json("bound", LENET, "-e", "1000", "--crash", ",".join(map(str, vector)))
            found[vector] = float(report["fep"])
    return found


@pytest.fixture(scope="module")
def every_vector() -> dict[tuple[int, ...], float]:
    return _bounds_of_every_vector()


def _verdict(epsilon: float, expect: int) -> dict:
    proc = run_in_process("check", LENET, "-e", epsilon, "--require-crash", 1, "--format", "json", expect=expect)
    (requirement,) = json.loads(proc.stdout)["models"][0]["requirements"]
    return requirement


def test_a_uniform_requirement_passes_when_every_vectors_own_bound_is_within(every_vector) -> None:
    largest = max(every_vector.values())
    assert largest < 300  # each vector's own bound, from its own run
    report = cli_json("bound", LENET, "-e", "300")
    assert report["uniform"]["max_failures"] == 0  # the searched count does not show it
    verdict = _verdict(300, 0)
    assert verdict["status"] == "pass" and verdict["achieved"] == 1
    assert "refined one by one" in verdict["detail"]


def test_it_fails_when_one_vectors_bound_exceeds(every_vector) -> None:
    epsilon = max(every_vector.values()) * 0.98
    verdict = _verdict(epsilon, 1)
    assert verdict["status"] == "fail" and verdict["achieved"] == 0


@dataclass
class _Layer:
    neurons: int


class _Stub:
    """A bound whose plain figures all exceed ε and whose refined figure of one vector below the largest does
    too: only checking every vector finds it."""

    def __init__(self, layers: int, failing: tuple[int, ...]) -> None:
        self.analysis = type("A", (), {"hidden": [_Layer(3)] * layers})()
        self.failing = failing
        self.asked: list[tuple[int, ...]] = []

    def fep(self, failures) -> float:
        return 10.0 if any(failures) else 0.0

    def fep_vector(self, failures) -> float:
        self.asked.append(tuple(failures))
        return 2.0 if tuple(failures) == self.failing else 0.5


def test_every_vector_below_the_count_is_refined_not_only_the_largest() -> None:
    stub = _Stub(3, (0, 1, 0))
    shown, refined = vectors_within(stub, 1, 1.0)  # type: ignore[arg-type]
    assert shown is False and (0, 1, 0) in stub.asked
    passing = _Stub(3, (5, 5, 5))
    shown, refined = vectors_within(passing, 1, 1.0)  # type: ignore[arg-type]
    below = set(itertools.product([0, 1], repeat=3)) - {(0, 0, 0)}
    assert shown is True and refined == 7 and set(passing.asked) == below


def test_too_many_vectors_are_not_listed() -> None:
    layers = 1
    while 2**layers <= MAX_LISTED_VECTORS:
        layers += 1
    stub = _Stub(layers, (9,) * layers)
    assert vectors_within(stub, 1, 1.0) == (None, 0)  # type: ignore[arg-type]
    assert stub.asked == []


def test_a_policys_errors_name_its_keys_too(tmp_path) -> None:
    """A policy's wrong input_shape, or certified inputs outside its input_range, are named by the policy's keys
    beside the flags (a new-user trial read '--input-shape gives 32' about a policy's 'input_shape')."""
    x = np.load(SAMPLES / "digits_cnn_inputs.npz")["x"] * 16.0
    np.save(tmp_path / "raw.npy", x.astype(np.float32))
    cases = (
        ("input_shape: [1, 32]\n    require: {crash: 1}\n", "'input_shape' (--input-shape)"),
        ("inputs: raw.npy\n    require: {certified: {crash: 1}}\n", "input_range: [0, 16] (or --input-range 0,16)"),
    )
    for entry, named in cases:
        (tmp_path / "robaudit.yaml").write_text(
            f"epsilon: 20\nmodels:\n  - path: {SAMPLES / 'digits_cnn.onnx'}\n    {entry}", encoding="utf-8")
        proc = run_in_process("check", cwd=tmp_path, expect=2)
        assert named in proc.stderr, proc.stderr


def test_a_certified_row_of_classes_shows_no_epsilon(tmp_path) -> None:
    """Certificates of an output with classes mean the class kept: the ε column shows '-', the report says
    epsilon_used false and the detail why (a new-user trial read the entry's ε as what was certified)."""
    (tmp_path / "robaudit.yaml").write_text(
        f"epsilon: 20\nmodels:\n  - path: {SAMPLES / 'digits_cnn.onnx'}\n"
        f"    inputs: {SAMPLES / 'digits_cnn_inputs.npz'}\n"
        "    require:\n      crash: 0\n      certified: {crash: 1, min_fraction: 0.0}\n", encoding="utf-8")
    report = json.loads(run_in_process("check", "--format", "json", cwd=tmp_path).stdout)
    verdicts = {v["key"]: v for v in report["models"][0]["requirements"]}
    assert verdicts["require.certified"]["epsilon_used"] is False and verdicts["require.crash"]["epsilon_used"]
    assert "ε is not used" in verdicts["require.certified"]["detail"]
    table = run_in_process("check", cwd=tmp_path, columns=240).stdout
    (row,) = [line for line in table.splitlines() if "require.certified" in line]
    (crash,) = [line for line in table.splitlines() if "require.crash" in line]
    assert [c.strip() for c in row.split("│")][4] == "-" and [c.strip() for c in crash.split("│")][4] == "20"
