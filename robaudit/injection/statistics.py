"""Statistical fault injection: campaign sizing and the failure rate's confidence interval
(docs/method.md §8.3).

Pure functions of integers and floats; nothing here knows about ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

from robaudit.errors import OptionError

#: The worst-case proportion of the sizing formula (it maximizes p(1 − p)).
WORST_PROPORTION = 0.5


def normal_quantile(confidence: float) -> float:
    """The two-sided standard-normal cut-off t with P(|Z| ≤ t) = ``confidence`` (0.95 → 1.95996…).

    Raises :class:`~robaudit.errors.OptionError` unless 0 < confidence < 1.
    """
    if not 0.0 < confidence < 1.0:
        raise OptionError(f"--confidence must lie strictly between 0 and 1, got {confidence:g}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def fault_set_population(sizes: Sequence[int], counts: Sequence[int]) -> int:
    """N = Π_s C(size_s, count_s): the number of distinct fault sets (exact big integer).

    ``sizes`` are the candidates per fault site (neurons, or synapses), ``counts`` the
    elements failing there. Source: docs/method.md §8.3.
    """
    population = 1
    for size, count in zip(sizes, counts, strict=True):
        population *= math.comb(size, count)
    return population


def sample_size(population: int | None, margin: float, confidence: float, proportion: float = WORST_PROPORTION) -> int:
    """Fault sets to draw so that the failure rate is known to ±``margin`` at ``confidence``.

    Leveugle et al. (DATE 2009): n = N / (1 + e²(N − 1) / (t² p(1 − p))), rounded up, with
    N = ``population`` (None: infinite, n = t² p(1 − p) / e²). N may have thousands of digits:
    the formula is evaluated in exact rationals (n = N·a / (a + e²(N − 1)), a = t² p(1 − p)),
    never by converting N to a float. Source: docs/method.md §8.3.
    Raises :class:`~robaudit.errors.OptionError` for a margin outside (0, 1) or a bad confidence.
    """
    if not 0.0 < margin < 1.0:
        raise OptionError(f"--margin must lie strictly between 0 and 1, got {margin:g}")
    t = normal_quantile(confidence)
    a = Fraction(t) ** 2 * Fraction(proportion) * (1 - Fraction(proportion))
    e2 = Fraction(margin) ** 2
    if population is None:
        n = a / e2
    else:
        if population < 1:
            raise OptionError("there is no fault set to draw (the population is empty)")
        n = population * a / (a + e2 * (population - 1))
    return max(1, math.ceil(n))


@dataclass(frozen=True)
class FailureRate:
    """Fault sets whose error exceeds ε, with a Wilson score interval (docs/method.md §8.3)."""

    #: Fault sets whose largest error over the inputs is above ε.
    failing: int
    #: Fault sets evaluated.
    sets: int
    #: failing / sets.
    rate: float
    #: Wilson score interval of the rate at ``confidence``.
    low: float
    high: float
    confidence: float


def wilson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of a binomial proportion, clipped to [0, 1].

    centre = (p̂ + z²/2n) / (1 + z²/n), half-width = z·√(p̂(1 − p̂)/n + z²/4n²) / (1 + z²/n),
    z = :func:`normal_quantile` (``confidence``). Raises ``OptionError`` when trials < 1 or
    successes lies outside [0, trials]. Source: docs/method.md §8.3.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise OptionError(f"a proportion needs 0 ≤ successes ≤ trials and trials ≥ 1, got {successes}/{trials}")
    z = normal_quantile(confidence)
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials)) / (1.0 + z2n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: rounding leaves ~1e-17
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def failure_rate(failing: int, sets: int, confidence: float) -> FailureRate:
    """:class:`FailureRate` of ``failing`` out of ``sets`` fault sets."""
    low, high = wilson_interval(failing, sets, confidence)
    return FailureRate(failing, sets, failing / sets, low, high, confidence)
