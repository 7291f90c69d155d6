"""Pooling and reductions, and the output-only Softmax/LogSoftmax (docs/method.md §3.2).

Max pooling: |Δ max| ≤ max |Δ| ≤ Σ over the window, so its adjoint is that of sum
pooling; average pooling divides by the window's divisor. The paper's scale is the
largest total weight one input element receives over all windows.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from robaudit.graph.conv import (
    ConvGeometry,
    VolumeGeometry,
    conv2d_adjoint,
    pad_planes,
    volume_windows,
    window_scatter,
    window_taps,
)
from robaudit.graph.ops.base import INT, INTS, STRING, Interval, OpRule, Probabilities, register, unsupported


def pool_geometry(node, shape) -> tuple[ConvGeometry | VolumeGeometry, tuple[int, ...]]:
    """Geometry of a 2-D (or 1-D, as H = 1) or 3-D pooling node, ceil_mode folded into the end pads."""
    kernel = list(node.attr("kernel_shape"))
    spatial = len(kernel)
    if spatial not in (1, 2, 3) or len(shape) != spatial + 2:
        raise unsupported(node, "only 1-D, 2-D and 3-D pooling is supported")
    strides = list(node.attr("strides", [1] * spatial))
    dilations = list(node.attr("dilations", [1] * spatial))
    pads = list(node.attr("pads", [0] * 2 * spatial))
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise unsupported(node, "auto_pad SAME on pooling is not supported")
    if node.attr("ceil_mode", 0):
        for axis in range(spatial):
            pads[axis + spatial] += _ceil_extension(
                shape[2 + axis], kernel[axis], strides[axis], dilations[axis], pads[axis], pads[axis + spatial]
            )
    if spatial == 3:
        return VolumeGeometry(tuple(strides), tuple(dilations), tuple(pads), 1), tuple(kernel)
    if spatial == 1:
        kernel, strides, dilations = [1] + kernel, [1] + strides, [1] + dilations
        pads = [0, pads[0], 0, pads[1]]
    geom = ConvGeometry(tuple(strides), tuple(dilations), tuple(pads), 1)
    return geom, (kernel[0], kernel[1])


def _ceil_extension(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> int:
    """Positions added past the end pad by ``ceil_mode`` along one axis (docs/method.md §3.2): the output has
    ⌈(size + pads − span)/stride⌉ + 1 windows, less the last one when it would start in the end pad (ONNX's
    reference, onnxruntime and PyTorch drop it), and the last window may hang past the pads by the rest."""
    span = dilation * (kernel - 1) + 1
    padded = size + begin + end
    count = -(-(padded - span) // stride) + 1
    if (count - 1) * stride >= size + begin:
        count -= 1
    return max(0, (count - 1) * stride + span - padded)


def _given_pads(node, spatial: int) -> tuple[int, ...]:
    """The node's own pads in the layout of its geometry ((top, left, bottom, right); a 1-D node as H = 1; 3-D:
    begins then ends), before ``ceil_mode`` extends the end pads."""
    none = [0] * 2 * spatial
    pads = none if node.attr("auto_pad", "NOTSET") == "VALID" else list(node.attr("pads", none))
    return (0, pads[0], 0, pads[1]) if spatial == 1 else tuple(pads)


def _windows(x: np.ndarray, geom: ConvGeometry, kernel, fill: float) -> np.ndarray:
    xp = pad_planes(x, geom.pads, fill)
    (sh, sw), (dh, dw) = geom.strides, geom.dilations
    ho, wo = geom.output_hw(x.shape[2], x.shape[3], kernel)
    span = (dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1)
    view = sliding_window_view(xp, span, axis=(2, 3))
    return view[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw, ::dh, ::dw]


def _as4d(x: np.ndarray) -> np.ndarray:
    return x[:, :, None, :] if x.ndim == 3 else x


class WindowPool(OpRule):
    """MaxPool / AveragePool / LpPool-free windows over the spatial axes."""

    def _divisors(self, node, shape, geom, kernel) -> np.ndarray:
        if node.op_type == "MaxPool":
            ho, wo = geom.output_hw(shape[-2], shape[-1], kernel)
            return np.ones((ho, wo))
        if node.attr("count_include_pad", 0):
            # the elements of each window inside the input and its own pads, not in what ceil_mode adds past them
            top, left, bottom, right = _given_pads(node, len(node.attr("kernel_shape")))
            padded = np.ones((1, 1, shape[-2] + top + bottom, shape[-1] + left + right))
            extra = (0, 0, geom.pads[2] - bottom, geom.pads[3] - right)
            past = ConvGeometry(geom.strides, geom.dilations, extra, 1)
            return _windows(padded, past, kernel, 0.0).sum(axis=(-1, -2))[0, 0]
        ones = np.ones((1, 1) + tuple(shape[-2:]))
        return _windows(ones, geom, kernel, 0.0).sum(axis=(-1, -2))[0, 0]

    def _volume_divisors(self, node, shape, geom: VolumeGeometry, kernel) -> np.ndarray:
        out = geom.output_size(tuple(shape[2:]), kernel)
        if node.op_type == "MaxPool":
            return np.ones(out)
        if node.attr("count_include_pad", 0):
            given = _given_pads(node, 3)
            padded = np.ones((1, 1) + tuple(int(shape[2 + a]) + given[a] + given[a + 3] for a in range(3)))
            extra = (0, 0, 0) + tuple(geom.pads[3 + a] - given[3 + a] for a in range(3))
            return volume_windows(padded, VolumeGeometry(geom.strides, geom.dilations, extra, 1), kernel).sum(
                axis=(-1, -2, -3)
            )[0, 0]
        ones = np.ones((1, 1) + tuple(shape[2:]))
        return volume_windows(ones, geom, kernel).sum(axis=(-1, -2, -3))[0, 0]

    def _volume_interval(self, node, x: Interval, geom: VolumeGeometry, kernel) -> list[Interval]:
        outs = []
        for bound in (x.lo, x.hi):
            if node.op_type == "MaxPool":
                outs.append(volume_windows(bound, geom, kernel, -np.inf).max(axis=(-1, -2, -3)))
            else:
                total = volume_windows(bound, geom, kernel).sum(axis=(-1, -2, -3))
                outs.append(total / self._volume_divisors(node, x.shape, geom, kernel))
        return [Interval(outs[0], outs[1])]

    def _volume_adjoint(self, node, cot: np.ndarray, in_shape, geom: VolumeGeometry, kernel) -> np.ndarray:
        k, channels = cot.shape[0], in_shape[1]
        grad = cot.reshape((k,) + tuple(cot.shape[2:])) / self._volume_divisors(node, in_shape, geom, kernel)
        geom_c = VolumeGeometry(geom.strides, geom.dilations, geom.pads, channels)
        out = window_scatter(grad, np.ones((channels, 1) + tuple(kernel)), geom_c, tuple(in_shape[2:]))
        return out.reshape((k,) + tuple(in_shape))

    def interval(self, node, args):
        x = args[0]
        if len(node.outputs) > 1 and node.outputs[1]:
            raise unsupported(node, "MaxPool's Indices output is not supported")
        shape4 = _as4d(x.lo).shape
        geom, kernel = pool_geometry(node, x.shape)
        if isinstance(geom, VolumeGeometry):
            return self._volume_interval(node, x, geom, kernel)
        outs = []
        for bound in (x.lo, x.hi):
            if node.op_type == "MaxPool":
                pooled = _windows(_as4d(bound), geom, kernel, -np.inf).max(axis=(-1, -2))
            else:
                total = _windows(_as4d(bound), geom, kernel, 0.0).sum(axis=(-1, -2))
                pooled = total / self._divisors(node, shape4, geom, kernel)
            outs.append(pooled[:, :, 0, :] if x.lo.ndim == 3 else pooled)
        return [Interval(outs[0], outs[1])]

    def _adjoint(self, node, cot: np.ndarray, in_shape) -> np.ndarray:
        """Apply the (absolute) adjoint to [K, 1, C, ...out] sensitivities."""
        geom, kernel = pool_geometry(node, in_shape)
        if isinstance(geom, VolumeGeometry):
            return self._volume_adjoint(node, cot, in_shape, geom, kernel)
        shape4 = _as4d(np.zeros(in_shape)).shape
        channels = shape4[1]
        k = cot.shape[0]
        grad = _as4d(cot.reshape((k,) + tuple(cot.shape[2:])))
        grad = grad / self._divisors(node, shape4, geom, kernel)
        ones = np.ones((channels, 1) + kernel)
        geom_c = ConvGeometry(geom.strides, geom.dilations, geom.pads, channels)
        out = conv2d_adjoint(grad, ones, geom_c, shape4[2:])
        return out.reshape((k,) + tuple(in_shape))

    def backward(self, node, cot, ctx):
        in_shape = ctx.shape(node.inputs[0])
        if node.op_type == "MaxPool" and ctx.use_ranges and len(in_shape) <= 4:  # 1-D and 2-D windows
            box = ctx.memo(("hull", node.inputs[0]), lambda: ctx.hull(node.inputs[0]))
            return [max_candidates_adjoint(node, cot[0], box, context_candidates(node, ctx))]
        return [self._adjoint(node, cot[0], in_shape)]

    def paper(self, node, errs, ctx):
        out_shape = ctx.shape(node.outputs[0])
        ones = np.ones((1,) + tuple(out_shape))
        weight = self._adjoint(node, ones, ctx.shape(node.inputs[0]))
        return [errs[0] * float(weight.max())]


def max_candidates_adjoint(
    node, cot: np.ndarray, box: Interval, found: tuple[ConvGeometry, np.ndarray] | None = None
) -> np.ndarray:
    """MaxPool's adjoint restricted to the elements that can be their window's maximum.

    An element j of window w can be the maximum (clean or faulty) only if hi_j ≥ max_{i∈w} lo_i
    (``box`` the hull of both networks' intervals); |Δ max_w| ≤ max over those j of |Δx_j|
    ≤ their sum (docs/method.md §4.3). ``cot`` is [K, 1, C, ...out], the result [K, *in]
    (float64). ``found``: the geometry and candidate mask of ``box`` already computed
    (:func:`context_candidates`).
    """
    shape4 = _as4d(box.lo).shape
    geom, candidate = found if found is not None else _candidates(node, box)
    k = cot.shape[0]
    grad = _as4d(cot.reshape((k,) + tuple(cot.shape[2:])))
    out = masked_window_adjoint(grad, candidate, geom, (shape4[2], shape4[3]))
    return out.reshape((k,) + tuple(box.shape))


def context_candidates(node, ctx) -> tuple[ConvGeometry, np.ndarray]:
    """:func:`_candidates` of the hull of ``node``'s input in ``ctx``, computed once per context (the same
    mask for every chunk of outputs of a backward pass: docs/method.md §4.4)."""
    box = ctx.memo(("hull", node.inputs[0]), lambda: ctx.hull(node.inputs[0]))
    return ctx.memo(("max candidates", node.name), lambda: _candidates(node, box))


def _candidates(node, box: Interval) -> tuple[ConvGeometry, np.ndarray]:
    """The pooling geometry and the candidate mask [C, Ho, Wo, kh, kw] of :func:`max_candidates_adjoint`."""
    geom, kernel = pool_geometry(node, box.shape)
    assert isinstance(geom, ConvGeometry)  # 1-D and 2-D windows only: the caller checks the rank
    low = _windows(_as4d(box.lo), geom, kernel, -np.inf)
    high = _windows(_as4d(box.hi), geom, kernel, -np.inf)
    return geom, (high >= low.max(axis=(-1, -2), keepdims=True))[0]


def max_candidates_block_adjoint(
    node,
    block: np.ndarray,
    origin: tuple[int, int],
    box: Interval,
    found: tuple[ConvGeometry, np.ndarray] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`max_candidates_adjoint` of sensitivities [K, C, h, w] that are zero outside ``block``
    (first output position ``origin``) of a 2-D MaxPool, as the block of the input plane its
    taps reach and that block's origin: the same sums, in the same order (docs/method.md §4.4).
    ``found``: the geometry and candidate mask of ``box`` already computed (:func:`context_candidates`)."""
    geom, candidate = found if found is not None else _candidates(node, box)
    (r0, c0), (h, w) = origin, block.shape[2:]
    in_hw = tuple(box.shape[2:])
    taps = window_taps((h, w), candidate.shape[-2:], geom, in_hw, origin)
    if not taps:
        return np.zeros(block.shape[:2] + (1, 1)), (0, 0)
    top, left = min(t[3][0].start for t in taps), min(t[3][1].start for t in taps)
    frame = (max(t[3][0].stop for t in taps) - top, max(t[3][1].stop for t in taps) - left)
    local = candidate[:, r0 : r0 + h, c0 : c0 + w]
    shifted = [
        (
            i,
            j,
            outs,
            (
                slice(rows.start - top, rows.stop - top, rows.step),
                slice(cols.start - left, cols.stop - left, cols.step),
            ),
        )
        for i, j, outs, (rows, cols) in taps
    ]
    return _masked_taps(block, local, shifted, frame), (top, left)


def masked_window_adjoint(
    grad: np.ndarray, candidate: np.ndarray, geom: ConvGeometry, in_hw: tuple[int, int]
) -> np.ndarray:
    """Σ over the windows containing each input element of ``grad`` times ``candidate``.

    ``grad`` [K, C, Ho, Wo], ``candidate`` [C, Ho, Wo, kh, kw] (booleans: tap (i, j) of window
    (r, s) counts), result [K, C, H, W] in float64. Each tap is added in kernel order into the
    input window it reaches (taps and window parts in the padding are skipped: nothing is
    padded, cropped and copied); a tap whose mask is true everywhere adds ``grad`` itself
    (x·1 = x: the same numbers without the product). Every element is the same sum, in the
    same order, as the padded scatter of every tap's ``grad·candidate`` (docs/method.md §4.4).
    """
    kernel = (candidate.shape[-2], candidate.shape[-1])
    return _masked_taps(grad, candidate, window_taps(grad.shape[2:], kernel, geom, in_hw), in_hw)


def _masked_taps(grad: np.ndarray, candidate: np.ndarray, window: list, in_hw) -> np.ndarray:
    """Σ over ``window``'s taps (i, j, output window, input window), in order, of ``grad·candidate``
    added into an [K, C, *in_hw] plane (a tap whose mask is true everywhere adds ``grad`` itself)."""
    batch, channels, ho, wo = grad.shape
    out = np.zeros((batch, channels) + tuple(in_hw))
    taps = [
        (mask if not mask.all() else None, o_rows, o_cols, i_rows, i_cols)
        for mask, (o_rows, o_cols), (i_rows, i_cols) in (
            (candidate[:, o_rows, o_cols, i, j], (o_rows, o_cols), (i_rows, i_cols))
            for i, j, (o_rows, o_cols), (i_rows, i_cols) in window
        )
    ]
    # a cache-sized slice of the batch at a time through every tap (the same sums, in the same order)
    step = max(1, _POOL_SLICE_ELEMENTS // max(1, channels * (ho * wo + in_hw[0] * in_hw[1])))
    scratch = np.empty((min(step, batch), channels, ho, wo))
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        for mask, o_rows, o_cols, i_rows, i_cols in taps:
            source = grad[b0:b1, :, o_rows, o_cols]
            if mask is None:
                out[b0:b1, :, i_rows, i_cols] += source
                continue
            product = scratch[: b1 - b0, :, : source.shape[2], : source.shape[3]]
            np.multiply(source, mask, out=product)
            out[b0:b1, :, i_rows, i_cols] += product
    return out


#: Elements of one slice of the batch (its sensitivities and its part of the result) that the
#: max-pool adjoint takes through every tap at once (about 1 MiB of float64: stays in cache).
_POOL_SLICE_ELEMENTS = 2**17


@register
class MaxPool(WindowPool):
    op_types = ("MaxPool",)
    attributes = {
        "MaxPool": {
            "auto_pad": STRING,
            "ceil_mode": INT,
            "dilations": INTS,
            "kernel_shape": INTS,
            "pads": INTS,
            "storage_order": INT,
            "strides": INTS,
        },
    }


@register
class AveragePool(WindowPool):
    op_types = ("AveragePool",)
    attributes = {
        "AveragePool": {
            "auto_pad": STRING,
            "ceil_mode": INT,
            "count_include_pad": INT,
            "dilations": INTS,
            "kernel_shape": INTS,
            "pads": INTS,
            "strides": INTS,
        },
    }


def _reduce_axes(node, shape, args) -> tuple[int, ...]:
    if node.op_type.startswith("Global"):
        return tuple(range(2, len(shape)))
    axes = node.attr("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = [int(a) for a in np.asarray(args[1]).reshape(-1)]
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return ()
        return tuple(range(len(shape)))
    return tuple(sorted(a % len(shape) for a in axes))


@register
class Reduction(OpRule):
    """GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceMax, ReduceSum."""

    op_types = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum")
    attributes = {
        "GlobalAveragePool": {},
        "GlobalMaxPool": {},
        "ReduceMean": {"axes": INTS, "keepdims": INT, "noop_with_empty_axes": INT},
        "ReduceMax": {"axes": INTS, "keepdims": INT, "noop_with_empty_axes": INT},
        "ReduceSum": {"axes": INTS, "keepdims": INT, "noop_with_empty_axes": INT},
    }

    def _keep(self, node) -> bool:
        return node.op_type.startswith("Global") or bool(node.attr("keepdims", 1))

    def _scale(self, node, shape, axes) -> float:
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            return 1.0 / float(np.prod([shape[a] for a in axes]))
        return 1.0

    def interval(self, node, args):
        x = args[0]
        if any(isinstance(a, Interval) for a in args[1:]):
            raise unsupported(node, "reduction axes must be constants")
        if 0 in _reduce_axes(node, x.shape, args):
            raise unsupported(node, "reducing over the batch axis is not supported")
        axes = _reduce_axes(node, x.shape, args)
        keep = self._keep(node)
        if node.op_type in ("GlobalMaxPool", "ReduceMax"):
            return [Interval(x.lo.max(axis=axes, keepdims=keep), x.hi.max(axis=axes, keepdims=keep))]
        scale = self._scale(node, x.shape, axes)
        return [Interval(x.lo.sum(axis=axes, keepdims=keep) * scale, x.hi.sum(axis=axes, keepdims=keep) * scale)]

    def _axes_from_ctx(self, node, ctx, shape):
        args = [None] + [ctx.constants.get(v) if v else None for v in node.inputs[1:]]
        return _reduce_axes(node, shape, args)

    def backward(self, node, cot, ctx):
        in_shape = ctx.shape(node.inputs[0])
        axes = self._axes_from_ctx(node, ctx, in_shape)
        grad = cot[0]
        if not self._keep(node):
            for axis in axes:
                grad = np.expand_dims(grad, axis + 1)
        grad = np.broadcast_to(grad, (grad.shape[0],) + tuple(in_shape)) * self._scale(node, in_shape, axes)
        if node.op_type in ("GlobalMaxPool", "ReduceMax") and ctx.use_ranges:
            # only elements that can be the maximum (hi ≥ the largest lo) move it (docs/method.md §4.3)
            box = ctx.hull(node.inputs[0])
            grad = grad * (box.hi >= box.lo.max(axis=axes, keepdims=True))
        return [np.ascontiguousarray(grad)] + [None] * (len(node.inputs) - 1)

    def paper(self, node, errs, ctx):
        in_shape = ctx.shape(node.inputs[0])
        return [errs[0] * self._scale(node, in_shape, self._axes_from_ctx(node, ctx, in_shape))]


@register
class SoftmaxTail(OpRule):
    """Softmax and LogSoftmax: on the output tail a ∞-norm factor (1/2, 2); inside the network
    the absolute adjoint of their Jacobian over the faulty input ranges (docs/method.md §13.2).
    """

    #: Inside the network its deviation bound reads the faulty ranges of its input.
    range_dependent = True

    op_types = ("Softmax", "LogSoftmax")
    attributes = {
        "Softmax": {"axis": INT},
        "LogSoftmax": {"axis": INT},
    }

    def tail_factor(self, node) -> float:
        """∞→∞ Lipschitz constant: Softmax rows of |J| sum to 2s(1−s) ≤ 1/2; LogSoftmax 2(1−s) ≤ 2."""
        return 0.5 if node.op_type == "Softmax" else 2.0

    def interval(self, node, args):
        x = args[0]
        view, axis = softmax_view(node, x.shape)
        x = Interval(x.lo.reshape(view), x.hi.reshape(view))
        if node.op_type == "Softmax":
            out = softmax_interval(x, axis)
            if axis == len(view) - 1 and view[-1] == args[0].shape[-1]:
                # the rows it normalizes are the tensor's own last axis: P·V is a convex combination (before
                # opset 13 a 2-D view from an earlier axis normalizes several rows together, none summing to 1)
                return [Probabilities(out.lo.reshape(args[0].shape), out.hi.reshape(args[0].shape))]
        else:
            log_total_hi = np.log(np.exp(x.hi - x.hi.max()).sum(axis=axis, keepdims=True)) + x.hi.max()
            log_total_lo = np.log(np.exp(x.lo - x.lo.max()).sum(axis=axis, keepdims=True)) + x.lo.max()
            out = Interval(x.lo - log_total_hi, np.minimum(x.hi - log_total_lo, 0.0))
        shape = args[0].shape
        return [Interval(out.lo.reshape(shape), out.hi.reshape(shape))]

    def backward(self, node, cot, ctx):
        box = ctx.faulty[node.inputs[0]]
        view, axis = softmax_view(node, box.shape)
        probs = softmax_interval(Interval(box.lo.reshape(view), box.hi.reshape(view)), axis)
        grad = cot[0].reshape((cot[0].shape[0],) + view)
        adjoint = softmax_adjoint(grad, probs.lo, probs.hi, axis + 1, node.op_type == "LogSoftmax")
        return [adjoint.reshape(cot[0].shape)]

    def paper(self, node, errs, ctx):
        ones = np.ones((1,) + tuple(ctx.shape(node.outputs[0])))
        return [errs[0] * float(self.backward(node, [ones], ctx)[0].max())]


def softmax_view(node, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """The shape a Softmax/LogSoftmax normalizes in and the axis of it (docs/method.md §13.2): from opset 13 on,
    the tensor itself and ``axis`` (default −1); before it, the input is coerced to 2-D — [a_0⋯a_{k−1},
    a_k⋯a_{n−1}] for ``axis`` k (default 1) — and normalized along that view's axis 1, i.e. over every element
    from axis k on at once (a node with no opset recorded is read as opset 13 or later; a translated QLinearSoftmax
    follows its own ``opset`` attribute: :meth:`~robaudit.graph.onnx_graph.Node.semantics_opset`)."""
    rank = len(shape)
    modern = not 0 < node.semantics_opset() < 13
    axis = int(node.attr("axis", -1 if modern else 1))
    if not -rank <= axis < rank:
        raise unsupported(node, f"axis {axis} is out of range for an input of rank {rank}")
    if modern:
        return tuple(shape), axis % rank
    axis %= rank
    return (int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))), 1


#: Relative rounding allowance per summed term when an element's own term is taken off a sum.
_SUM_ROUNDING = 4e-16


def _log_sum_others(values: np.ndarray, axis: int, upper: bool) -> np.ndarray:
    """log Σ_{j≠k} exp(values_j) for every k along ``axis``, rounded down (``upper`` False) or up.

    Computed as max + log(Σ exp(v − max) − exp(v_k − max)) with the rounding of the sum
    allowed for; −inf when no other term is left.
    """
    top = values.max(axis=axis, keepdims=True)
    terms = np.exp(values - top)
    total = terms.sum(axis=axis, keepdims=True)
    margin = _SUM_ROUNDING * values.shape[axis] * total
    rest = total - terms + (margin if upper else -margin)
    with np.errstate(divide="ignore"):
        return top + np.log(np.maximum(rest, 0.0))


def softmax_interval(x: Interval, axis: int) -> Interval:
    """Range of softmax over a box (docs/method.md §13.2), stable for any spread of the inputs.

    softmax_k ≤ 1 / (1 + Σ_{j≠k} exp(lo_j − hi_k)) and ≥ 1 / (1 + Σ_{j≠k} exp(hi_j − lo_k)).
    """
    upper = np.exp(-np.logaddexp(0.0, _log_sum_others(x.lo, axis, upper=False) - x.hi))
    lower = np.exp(-np.logaddexp(0.0, _log_sum_others(x.hi, axis, upper=True) - x.lo))
    return Interval(np.clip(lower, 0.0, 1.0), np.clip(upper, 0.0, 1.0))


def softmax_adjoint(cot: np.ndarray, s_lo: np.ndarray, s_hi: np.ndarray, axis: int, log: bool) -> np.ndarray:
    """Absolute adjoint of softmax (or log-softmax) over probabilities in [s_lo, s_hi].

    Shapes: cot [K, *shape], s_lo/s_hi [*shape] (broadcast over K), ``axis`` counts K.
    Softmax: |J_ij| = s_i·|δ_ij − s_j| → c_j·max s_j(1 − s_j) + s_j^hi·Σ_{i≠j} c_i·s_i^hi, and the column
    sum 2·s_j(1 − s_j) ≤ 1/2 caps it at max c · 2·max s_j(1 − s_j). Log-softmax: |J_ij| = |δ_ij − s_j|
    → c_j·(1 − s_j^lo) + s_j^hi·Σ_{i≠j} c_i.
    """
    s_lo, s_hi = s_lo[None], s_hi[None]
    if log:
        total = cot.sum(axis=axis, keepdims=True)
        return cot * (1.0 - s_lo) + s_hi * (total - cot)
    peak = np.where((s_lo <= 0.5) & (s_hi >= 0.5), 0.25, np.maximum(s_lo * (1 - s_lo), s_hi * (1 - s_hi)))
    others = (cot * s_hi).sum(axis=axis, keepdims=True) - cot * s_hi
    cap = 2.0 * peak * cot.max(axis=axis, keepdims=True)
    return np.minimum(cot * peak + s_hi * others, cap)
