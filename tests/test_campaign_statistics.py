"""Campaign sizing (Leveugle et al.) and the Wilson interval, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from robaudit.errors import OptionError
from robaudit.injection.statistics import (
    failure_rate,
    fault_set_population,
    normal_quantile,
    sample_size,
    wilson_interval,
)


def test_normal_quantile_matches_tables():
    assert normal_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert normal_quantile(0.99) == pytest.approx(2.575829, abs=1e-6)


def test_sample_size_textbook_values():
    # t²·p(1−p)/e² with t = 1.959964: 384.15 → 385 (e = 5 %), 9603.6 → 9604 (e = 1 %).
    assert sample_size(None, 0.05, 0.95) == 385
    assert sample_size(None, 0.01, 0.95) == 9604
    # Finite N = 1000, e = 5 %: 1000·0.960365 / (0.960365 + 0.0025·999) = 277.7 → 278.
    assert sample_size(1000, 0.05, 0.95) == 278
    # One possible fault set: one draw is the census.
    assert sample_size(1, 0.01, 0.95) == 1


def test_sample_size_with_a_population_of_thousands_of_digits():
    population = fault_set_population([4096, 4096, 1024], [300, 300, 100])
    assert len(str(population)) > 800  # far beyond a float's range
    assert sample_size(population, 0.01, 0.95) == 9604  # N → ∞ limit, no overflow
    assert sample_size(population, 0.01, 0.95) <= sample_size(None, 0.01, 0.95)


def test_population_is_the_product_of_binomials():
    assert fault_set_population([10, 6], [2, 3]) == 45 * 20
    assert fault_set_population([5], [0]) == 1


def test_wilson_hand_values():
    # 0/10 at 95 %: (0, 0.2775); 5/10: (0.2366, 0.7634); 10/10: (0.7225, 1).
    low, high = wilson_interval(0, 10, 0.95)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-5)
    low, high = wilson_interval(5, 10, 0.95)
    assert (low, high) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    low, high = wilson_interval(10, 10, 0.95)
    assert low == pytest.approx(0.72247, abs=1e-5) and high == 1.0


def test_wilson_against_a_second_implementation():
    """The interval's ends solve |p̂ − p| = z·√(p(1 − p)/n) (the quadratic, solved by bisection)."""
    z = normal_quantile(0.9)
    for k, n in [(3, 40), (17, 200), (1, 1000)]:
        p_hat = k / n

        def gap(p: float, p_hat: float = p_hat, n: int = n) -> float:
            return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

        def root(lo: float, hi: float, gap=gap) -> float:
            for _ in range(200):
                mid = (lo + hi) / 2
                if (gap(lo) > 0) == (gap(mid) > 0):
                    lo = mid
                else:
                    hi = mid
            return (lo + hi) / 2

        low, high = wilson_interval(k, n, 0.9)
        assert low == pytest.approx(root(0.0, p_hat), abs=1e-9)
        assert high == pytest.approx(root(p_hat, 1.0), abs=1e-9)


def test_failure_rate_fields():
    rate = failure_rate(3, 12, 0.95)
    assert (rate.failing, rate.sets, rate.rate) == (3, 12, 0.25)
    assert rate.low < 0.25 < rate.high and not math.isnan(rate.low)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sample_size(None, 0.0, 0.95), "--margin"),
        (lambda: sample_size(None, 0.05, 1.0), "--confidence"),
        (lambda: wilson_interval(3, 2, 0.95), "successes"),
    ],
)
def test_bad_values_are_option_errors(call, message):
    with pytest.raises(OptionError, match=message):
        call()
