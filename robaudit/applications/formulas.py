"""Pure formulas of the applications (docs/method.md §9.1): numbers in, numbers out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from robaudit.bounds.slack import EPSILON_SLACK, epsilon_limit
from robaudit.errors import OptionError, UnsupportedModelError

#: Relative slack when comparing a bound with ε: the one of every command (kept as a public name).
SLACK = EPSILON_SLACK
#: Most bits per value considered by ``precision``.
MAX_BITS = 64


def rounding_error(value_range: float, bits: int) -> float:
    """q = R / (2·(2^b − 1)): the largest error of rounding to b bits over a range R (docs/method.md §9.1).

    b bits give 2^b levels lo, lo + s, …, hi with step s = R / (2^b − 1); rounding to
    the nearest level is off by at most s/2. Values just outside [lo, hi] are rounded
    on the same grid (or clipped to it), which never errs by more either.
    """
    if bits < 1:
        raise OptionError(f"a value needs at least 1 bit, got {bits}")
    return value_range / (2.0 * (2.0**bits - 1.0))


def source_layer_error(e_prev: float, sigma: float, neurons: int, fanout: int, lipschitz: float, max_weight: float):
    """E_l = N_l·σ_l + min(fanout_l, N_l)·K_l·w_m^{(l)}·E_{l−1} (docs/method.md §9.1).

    With σ_l = q_l this is the memory-cost recursion of docs/method.md §9.1; every neuron is
    perturbed and none is silenced, hence min(fanout_l, N_l) and not N_l − f_l.
    """
    return neurons * sigma + min(fanout, neurons) * lipschitz * max_weight * e_prev


def chain_source_fep(
    sigmas: Sequence[float],
    neurons: Sequence[int],
    fanouts: Sequence[int],
    lipschitz: Sequence[float],
    max_weights: Sequence[float],
    out_lipschitz: float,
    out_max_weight: float,
    out_sigma: float = 0.0,
) -> float:
    """Fep = K_{L+1}·w_m^{(L+1)}·E_L + σ_{L+1} on a dense chain (docs/method.md §9.1).

    ``out_sigma`` is a perturbation of every output neuron itself (weight rounding in
    the output layer); it adds to the ∞-norm error directly.
    """
    error = 0.0
    for s, n, fo, k, w in zip(sigmas, neurons, fanouts, lipschitz, max_weights, strict=True):
        error = source_layer_error(error, s, n, fo, k, w)
    return out_lipschitz * out_max_weight * error + out_sigma


def weight_rounding_sigma(lipschitz: float, fan_in: int, weight_error: float, input_bound: float) -> float:
    """σ_l = K_l·fan-in_l·Δw_l·Y_{l−1}: a neuron's deviation when its weights are off by ≤ Δw_l (docs/method.md §9.1).

    Each synapse is perturbed by at most Δw_l·Y_{l−1} (|y| ≤ Y_{l−1} on the layer's
    input); rounding to levels inside [min W, max W] keeps |w̃| ≤ w_m, so the
    propagated part of the recursion is unchanged.
    """
    return lipschitz * fan_in * weight_error * input_bound


def wait_sigma(lipschitz: float, ignored: int, synapse_delta: float) -> float:
    """σ_l = K_l·r_l·d_l: a neuron's deviation when r_l incoming signals are missing (docs/method.md §2.2, §9.1).

    A missing signal is a crashed synapse: d_l = w_m^{(l)}·Y_{l−1}.
    """
    return lipschitz * ignored * synapse_delta


def bits_needed(gain: float, value_range: float, epsilon: float) -> int:
    """Fewest b ≥ 1 with gain·R / (2·(2^b − 1)) ≤ ε, i.e. b = ⌈log2(gain·R/(2ε) + 1)⌉ (docs/method.md §9.1)."""
    need = gain * value_range
    if not math.isfinite(need):
        raise UnsupportedModelError("a layer's value range or gain is unbounded; give --activation-bound")
    bits = max(1, math.ceil(math.log2(need / (2.0 * epsilon) + 1.0)))
    while bits > 1 and gain * rounding_error(value_range, bits - 1) <= epsilon_limit(epsilon):
        bits -= 1
    while gain * rounding_error(value_range, bits) > epsilon_limit(epsilon):
        bits += 1
    return bits


def max_ignored(cost_per_signal: float, fan_in: int, epsilon: float) -> int:
    """Largest r ≤ fan-in with r·cost ≤ ε, where cost = g_l·K_l·d_l is Fep per ignored signal."""
    if cost_per_signal <= 0:
        return fan_in
    ratio = epsilon / cost_per_signal
    r = fan_in if not math.isfinite(ratio) or ratio >= fan_in else math.floor(ratio)
    while r > 0 and r * cost_per_signal > epsilon_limit(epsilon):
        r -= 1
    while r < fan_in and (r + 1) * cost_per_signal <= epsilon_limit(epsilon):
        r += 1
    return r


def largest_scale(
    fep_at: Callable[[float], float],
    epsilon: float,
    rel_tol: float = 1e-6,
    floor: float = 1e-12,
    ceiling: float = 1e12,
    max_evals: int = 80,
) -> float | None:
    """Largest s in [floor, ceiling] with fep_at(s) ≤ ε (docs/method.md §9.1, ``design``).

    ``fep_at`` grows with s (every Fep of a network whose weights are scaled by s
    does). Brackets from s = 1 by factors of 4, then Illinois regula falsi on
    log Fep against log s (Fep is close to a power of s), always keeping a feasible
    lower end, which is returned. ``math.inf`` when even the ceiling is fine,
    None when even the floor is not.
    """
    limit = epsilon_limit(epsilon)

    def gap(value: float) -> float:
        return math.log(max(value, 1e-300)) - math.log(limit)

    f_one = fep_at(1.0)
    if f_one <= limit:
        if fep_at(ceiling) <= limit:
            return math.inf
        lo, f_lo, hi = 1.0, f_one, 4.0
        while (f_hi := fep_at(hi)) <= limit:
            lo, f_lo, hi = hi, f_hi, hi * 4
    else:
        if fep_at(floor) > limit:
            return None
        hi, f_hi, lo = 1.0, f_one, 0.25
        while (f_lo := fep_at(lo)) > limit:
            hi, f_hi, lo = lo, f_lo, lo / 4
    x0, y0, x1, y1 = math.log(lo), gap(f_lo), math.log(hi), gap(f_hi)
    side, evals = 0, 0
    while x1 - x0 > math.log1p(rel_tol) and evals < max_evals:
        evals += 1
        x = x1 - y1 * (x1 - x0) / (y1 - y0) if y1 > y0 else (x0 + x1) / 2
        width = x1 - x0
        if not (x0 + 0.01 * width < x < x1 - 0.01 * width):
            x = (x0 + x1) / 2
        value = fep_at(math.exp(x))
        if value <= limit:
            x0, y0 = x, gap(value)
            y1 = y1 / 2 if side == -1 else y1
            side = -1
        else:
            x1, y1 = x, gap(value)
            y0 = y0 / 2 if side == 1 else y0
            side = 1
    return math.exp(x0)


@dataclass(frozen=True)
class Gains:
    """Fep of per-neuron perturbations σ (one per site): Σ g·σ (paper), max_k Σ S[k]·σ (tight).

    With both, Fep is their minimum (both are sound, docs/method.md §4.1 ``CombinedBound``).
    """

    #: g_l: Fep when every neuron of site l is perturbed by 1 and nothing else is (paper).
    paper: np.ndarray
    #: [outputs, sites]: S_l[k] = Σ_i P[k, i] (tight), or None for the paper method alone.
    tight: np.ndarray | None = None

    def fep(self, sigmas: Sequence[float] | np.ndarray) -> float:
        """The bound for per-neuron perturbations ``sigmas`` (one per site)."""
        sig = np.asarray(sigmas, dtype=np.float64)
        value = float(self.paper @ sig)
        if self.tight is not None:
            value = min(value, float((self.tight @ sig).max(initial=0.0)))
        return value

    def alone(self, site: int) -> float:
        """Fep per unit σ when only ``site`` is perturbed."""
        unit = np.zeros(len(self.paper))
        unit[site] = 1.0
        return self.fep(unit)


def fewest_bits_together(
    fep_of_bits: Callable[[list[int]], float], start: Sequence[int], costs: Sequence[int], epsilon: float
) -> list[int] | None:
    """Bits per site when every site is rounded at once, with few stored bits Σ cost_l·b_l.

    Greedy from each site's bits alone (a lower bound): add one bit where it lowers the
    bound most per stored bit. The uniform allocation is the fallback when it stores
    less; finally bits are taken back, costliest sites first, while the bound stays
    ≤ ε. None if 64 bits everywhere are not enough.
    """
    limit = epsilon_limit(epsilon)
    greedy = _greedy_bits(fep_of_bits, list(start), costs, limit)
    uniform = fewest_uniform_bits(fep_of_bits, len(costs), max(start, default=1), epsilon)
    candidates = [] if greedy is None else [greedy]
    if uniform is not None:
        candidates.append([uniform] * len(costs))
    if not candidates:
        return None
    bits = min(candidates, key=lambda c: sum(n * b for n, b in zip(costs, c, strict=True)))
    for site in sorted(range(len(costs)), key=lambda i: -costs[i]):
        while bits[site] > start[site]:
            trial = bits.copy()
            trial[site] -= 1
            if fep_of_bits(trial) > limit:
                break
            bits = trial
    return bits


def _greedy_bits(fep_of_bits, bits: list[int], costs: Sequence[int], limit: float) -> list[int] | None:
    current = fep_of_bits(bits)
    while current > limit:
        best, best_rate, best_value = None, 0.0, current
        for site, cost in enumerate(costs):
            if bits[site] >= MAX_BITS:
                continue
            trial = bits.copy()
            trial[site] += 1
            value = fep_of_bits(trial)
            rate = (current - value) / max(cost, 1)
            if best is None or rate > best_rate:
                best, best_rate, best_value = site, rate, value
        if best is None or best_value >= current:
            return None
        bits[best] += 1
        current = best_value
    return bits


def fewest_uniform_bits(
    fep_of_bits: Callable[[list[int]], float], sites: int, start: int, epsilon: float
) -> int | None:
    """Fewest b (≥ start) with the same b at every site keeping the bound ≤ ε; None beyond 64."""
    for bits in range(max(1, start), MAX_BITS + 1):
        if fep_of_bits([bits] * sites) <= epsilon_limit(epsilon):
            return bits
    return None


# --------------------------------------------------------------------------- number formats


@dataclass(frozen=True)
class NumberFormat:
    """A storage format the ``precision`` report checks at a glance."""

    name: str
    #: ``float`` (relative rounding error) or ``fixed`` (b bits over the layer's range).
    kind: str
    #: Significand bits including the implicit one (float) or total bits (fixed).
    bits: int
    #: Largest finite value (float formats); beyond it a value becomes inf.
    max_value: float = math.inf
    #: Half the smallest subnormal: the absolute error floor near 0 (float formats).
    abs_floor: float = 0.0

    @property
    def unit_roundoff(self) -> float:
        """u = 2^−p: |fl(y) − y| ≤ u·|y| for normal numbers (float formats)."""
        return 2.0**-self.bits


FP16 = NumberFormat("fp16", "float", 11, 65504.0, 2.0**-25)
BF16 = NumberFormat("bf16", "float", 8, 3.3895e38, 2.0**-134)
INT8 = NumberFormat("int8", "fixed", 8)
INT4 = NumberFormat("int4", "fixed", 4)


def float_sigma(fmt: NumberFormat, magnitude: float) -> float:
    """Largest error of storing |y| ≤ Y in a float format: max(u·Y, subnormal floor).

    Floating point rounds *relative* to the value, so the error depends on the layer's
    largest magnitude Y = max(|lo|, |hi|), not on its range R as fixed point does. The
    error is relative to the (possibly already perturbed) value ỹ: |fl(ỹ) − y| ≤
    (1 + u)·|ỹ − y| + u·Y, hence the factor (1 + u) per layer in :func:`float_growth`.
    """
    return max(fmt.unit_roundoff * magnitude, fmt.abs_floor)


def float_growth(fmt: NumberFormat, depth: int) -> float:
    """(1 + u)^depth: what the relative rounding of already perturbed values adds, at most."""
    return (1.0 + fmt.unit_roundoff) ** depth
