"""The stride-1 depthwise adjoint on flattened planes writes its buffers without zeroing them whole
(docs/method.md §4.4): the placed block gets zeros on either side of its columns only, and the result is
zeroed only where the frame does not cover every input row.

Started from uninitialised buffers filled with NaN, the adjoint still equals the scatter written with
explicit loops (``loop_adjoint`` of ``tests/test_conv_adjoint.py``), for whole planes and for blocks
cut to a rectangle inside the plane (random pads, dilations, kernels); a copy that leaves the right-hand
margin of the placed block unzeroed is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conv_adjoint import loop_adjoint

import robaudit.graph.conv as conv_module
from robaudit.graph.conv import ConvGeometry, conv2d_adjoint


def _nan_empty(shape, dtype=float):
    return np.full(shape, np.nan, dtype)


def _case(seed: int, kernel: int, pads: tuple[int, int, int, int], dilation: int, cut: bool):
    """A depthwise convolution on a 21×23 plane (too large for the per-channel matrices) and a sensitivity
    that is whole or zero outside an inner rectangle."""
    rng = np.random.default_rng(seed)
    channels, hw = 3, (21, 23)
    geom = ConvGeometry((1, 1), (dilation, dilation), pads, channels)
    ho, wo = geom.output_hw(*hw, (kernel, kernel))
    grad = rng.random((2, channels, ho, wo))
    if cut:  # a chunk that reaches part of the plane
        mask = np.zeros((ho, wo), dtype=bool)
        mask[ho // 4 : ho // 4 + max(1, ho // 3), wo // 5 : wo // 5 + max(1, wo // 3)] = True
        grad = grad * mask
    return grad, rng.random((channels, 1, kernel, kernel)), geom, hw


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 1000),
    kernel=st.sampled_from([1, 3, 5]),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    dilation=st.integers(1, 2),
    cut=st.booleans(),
)
def test_depthwise_shifted_from_uninitialised_buffers_is_the_loop_scatter(seed, kernel, pads, dilation, cut):
    grad, weight, geom, hw = _case(seed, kernel, pads, dilation, cut)
    expected = loop_adjoint(grad, weight, geom, hw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_module, "_empty", _nan_empty)
        got = conv2d_adjoint(grad, weight, geom, hw)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_the_flattened_form_is_taken(monkeypatch):
    calls = []
    real = conv_module._depthwise_shifted
    monkeypatch.setattr(conv_module, "_depthwise_shifted", lambda *a: calls.append(1) or real(*a))
    grad, weight, geom, hw = _case(1, 3, (1, 1, 1, 1), 1, False)
    conv2d_adjoint(grad, weight, geom, hw)
    assert calls


def test_a_placed_block_with_an_unzeroed_margin_is_caught(monkeypatch):
    """Weakened: the zeros right of the block are left out (the buffer keeps whatever it held)."""
    grad, weight, geom, hw = _case(2, 3, (1, 1, 1, 1), 1, True)
    expected = loop_adjoint(grad, weight, geom, hw)
    monkeypatch.setattr(conv_module, "_empty", _nan_empty)
    np.testing.assert_allclose(conv2d_adjoint(grad, weight, geom, hw), expected, rtol=1e-12, atol=1e-12)
    text = _source_of_shifted()
    weakened_text = text.replace("\n    placed[:, :, :, c0 + wo :] = 0.0", "")
    assert weakened_text != text
    namespace: dict = dict(conv_module.__dict__)
    exec(compile(weakened_text, str(conv_module.__file__), "exec"), namespace)
    monkeypatch.setattr(conv_module, "_depthwise_shifted", namespace["_depthwise_shifted"])
    got = conv2d_adjoint(grad, weight, geom, hw)
    assert not np.allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=False)


def _source_of_shifted() -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(conv_module._depthwise_shifted))
