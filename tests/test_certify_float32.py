"""certify keeps room for float32 inference on each margin (docs/method.md §7.4, §10.2).

The independent computation is numpy's float32 rounding of two outputs whose real-number
margin is a few ulps: where float32 cannot tell them apart, no certificate may be given.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robaudit.bounds.certify import BoxBound, float32_allowance


def _box(margin: float, drop: float, magnitude: float) -> BoxBound:
    return BoxBound(
        np.zeros(2), 0, np.array([margin]), np.array([drop]), float32_allowance(np.array([drop]), magnitude)
    )


def _old_rule(margin: float, drop: float) -> bool:
    """The weakened copy: a fixed relative 10⁻⁶ of the margin."""
    return drop < margin - 1e-6 * max(1.0, abs(margin))


def _float32_loses_margin(magnitude: float, margin: float, drop: float) -> bool:
    """True when float32 outputs F_c = M + margin − drop and F_j = M may not keep F_c > F_j."""
    f_c = np.float32(magnitude + margin - drop)
    f_j = np.float32(magnitude)
    return bool(f_c <= f_j)


@settings(max_examples=300, deadline=None)
@given(
    magnitude=st.floats(1.0, 1e5),
    ulps=st.floats(0.0, 4.0),
    drop_share=st.floats(0.0, 1.0),
)
def test_no_certificate_where_float32_can_erase_the_margin(magnitude: float, ulps: float, drop_share: float) -> None:
    ulp = float(np.spacing(np.float32(magnitude)))
    margin = ulps * ulp
    drop = drop_share * margin
    if _float32_loses_margin(magnitude, margin, drop):
        assert not _box(margin, drop, magnitude).certified(1.0)


def test_the_old_relative_slack_is_caught() -> None:
    magnitude, margin = 1000.0, 3e-5  # half an ulp of float32 at 1000
    assert _float32_loses_margin(magnitude, margin, 0.0)
    assert _old_rule(margin, 0.0)
    assert not _box(margin, 0.0, magnitude).certified(1.0)


def test_a_clear_margin_is_still_certified() -> None:
    magnitude = 1000.0
    room = float(float32_allowance(np.array([0.5]), magnitude)[0])
    assert room == pytest.approx(1e-5 * 0.5 + 2e-6 * 1000.0, rel=1e-12)
    assert _box(1.0, 0.5, magnitude).certified(1.0)
    assert not _box(0.5 + room, 0.5, magnitude).certified(1.0)
    assert _box(0.5 + 1.01 * room, 0.5, magnitude).certified(1.0)
