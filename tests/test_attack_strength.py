"""The benchmark attack (``benchmarks/trained_nets.attack``) against the exact worst error on a
network small enough to solve exactly.

One hidden ReLU layer of 5 neurons on a 4-pixel input box [0, 1]^4, 3 outputs, 2 crashed
neurons. F̃ − F = −Σ_{j∈S} W2[:, j] relu(w_j·x + b_j); on each activation pattern of the crashed
neurons it is affine in x, so its largest value over the box is a linear program per (set,
pattern, output, sign), solved with scipy's HiGHS — no code shared with the attack. The
attack must reach it (within its final step size) and never exceed it.
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

from trained_nets import AttackOptions, Site, attack  # noqa: E402

CRASHED = 2


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.site, self.fc2 = torch.nn.Linear(4, 5), Site(), torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.site(torch.relu(self.fc1(x))))


def _model(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


@functools.cache
def exact_worst(seed: int) -> float:
    """max over crash sets S (|S| = 2), outputs k, x ∈ [0, 1]^4 of |F̃_k(x) − F_k(x)|, by LPs."""
    model = _model(seed)
    w1, b1 = model.fc1.weight.detach().double().numpy(), model.fc1.bias.detach().double().numpy()
    w2 = model.fc2.weight.detach().double().numpy()
    best = 0.0
    for chosen in itertools.combinations(range(5), CRASHED):
        for active in itertools.product([True, False], repeat=CRASHED):
            on = [j for j, a in zip(chosen, active, strict=True) if a]
            # pattern: w_j·x + b_j ≥ 0 for active j, ≤ 0 for the others (A x ≤ c)
            rows = [(-w1[j], b1[j]) if a else (w1[j], -b1[j]) for j, a in zip(chosen, active, strict=True)]
            a_ub, b_ub = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
            for k in range(3):
                for sign in (1.0, -1.0):
                    # sign·(F̃_k − F_k) = −sign·Σ_{j on} w2[k, j](w_j·x + b_j): minimise its negation
                    cost = sign * sum((w2[k, j] * w1[j] for j in on), np.zeros(4))
                    offset = -sign * sum(w2[k, j] * b1[j] for j in on)
                    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(0.0, 1.0)] * 4, method="highs")
                    if result.status == 0:
                        best = max(best, -result.fun + offset)
    return best


def _case(seed: int, options: AttackOptions) -> tuple[float, float]:
    data = np.random.default_rng(seed).uniform(0.0, 1.0, (20, 4))
    found = attack(_model(seed), [CRASHED], (0.0, 0.0), (0.0, 1.0), data, [0, 1, 2], options)
    return found, exact_worst(seed)


def _reaches(found: float, exact: float) -> bool:
    """A real error (never above the maximum) within 0.1 % of it."""
    assert found <= exact * (1 + 1e-9) + 1e-12, (found, exact)
    return found >= 0.999 * exact


STRONG = AttackOptions(starts=4, steps=20, targets=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_attack_reaches_the_exact_worst_crash_error(seed):
    assert _reaches(*_case(seed, STRONG)), _case(seed, STRONG)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [s for s in range(2, 23) if s != 17])  # 17: every crash error is 0
def test_slow_attack_reaches_the_exact_worst_crash_error(seed):
    """The benchmark's own options (the light ones above miss seed 21 by 19 %)."""
    assert _reaches(*_case(seed, AttackOptions())), _case(seed, AttackOptions())


def test_a_weakened_attack_is_caught():
    """Two starts, no ascent, no swaps, one candidate, one target: 55 % of the exact worst here,
    so the check above can tell a weak search from a strong one."""
    weak = AttackOptions(starts=2, steps=0, swap_rounds=0, targets=1, candidates=1, settle=0)
    assert not _reaches(*_case(0, weak))
