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


@pytest.fixture(scope="module")
def small_fcn(tmp_path_factory):
    """conv(1→4) → ReLU → conv(4→6) → ReLU → mean → Linear(6→3), torch's default init (seed 0), 8×8 input:
    its total-budget DP (one per-layer sum over every output) answered 2 where the uniform search proved 4."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn

    class FCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    path = tmp_path_factory.mktemp("fcn") / "fcn.onnx"
    torch.onnx.export(FCN().eval(), (torch.rand(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17)
    return path


@pytest.mark.parametrize("model", ["fcn", "paper_mlp_sigmoid.onnx", "digits_mlp.onnx", "lenet.onnx"])
@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.5, 5.0])
def test_the_total_budget_holds_what_the_other_counts_prove(model, epsilon, small_fcn):
    """Every distribution of F ≤ uniform failures is a vector ≤ (F, …, F), and one failure anywhere is one layer's
    single count: the total budget is at least those (a new-user trial found total 2 beside uniform 4 and a check
    that failed require.total 3 on it), and check's requirement test decides the same counts."""
    from robaudit.gate.remedy import meets

    path = small_fcn if model == "fcn" else SAMPLES / model
    _, network = load_network(path, NetworkOptions())
    hidden = network.hidden_layers
    for method in (Method.PAPER, Method.TIGHT):
        options = BoundOptions(epsilon=epsilon, method=method)
        result = bound_network(network, options, ModelInfo("m.onnx", "", "", 17))
        uniform = result.uniform
        everything = sum(la.neurons for la in hidden)
        implied = everything if uniform >= max(la.neurons for la in hidden) else uniform
        if all(layer.max_failures >= 1 for layer in result.layers):
            implied = max(implied, 1)
        assert result.total >= implied, (method, result.total, uniform, [la.max_failures for la in result.layers])
        if result.total > 0:
            assert meets(network, options, "total", result.total)
        if result.total < everything:
            assert not meets(network, options, "total", result.total + 1)


def test_the_fcn_needs_the_uniform_count_for_its_total(small_fcn):
    """The case above can fail: on the FCN at ε = 0.05 the DP alone proves less than the uniform count."""
    from robaudit.bounds.fep import max_total

    _, network = load_network(small_fcn, NetworkOptions())
    tight = make_bound(Analysis(network, FailureModel.crash()), Method.TIGHT)
    assert max_total(tight.tight, 0.05)[0] < tight.max_uniform(0.05)
