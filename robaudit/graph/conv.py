"""Convolution and its adjoint in numpy, for interval propagation and sensitivities.

Shapes follow ONNX: x [B, C_in, H, W], weight [C_out, C_in/groups, kh, kw]. One-D
convolutions are handled by the callers as H = 1.
"""

from __future__ import annotations

import functools
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


def pad_planes(x: np.ndarray, pads: tuple[int, int, int, int], fill: float = 0.0) -> np.ndarray:
    """x [B, C, H, W] with ``fill`` around each plane: ``pads`` = (top, left, bottom, right) ≥ 0, as
    ONNX's ``pads`` of a 2-D Conv or pool. ``np.pad``'s result, made by one allocation and one copy
    (``np.pad`` costs ~0.1 ms per call in argument handling, and the interpreters call it per op)."""
    top, left, bottom, right = pads
    if not (top or left or bottom or right):
        return x
    height, width = x.shape[2], x.shape[3]
    out = np.full(x.shape[:2] + (top + height + bottom, left + width + right), fill, dtype=x.dtype)
    out[:, :, top : top + height, left : left + width] = x
    return out


def conv2d(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Cross-correlation as ONNX ``Conv`` computes it (no bias): x [B, C_in, H, W] → [B, C_out, Ho, Wo].

    Groups of one: per slice of the batch, the windows are copied once into a buffer
    [C_in·kh·kw, Ho·Wo] per sample and multiplied by the weight [C_out, C_in·kh·kw] in one
    BLAS product (docs/method.md §4.4); other groupings by ``einsum`` over window views.
    """
    batch, c_in = x.shape[:2]
    c_out, c_per_group, kh, kw = weight.shape
    groups = geom.groups
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    ho, wo = geom.output_hw(x.shape[2], x.shape[3], (kh, kw))
    xp = pad_planes(x, geom.pads)
    if groups == 1:
        return _conv2d_columns(xp, weight, geom, (ho, wo))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw, ::dh, ::dw]
    windows = windows.reshape(batch, groups, c_per_group, ho, wo, kh, kw)
    w = weight.reshape(groups, c_out // groups, c_per_group, kh, kw)
    out = np.einsum("bgchwij,gocij->bgohw", windows, w, optimize=True)
    return out.reshape(batch, c_out, ho, wo)


def conv2d_nonzero_rows(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """:func:`conv2d` of an ``x`` [B, C_in, H, W] whose non-zeros sit in a band of rows (a chunk of
    sensitivities of an image output): only the output rows whose windows reach the band are
    computed, the others are 0 (the weight is finite; otherwise, or for other groupings, or when
    the band covers most of the plane, the whole :func:`conv2d`).

    The computed rows take the same windows (the same values, padding zeros included) into the
    same im2col product as the whole convolution; only the number of output positions per
    BLAS product changes (docs/method.md §4.4).
    """
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    (sh, _), (dh, _) = geom.strides, geom.dilations
    top, left, _, right = geom.pads
    ho, wo = geom.output_hw(height, width, (kh, kw))
    rows = np.flatnonzero(np.any(x != 0, axis=(0, 1, 3)))
    if geom.groups != 1 or rows.size == 0 or not np.all(np.isfinite(weight)):
        return conv2d(x, weight, geom)
    span = dh * (kh - 1) + 1
    first = max(0, -(-(int(rows[0]) + top - span + 1) // sh))
    last = min(ho - 1, (int(rows[-1]) + top) // sh)
    if last < first or last - first + 1 > 0.8 * ho:
        return conv2d(x, weight, geom)
    count = (last - first) * sh + span  # padded rows first·sh … last·sh + span − 1
    slab = np.zeros((batch, c_in, count, width + left + right), dtype=x.dtype)
    lo, hi = max(0, first * sh - top), min(height, first * sh - top + count)
    slab[:, :, lo - (first * sh - top) : hi - (first * sh - top), left : left + width] = x[:, :, lo:hi]
    out = np.zeros((batch, c_out, ho, wo), dtype=np.result_type(x, weight))
    out[:, :, first : last + 1] = _conv2d_columns(slab, weight, geom, (last - first + 1, wo))
    return out


def _conv2d_columns(xp: np.ndarray, weight: np.ndarray, geom: ConvGeometry, out_hw: tuple[int, int]) -> np.ndarray:
    """Groups of one on the padded input ``xp``: im2col a cache-sized slice of the batch at a time."""
    batch, c_in = xp.shape[:2]
    c_out, _, kh, kw = weight.shape
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    ho, wo = out_hw
    dtype = np.result_type(xp, weight)
    out = np.empty((batch, c_out, ho * wo), dtype=dtype)
    wide = weight.reshape(c_out, c_in * kh * kw).astype(dtype, copy=False)
    step = max(1, _SLICE_ELEMENTS // max(1, c_in * kh * kw * ho * wo))
    cols = np.empty((min(step, batch), c_in, kh, kw, ho, wo), dtype=dtype)
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        part = cols[: b1 - b0]
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
                part[:, :, i, j] = xp[b0:b1, :, rows, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
        np.matmul(wide, part.reshape(b1 - b0, c_in * kh * kw, ho * wo), out=out[b0:b1])
    return out.reshape(batch, c_out, ho, wo)


def conv2d_adjoint(grad: np.ndarray, weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]) -> np.ndarray:
    """The transpose of :func:`conv2d` applied to ``grad`` [B, C_out, Ho, Wo]: [B, C_in, H, W].

    ``grad`` is first cut to the rectangle of output positions where it is not zero
    (sensitivities of a few outputs of an image model reach only their receptive field).
    Kernel taps that land only in the padding are skipped. Groups of one take one BLAS
    product per slice of the batch for all the remaining taps (:func:`_dense_adjoint`),
    depthwise convolutions per-channel matrices on small planes or one in-place
    multiply-add per tap (:func:`_depthwise_adjoint`), other groupings one product per tap
    and group (:func:`_grouped_adjoint`). Every output element sums the same products as
    the textbook scatter (the matrix form adds exact zeros besides), possibly in another
    order (docs/method.md §4.4).
    """
    r0, c0, grad = _nonzero_block(grad)
    return _block_adjoint(grad, (r0, c0), weight, geom, in_hw)


def conv2d_adjoint_scaled(
    grad: np.ndarray, scale: np.ndarray | float, weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]
) -> np.ndarray:
    """:func:`conv2d_adjoint` of ``grad · scale`` ([B, C_out, Ho, Wo] times a [C_out, Ho, Wo] or
    scalar factor, finite), the product taken only on the rectangle where ``grad`` is not zero.

    Outside that rectangle grad · scale is 0 (the scale is finite), so the rectangle of
    non-zeros of the product, the block and the origin passed on are those that
    :func:`conv2d_adjoint` finds on the whole product: the same numbers, without a pass over
    the whole plane (a chunk of an image output reaches a small part of it: docs/method.md §4.4).
    """
    height, width = grad.shape[2:]
    if height * width < _EDGE_CHECK_AREA:  # small planes: a second search would cost more than it saves
        return conv2d_adjoint(scaled_by(grad, scale), weight, geom, in_hw)
    r0, c0, block = _nonzero_block(grad)
    if block is grad:  # most of the plane: nothing to save
        return conv2d_adjoint(scaled_by(grad, scale), weight, geom, in_hw)
    local: np.ndarray | float = scale
    if np.ndim(scale):
        local = np.broadcast_to(scale, grad.shape[1:])[:, r0 : r0 + block.shape[2], c0 : c0 + block.shape[3]]
    r1, c1, scaled = _nonzero_block(scaled_by(block, local), whole=height * width)
    if not scaled.any():
        return _block_adjoint(scaled, (0, 0), weight, geom, in_hw)  # what conv2d_adjoint does on all zeros
    return _block_adjoint(scaled, (r0 + r1, c0 + c1), weight, geom, in_hw)


def scaled_by(grad: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """``grad · scale`` (a new array), or ``grad`` itself when ``scale`` is the number 1: x·1 = x exactly,
    ±∞ and NaN included, so the copy would hold the same numbers (layers without an activation, and
    those whose every slope is 1: docs/method.md §4.4). The callers only read the result."""
    if np.ndim(scale) == 0 and float(scale) == 1.0:
        return grad
    return grad * scale


def conv2d_adjoint_window(
    block: np.ndarray, origin: tuple[int, int], weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`conv2d_adjoint` of sensitivities that are zero outside ``block`` [B, C_out, h, w], whose
    first output position is ``origin``, returned as a block of the input plane and its origin:
    the rectangle of input positions the block's kernel taps reach (zero elsewhere).

    Groups of one; the same taps, products and additions, in the same order, as
    :func:`conv2d_adjoint` computes for those positions (docs/method.md §4.4). Other
    groupings return the whole input plane (origin (0, 0)); a block that reaches no input
    position returns a 1×1 block of zeros.
    """
    c_out, c_per_group, kh, kw = weight.shape
    taps = _taps(block.shape[2:], (kh, kw), geom, in_hw, origin)
    dtype = np.result_type(block, weight)
    if not taps:
        return np.zeros((block.shape[0], geom.groups * c_per_group, 1, 1), dtype=dtype), (0, 0)
    if geom.groups != 1:
        return _block_adjoint(block, origin, weight, geom, in_hw), (0, 0)
    top = min(t[3][0].start for t in taps)
    left = min(t[3][1].start for t in taps)
    frame = (top, left, max(t[3][0].stop for t in taps) - top, max(t[3][1].stop for t in taps) - left)
    return _dense_adjoint(block, weight.astype(dtype, copy=False), taps, in_hw, frame), (top, left)


def conv2d_window(
    block: np.ndarray, origin: tuple[int, int], weight: np.ndarray, geom: ConvGeometry, out_hw: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """:func:`conv2d` of an input that is zero outside ``block`` [B, C_in, h, w] (first position
    ``origin``), on the output positions [0, out_hw) only (a ConvTranspose's adjoint is cropped
    so), as the block of output positions whose windows reach ``block`` and its origin.

    The other outputs are 0 (the weight is finite). The computed ones take the same windows
    (the same values, padding zeros included) into the same im2col product as the whole
    convolution, with fewer output positions per BLAS product (docs/method.md §4.4). None
    for groups other than one or a weight that is not finite (the caller takes the whole
    plane).
    """
    if geom.groups != 1 or not np.all(np.isfinite(weight)):
        return None
    c_out, c_in, kh, kw = weight.shape
    span = (geom.dilations[0] * (kh - 1) + 1, geom.dilations[1] * (kw - 1) + 1)
    first, last = [], []
    for axis in range(2):
        stride, pad = geom.strides[axis], geom.pads[axis]
        start, size = origin[axis], block.shape[2 + axis]
        first.append(max(0, -(-(start + pad - span[axis] + 1) // stride)))
        last.append(min(out_hw[axis] - 1, (start + size - 1 + pad) // stride))
    if last[0] < first[0] or last[1] < first[1]:
        return np.zeros((block.shape[0], c_out, 1, 1), dtype=np.result_type(block, weight)), (0, 0)
    count = [(last[a] - first[a]) * geom.strides[a] + span[a] for a in range(2)]
    slab = np.zeros((block.shape[0], c_in, count[0], count[1]), dtype=block.dtype)
    # padded position first·stride + t is input position first·stride + t − pad
    lead = [first[a] * geom.strides[a] - geom.pads[a] for a in range(2)]
    lo = [max(origin[a], lead[a]) for a in range(2)]
    hi = [min(origin[a] + block.shape[2 + a], lead[a] + count[a]) for a in range(2)]
    if hi[0] > lo[0] and hi[1] > lo[1]:
        slab[:, :, lo[0] - lead[0] : hi[0] - lead[0], lo[1] - lead[1] : hi[1] - lead[1]] = block[
            :, :, lo[0] - origin[0] : hi[0] - origin[0], lo[1] - origin[1] : hi[1] - origin[1]
        ]
    out_size = (last[0] - first[0] + 1, last[1] - first[1] + 1)
    return _conv2d_columns(slab, weight, geom, out_size), (first[0], first[1])


def nonzero_block(grad: np.ndarray, whole: int | None = None) -> tuple[int, int, np.ndarray]:
    """(first row, first column, block) of the smallest spatial rectangle holding every non-zero of
    ``grad`` [B, C, H, W] (the whole array when that saves little: more than 0.8 of ``whole``
    positions, default H·W; an empty 1×1 block if all zero)."""
    return _nonzero_block(grad, whole)


#: Planes from which looking at the whole batch's edges first pays (on smaller ones the edges are most
#: of the plane; the first sample's edges are looked at on every plane).
_EDGE_CHECK_AREA = 64


def _reaches_every_edge(grad: np.ndarray, whole_batch: bool = True) -> bool:
    """Whether ``grad`` [B, C, H, W] has a non-zero on its first and last row and column (then the
    rectangle of its non-zeros is the whole plane), looking at the edges only: of the first sample,
    then (``whole_batch``) of every sample."""
    # the first sample alone usually settles it (every sensitivity of a classification head is whole):
    # the rectangle of the whole batch contains that of any one sample
    if grad.size == 0:
        return False
    for part in (grad[:1], grad) if whole_batch else (grad[:1],):
        edges = (part[:, :, 0], part[:, :, -1], part[:, :, :, 0], part[:, :, :, -1])
        if all(bool(np.any(edge != 0)) for edge in edges):
            return True
    return False


def _block_adjoint(
    grad: np.ndarray, origin: tuple[int, int], weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]
) -> np.ndarray:
    """:func:`conv2d_adjoint` of the block ``grad`` whose first output position is ``origin`` (zero elsewhere)."""
    r0, c0 = origin
    c_out, c_per_group, kh, kw = weight.shape
    taps = _taps(grad.shape[2:], (kh, kw), geom, in_hw, (r0, c0))
    dtype = np.result_type(grad, weight)
    if not taps:
        return np.zeros((grad.shape[0], geom.groups * c_per_group) + tuple(in_hw), dtype=dtype)
    if geom.groups == 1:
        return _dense_adjoint(grad, weight.astype(dtype, copy=False), taps, in_hw)
    if geom.groups == c_out and c_per_group == 1:
        return _depthwise_adjoint(grad, weight.astype(dtype, copy=False), taps, geom, in_hw, (r0, c0))
    return _grouped_adjoint(grad, weight, geom, in_hw, (r0, c0))


#: One kernel tap that reaches the input: (i, j, output window, input window).
Tap = tuple[int, int, tuple[slice, slice], tuple[slice, slice]]

#: Elements of the per-tap products one slice of the batch holds at a time (2 MiB of float64: stays in cache).
_SLICE_ELEMENTS = 2**18
#: The same for the channels-last product (4 MiB: measured fastest on ResNet-18's 4×4 and 2×2 planes, 1.2–1.5×
#: faster than 16 MiB; every slicing gives the same numbers).
_LAST_SLICE_ELEMENTS = 2**19
#: Output channels from which the gathered taps of a slice of the batch take one BLAS product together
#: (:func:`_gathered_across_batch`), and the elements of that slice's gathered block (4 MiB).
_WIDE_GATHER = 64
_ACROSS_ELEMENTS = 2**19
#: Positions per sample from which the channels-first product pays (below: channels last).
_FEW_POSITIONS = 32
#: Largest per-channel adjoint matrices for depthwise convolutions (C·Ho·Wo·H·W entries, 64 MiB).
_MATRIX_ELEMENTS = 2**23
#: A depthwise matrix product is used while H·W ≤ this × taps: per output position the BLAS
#: product costs H·W multiply-adds, the tap loop two elementwise passes per tap, about 40
#: times slower each (measured on 4×4 to 32×32 planes, 3×3 and 5×5 kernels).
_MATRIX_GAIN = 40
#: Elements of one slice of the batch in the depthwise loop (stays in cache across the taps).
_DEPTHWISE_ELEMENTS = 2**16


def _tap_reach(first: int, size: int, stride: int, offset: int, pad: int, length: int) -> tuple[slice, slice] | None:
    """Along one axis, for output positions first … first + size − 1 and one kernel offset:
    (output slice, input slice) of the positions whose input index position·stride +
    offset − pad lies in [0, length), or None when none does."""
    base = first * stride + offset - pad
    lo = (-base + stride - 1) // stride if base < 0 else 0
    hi = min(size - 1, (length - 1 - base) // stride) if length - 1 - base >= 0 else -1
    if hi < lo:
        return None
    start = base + lo * stride
    return slice(lo, hi + 1), slice(start, start + (hi - lo) * stride + 1, stride)


def _taps(grad_hw, kernel: tuple[int, int], geom: ConvGeometry, in_hw, origin: tuple[int, int]) -> list[Tap]:
    """Every kernel tap (in kernel order) that sends some output position of the block at
    ``origin`` inside the unpadded input, with the matching output and input windows."""
    return list(_cached_taps(_pair(grad_hw), _pair(kernel), geom, _pair(in_hw), _pair(origin)))


def _pair(pair) -> tuple[int, int]:
    return int(pair[0]), int(pair[1])


@functools.lru_cache(maxsize=4096)
def _cached_taps(
    grad_hw: tuple[int, int], kernel: tuple[int, int], geom: ConvGeometry, in_hw: tuple[int, int],
    origin: tuple[int, int],
) -> tuple[Tap, ...]:
    """:func:`_taps`, kept: the same few shapes recur in every chunk of a pass and every piece of a split (the
    windows are slices, which nothing writes into)."""
    taps: list[Tap] = []
    for i in range(kernel[0]):
        rows = _tap_reach(origin[0], grad_hw[0], geom.strides[0], i * geom.dilations[0], geom.pads[0], in_hw[0])
        if rows is None:
            continue
        for j in range(kernel[1]):
            cols = _tap_reach(origin[1], grad_hw[1], geom.strides[1], j * geom.dilations[1], geom.pads[1], in_hw[1])
            if cols is not None:
                taps.append((i, j, (rows[0], cols[0]), (rows[1], cols[1])))
    return tuple(taps)


def window_taps(
    out_hw, kernel: tuple[int, int], geom: ConvGeometry, in_hw, origin: tuple[int, int] = (0, 0)
) -> list[Tap]:
    """Every kernel tap (in kernel order) that reaches the unpadded input from an [Ho, Wo] output
    (a block of the output whose first position is ``origin``): (i, j, output window in the
    block, input window) (windows as slices; the pooling adjoints use them)."""
    return _taps(out_hw, kernel, geom, in_hw, origin)


def _dense_adjoint(
    grad: np.ndarray, weight: np.ndarray, taps: list[Tap], in_hw, frame: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Groups of one: all taps' columns from one BLAS product per slice of the batch, each tap's
    part added into its input window. Channels first ([T·C_in, C_out] @ [C_out, Ho·Wo] per
    sample) when a sample has many positions, channels last ([B·Ho·Wo, C_out] @ [C_out, T·C_in])
    when it has few (deep stages: the product would be a matrix-vector one per sample). With stride 1
    and many positions the taps are gathered first instead (:func:`_gathered_adjoint`: the product
    over C_out alone is too short for BLAS; 1.2–2× faster on 64–256 channels, 2–6× on 8–32).

    ``frame`` (top, left, height, width): return only that rectangle of the input plane, which
    must hold every tap's input window."""
    batch, c_out, ho, wo = grad.shape
    c_in = weight.shape[1]
    stacked = np.concatenate([weight[:, :, i, j] for i, j, _, _ in taps], axis=1)  # [C_out, T·C_in]
    if frame is not None:
        top, left, height, width = frame
        in_hw = (height, width)
        taps = [(i, j, outs, (_shifted(rows, top), _shifted(cols, left))) for i, j, outs, (rows, cols) in taps]
    if ho * wo >= _FEW_POSITIONS and len(taps) > 1 and _unit_steps(taps):
        return _gathered_adjoint(grad, weight, taps, in_hw)
    if len(taps) == 1 and _whole_tap(taps[0], (ho, wo), in_hw):  # a 1×1 kernel, stride 1, no padding
        return _one_tap_adjoint(grad, stacked)
    if frame is None and _plane_matrix_pays(grad.shape, c_in, len(taps), in_hw):
        out = _plane_matrix_adjoint(grad, weight, taps, in_hw)
        if np.all(np.isfinite(out)):  # an infinite sensitivity times a structural zero: redo with the taps
            return out
    out = np.zeros((batch, c_in) + tuple(in_hw), dtype=np.result_type(grad, weight))
    if ho * wo >= _FEW_POSITIONS:
        step = max(1, _SLICE_ELEMENTS // max(1, ho * wo * stacked.shape[1]))
        columns = np.ascontiguousarray(stacked.T)
        flat = grad.reshape(batch, c_out, ho * wo)
        for b0 in range(0, batch, step):
            b1 = min(batch, b0 + step)
            cols = np.matmul(columns, flat[b0:b1]).reshape(b1 - b0, len(taps), c_in, ho, wo)
            for t, (_, _, (o_rows, o_cols), (i_rows, i_cols)) in enumerate(taps):
                out[b0:b1, :, i_rows, i_cols] += cols[:, t, :, o_rows, o_cols]
        return out
    step = max(1, _LAST_SLICE_ELEMENTS // max(1, ho * wo * stacked.shape[1]))
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        rows = grad[b0:b1].transpose(0, 2, 3, 1).reshape(-1, c_out)
        cols = (rows @ stacked).reshape(b1 - b0, ho, wo, len(taps), c_in)
        part = np.zeros((b1 - b0,) + tuple(in_hw) + (c_in,), dtype=out.dtype)
        for t, (_, _, (o_rows, o_cols), (i_rows, i_cols)) in enumerate(taps):
            part[:, i_rows, i_cols] += cols[:, o_rows, o_cols, t]
        out[b0:b1] = part.transpose(0, 3, 1, 2)
    return out


def _plane_matrix_pays(shape: tuple[int, ...], c_in: int, taps: int, in_hw) -> bool:
    """Whether the adjoint of a whole small plane as one matrix (:func:`_plane_matrix_adjoint`) takes no
    more multiply-adds than the channels-last tap form: H·W ≤ taps (every input position per output
    position against every reaching tap per output position), and the matrix fits ``_MATRIX_ELEMENTS``."""
    _, c_out, ho, wo = shape
    area = int(in_hw[0]) * int(in_hw[1])
    return ho * wo < _FEW_POSITIONS and area <= taps and c_out * ho * wo * c_in * area <= _MATRIX_ELEMENTS


def _plane_matrix_adjoint(grad: np.ndarray, weight: np.ndarray, taps: list[Tap], in_hw) -> np.ndarray:
    """Groups of one on a small plane (ResNet-18's 2×2 stage at 32×32): the adjoint as one matrix
    M [C_out·Ho·Wo, C_in·H·W] (w[o, c, i, j] where output position p of channel o meets input position q
    of channel c through tap (i, j), 0 where no tap joins them), applied to all samples by one BLAS
    product [B, C_out·Ho·Wo] @ M.

    Each pair (p, q) is met by at most one tap, so every output element sums the same products as
    the tap form (plus exact zeros), in one dot product instead of per tap then over taps: a value
    may move by an ulp or so (docs/method.md §4.4). An infinite sensitivity times a structural zero
    gives NaN: the caller then takes the tap form.
    """
    batch, c_out, ho, wo = grad.shape
    c_in = weight.shape[1]
    width, area = int(in_hw[1]), int(in_hw[0]) * int(in_hw[1])
    matrix = np.zeros((c_out, ho * wo, c_in, area), dtype=np.result_type(grad, weight))
    for i, j, (o_rows, o_cols), (i_rows, i_cols) in taps:
        out_index = (np.arange(ho)[o_rows][:, None] * wo + np.arange(wo)[o_cols][None, :]).ravel()
        in_rows = np.arange(i_rows.start, i_rows.stop, i_rows.step)
        in_cols = np.arange(i_cols.start, i_cols.stop, i_cols.step)
        in_index = (in_rows[:, None] * width + in_cols[None, :]).ravel()
        matrix[:, out_index, :, in_index] = weight[None, :, :, i, j]  # [pairs, C_out, C_in]: one tap per pair
    with np.errstate(invalid="ignore"):  # ∞·0: the caller then takes the tap form
        out = grad.reshape(batch, c_out * ho * wo) @ matrix.reshape(c_out * ho * wo, c_in * area)
    return out.reshape((batch, c_in) + tuple(in_hw))


def _unit_steps(taps: list[Tap]) -> bool:
    """Whether every tap's windows step by one position (stride 1 and dilation 1 along both axes)."""
    return all(w.step in (None, 1) for _, _, outs, ins in taps for w in outs + ins)


def _whole_tap(tap: Tap, out_hw: tuple[int, int], in_hw) -> bool:
    """Whether ``tap`` maps the whole [Ho, Wo] block onto the whole input plane, position for position."""
    _, _, (o_rows, o_cols), (i_rows, i_cols) = tap
    if tuple(out_hw) != tuple(in_hw):
        return False
    spans = [(0, out_hw[0]), (0, out_hw[1]), (0, in_hw[0]), (0, in_hw[1])]
    windows = (o_rows, o_cols, i_rows, i_cols)
    return all((w.start, w.stop, w.step or 1) == (*span, 1) for w, span in zip(windows, spans, strict=True))


def _one_tap_adjoint(grad: np.ndarray, stacked: np.ndarray) -> np.ndarray:
    """A single tap covering the whole plane (1×1 kernel, stride 1, no padding): the BLAS product itself,
    written straight into the result — the same products as :func:`_dense_adjoint` adds into zeros."""
    batch, c_out, ho, wo = grad.shape
    c_in = stacked.shape[1]
    if ho * wo >= _FEW_POSITIONS:
        out = np.empty((batch, c_in, ho * wo), dtype=np.result_type(grad, stacked))
        np.matmul(np.ascontiguousarray(stacked.T), grad.reshape(batch, c_out, ho * wo), out=out)
        return out.reshape(batch, c_in, ho, wo)
    out = np.empty((batch, c_in, ho, wo), dtype=np.result_type(grad, stacked))
    step = max(1, _LAST_SLICE_ELEMENTS // max(1, ho * wo * c_in))
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        rows = grad[b0:b1].transpose(0, 2, 3, 1).reshape(-1, c_out)
        out[b0:b1] = (rows @ stacked).reshape(b1 - b0, ho, wo, c_in).transpose(0, 3, 1, 2)
    return out


def _gathered_adjoint(grad: np.ndarray, weight: np.ndarray, taps: list[Tap], in_hw) -> np.ndarray:
    """Groups of one, stride 1, at least ``_FEW_POSITIONS`` positions: per sample the cotangent's taps are
    first gathered into [taps·C_out, H·W] (tap t's block placed on the input positions it reaches, zero elsewhere),
    then one BLAS product [C_in, taps·C_out] @ [taps·C_out, H·W] gives every input position's sum
    over taps and output channels at once.

    The same products as the scatter form (each input position meets each tap's output position
    at most once; the other entries are exact zeros times a finite weight), summed in one dot
    product instead of per tap then over taps: a value may move by an ulp or so
    (docs/method.md §4.4). The zeros stay put from one slice of the batch to the next (every
    slice writes the same windows).
    """
    batch, c_out = grad.shape[:2]
    c_in = weight.shape[1]
    height, width = in_hw
    count = len(taps)
    flat_weight = np.concatenate([weight[:, :, i, j] for i, j, _, _ in taps], axis=0)  # [T·C_out, C_in]
    matrix = np.ascontiguousarray(flat_weight.T)
    dtype = np.result_type(grad, weight)
    out = np.empty((batch, c_in, height * width), dtype=dtype)
    if c_out >= _WIDE_GATHER:
        return _gathered_across_batch(grad, matrix, taps, in_hw, out)
    step = max(1, _SLICE_ELEMENTS // max(1, count * c_out * height * width))
    gathered = _empty((min(step, batch), count, c_out, height, width), dtype=dtype)
    for t, (_, _, _, (i_rows, i_cols)) in enumerate(taps):
        _zero_outside(gathered[:, t], i_rows, i_cols)
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        part = gathered[: b1 - b0]
        for t, (_, _, (o_rows, o_cols), (i_rows, i_cols)) in enumerate(taps):
            part[:, t, :, i_rows, i_cols] = grad[b0:b1, :, o_rows, o_cols]
        np.matmul(matrix, part.reshape(b1 - b0, count * c_out, height * width), out=out[b0:b1])
    return out.reshape(batch, c_in, height, width)


def _gathered_across_batch(grad: np.ndarray, matrix: np.ndarray, taps: list[Tap], in_hw, out: np.ndarray) -> np.ndarray:
    """:func:`_gathered_adjoint` with one BLAS product per slice of the batch instead of one per sample:
    the taps are gathered into [taps·C_out, b·H·W] (samples side by side along the columns) and
    [C_in, taps·C_out] @ that gives [C_in, b·H·W], copied into ``out`` [B, C_in, H·W]. Every entry is
    the same dot product over taps and output channels as the per-sample product (a longer product
    keeps BLAS busier: 10–17 % faster on 64–128 channels, no faster or slower on 8–32; docs/method.md §4.4)."""
    batch, c_out = grad.shape[:2]
    c_in, height, width = out.shape[1], in_hw[0], in_hw[1]
    count = len(taps)
    step = max(1, _ACROSS_ELEMENTS // max(1, count * c_out * height * width))
    gathered = None
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        if gathered is None or gathered.shape[2] != b1 - b0:  # the zeros stay put for slices of one size
            gathered = _empty((count, c_out, b1 - b0, height, width), dtype=out.dtype)
            for t, (_, _, _, (i_rows, i_cols)) in enumerate(taps):
                _zero_outside(gathered[t], i_rows, i_cols)
        for t, (_, _, (o_rows, o_cols), (i_rows, i_cols)) in enumerate(taps):
            gathered[t, :, :, i_rows, i_cols] = grad[b0:b1, :, o_rows, o_cols].transpose(1, 0, 2, 3)
        product = matrix @ gathered.reshape(count * c_out, (b1 - b0) * height * width)
        out[b0:b1] = product.reshape(c_in, b1 - b0, height * width).transpose(1, 0, 2)
    return out.reshape((batch, c_in) + tuple(in_hw))


#: Uninitialised buffers of the gathered forms (every entry is then written: a tap's rectangle or a zero).
_empty = np.empty


def _zero_outside(planes: np.ndarray, rows: slice, cols: slice) -> None:
    """Write 0 into ``planes`` [..., H, W] everywhere outside the rectangle ``rows`` × ``cols`` (unit steps):
    a gathered block whose rectangle is then written by its tap holds exactly what ``np.zeros`` and that
    write would give, without zeroing the rectangle first."""
    top, bottom = rows.start, rows.stop
    left, right = cols.start, cols.stop
    planes[..., :top, :] = 0.0
    planes[..., bottom:, :] = 0.0
    planes[..., top:bottom, :left] = 0.0
    planes[..., top:bottom, right:] = 0.0


def _shifted(window: slice, offset: int) -> slice:
    """``window`` (a slice with a start and a stop) moved ``offset`` positions back."""
    return slice(window.start - offset, window.stop - offset, window.step)


def _depthwise_adjoint(
    grad: np.ndarray, weight: np.ndarray, taps: list[Tap], geom: ConvGeometry, in_hw, origin: tuple[int, int]
) -> np.ndarray:
    """One filter per channel: per tap, grad·w[c, i, j] added into the input window in place, a
    cache-sized slice of the batch at a time. With stride 1 each sample's block is laid out
    with the padded input's row pitch, so that every tap is one contiguous shifted add
    (:func:`_depthwise_shifted`); with other strides one residue class of input positions at a
    time (:func:`_depthwise_strided`)."""
    positions, area = grad.shape[2] * grad.shape[3], in_hw[0] * in_hw[1]
    if grad.shape[1] * positions * area <= _MATRIX_ELEMENTS and area <= _MATRIX_GAIN * len(taps):
        out = _depthwise_matrix(grad, weight, taps, in_hw)
        if np.all(np.isfinite(out)):  # an infinite sensitivity times a zero entry: redo without the zeros
            return out
    if geom.strides == (1, 1):
        return _depthwise_shifted(grad, weight, taps, geom, in_hw, origin)
    return _depthwise_strided(grad, weight, taps, geom.strides, in_hw)


def _depthwise_strided(
    grad: np.ndarray, weight: np.ndarray, taps: list[Tap], strides: tuple[int, int], in_hw
) -> np.ndarray:
    """Depthwise adjoint with strides (s_h, s_w) other than 1, one residue class of input positions at a time.

    Tap (i, j) reaches input rows start + s_h·t (its input window), all of one residue class
    r = start mod s_h, and likewise for the columns: the input plane splits into s_h·s_w classes
    (rows ≡ r, columns ≡ c), each a dense [⌈(H − r)/s_h⌉, ⌈(W − c)/s_w⌉] plane on which a tap's
    window is a contiguous rectangle. Each class's plane starts at 0 and adds its taps' products
    in kernel order, then is written into the input plane's positions of its class (every
    position is in exactly one class): every element is the same sum, in the same order, as the
    in-place multiply-add per tap on the strided windows, which makes strided additions
    (docs/method.md §4.4)."""
    batch, channels, ho, wo = grad.shape
    (sh, sw), (height, width) = strides, in_hw
    dtype = np.result_type(grad, weight)
    out = np.empty((batch, channels, height, width), dtype=dtype)
    classes: dict[tuple[int, int], list[tuple[np.ndarray, tuple[slice, slice], tuple[slice, slice]]]] = {}
    for i, j, (o_rows, o_cols), (i_rows, i_cols) in taps:
        r, c = _residue(i_rows, sh), _residue(i_cols, sw)
        local = (_class_window(i_rows, sh), _class_window(i_cols, sw))
        classes.setdefault((r, c), []).append((weight[:, 0, i, j].reshape(1, channels, 1, 1), (o_rows, o_cols), local))
    # a cache-sized slice of the batch at a time through every class and tap
    step = max(1, _DEPTHWISE_ELEMENTS // max(1, channels * max(ho * wo, height * width)))
    scratch = np.empty((min(step, batch), channels, ho, wo), dtype=dtype)
    planes = {
        (r, c): np.empty((min(step, batch), channels, -(-(height - r) // sh), -(-(width - c) // sw)), dtype=dtype)
        for r in range(sh)
        for c in range(sw)
    }
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        for (r, c), whole in planes.items():
            plane = whole[: b1 - b0]
            plane.fill(0.0)
            for scale, (o_rows, o_cols), (l_rows, l_cols) in classes.get((r, c), []):
                source = grad[b0:b1, :, o_rows, o_cols]
                product = scratch[: b1 - b0, :, : source.shape[2], : source.shape[3]]
                np.multiply(source, scale, out=product)
                plane[:, :, l_rows, l_cols] += product
            out[b0:b1, :, r::sh, c::sw] = plane
    return out


def _residue(window: slice, stride: int) -> int:
    """The residue class (position mod ``stride``) of every position of a tap's input window."""
    return window.start % stride


def _class_window(window: slice, stride: int) -> slice:
    """A tap's input window (start, step ``stride``) as a contiguous window of its residue class's plane."""
    count = len(range(window.start, window.stop, window.step or 1))
    first = window.start // stride
    return slice(first, first + count)


def _depthwise_matrix(grad: np.ndarray, weight: np.ndarray, taps: list[Tap], in_hw) -> np.ndarray:
    """Small planes: per channel c the adjoint as a matrix M_c [Ho·Wo, H·W] (w[c, i, j] where output
    position p meets input position q through tap (i, j)), applied to all samples by one batched
    BLAS product [C, B, Ho·Wo] @ [C, Ho·Wo, H·W]."""
    batch, channels, ho, wo = grad.shape
    width = in_hw[1]
    matrix = np.zeros((channels, ho * wo, in_hw[0] * width), dtype=np.result_type(grad, weight))
    for i, j, (o_rows, o_cols), (i_rows, i_cols) in taps:
        out_index = (np.arange(ho)[o_rows][:, None] * wo + np.arange(wo)[o_cols][None, :]).ravel()
        in_rows = np.arange(i_rows.start, i_rows.stop, i_rows.step)
        in_cols = np.arange(i_cols.start, i_cols.stop, i_cols.step)
        in_index = (in_rows[:, None] * width + in_cols[None, :]).ravel()
        matrix[:, out_index, in_index] += weight[:, 0, i, j][:, None]  # one tap meets each (p, q) once
    # per channel [B, Ho·Wo] @ [Ho·Wo, H·W], read from and written into the [B, C, ...] layouts through
    # strided views (BLAS takes the row pitch): no transposed copies, the same products
    out = np.empty((batch, channels, in_hw[0] * width), dtype=matrix.dtype)
    with np.errstate(invalid="ignore"):  # ∞·0: the caller then takes the tap form
        np.matmul(grad.reshape(batch, channels, ho * wo).transpose(1, 0, 2), matrix, out=out.transpose(1, 0, 2))
    return out.reshape((batch, channels) + tuple(in_hw))


def _depthwise_shifted(
    grad: np.ndarray, weight: np.ndarray, taps: list[Tap], geom: ConvGeometry, in_hw, origin: tuple[int, int]
) -> np.ndarray:
    """Stride-1 depthwise adjoint on flattened planes.

    The block (at ``origin`` in the output) is copied into rows of the padded input's width
    Wp, zero outside its columns. Output position (r, c) meets input position
    (r + i·d_h, c + j·d_w) of the padded frame, i.e. flat index n + i·d_h·Wp + j·d_w for
    n = r·Wp + c: a tap is one shifted add of the whole plane. Positions past the block's
    columns hold zeros, so what they send across a row end adds nothing; the padded frame
    is cropped at the end. Taps are added in kernel order, each element the same sum as
    the window form.
    """
    batch, channels, ho, wo = grad.shape
    (dh, dw), (top, left, _, right) = geom.dilations, geom.pads
    r0, c0 = origin
    pitch = in_hw[1] + left + right
    kh = max(i for i, _, _, _ in taps) + 1
    frame_rows = ho + (kh - 1) * dh
    dtype = np.result_type(grad, weight)
    # every element written once: the block, zeros on either side of it (not the whole array zeroed first)
    placed = _empty((batch, channels, ho, pitch), dtype=dtype)
    placed[:, :, :, :c0] = 0.0
    placed[:, :, :, c0 + wo :] = 0.0
    placed[:, :, :, c0 : c0 + wo] = grad
    placed = placed.reshape(batch, channels, ho * pitch)
    length = (ho - 1) * pitch + c0 + wo
    frame = np.zeros((batch, channels, frame_rows * pitch), dtype=dtype)
    step = max(1, _DEPTHWISE_ELEMENTS // max(1, channels * ho * pitch))
    scratch = np.empty((min(step, batch), channels, length), dtype=dtype)
    scales = [(weight[:, 0, i, j].reshape(1, channels, 1), i * dh * pitch + j * dw) for i, j, _, _ in taps]
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        product, source, target = scratch[: b1 - b0], placed[b0:b1, :, :length], frame[b0:b1]
        for scale, shift in scales:
            np.multiply(source, scale, out=product)
            target[:, :, shift : shift + length] += product
    frame = frame.reshape(batch, channels, frame_rows, pitch)
    first, last = max(0, r0 - top), min(in_hw[0], r0 - top + frame_rows)
    # the frame's rows cover every input row (a whole plane): every element is written below, no zeros first
    out = (_empty if first == 0 and last == in_hw[0] else np.zeros)((batch, channels) + tuple(in_hw), dtype=dtype)
    if first < last:
        out[:, :, first:last] = frame[:, :, first - (r0 - top) : last - (r0 - top), left : left + in_hw[1]]
    return out


def _grouped_adjoint(
    grad: np.ndarray, weight: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int], origin: tuple[int, int]
) -> np.ndarray:
    """Any grouping: ``grad`` (the block at ``origin``) laid out once as [groups, C_out/g, B·Ho·Wo];
    each kernel tap is one matrix product per group added into the padded input."""
    batch, c_out, ho, wo = grad.shape
    _, c_per_group, kh, kw = weight.shape
    groups = geom.groups
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    top, left, bottom, right = geom.pads
    height, width = in_hw
    r0, c0 = origin
    per_group = c_out // groups
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


def _nonzero_block(grad: np.ndarray, whole: int | None = None) -> tuple[int, int, np.ndarray]:
    """(first row, first column, block) of the smallest spatial rectangle holding every non-zero of
    ``grad`` [B, C, H, W] (the whole array when that saves little, i.e. the rectangle is more than
    0.8 of ``whole`` positions, default H·W; an empty 1×1 block if all zero)."""
    height, width = grad.shape[2:]
    whole = height * width if whole is None else whole
    # the whole block (classification heads); on small planes the first sample's edges only (a few
    # elements), which spares the scan of the whole batch below on every layer of a deep stage
    if _reaches_every_edge(grad, whole_batch=height * width >= _EDGE_CHECK_AREA):
        return 0, 0, grad
    active = np.any(grad != 0, axis=(0, 1))
    rows, cols = np.flatnonzero(active.any(axis=1)), np.flatnonzero(active.any(axis=0))
    if rows.size == 0:
        return 0, 0, grad[:, :, :1, :1] * 0
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (r1 - r0) * (c1 - c0) > 0.8 * whole:
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
