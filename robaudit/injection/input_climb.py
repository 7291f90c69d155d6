"""Moving the input by measurements alone, where the numpy model of :mod:`robaudit.injection.joint` cannot follow the
network (several inputs, recurrent layers, attention and normalization between layers, synapse failures, a float's
exponent bits): sign ascent on the error onnxruntime measures, its direction estimated by central differences along
random ±1 directions (docs/method.md §8.2, "Where the numpy model cannot follow").

The fault set stays the one the search found on the given inputs; every input tried lies in the box it is given
(the input domain per element, or its part within a radius); what is returned is an input whose error was measured.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Steps of one climb, random directions per step (2 measurements each), the probe's and the first step's size as
#: fractions of the box's width per element, the step's shrink per step, and how much of the direction estimates
#: so far each step keeps (momentum: on |w·x| over a box, 64 elements, the corner's error is reached to 78 % by
#: each step's own estimate, 90 % with it; 768 elements 34 % and 50 %).
STEPS, DIRECTIONS, PROBE, FIRST_STEP, SHRINK, MOMENTUM = 20, 16, 0.05, 0.25, 0.9, 0.9
#: Inputs one climb measures at most.
CLIMB_MEASUREMENTS = 1 + STEPS * (2 * DIRECTIONS + 1)


def climb_input(
    error_at: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    rng: np.random.Generator,
    steps: int = STEPS,
    directions: int = DIRECTIONS,
) -> tuple[np.ndarray, float]:
    """The input of largest measured error met by sign ascent from ``start`` inside [``low``, ``high``].

    ``error_at(inputs)``: the error at each of ``inputs`` [R, *shape] (float32 values), [R]. ``start``, ``low``,
    ``high``: one sample's shape. Each step measures x ± h·u for ``directions`` random u ∈ {−1, 1}^n, or for each
    unit vector u where n ≤ ``directions`` (h = 5 % of the box's width per element, the probes clipped into the
    box); forms g = Σ_j (e⁺_j − e⁻_j)·u_j, scaled to a largest element of 1, and adds it to 0.9 times the earlier
    ones; moves x by step·sign(that sum) (¼ of the width at first, × 0.9 per step) and measures it there.
    Returns (input, its error), the best of every input measured; an infinite error ends the climb.
    """
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    width = high - low
    x = np.clip(np.asarray(start, np.float64), low, high)
    best_x, best = x, float(error_at(_single(x[None]))[0])
    step = FIRST_STEP * width
    heading = np.zeros_like(x)
    for _ in range(steps):
        if not np.isfinite(best):
            break
        signs = _directions(x.shape, directions, rng)
        probes = _single(np.clip(np.concatenate([x + PROBE * width * signs, x - PROBE * width * signs]), low, high))
        errors = np.asarray(error_at(probes), np.float64)
        top = int(np.argmax(errors))
        if errors[top] > best:
            best_x, best = probes[top].astype(np.float64), float(errors[top])
        if not np.all(np.isfinite(errors)):
            break
        half = len(signs)
        slope = np.tensordot(errors[:half] - errors[half:], signs, axes=1)
        heading = MOMENTUM * heading + slope / max(float(np.abs(slope).max()), np.finfo(np.float64).tiny)
        x = _single(np.clip(x + step * np.sign(heading), low, high)[None])[0].astype(np.float64)
        error = float(error_at(x[None].astype(np.float32))[0])
        if error > best:
            best_x, best = x, error
        step = step * SHRINK
    return best_x.astype(np.float32), best


def _directions(shape: tuple[int, ...], count: int, rng: np.random.Generator) -> np.ndarray:
    """[D, *shape]: the unit vectors where the sample has at most ``count`` elements (central differences along every
    axis), else ``count`` random ±1 vectors."""
    size = int(np.prod(shape))
    if size <= count:
        return np.eye(size).reshape((size,) + shape)
    return rng.choice(np.array([-1.0, 1.0]), size=(count,) + shape)


def _single(inputs: np.ndarray) -> np.ndarray:
    """``inputs`` as the float32 values onnxruntime is fed (the box's ends are float32 values or lie between two)."""
    return np.asarray(inputs, np.float32)
