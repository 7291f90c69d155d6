"""Golden bound reports: a bound that silently loosens, or a tolerated count that drops, fails here.

``tests/golden/*.json`` hold the ``bound`` report of every sample model in crash and
byzantine mode (``tests/golden/regenerate.py``). The comparison is one-sided: bounds
(Fep, δ) may only go down (up to 1 % up is tolerated, for float noise and deliberate
small changes), tolerated counts may only go up. A change that tightens the bounds passes;
regenerate the files to pin the new figures.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from regenerate import MODELS, MODES, case_name, report  # noqa: E402

#: A bound may grow by this factor before it counts as loosened.
LOOSENING = 1.01
HINT = "if the change is deliberate, regenerate the golden reports: python tests/golden/regenerate.py"
#: Report keys that are upper bounds (smaller is tighter), top level and per layer.
BOUNDS = ("fep", "fep_paper", "fep_tight")
LAYER_BOUNDS = ("delta", "synapse_delta")
#: Report keys that are tolerated counts (larger is better).
LAYER_COUNTS = ("max_failures", "max_failures_paper", "max_failures_tight")
SUMMARY_COUNTS = {"uniform": ("max_failures", "paper", "tight"), "total": ("max_failures", "paper", "tight")}


def regressions(golden: dict, new: dict) -> list[str]:
    """Every figure of ``new`` that is looser than ``golden`` (empty: none)."""
    found = []

    def bound(where: str, old: float | None, now: float | None) -> None:
        if old is not None and now is not None and now > old * LOOSENING + 1e-12:
            found.append(f"{where}: bound {now:.6g} > golden {old:.6g} (+{now / old - 1:.1%})" if old else where)

    def count(where: str, old: int, now: int) -> None:
        if now < old:
            found.append(f"{where}: tolerated count {now} < golden {old}")

    for key in BOUNDS:
        bound(key, golden.get(key), new.get(key))
    for block, keys in SUMMARY_COUNTS.items():
        for key in keys:
            count(f"{block}.{key}", golden[block][key], new[block][key])
    new_layers = {layer["name"]: layer for layer in new["layers"]}
    for layer in golden["layers"]:
        name = layer["name"]
        if name not in new_layers:
            found.append(f"layer '{name}' is gone (layers now: {sorted(new_layers)})")
            continue
        for key in LAYER_BOUNDS:
            bound(f"layers.{name}.{key}", layer.get(key), new_layers[name].get(key))
        for key in LAYER_COUNTS:
            count(f"layers.{name}.{key}", layer[key], new_layers[name][key])
    return found


CASES = [(model, mode) for model in MODELS for mode in MODES]


@pytest.mark.parametrize(("model", "mode"), CASES, ids=[case_name(m, d) for m, d in CASES])
def test_bounds_do_not_loosen(model, mode):
    golden = json.loads((GOLDEN / f"{case_name(model, mode)}.json").read_text(encoding="utf-8"))
    new = report(model, mode)
    assert new["settings"] == golden["settings"], f"the case's settings changed; {HINT}"
    problems = regressions(golden, new)
    assert not problems, f"{case_name(model, mode)} loosened:\n  " + "\n  ".join(problems) + f"\n{HINT}"


def test_every_sample_model_has_golden_reports():
    models = {path.stem for path in (GOLDEN.parents[1] / "sample_models").glob("*.onnx")}
    assert models == set(MODELS)
    assert {path.name for path in GOLDEN.glob("*.json")} == {f"{case_name(m, d)}.json" for m, d in CASES}


def test_the_comparison_catches_a_loosened_bound_and_a_lost_count():
    golden = json.loads((GOLDEN / "lenet.crash.json").read_text(encoding="utf-8"))
    assert regressions(golden, golden) == []
    looser = copy.deepcopy(golden)
    looser["fep_tight"] *= 1.02
    looser["layers"][1]["delta"] *= 10
    looser["layers"][2]["max_failures_tight"] -= 1
    looser["total"]["tight"] -= 1
    problems = regressions(golden, looser)
    assert len(problems) == 4, problems
    tighter = copy.deepcopy(golden)
    tighter["fep_tight"] *= 0.5
    tighter["uniform"]["tight"] += 3
    assert regressions(golden, tighter) == []
