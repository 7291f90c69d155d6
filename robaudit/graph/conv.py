"""Convolution and its adjoint in numpy, for interval propagation and sensitivities.

Shapes follow ONNX: x [B, C_in, H, W], weight [C_out, C_in/groups, kh, kw]. One-D
convolutions are handled by the callers as H = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class ConvGeometry:
    """Strides, dilations, pads ([top, left, bottom, right]) and groups of a 2-D conv."""

    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]
    groups: int

    def output_hw(self, height: int, width: int, kernel: tuple[int, int]) -> tuple[int, int]:
        """Output spatial size for an input of ``height`` x ``width``."""
        sizes = []
        for axis, size in enumerate((height, width)):
            span = self.dilations[axis] * (kernel[axis] - 1) + 1
            padded = size + self.pads[axis] + self.pads[axis + 2]
            sizes.append((padded - span) // self.strides[axis] + 1)
        return sizes[0], sizes[1]

    def max_fanout(self, kernel: tuple[int, int]) -> int:
        """Most output positions one input position feeds (per output channel).

        For each axis: max over input positions p of #{j < k : (p + pad - j*d) % s == 0},
        i.e. ⌈k/s⌉ without dilation (docs/method.md §3.1, fanout of a conv).
        """
        total = 1
        for axis in range(2):
            k, s, d = kernel[axis], self.strides[axis], self.dilations[axis]
            total *= max(sum(1 for j in range(k) if (r - j * d) % s == 0) for r in range(s))
        return total


def _padded(x: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def conv2d(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Cross-correlation as ONNX ``Conv`` computes it (no bias)."""
    batch, c_in = x.shape[:2]
    c_out, c_per_group, kh, kw = weight.shape
    groups = geom.groups
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    ho, wo = geom.output_hw(x.shape[2], x.shape[3], (kh, kw))
    xp = _padded(x, geom.pads)
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw, ::dh, ::dw]
    windows = windows.reshape(batch, groups, c_per_group, ho, wo, kh, kw)
    w = weight.reshape(groups, c_out // groups, c_per_group, kh, kw)
    out = np.einsum("bgchwij,gocij->bgohw", windows, w, optimize=True)
    return out.reshape(batch, c_out, ho, wo)


def conv2d_adjoint(grad: np.ndarray, weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]) -> np.ndarray:
    """The transpose of :func:`conv2d` applied to ``grad`` [B, C_out, Ho, Wo]."""
    batch, c_out, ho, wo = grad.shape
    _, c_per_group, kh, kw = weight.shape
    groups = geom.groups
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    top, left, bottom, right = geom.pads
    height, width = in_hw
    out = np.zeros(
        (batch, groups, c_per_group, height + top + bottom, width + left + right),
        dtype=np.result_type(grad, weight),
    )
    g = grad.reshape(batch, groups, c_out // groups, ho, wo)
    w = weight.reshape(groups, c_out // groups, c_per_group, kh, kw)
    for i in range(kh):
        for j in range(kw):
            contribution = np.einsum("bgohw,goc->bgchw", g, w[:, :, :, i, j], optimize=True)
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            out[:, :, :, rows, cols] += contribution
    out = out.reshape(batch, groups * c_per_group, height + top + bottom, width + left + right)
    return out[:, :, top : top + height, left : left + width]
