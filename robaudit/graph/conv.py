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
    """The transpose of :func:`conv2d` applied to ``grad`` [B, C_out, Ho, Wo].

    ``grad`` is cut to the rectangle of output positions where it is not zero (sensitivities
    of a few outputs of an image model reach only their receptive field), laid out once
    as [groups, C_out/g, B·Ho·Wo]; each kernel tap is then one matrix product per group
    (an elementwise product for depthwise convolutions) added into the padded input.
    """
    batch, c_out, ho, wo = grad.shape
    _, c_per_group, kh, kw = weight.shape
    groups = geom.groups
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    top, left, bottom, right = geom.pads
    height, width = in_hw
    per_group = c_out // groups
    r0, c0, grad = _nonzero_block(grad)
    ho, wo = grad.shape[2:]
    g = grad.reshape(batch, groups, per_group, ho * wo).transpose(1, 2, 0, 3).reshape(groups, per_group, -1)
    w = weight.reshape(groups, per_group, c_per_group, kh, kw)
    out = np.zeros(
        (groups, c_per_group, batch, height + top + bottom, width + left + right), dtype=np.result_type(grad, weight)
    )
    for i in range(kh):
        for j in range(kw):
            tap = w[:, :, :, i, j].transpose(0, 2, 1)  # [G, C_in/g, C_out/g]
            product = tap * g if per_group == 1 else np.matmul(tap, g)
            first_row, first_col = r0 * sh + i * dh, c0 * sw + j * dw
            rows = slice(first_row, first_row + sh * (ho - 1) + 1, sh)
            cols = slice(first_col, first_col + sw * (wo - 1) + 1, sw)
            out[:, :, :, rows, cols] += product.reshape(groups, c_per_group, batch, ho, wo)
    out = out[:, :, :, top : top + height, left : left + width]
    return out.transpose(2, 0, 1, 3, 4).reshape(batch, groups * c_per_group, height, width)


def _nonzero_block(grad: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(first row, first column, block) of the smallest spatial rectangle holding every non-zero of
    ``grad`` [B, C, H, W] (the whole array when that saves little; an empty 1×1 block if all zero)."""
    height, width = grad.shape[2:]
    active = np.any(grad != 0, axis=(0, 1))
    rows, cols = np.flatnonzero(active.any(axis=1)), np.flatnonzero(active.any(axis=0))
    if rows.size == 0:
        return 0, 0, grad[:, :, :1, :1] * 0
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (r1 - r0) * (c1 - c0) > 0.8 * height * width:
        return 0, 0, grad
    return r0, c0, grad[:, :, r0:r1, c0:c1]


# --------------------------------------------------------------------------- 3-D (volumes)


@dataclass(frozen=True)
class VolumeGeometry:
    """Strides, dilations, pads ([d0, h0, w0, d1, h1, w1], ONNX order) and groups of a 3-D conv."""

    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int

    def output_size(self, sizes: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
        """Output spatial size for an input of spatial size ``sizes``."""
        spatial = len(sizes)
        return tuple(
            (sizes[a] + self.pads[a] + self.pads[a + spatial] - self.dilations[a] * (kernel[a] - 1) - 1)
            // self.strides[a]
            + 1
            for a in range(spatial)
        )

    def max_fanout(self, kernel: tuple[int, ...]) -> int:
        """Most output positions one input position feeds (per output channel): ∏ over axes, as in 2-D."""
        total = 1
        for axis, k in enumerate(kernel):
            s, d = self.strides[axis], self.dilations[axis]
            total *= max(sum(1 for j in range(k) if (r - j * d) % s == 0) for r in range(s))
        return total


def _pad_spatial(x: np.ndarray, pads: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    spatial = x.ndim - 2
    width = [(0, 0), (0, 0)] + [(pads[a], pads[a + spatial]) for a in range(spatial)]
    return np.pad(x, width, constant_values=fill)


def volume_windows(x: np.ndarray, geom: VolumeGeometry, kernel: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """[B, C, *out, *kernel] windows of ``x`` [B, C, *in] (padding with ``fill``)."""
    spatial = x.ndim - 2
    out = geom.output_size(tuple(x.shape[2:]), kernel)
    spans = tuple(geom.dilations[a] * (kernel[a] - 1) + 1 for a in range(spatial))
    view = sliding_window_view(_pad_spatial(x, geom.pads, fill), spans, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None))
    index += tuple(slice(None, geom.strides[a] * (out[a] - 1) + 1, geom.strides[a]) for a in range(spatial))
    index += tuple(slice(None, None, geom.dilations[a]) for a in range(spatial))
    return view[index]


def conv_volume(x: np.ndarray, weight: np.ndarray, geom: VolumeGeometry) -> np.ndarray:
    """Cross-correlation as ONNX ``Conv`` computes it for any number of spatial axes (no bias)."""
    batch, groups = x.shape[0], geom.groups
    c_out, c_per_group = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    windows = volume_windows(x, geom, kernel)
    out = windows.shape[2 : 2 + len(kernel)]
    windows = windows.reshape((batch, groups, c_per_group) + out + kernel)
    w = weight.reshape((groups, c_out // groups, c_per_group) + kernel)
    letters = "defhij"[: len(kernel)], "klmnpq"[: len(kernel)]
    spec = f"bgc{letters[0]}{letters[1]},goc{letters[1]}->bgo{letters[0]}"
    return np.einsum(spec, windows, w, optimize=True).reshape((batch, c_out) + out)


def window_scatter(grad: np.ndarray, weight: np.ndarray, geom: VolumeGeometry, in_size: tuple[int, ...]) -> np.ndarray:
    """The transpose of :func:`conv_volume` applied to ``grad`` [B, C_out, *out]."""
    batch, c_out = grad.shape[:2]
    out = grad.shape[2:]
    kernel, c_per_group, groups = tuple(weight.shape[2:]), weight.shape[1], geom.groups
    spatial = len(kernel)
    padded = tuple(in_size[a] + geom.pads[a] + geom.pads[a + spatial] for a in range(spatial))
    result = np.zeros((batch, groups, c_per_group) + padded, dtype=np.result_type(grad, weight))
    g = grad.reshape((batch, groups, c_out // groups) + tuple(out))
    w = weight.reshape((groups, c_out // groups, c_per_group) + kernel)
    for offset in np.ndindex(*kernel):
        contribution = np.einsum("bgo...,goc->bgc...", g, w[(Ellipsis,) + offset], optimize=True)
        index = (slice(None),) * 3 + tuple(
            slice(
                offset[a] * geom.dilations[a],
                offset[a] * geom.dilations[a] + geom.strides[a] * (out[a] - 1) + 1,
                geom.strides[a],
            )
            for a in range(spatial)
        )
        result[index] += contribution
    result = result.reshape((batch, groups * c_per_group) + padded)
    crop = tuple(slice(geom.pads[a], geom.pads[a] + in_size[a]) for a in range(spatial))
    return result[(slice(None), slice(None)) + crop]
