"""The second CROWN pass (optimised lower slopes) is left out only where it would repeat the first
(docs/method.md §4.4, §5.2).

For the sample models and the clean and faulty (every hidden layer's output widened to a failure range)
networks, the plain pass is run, then the second pass as it was always run before (starting from the
plain ranges, with the whole alpha budget), written out here:

* where the plain pass crossed no source with lower slope choices and tightened no range after it
  had been stored, every range, σ floor and report entry of the second pass is the plain pass's, bit
  for bit, and ``_tightened`` returns the plain pass;
* elsewhere ``_tightened`` still runs the second pass (its ranges are the second pass's);
* a copy that leaves the second pass out whenever the plain pass used no repeated back-substitution
  gives looser ranges on a network with choices (caught).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import robaudit.bounds.ranges as ranges
from robaudit.bounds.audit import load_network
from robaudit.graph.network import NetworkOptions

MODELS = Path(__file__).resolve().parent.parent / "sample_models"
NAMES = ("paper_mlp_sigmoid", "digits_mlp", "lenet", "resnet_small", "mobilenet_se", "encoder", "digits_cnn")
BUDGET = 1e8
ALPHA = 3e7


def _ibp_network(name: str):
    _, network = load_network(MODELS / f"{name}.onnx", NetworkOptions(ranges="ibp"))
    return network


def _cases(network):
    """(starting boxes, widen): the clean network, and every hidden output widened to [−1, 1]."""
    widen = {layer.output_value: (-1.0, 1.0) for layer in network.hidden_layers}
    return [(dict(network.clean), {}), (ranges._widened_ibp(network, widen, {}), widen)]


def _always_second(network, boxes, widen):
    """Both passes as ``_tightened`` ran them before the second one could be left out."""
    plain = ranges._Ranges(network, dict(boxes), set(widen), widen, BUDGET, {})
    plain.run(boxes)
    spent = BUDGET - plain.budget
    if plain.limited and 4 * spent > ALPHA:
        return plain, None
    second = ranges._Ranges(network, dict(plain.intervals), set(widen), widen, BUDGET, {})
    second.alpha_budget = ALPHA
    second.run(dict(plain.intervals))
    return plain, second


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


def _same_ranges(a: ranges._Ranges, b: ranges._Ranges) -> bool:
    if a.intervals.keys() != b.intervals.keys() or a.floors.keys() != b.floors.keys():
        return False
    boxes = all(
        _same(a.intervals[v].lo, b.intervals[v].lo) and _same(a.intervals[v].hi, b.intervals[v].hi) for v in a.intervals
    )
    floors = all(_same(a.floors[k][1], b.floors[k][1]) for k in a.floors)
    return boxes and floors and a.report == b.report


@pytest.fixture(scope="module")
def passes() -> list[tuple]:
    """Per model and case: (network, boxes, widen, plain pass, second pass or None, what ``_tightened`` gives)."""
    found = []
    for name in NAMES:
        network = _ibp_network(name)
        for boxes, widen in _cases(network):
            plain, second = _always_second(network, boxes, widen)
            found.append(
                (network, boxes, widen, plain, second, ranges._tightened(network, boxes, widen, {}, BUDGET, ALPHA))
            )
    return found


def test_left_out_only_where_it_repeats_the_first(passes):
    kinds = set()
    for _, _, _, plain, second, found in passes:
        if second is None:
            continue
        kinds.add(plain.choosable or plain.moved)
        if not plain.choosable and not plain.moved:
            assert _same_ranges(plain, second)
            assert _same_ranges(found, plain)
        else:
            assert _same_ranges(found, second)
    assert kinds == {True, False}  # both kinds occur among the sample models


def test_leaving_it_out_without_the_conditions_is_caught(passes, monkeypatch):
    looser = 0
    for network, boxes, widen, _, second, _ in passes:
        if second is None or not sum(second.report.repeats.values()):
            continue
        with monkeypatch.context() as patch:  # the copy: never a second pass
            patch.setattr(ranges.limits, "alpha_budget", lambda: 0.0)
            weakened = ranges._tightened(network, boxes, widen, {}, BUDGET, None)
        width = sum(float(np.sum(b.hi - b.lo)) for b in weakened.intervals.values())
        tight = sum(float(np.sum(b.hi - b.lo)) for b in second.intervals.values())
        looser += width > tight
    assert looser > 0
