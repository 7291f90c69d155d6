"""The one bound interface (docs/method.md §6): ``make_bound`` builds the bound of a method,
the named choices parse user text in one place, and every "≤ ε" uses one slack (§10.1)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES

from robaudit.bounds.audit import BoundOptions, bound_network, load_network
from robaudit.bounds.bound import CombinedBound, PaperMethod, make_bound, make_bounds
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound
from robaudit.bounds.results import ModelInfo
from robaudit.bounds.slack import EPSILON_SLACK, within
from robaudit.bounds.tight import TightBound
from robaudit.errors import OptionError
from robaudit.graph.network import NetworkOptions
from robaudit.options import Method, Mode, Search


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    _, network = load_network(SAMPLES / "paper_mlp_sigmoid.onnx", NetworkOptions())
    return Analysis(network, FailureModel.crash())


def test_the_factory_gives_each_method_its_bound(analysis):
    paper, tight = make_bound(analysis, "paper"), make_bound(analysis, Method.TIGHT)
    assert isinstance(paper, PaperMethod) and isinstance(tight, CombinedBound)
    raw_paper, raw_tight = PaperBound(analysis), TightBound(analysis)
    rng = np.random.default_rng(0)
    for _ in range(20):
        vector = [int(rng.integers(0, la.neurons + 1)) for la in analysis.hidden]
        assert paper.fep(vector) == raw_paper.fep(vector)
        assert tight.fep(vector) == min(raw_paper.fep(vector), raw_tight.fep(vector))
    budget = sum(la.neurons for la in analysis.hidden)
    np.testing.assert_array_equal(
        tight.total_curve(budget), np.minimum(raw_paper.total_curve(budget), raw_tight.total_curve(budget))
    )


def test_the_interface_gives_the_figures_of_bound(analysis):
    """max_single / max_uniform / max_total of both methods are the report's columns."""
    epsilon = 0.5
    result = bound_network(analysis.network, BoundOptions(epsilon=epsilon), ModelInfo("m.onnx", "", "", 17))
    paper, tight = make_bounds(analysis)
    for i, (layer, la) in enumerate(zip(result.layers, analysis.hidden, strict=True)):
        assert layer.max_failures_paper == paper.max_single(i, la.neurons, epsilon)
        assert layer.max_failures_tight == tight.max_single(i, la.neurons, epsilon)
    assert (result.uniform_paper, result.uniform_tight) == (paper.max_uniform(epsilon), tight.max_uniform(epsilon))
    assert (result.total_paper, result.total_tight) == (paper.max_total(epsilon)[0], tight.max_total(epsilon)[0])


def test_without_memory_the_sensitivities_are_still_computed(analysis, monkeypatch):
    """No stand-in: a budget of 0 MB gives chunks of one output and one kept value per layer
    (docs/method.md §4.4), the same figure for one failure per layer."""
    monkeypatch.setenv("ROBAUDIT_TIGHT_MEMORY_MB", "0")
    tight = make_bound(analysis, "tight", strict=True)
    assert isinstance(tight, CombinedBound) and tight.note is None
    assert all(top.shape[1] == 1 for top in tight.sensitivity.top)
    vector = [1] * len(analysis.hidden)
    full = TightBound(analysis, memory_bytes=2**30)
    assert tight.fep(vector) == pytest.approx(min(PaperBound(analysis).fep(vector), full.fep(vector)), rel=1e-12)


@pytest.mark.parametrize(
    ("choice", "flag", "good", "bad"),
    [
        (Method, "--method", "paper", "exact"),
        (Mode, "--mode", "byzantine", "crashed"),
        (Search, "--search", "worst", ""),
    ],
)
def test_named_choices_parse_user_text(choice, flag, good, bad):
    assert choice.parse(good, flag) == good and str(choice.parse(good, flag)) == good
    with pytest.raises(OptionError, match=f"{flag} must be one of .*got '{bad}'"):
        choice.parse(bad, flag)


def test_a_bad_method_is_one_clear_error(analysis):
    with pytest.raises(OptionError, match="--method must be one of paper, tight, got 'exact'"):
        make_bound(analysis, "exact")
    with pytest.raises(OptionError, match="--method must be one of paper, tight"):
        BoundOptions(epsilon=0.1, method="exact").check()


def test_one_slack_on_epsilon():
    assert within(1.0, 1.0) and within(1.0 + 0.5 * EPSILON_SLACK, 1.0)
    assert not within(1.0 + 2 * EPSILON_SLACK, 1.0)
