"""The one relative slack on ε of every "bound ≤ ε" decision (docs/method.md §10).

A bound computed in float64 that equals ε in exact arithmetic may come out a few ulps
above it (sums in another order, a scale found by bisection); a relative slack of
1e-12 — far above float64 rounding of these sums, far below any figure a report
prints — makes such ties count as met, the same way in every command.
"""

from __future__ import annotations

#: Relative slack: a bound ≤ ε·(1 + EPSILON_SLACK) counts as ≤ ε.
EPSILON_SLACK = 1e-12

#: The float32 allowance (docs/method.md §10.2): onnxruntime's float32 value of an output may
#: differ from the real-number one by FLOAT32_RELATIVE of its deviation bound plus
#: FLOAT32_ABSOLUTE·max(1, max|F|). `inject` calls a measured error above it a violation;
#: `certify` certifies a class only with this much room on each margin.
FLOAT32_RELATIVE = 1e-5
FLOAT32_ABSOLUTE = 1e-6


def epsilon_limit(epsilon: float) -> float:
    """ε·(1 + EPSILON_SLACK): the largest bound that still counts as ≤ ε."""
    return epsilon * (1 + EPSILON_SLACK)


def within(bound: float, epsilon: float) -> bool:
    """True when ``bound`` counts as ≤ ε (:data:`EPSILON_SLACK`)."""
    return bound <= epsilon_limit(epsilon)
