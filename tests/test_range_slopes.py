"""Optimised lower slopes of the CROWN ranges (docs/method.md §5.2, "Optimised lower slopes").

Each lower-slope choice of a ReLU family activation is checked against the activation
itself on a dense grid (numpy, written out here); the ranges that repeat the
back-substitution with those choices are checked against what the networks really
compute (random nets: the PyTorch forward pass of ``test_ranges``; a small ResNet trained
here on digits: the torch model itself, with samples, data points, corners and a
gradient attack on every neuron) and against plain CROWN (never looser). A copy with
slopes outside [α, 1] — an optimiser stepping the wrong way — is caught on random nets
(on the trained ResNet CROWN's ranges are too wide above what the network reaches for a
slightly wrong slope to show).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ranges import build, make_net, observe, violations

import robaudit.bounds.ranges as ranges_module
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.ranges import tighten_network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops.relaxations import linear_bounds, lower_slope_choices

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from trained_nets import NETWORKS, digits, export, sites, train  # noqa: E402

#: Slack of a containment check (float32 weights, float64 ranges).
SLACK = 1e-7


# --------------------------------------------------------------------------- the lines


def _node(op: str, alpha: float) -> tuple[Node, dict]:
    if op == "PRelu":
        return Node("n", "PRelu", "", ["x", "slope"], ["y"]), {"slope": np.array([alpha, 1.5, 0.0])}
    return Node("n", op, "", ["x"], ["y"], {"alpha": alpha} if op == "LeakyRelu" else {}), {}


def _leaks(op: str, alpha: float) -> np.ndarray:
    return {"Relu": np.zeros(3), "LeakyRelu": np.full(3, alpha), "PRelu": np.array([alpha, 1.5, 0.0])}[op]


def lines_below(choices: np.ndarray, icpt: np.ndarray, leak: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether every line choice·x + icpt stays below max(x, leak·x) / min(x, leak·x) on a dense grid of [lo, hi]."""
    grid = lo + (hi - lo) * np.linspace(0.0, 1.0, 401)[:, None]
    grid = np.concatenate([grid, np.clip(np.zeros((1, 3)), lo, hi)])
    f = np.where(grid >= 0, grid, leak * grid)
    tol = 1e-12 * (1 + np.abs(grid))
    return all(np.all(c * grid + icpt <= f + tol) for c in choices)


BOXES = st.lists(st.floats(-5, 5, allow_nan=False), min_size=6, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["Relu", "LeakyRelu", "PRelu"]), st.floats(0.0, 0.9), BOXES)
def test_every_lower_slope_choice_lies_below_the_activation(op, alpha, ends):
    node, constants = _node(op, alpha)
    a, b = np.array(ends[:3]), np.array(ends[3:])
    lo, hi = np.minimum(a, b) - 1e-3, np.maximum(a, b)
    choices = lower_slope_choices(node, lo, hi, constants)
    lines = linear_bounds(node, lo, hi, constants)
    if choices is None:  # nothing straddles 0 with a convex piece
        return
    assert choices.shape == (4, 3)
    np.testing.assert_array_equal(choices[0], lines.lower_slope)  # choice 0: the adaptive slope itself
    assert lines_below(choices, lines.lower_icpt, _leaks(op, alpha), lo, hi)
    # the check can fail: a slope outside [α, 1] (1.5, or −0.5 from a step the wrong way) is refuted
    straddle = (lo < -0.1) & (hi > 0.1) & (_leaks(op, alpha) <= 1)
    if straddle.any():
        for wrong in (1.5, -0.5):
            bad = np.where(straddle, wrong, choices[0])[None]
            assert not lines_below(bad, lines.lower_icpt, _leaks(op, alpha), lo, hi)


# --------------------------------------------------------------------------- random nets


def _pair(net, tmp_path, box, budget=None):
    """(optimised network, plain-CROWN clean ranges) of the same net."""
    plain, _ = build(net, tmp_path, box, "crown", budget, alpha_budget=0.0)
    network, _ = build(net, tmp_path, box, "crown", budget, alpha_budget=1e12)
    return network, plain.clean


def _inside(tight, loose, names) -> bool:
    for name in names:
        t, lo = tight[name], loose[name]
        tol = 1e-9 * (1 + np.abs(lo.lo) + np.abs(lo.hi))
        if np.any(t.lo < lo.lo - tol) or np.any(t.hi > lo.hi + tol):
            return False
    return True


NETS = st.tuples(
    st.sampled_from(["dense", "conv", "residual", "mixed", "deconv"]),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.4, 1.0, 2.0]),
    st.sampled_from([None, 2e4]),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NETS)
def test_optimised_ranges_are_sound_and_never_looser_than_crown(tmp_path, params):
    kind, seed, scale, budget = params
    net = make_net(kind, "relu", np.random.default_rng(seed), scale)
    box = (-1.0, 1.0) if seed % 2 else (0.0, 1.0)
    network, plain = _pair(net, tmp_path, box, budget)
    assert not violations(network.clean, observe(net, box, seed=seed), net.values)
    assert _inside(network.clean, plain, net.values)
    faulty = Analysis(network, FailureModel.byzantine(None, (-1.0, 1.0))).faulty()
    assert not violations(faulty, observe(net, box, failure_range=(-1.0, 1.0), seed=seed), net.values)


def _wrong_choices(node, lo, hi, constants):
    """A weakened copy: two more choices, slopes −1 and 2 where the ReLU straddles 0 (outside [0, 1])."""
    choices = lower_slope_choices(node, lo, hi, constants)
    if choices is None:
        return None
    straddle = (lo < 0) & (hi > 0)
    return np.concatenate([choices] + [np.where(straddle, s, choices[0])[None] for s in (-1.0, 2.0)])


@pytest.mark.parametrize("kind", ["dense", "residual"])
def test_a_slope_outside_the_sound_interval_is_caught(tmp_path, kind, monkeypatch):
    net = make_net(kind, "relu", np.random.default_rng(3), 1.0)
    observed = observe(net, (0.0, 1.0), seed=3, steps=40)
    network, _ = build(net, tmp_path, (0.0, 1.0), "crown", alpha_budget=1e12)
    assert not violations(network.clean, observed, net.values)
    monkeypatch.setattr(ranges_module, "lower_slope_choices", _wrong_choices)
    weakened, _ = build(net, tmp_path, (0.0, 1.0), "crown", alpha_budget=1e12)
    assert violations(weakened.clean, observed, net.values)


# --------------------------------------------------------------------------- a trained ResNet

_TRAINED: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A small ResNet (two residual blocks, BatchNorm folded) trained 3 epochs on digits, and what its sites
    reach: min and max per neuron over samples, data, corners and a sign-gradient attack on every neuron."""
    if "resnet" not in _TRAINED:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        model = NETWORKS["resnet_small"][0]()
        train(model, epochs=3)
        path = export(model, tmp_path_factory.mktemp("resnet") / "resnet_small.onnx")
        _TRAINED["resnet"] = (model, path, _reached(model))
    return _TRAINED["resnet"]


def _site_values(model, x) -> list:
    model(x)
    return [s.seen.reshape(x.shape[0], -1) for s in sites(model)]


def _reached(model) -> list[tuple[np.ndarray, np.ndarray]]:
    gen = torch.Generator().manual_seed(0)
    images, _ = digits()
    starts = [
        torch.rand((512, 1, 8, 8), generator=gen),
        (torch.rand((512, 1, 8, 8), generator=gen) < 0.5).float(),
        torch.from_numpy(images[:512]).float(),
    ]
    with torch.no_grad():
        seen = [_site_values(model, x) for x in starts]
    lo = [torch.cat([s[i] for s in seen]).min(0).values for i in range(len(seen[0]))]
    hi = [torch.cat([s[i] for s in seen]).max(0).values for i in range(len(seen[0]))]
    for i, width in enumerate(v.shape[0] for v in lo):
        rows = torch.arange(2 * width)
        sign = torch.where(rows < width, 1.0, -1.0)
        x = torch.rand((2 * width, 1, 8, 8), generator=gen).requires_grad_(True)
        for _ in range(30):
            values = _site_values(model, x)[i][rows, rows % width]
            (grad,) = torch.autograd.grad((sign * values).sum(), x)
            with torch.no_grad():
                x += 0.05 * grad.sign()
                x.clamp_(0.0, 1.0)
        with torch.no_grad():
            values = _site_values(model, x)[i][rows, rows % width]
        lo[i] = torch.minimum(lo[i], values[width:])
        hi[i] = torch.maximum(hi[i], values[:width])
    return [(a.double().numpy(), b.double().numpy()) for a, b in zip(lo, hi, strict=True)]


def _networks(path, alpha_budget: float | None):
    from robaudit.bounds.audit import load_network
    from robaudit.graph.network import NetworkOptions

    _, network = load_network(path, NetworkOptions(input_range=(0.0, 1.0), ranges="ibp"))
    tighten_network(network, "crown", alpha_budget=alpha_budget)
    return network


def _outside(network, reached) -> list[str]:
    bad = []
    for layer, (lo, hi) in zip(network.hidden_layers, reached, strict=True):
        box = network.clean[layer.output_value]
        tol = 1e-5 * (1 + np.abs(lo) + np.abs(hi))  # float32 torch against float64 ranges
        if np.any(lo < box.lo.reshape(-1) - tol) or np.any(hi > box.hi.reshape(-1) + tol):
            bad.append(layer.name)
    return bad


def test_trained_resnet_ranges_are_sound_and_tighter_than_crown(resnet):
    _, path, reached = resnet
    plain, optimised = _networks(path, 0.0), _networks(path, None)  # None: the default ROBAUDIT_ALPHA_BUDGET
    assert not _outside(plain, reached) and not _outside(optimised, reached)
    assert _inside(optimised.clean, plain.clean, list(plain.clean))
    last = plain.hidden_layers[-1].output_value
    width = lambda box: float(np.median(box.hi - box.lo))  # noqa: E731
    # measured: the last block's median width 0.6-0.75 of plain CROWN's
    assert width(optimised.clean[last]) < 0.9 * width(plain.clean[last])
    assert sum(optimised.range_report.repeats.values()) > 0
