"""``bound`` says so when the bound of the vector asked about is within ε but the tolerated counts (which
``check`` reads) do not show that vector: a new-user trial saw ``Fep for failures [1, 1]: 321.6`` at ε = 330
beside ``uniform 0`` and a failing ``check --require-crash 1``, with the reason only in the README."""

from __future__ import annotations

import pytest
from conftest import cli_json, run_cli

from robaudit.bounds.audit import counts_cover

SAMPLE = "sample_models/paper_mlp_sigmoid.onnx"


@pytest.mark.parametrize(
    ("failures", "uniform", "total", "singles", "covered"),
    [
        ([1, 1], 1, 0, [0, 0], True),  # every count within uniform
        ([1, 1], 0, 2, [0, 0], True),  # the sum within the total budget
        ([2, 0], 0, 1, [2, 0], True),  # one layer alone, within its count
        ([2, 0], 0, 1, [1, 5], False),
        ([1, 1], 0, 1, [5, 5], False),  # two layers: the single-layer counts say nothing
        ([0, 0], -1, -1, [-1, -1], True),  # nothing fails
    ],
)
def test_counts_cover_reads_the_three_searches(failures, uniform, total, singles, covered):
    assert counts_cover(failures, uniform, total, singles) is covered


def test_bound_notes_a_vector_within_epsilon_that_the_counts_do_not_show():
    # the sample's own bound of [1, 1] is 0.4905; the searches' bound of one crash per layer is above 0.495
    report = cli_json("bound", SAMPLE, "--epsilon", "0.495", "--crash", "1", "--format", "json")
    assert report["fep"] <= 0.495 and report["uniform"]["max_failures"] == 0 and report["total"]["max_failures"] < 2
    notes = [n for n in report["notes"] if n.startswith("the bound of exactly [1, 1]")]
    assert len(notes) == 1, report["notes"]
    shown = run_cli("bound", SAMPLE, "--epsilon", "0.495", "--crash", "1").stdout
    assert "note: the bound of exactly [1, 1] (0.4905) is within ε = 0.495" in " ".join(shown.split())
    at_half = cli_json("bound", SAMPLE, "--epsilon", "0.5", "--crash", "1", "--format", "json")
    assert at_half["uniform"]["max_failures"] >= 1 and not any("the bound of exactly" in n for n in at_half["notes"])
