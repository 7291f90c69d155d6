"""The benchmark's exact search (``benchmarks/exact_search.py``: a MILP of the clean and the
faulty network, every incumbent checked by a torch forward pass) against independent
computations.

* On one hidden ReLU layer (5 neurons, input box [0, 1]^4, 3 outputs) the worst error per
  (output, sign) is enumerated: every failure set, every activation pattern of the failed
  neurons, the input by a linear program (scipy's HiGHS linprog): F̃ − F = Σ_{j∈S} W2[:, j]
  (v_j − relu(w_j·x + b_j)), affine in x on each pattern, v_j = ±C at the better end. The MILP's
  verified answer must equal it (crash and byzantine).
* The DAG read from the torch models (MLP, ``SmallResNet`` with its residual adds) reproduces
  the torch forward pass with failures; the interval bounds contain sampled clean, faulty and
  difference values.
* Weakened copies are caught: big-M constants shrunk by 10 % make the MILP claim an error the
  forward pass does not reproduce, or miss the enumerated worst; ranges shrunk by 10 % are left
  by sampled points.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("scipy")
import torch  # noqa: E402
from scipy.optimize import linprog  # type: ignore[import-untyped]  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from exact_search import bounds, extract, forward, phases_at, polish, region_lp, solve, verify  # noqa: E402
from trained_nets import MLP, SmallResNet, _forward, sites  # noqa: E402


def _tiny(seed: int) -> MLP:
    """An :class:`MLP`-shaped net on 4 inputs (the exact search reads MLPs)."""
    torch.manual_seed(seed)
    model = MLP([5])
    model.body[1] = torch.nn.Linear(4, 5)
    model.body[0] = torch.nn.Flatten()
    model.body[4] = torch.nn.Linear(5, 3)
    return model.double().eval()


@functools.cache
def enumerated(seed: int, count: int, c: float) -> dict[tuple[int, float], float]:
    """(output, sign) → max over failure sets |S| = count, x ∈ [0, 1]^4 of sign·(F̃ − F), by LPs."""
    model = _tiny(seed)
    w1, b1 = model.body[1].weight.detach().numpy(), model.body[1].bias.detach().numpy()
    w2 = model.body[4].weight.detach().numpy()
    best: dict[tuple[int, float], float] = {}
    for k, sign in itertools.product(range(3), (1.0, -1.0)):
        top = -np.inf
        for chosen in itertools.combinations(range(5), count):
            sent = sum(c * abs(w2[k, j]) for j in chosen)  # sign·W2[k, j]·v_j at its best end
            for active in itertools.product([True, False], repeat=count):
                rows = [(-w1[j], b1[j]) if a else (w1[j], -b1[j]) for j, a in zip(chosen, active, strict=True)]
                on = [j for j, a in zip(chosen, active, strict=True) if a]
                cost = sign * sum((w2[k, j] * w1[j] for j in on), np.zeros(4))  # minimise −objective
                offset = sent - sign * sum(w2[k, j] * b1[j] for j in on)
                result = linprog(cost, A_ub=np.array([r[0] for r in rows]), b_ub=np.array([r[1] for r in rows]),
                                 bounds=[(0.0, 1.0)] * 4, method="highs")
                if result.status == 0:
                    top = max(top, -result.fun + offset)
        best[(k, sign)] = top
    return best


@pytest.mark.parametrize(("seed", "count", "c"),
                         [(0, 2, 0.0), pytest.param(1, 2, 0.0, marks=pytest.mark.slow),
                          pytest.param(2, 1, 0.5, marks=pytest.mark.slow)])
def test_the_milp_finds_the_enumerated_worst(seed, count, c):
    model = _tiny(seed)
    graph = extract(model)
    exact = enumerated(seed, count, c)
    for (k, sign), worst in exact.items():
        found = solve(model, graph, [count], c, k, sign, time_limit=20)
        assert found.verified is not None
        # a real error (the forward pass), equal to the MILP's claim and to the enumerated worst
        assert found.verified == pytest.approx(found.claimed, abs=1e-6)
        assert found.verified == pytest.approx(worst, abs=1e-6), (k, sign)
        assert found.dual >= worst - 1e-6


def test_shrunk_big_m_constants_are_caught():
    """Big-M constants shrunk by 10 %: some (output, sign) claims an error the forward pass does not
    reproduce, or misses the enumerated worst."""
    seed, count, c = 0, 2, 0.0
    model = _tiny(seed)
    graph = extract(model)
    caught = 0
    for (k, sign), worst in enumerated(seed, count, c).items():
        found = solve(model, graph, [count], c, k, sign, time_limit=20, big_m=0.9)
        assert found.verified is not None
        caught += abs(found.verified - found.claimed) > 1e-6 or abs(found.verified - worst) > 1e-6
    assert caught


def _random_resnet() -> SmallResNet:
    torch.manual_seed(3)
    model = SmallResNet(channels=2)
    for module in model.modules():  # BatchNorm with non-trivial statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.double().eval()


def _random_failures(model, counts, c, batch, rng):
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    shapes = [tuple(s.seen.shape[1:]) for s in sites(model)]
    masks, values = [], []
    for shape, count in zip(shapes, counts, strict=True):
        n = int(np.prod(shape))
        mask = np.zeros((batch, n))
        for b in range(batch):
            mask[b, rng.choice(n, count, replace=False)] = 1.0
        masks.append(mask)
        values.append(np.where(mask > 0, rng.choice([-c, c], (batch, n)), 0.0))
    return shapes, masks, values


@pytest.mark.parametrize("model", [_random_resnet(), MLP([6, 5]).double().eval()], ids=["resnet", "mlp"])
def test_the_graph_reproduces_the_torch_forward_pass(model):
    rng = np.random.default_rng(0)
    graph = extract(model)
    counts = [2] * len(graph.sites)
    x = rng.uniform(0, 1, (8, 64))
    shapes, masks, values = _random_failures(model, counts, 0.7, 8, rng)
    with torch.no_grad():
        xt = torch.from_numpy(x).reshape(8, 1, 8, 8)
        faulty = _forward(model, xt, [torch.from_numpy(m).reshape(8, *s) for m, s in zip(masks, shapes, strict=True)],
                          [torch.from_numpy(v).reshape(8, *s) for v, s in zip(values, shapes, strict=True)]).numpy()
        clean = model(xt).numpy()
    for b in range(8):
        assert np.allclose(forward(graph, x[b])[-1], clean[b], atol=1e-9)
        got = forward(graph, x[b], [m[b] for m in masks], [v[b] for v in values])[-1]
        assert np.allclose(got, faulty[b], atol=1e-9)


def _outside(graph, r, x, masks, values, shrink: float) -> bool:
    """Whether a clean, faulty or difference pre-activation at a point leaves the (shrunk) ranges."""
    def narrow(lo, hi):
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
        return mid - half, mid + half

    clean, faulty = forward(graph, x), forward(graph, x, masks, values)
    for i in range(len(graph.nodes)):
        for value, lo, hi in ((clean[i], r.zl[i], r.zu[i]), (faulty[i], r.fzl[i], r.fzu[i]),
                              (faulty[i] - clean[i], r.dzl[i], r.dzu[i])):
            lo, hi = narrow(lo, hi)
            if np.any(value < lo - 1e-9) or np.any(value > hi + 1e-9):
                return True
    return False


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_the_ranges_contain_sampled_points_and_shrunk_ones_do_not(c):
    model = _random_resnet()
    graph = extract(model)
    counts = [1, 0, 2, 1, 1]
    r = bounds(graph, (0.0, 1.0), counts, c)
    rng = np.random.default_rng(1)
    _, masks, values = _random_failures(model, counts, c, 64, rng)
    # corners and uniform points: the corners push the stem's pre-activations to their ends
    xs = np.concatenate([rng.integers(0, 2, (32, 64)).astype(float), rng.uniform(0, 1, (32, 64))])
    assert not any(_outside(graph, r, xs[b], [m[b] for m in masks], [v[b] for v in values], 1.0) for b in range(64))
    assert any(_outside(graph, r, xs[b], [m[b] for m in masks], [v[b] for v in values], 0.9) for b in range(64))


def test_polish_only_gains_and_stays_below_the_enumerated_worst():
    """From random points with random failure sets: the linear program over the point's region and
    the walk to neighbouring regions give real errors (forward pass) between the point's own and
    the enumerated worst, the walk at least the single program's."""
    seed, count = 0, 2
    model = _tiny(seed)
    graph = extract(model)
    exact = enumerated(seed, count, 0.0)
    rng = np.random.default_rng(5)
    for _ in range(4):
        x = rng.uniform(0, 1, 4)
        mask = np.zeros(5)
        mask[rng.choice(5, count, replace=False)] = 1.0
        k, sign = int(rng.integers(3)), float(rng.choice([-1.0, 1.0]))
        start, _ = verify(model, x, [mask], [np.zeros(5)], k, sign)
        single = polish(model, graph, [count], 0.0, k, sign, x, [mask], [np.zeros(5)])
        walked = polish(model, graph, [count], 0.0, k, sign, x, [mask], [np.zeros(5)], rounds=6)
        assert single.verified is not None and walked.verified is not None
        assert start - 1e-9 <= single.verified <= walked.verified + 1e-9
        assert walked.verified <= exact[(k, sign)] + 1e-9


@pytest.mark.parametrize("c", [0.0, 0.8])
def test_the_region_lp_equals_the_milp_with_the_same_phases(c):
    """Two formulations of one region's maximum: :func:`region_lp` (the networks affine in the input
    and sent values) and the MILP with every phase fixed (its clean and faulty node variables)."""
    model = _random_resnet()
    graph = extract(model)
    counts = [1, 0, 1, 0, 1]
    rng = np.random.default_rng(2)
    _, masks, values = _random_failures(model, counts, c, 1, rng)
    masks, values = [m[0] for m in masks], [v[0] for v in values]
    x = rng.uniform(0, 1, 64)
    phases = phases_at(graph, x, masks, values, 0)
    k, sign = 3, -1.0
    start, _ = verify(model, x, masks, values, k, sign)
    lp = region_lp(model, graph, phases, masks, c, k, sign)
    mip = solve(model, graph, counts, c, k, sign, failed=[m > 0.5 for m in masks], time_limit=20, phases=phases)
    assert lp.verified is not None and mip.verified is not None
    assert lp.verified == pytest.approx(lp.claimed, abs=1e-7)
    assert lp.verified == pytest.approx(mip.verified, abs=1e-6)
    assert lp.verified >= start - 1e-9
