"""Affine ops: Gemm, MatMul, Conv, ConvTranspose, BatchNormalization, and arithmetic.

Gemm/MatMul/Conv with constant weights become layers (see ``network.py``); their
rules here only provide interval propagation. Arithmetic with a constant is an
elementwise affine map; Add/Sub of two variables adds deviations; Mul of two
variables is bounded with the product rule |Δ(xy)| ≤ |x̃|·|Δy| + |y|·|Δx| where x̃ is
x's range in the faulty network (docs/method.md §4.1).
"""

from __future__ import annotations

import math

import numpy as np

from robaudit.graph.conv import (
    ConvGeometry,
    VolumeGeometry,
    conv2d,
    conv2d_adjoint,
    conv2d_adjoint_scaled,
    conv2d_nonzero_rows,
    conv_volume,
    window_scatter,
)
from robaudit.graph.ops.base import (
    FLOAT,
    FLOATS,
    INT,
    INTS,
    STRING,
    Interval,
    NormalizedRows,
    OpRule,
    Probabilities,
    Role,
    reduce_to_shape,
    register,
    replication,
    unsupported,
)
from robaudit.graph.ops.elementwise import (
    variable_division_backward,
    variable_division_interval,
    variable_division_paper,
)

#: A weight is converted to float64 about this many elements at a time (2 MiB: stays in cache;
#: 2**17–2**19 were equally fast on a 10 M-weight chain, ``benchmarks/bench_load.py``).
BLOCK_ELEMENTS = 2**18
#: Weight dtypes kept as they are; any other is converted to float64 once.
_EXACT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def affine_interval(x: Interval, apply) -> Interval:
    """Interval image of a linear map ``apply`` (bias included) by centre and radius; a point (``lo is
    hi``, as the concrete runs of the searches make them) maps to a point, with one product."""
    if x.lo is x.hi:
        image = apply(x.lo, signed=True)
        return Interval(image, image)
    centre = (x.lo + x.hi) / 2.0
    radius = (x.hi - x.lo) / 2.0
    mid = apply(centre, signed=True)
    spread = apply(radius, signed=False)
    return Interval(mid - spread, mid + spread)


def float_weight(array) -> np.ndarray:
    """A weight as float32 or float64 without copying those; other dtypes (float16, ints) to float64.

    Every float32 value is exactly a float64 value, so keeping the model's float32
    tensor loses nothing: the products below convert it block by block.
    """
    array = np.asarray(array)
    return array if array.dtype in _EXACT_DTYPES else array.astype(np.float64)


def float64_blocks(weight: np.ndarray):
    """Yield (start, stop, block): float64 copies of lines start:stop of a 2-D weight, one buffer reused.

    Lines are rows when ``weight`` is C-ordered (block = ``weight[start:stop]``) and
    columns otherwise (block = ``weight[:, start:stop].T``); each block holds about
    ``BLOCK_ELEMENTS`` values, so it stays in cache while it is used.
    """
    source = weight if weight.flags.c_contiguous else weight.T
    lines, length = source.shape
    step = max(16, BLOCK_ELEMENTS // max(length, 1))
    buffer = np.empty((min(step, lines), length))
    for start in range(0, lines, step):
        stop = min(start + step, lines)
        block = buffer[: stop - start]
        np.copyto(block, source[start:stop], casting="unsafe")
        yield start, stop, block


def weight_products(weight: np.ndarray, terms: list[tuple[np.ndarray, bool]]) -> list[np.ndarray]:
    """``left @ W`` (or ``left @ |W|`` when the flag is set) for each (left, flag), reading W once.

    ``weight`` is 2-D [p, q] of any real dtype and memory layout, each ``left`` [m, p].
    The products are computed in float64 as if W had first been converted to float64
    (exact for float32 weights; only the summation order differs from a plain
    ``left @ W.astype(float64)``), but W is converted one cached block at a time
    (:func:`float64_blocks`): a large float32 weight is never copied whole and |W| is
    never stored.
    """
    if not weight.flags.c_contiguous and not weight.flags.f_contiguous:
        weight = np.ascontiguousarray(weight)
    by_rows = weight.flags.c_contiguous
    lefts = [np.asarray(left, np.float64) for left, _ in terms]
    results = [np.zeros((left.shape[0], weight.shape[1])) for left in lefts]
    partial = [np.empty((left.shape[0], weight.shape[1] if by_rows else 0)) for left in lefts]
    order = sorted(range(len(terms)), key=lambda i: terms[i][1])  # signed products first, then |block| in place
    for start, stop, block in float64_blocks(weight):
        absolute = False
        for i in order:
            if terms[i][1] and not absolute:
                np.abs(block, out=block)
                absolute = True
            if by_rows:  # rows start:stop of W meet columns start:stop of left: accumulate
                np.matmul(lefts[i][:, start:stop], block, out=partial[i])
                results[i] += partial[i]
            else:  # columns start:stop of W give columns start:stop of the product
                np.matmul(lefts[i], block.T, out=results[i][:, start:stop])
    return results


def weight_extremes(weight: np.ndarray) -> tuple[float, float]:
    """(min W, max W) in one pass over memory, a cached block at a time ((0, 0) for an empty weight)."""
    flat = weight.ravel(order="K")  # a view of a C- or F-ordered weight
    if flat.size == 0:
        return 0.0, 0.0
    # A view of the model file's bytes may be unaligned, which numpy reduces ~3x slower:
    # such a block is first copied into an aligned buffer that stays in cache.
    scratch = None if flat.flags.aligned else np.empty(min(BLOCK_ELEMENTS, flat.size), flat.dtype)
    low, high = np.inf, -np.inf
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        block = flat[start : start + BLOCK_ELEMENTS]
        if scratch is not None:
            np.copyto(scratch[: block.size], block)
            block = scratch[: block.size]
        low, high = np.minimum(low, block.min()), np.maximum(high, block.max())  # NaN propagates
    return float(low), float(high)


def dense_interval(x: Interval, weight: np.ndarray, bias: np.ndarray | None = None) -> Interval:
    """Interval image of x ↦ x @ W + bias (W [in, out]) by centre and radius, in float64 (IBP, docs/method.md §5.1)."""
    width = weight.shape[0]
    if x.lo.ndim == 0 or x.lo.shape[-1] != width:
        raise ValueError(f"matmul: input of shape {list(x.shape)} does not fit a weight of shape {list(weight.shape)}")
    lead = x.lo.shape[:-1]
    if x.lo is x.hi:  # a point (the searches' concrete runs): one product, a point out
        (image,) = weight_products(weight, [(x.lo.reshape(-1, width), False)])
        image = image.reshape(lead + (-1,)) if bias is None else image.reshape(lead + (-1,)) + bias
        return Interval(image, image)
    centre = ((x.lo + x.hi) / 2.0).reshape(-1, width)
    radius = ((x.hi - x.lo) / 2.0).reshape(-1, width)
    mid, spread = weight_products(weight, [(centre, False), (radius, True)])
    mid, spread = mid.reshape(lead + (-1,)), spread.reshape(lead + (-1,))
    if bias is not None:
        mid = mid + bias
    box = Interval(mid - spread, mid + spread)
    if isinstance(x, NormalizedRows) and x.gamma.size == width:
        return normalized_image(box, x, weight, bias)
    return box


def normalized_image(box: Interval, x: NormalizedRows, weight: np.ndarray, bias: np.ndarray | None) -> Interval:
    """``box`` (the box of x @ W + bias, W [n, m]) narrowed by the 2-norm of the normalized rows: with
    x = γ⊙z + β, (x @ W)_j = Σ_i γ_i·W_ij·z_i + β·W_j, and over ‖z‖₂ ≤ √n (and Σ z = 0 when centred) the first
    term is at most √n·‖a_j‖₂ in magnitude, a_j = γ⊙W_j (less its mean when centred) (docs/method.md §13.1).
    The radius is widened by 10⁻⁹ of itself and of Σ|β||W| for float64 rounding."""
    n = x.gamma.size
    scaled = x.gamma[:, None] * weight
    if x.centred:
        scaled = scaled - scaled.mean(axis=0, keepdims=True)
    centre = x.beta @ weight + (0.0 if bias is None else bias)
    radius = math.sqrt(n) * np.sqrt((scaled * scaled).sum(axis=0))
    radius = radius * (1 + 1e-9) + 1e-9 * (np.abs(x.beta) @ np.abs(weight) + np.abs(centre))
    return _narrowed(box, centre - radius, centre + radius)


def _narrowed(box: Interval, lo: np.ndarray, hi: np.ndarray) -> Interval:
    """``box`` ∩ [lo, hi], two enclosures of the same value; where float64 rounding left them apart by an ulp
    (lo above box.hi, say) [lo, hi] alone, which holds the value by itself — never an empty box."""
    new_lo, new_hi = np.maximum(box.lo, lo), np.minimum(box.hi, hi)
    crossed = new_lo > new_hi
    if np.any(crossed):
        new_lo = np.where(crossed, np.broadcast_to(lo, new_lo.shape), new_lo)
        new_hi = np.where(crossed, np.broadcast_to(hi, new_hi.shape), new_hi)
    return Interval(new_lo, new_hi)


def gemm_operands(node, a, b, c):
    """Gemm's effective weight [in, out] and bias (alpha, beta folded).

    The weight is a view of ``b`` (see :func:`float_weight`) unless alpha ≠ 1, when
    alpha·B is formed in float64.
    """
    if node.attr("transB", 0):
        b = b.T
    alpha = node.attr("alpha", 1.0)
    weight = float_weight(b) if alpha == 1.0 else alpha * np.asarray(b, np.float64)
    return weight, (None if c is None else node.attr("beta", 1.0) * np.asarray(c, np.float64))


@register
class GemmRule(OpRule):
    op_types = ("Gemm",)
    role = Role.AFFINE
    attributes = {"Gemm": {"alpha": FLOAT, "beta": FLOAT, "broadcast": INT, "transA": INT, "transB": INT}}

    def interval(self, node, args):
        x, b, c = (args + [None])[:3]
        if not isinstance(x, Interval) or isinstance(b, Interval) or isinstance(c, Interval):
            raise unsupported(node, "Gemm is supported with a variable A and constant B and C")
        if np.ndim(b) != 2:
            raise unsupported(node, f"Gemm weight B must be 2-D, got shape {list(np.shape(b))}")
        weight, bias = gemm_operands(node, None, np.asarray(b), c)
        if node.attr("transA", 0):
            x = Interval(x.lo.T, x.hi.T)
        return [dense_interval(x, weight, bias)]


@register
class MatMulRule(OpRule):
    """x·W with a constant W anchors a layer; a product of two variable tensors (attention's
    Q·Kᵀ and P·V) is bounded by the product rule (docs/method.md §13.3)."""

    op_types = ("MatMul",)
    role = Role.AFFINE
    attributes = {"MatMul": {}}

    def interval(self, node, args):
        x, w = args[:2]
        if isinstance(x, Interval) and isinstance(w, Interval):
            if x.lo.ndim < 2 or w.lo.ndim < 2:
                raise unsupported(node, "a product of two variable tensors needs both of rank ≥ 2")
            product = matmul_interval(x, w)
            return [convex_combination_interval(product, w) if isinstance(x, Probabilities) else product]
        if not isinstance(x, Interval):
            raise unsupported(node, "MatMul is supported as (variable) x (constant weight) or of two variables")
        w = float_weight(w)
        if w.ndim != 2:
            raise unsupported(node, f"MatMul weight must be 2-D, got shape {list(w.shape)}")
        return [dense_interval(x, w)]

    def backward(self, node, cot, ctx):
        a, b = node.inputs[:2]
        if not (ctx.is_variable(a) and ctx.is_variable(b)):
            raise unsupported(node, "has no error-propagation rule outside a layer")
        # |ÃB̃ − AB| ≤ |Ã|·|ΔB| + |ΔA|·|B|  (Ã: faulty range of A, B: clean range of B)
        a_faulty, b_clean = ctx.faulty[a].abs_max(), ctx.clean[b].abs_max()
        grad_a = reduce_to_shape(cot[0] @ np.swapaxes(b_clean, -1, -2), ctx.shape(a))
        grad_b = reduce_to_shape(np.swapaxes(a_faulty, -1, -2) @ cot[0], ctx.shape(b))
        return [grad_a, grad_b]

    def paper(self, node, errs, ctx):
        ones = np.ones((1,) + tuple(ctx.shape(node.outputs[0])))
        grads = self.backward(node, [ones], ctx)
        return [sum(float(g.max()) * (e or 0.0) for g, e in zip(grads, errs, strict=True))]


def matmul_interval(x: Interval, y: Interval) -> Interval:
    """Interval of x @ y (both variable) by centre and radius: xc·yc ± (|xc|·yr + xr·|yc| + xr·yr)."""
    xc, xr = (x.lo + x.hi) / 2.0, (x.hi - x.lo) / 2.0
    yc, yr = (y.lo + y.hi) / 2.0, (y.hi - y.lo) / 2.0
    mid = xc @ yc
    spread = np.abs(xc) @ yr + xr @ np.abs(yc) + xr @ yr
    return Interval(mid - spread, mid + spread)


def convex_combination_interval(product: Interval, y: Interval) -> Interval:
    """``product`` (the box of P @ y) narrowed to the hull of y's rows: a row of P that is a probability vector
    makes each (P @ y)[…, i, j] = Σ_t P[…, i, t]·y[…, t, j] a convex combination of column j of y, so it lies in
    [min_t y_lo[…, t, j], max_t y_hi[…, t, j]] (docs/method.md §13.3). Shapes broadcast as MatMul's."""
    return _narrowed(product, y.lo.min(axis=-2, keepdims=True), y.hi.max(axis=-2, keepdims=True))


def conv_geometry(node, x_shape, w_shape) -> ConvGeometry | VolumeGeometry:
    """Normalize Conv attributes to a 2-D :class:`ConvGeometry` (1-D convs get H = 1) or a 3-D
    :class:`VolumeGeometry`."""
    spatial = len(w_shape) - 2
    if spatial not in (1, 2, 3):
        raise unsupported(node, f"only 1-D, 2-D and 3-D convolutions are supported, got {spatial}-D")
    kernel = list(w_shape[2:])
    strides = list(node.attr("strides", [1] * spatial))
    dilations = list(node.attr("dilations", [1] * spatial))
    pads = list(node.attr("pads", [0] * 2 * spatial))
    if len(dilations) != spatial or any(d < 1 for d in dilations):
        raise unsupported(node, f"dilations must be {spatial} integers ≥ 1, got {dilations}")
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * spatial
        for axis in range(spatial):
            size = x_shape[2 + axis]
            out = -(-size // strides[axis])
            total = max(0, (out - 1) * strides[axis] + dilations[axis] * (kernel[axis] - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads[axis], pads[axis + spatial] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * 2 * spatial
    if spatial == 3:
        return VolumeGeometry(tuple(strides), tuple(dilations), tuple(pads), int(node.attr("group", 1)))
    if spatial == 1:
        strides, dilations, pads = [1] + strides, [1] + dilations, [0, pads[0], 0, pads[1]]
    return ConvGeometry(tuple(strides), tuple(dilations), tuple(pads), int(node.attr("group", 1)))


def as_2d(array: np.ndarray) -> np.ndarray:
    """View a 1-D conv tensor [B, C, L] as 2-D [B, C, 1, L]."""
    return array[:, :, None, :] if array.ndim == 3 else array


@register
class ConvRule(OpRule):
    op_types = ("Conv",)
    role = Role.AFFINE
    attributes = {
        "Conv": {
            "auto_pad": STRING,
            "dilations": INTS,
            "group": INT,
            "kernel_shape": INTS,
            "pads": INTS,
            "strides": INTS,
        },
    }

    def interval(self, node, args):
        x, w, b = (args + [None])[:3]
        if not isinstance(x, Interval) or isinstance(w, Interval) or isinstance(b, Interval):
            raise unsupported(node, "Conv is supported with a variable input and constant weights")
        w = np.asarray(w, np.float64)
        if x.lo.ndim != w.ndim:
            raise unsupported(node, f"input rank {x.lo.ndim} does not match weight rank {w.ndim}")
        geom = conv_geometry(node, x.shape, w.shape)
        if isinstance(geom, VolumeGeometry):
            return [affine_interval(x, lambda v, signed: _conv_volume(v, w, b, geom, signed))]
        w2 = as_2d(w)
        one_d = w.ndim == 3

        def apply(v, signed):
            out = conv2d(as_2d(v), w2 if signed else np.abs(w2), geom)
            if signed and b is not None:
                out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
            return out[:, :, 0, :] if one_d else out

        return [affine_interval(x, apply)]


def _conv_volume(v: np.ndarray, w: np.ndarray, b, geom: VolumeGeometry, signed: bool) -> np.ndarray:
    """3-D Conv of ``v`` by W (with bias) or by |W| (without)."""
    out = conv_volume(v, w if signed else np.abs(w), geom)
    if signed and b is not None:
        out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1, 1)
    return out


def conv_abs_adjoint(cot: np.ndarray, weight: np.ndarray, geom, in_shape) -> np.ndarray:
    """|W|ᵀ applied to sensitivities [K, 1, C_out, ...] of a conv output."""
    k = cot.shape[0]
    if isinstance(geom, VolumeGeometry):
        grad = cot.reshape((k,) + tuple(cot.shape[2:]))
        out = window_scatter(grad, np.abs(np.asarray(weight, np.float64)), geom, tuple(in_shape[2:]))
        return out.reshape((k,) + tuple(in_shape))
    grad = as_2d(cot.reshape((k,) + tuple(cot.shape[2:])))
    hw = (1, in_shape[-1]) if len(in_shape) == 3 else tuple(in_shape[-2:])
    out = conv2d_adjoint(grad, np.abs(as_2d(weight)), geom, hw)
    return out.reshape((k,) + tuple(in_shape))


def conv_abs_adjoint_scaled(cot: np.ndarray, scale: np.ndarray | float, weight: np.ndarray, geom, in_shape):
    """``conv_abs_adjoint(cot · scale, ...)`` for a 2-D convolution (``cot`` [K, 1, C_out, Ho, Wo],
    ``scale`` finite, a scalar or broadcasting to [1, C_out, Ho, Wo]), the product taken only where
    ``cot`` is not zero (:func:`~robaudit.graph.conv.conv2d_adjoint_scaled`): the same numbers."""
    k = cot.shape[0]
    grad = cot.reshape((k,) + tuple(cot.shape[2:]))
    factor = scale if np.ndim(scale) == 0 else np.broadcast_to(scale, cot.shape[1:]).reshape(grad.shape[1:])
    out = conv2d_adjoint_scaled(grad, factor, np.abs(weight), geom, tuple(in_shape[-2:]))
    return out.reshape((k,) + tuple(in_shape))


def batchnorm_scale_shift(node, args) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale s = γ/√(var+eps) and shift β − mean·s of inference BatchNormalization."""
    gamma, beta, mean, var = (np.asarray(a, np.float64) for a in args[1:5])
    if not np.all(var + node.attr("epsilon", 1e-5) > 0):
        raise unsupported(node, "BatchNormalization needs variance + epsilon > 0 in every channel")
    scale = gamma / np.sqrt(var + node.attr("epsilon", 1e-5))
    return scale, beta - mean * scale


def check_inference_batchnorm(node) -> None:
    """Refuse BatchNormalization in training mode: it normalizes by the batch's statistics.

    The forms: ``training_mode=1`` (opset 14+), ``is_test=0`` (opset < 7), or the extra
    outputs (running/saved mean and variance) that only the training form produces.
    """
    if node.attr("training_mode", 0):
        raise unsupported(node, "attribute training_mode=1 (training form) is not supported; export in eval mode")
    if node.opset < 7 and node.attr("is_test", 0 if node.opset else 1) == 0:  # before opset 7 is_test defaults to 0
        raise unsupported(node, "attribute is_test=0 (training form) is not supported; export in eval mode")
    extra = [v for v in node.outputs[1:] if v]
    if extra:
        raise unsupported(
            node,
            f"the training form ({len(extra)} extra outputs, first '{extra[0]}') is not supported; export in eval mode",
        )


def channel_view(vector: np.ndarray, rank: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast over axis 1 of a rank-``rank`` tensor."""
    return vector.reshape((1, -1) + (1,) * (rank - 2))


class ElementwiseAffine(OpRule):
    """x ↦ m·x + c elementwise with constants m, c (subclasses say how to get them)."""

    def scale_shift(self, node, args, rank) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def interval(self, node, args):
        x = args[0] if isinstance(args[0], Interval) else args[1]
        scale, shift = self.scale_shift(node, args, x.lo.ndim)
        a, b = scale * x.lo + shift, scale * x.hi + shift
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        if isinstance(x, NormalizedRows) and lo.shape == x.shape:
            rows = _along_last_axis(scale, x), _along_last_axis(shift, x)
            if rows[0] is not None and rows[1] is not None:  # s⊙(γ⊙z + β) + t = (s⊙γ)⊙z + (s⊙β + t)
                gamma, beta = rows[0] * x.gamma, rows[0] * x.beta + rows[1]
                return [NormalizedRows(lo, hi, gamma=gamma, beta=beta, centred=x.centred)]
        return [Interval(lo, hi)]

    def _var_index(self, node, ctx) -> int:
        return 0 if ctx.is_variable(node.inputs[0]) else 1

    def _const_args(self, node, ctx):
        return [ctx.constants.get(v) if v and not ctx.is_variable(v) else None for v in node.inputs]

    def backward(self, node, cot, ctx):
        index = self._var_index(node, ctx)
        in_shape = ctx.shape(node.inputs[index])
        scale, _ = self.scale_shift(node, self._const_args(node, ctx), len(in_shape))
        result: list = [None] * len(node.inputs)
        result[index] = reduce_to_shape(cot[0] * np.abs(scale), in_shape)
        return result

    def paper(self, node, errs, ctx):
        index = self._var_index(node, ctx)
        in_shape = ctx.shape(node.inputs[index])
        scale, _ = self.scale_shift(node, self._const_args(node, ctx), len(in_shape))
        out_shape = ctx.shape(node.outputs[0])
        return [errs[index] * float(np.max(np.abs(scale), initial=0.0)) * replication(in_shape, out_shape)]


@register
class BatchNormRule(ElementwiseAffine):
    op_types = ("BatchNormalization",)
    attributes = {
        "BatchNormalization": {
            "consumed_inputs": INTS,
            "epsilon": FLOAT,
            "is_test": INT,
            "momentum": FLOAT,
            "spatial": INT,
            "training_mode": INT,
        },
    }

    def interval(self, node, args):
        check_inference_batchnorm(node)
        return super().interval(node, args)

    def scale_shift(self, node, args, rank):
        if any(isinstance(a, Interval) for a in args[1:5]):
            raise unsupported(node, "BatchNormalization needs constant parameters (inference form)")
        scale, shift = batchnorm_scale_shift(node, args)
        return channel_view(scale, rank), channel_view(shift, rank)


def _along_last_axis(constant, x: NormalizedRows) -> np.ndarray | None:
    """``constant`` as one number per element of the last axis, [n], when it varies along that axis alone (every
    other dim 1, rank at most x's): the constant of an elementwise map that keeps x's rows normalized rows with
    another γ and β (docs/method.md §13.1); None otherwise."""
    array = np.asarray(constant, np.float64)
    n = x.gamma.size
    if array.ndim > len(x.shape) or any(d != 1 for d in array.shape[:-1]) or array.size not in (1, n):
        return None
    return np.broadcast_to(array.reshape(-1), (n,)).astype(np.float64)


def _refuse_legacy_axis(node, args) -> None:
    """Refuse opset < 7's ``broadcast=1`` with an ``axis`` where B's dims start: B then lines up with A's dims from
    that axis on, which numpy's trailing alignment — what the rules compute — gives only for axis = rank A − rank B
    (an attack helper's finding: c = [10, 0] on axis 1 of [N, 2, 3, 2] was applied along the last axis)."""
    if not node.attr("broadcast", 0) or node.attr("axis") is None:
        return
    a_rank, b_rank = (len(a.shape) if isinstance(a, Interval) else np.ndim(a) for a in args[:2])
    axis = int(node.attr("axis"))
    if axis % max(1, a_rank) != a_rank - b_rank:
        raise unsupported(node, f"legacy broadcasting (opset < 7) of the second operand from axis {axis} is not "
                                "supported (only along the trailing axes); re-export at opset 7 or later")


@register
class ArithmeticRule(ElementwiseAffine):
    """Add/Sub/Mul/Div: with a constant operand an affine map, else the sum/product rule."""

    op_types = ("Add", "Sub", "Mul", "Div")
    attributes = {
        "Add": {"axis": INT, "broadcast": INT, "consumed_inputs": INTS},
        "Sub": {"axis": INT, "broadcast": INT, "consumed_inputs": INTS},
        "Mul": {"axis": INT, "broadcast": INT, "consumed_inputs": INTS},
        "Div": {"axis": INT, "broadcast": INT, "consumed_inputs": INTS},
    }

    def scale_shift(self, node, args, rank):
        var_first = args[0] is None or isinstance(args[0], Interval)
        const = np.asarray(args[1] if var_first else args[0], np.float64)
        op = node.op_type
        if op == "Add":
            return np.ones_like(const), const
        if op == "Sub":
            return (np.ones_like(const), -const) if var_first else (-np.ones_like(const), const)
        if op == "Mul":
            return const, np.zeros_like(const)
        if not var_first:
            raise unsupported(node, "this division form is not supported")
        return 1.0 / const, np.zeros_like(const)

    def _both_variable(self, args) -> bool:
        return all(isinstance(a, Interval) for a in args[:2])

    def uses_faulty_range(self, node, variable):
        return (
            node.op_type in ("Mul", "Div")
            and all(v in variable for v in node.inputs[:2])
            or (node.op_type == "Div" and node.inputs[1] in variable)
        )

    def interval(self, node, args):
        _refuse_legacy_axis(node, args)
        if node.op_type == "Div" and isinstance(args[1], Interval):
            return [variable_division_interval(node, args)]
        if not self._both_variable(args):
            return super().interval(node, args)
        x, y = args[:2]
        if node.op_type == "Add":
            return [Interval(x.lo + y.lo, x.hi + y.hi)]
        if node.op_type == "Sub":
            return [Interval(x.lo - y.hi, x.hi - y.lo)]
        if node.op_type == "Mul":
            corners = [x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi]
            return [Interval(np.minimum.reduce(corners), np.maximum.reduce(corners))]
        raise unsupported(node, "this division form is not supported")

    def backward(self, node, cot, ctx):
        if node.op_type == "Div" and ctx.is_variable(node.inputs[1]):
            return variable_division_backward(node, cot, ctx)
        if not all(ctx.is_variable(v) for v in node.inputs[:2]):
            return super().backward(node, cot, ctx)
        x_name, y_name = node.inputs[:2]
        x_shape, y_shape = ctx.shape(x_name), ctx.shape(y_name)
        if node.op_type in ("Add", "Sub"):
            return [reduce_to_shape(cot[0], x_shape), reduce_to_shape(cot[0], y_shape)]
        # |x̃ỹ − xy| ≤ |x̃|·|Δy| + |y|·|Δx|  (x̃: faulty range of x, y: clean range of y)
        x_faulty = ctx.faulty[x_name].abs_max()
        y_clean = ctx.clean[y_name].abs_max()
        return [reduce_to_shape(cot[0] * y_clean, x_shape), reduce_to_shape(cot[0] * x_faulty, y_shape)]

    def paper(self, node, errs, ctx):
        if node.op_type == "Div" and ctx.is_variable(node.inputs[1]):
            return variable_division_paper(node, errs, ctx)
        if not all(ctx.is_variable(v) for v in node.inputs[:2]):
            return super().paper(node, errs, ctx)
        x_name, y_name = node.inputs[:2]
        out_shape = ctx.shape(node.outputs[0])
        rep_x = replication(ctx.shape(x_name), out_shape)
        rep_y = replication(ctx.shape(y_name), out_shape)
        if node.op_type in ("Add", "Sub"):
            return [errs[0] * rep_x + errs[1] * rep_y]
        x_faulty = float(ctx.faulty[x_name].abs_max().max())
        y_clean = float(ctx.clean[y_name].abs_max().max())
        return [x_faulty * errs[1] * rep_y + y_clean * errs[0] * rep_x]


def conv_transpose_geometry(node, x_shape, w_shape) -> tuple[ConvGeometry, tuple[int, int]]:
    """Geometry (as the adjoint of a Conv) and output spatial size of a 2-D ConvTranspose."""
    if len(w_shape) != 4:
        raise unsupported(node, "only 2-D ConvTranspose is supported")
    kernel = tuple(w_shape[2:])
    strides = list(node.attr("strides", [1, 1]))
    dilations = list(node.attr("dilations", [1, 1]))
    out_pad = list(node.attr("output_padding", [0, 0]))
    pads = list(node.attr("pads", [0, 0, 0, 0]))
    full = [strides[a] * (x_shape[2 + a] - 1) + out_pad[a] + dilations[a] * (kernel[a] - 1) + 1 for a in range(2)]
    output_shape = node.attr("output_shape")
    auto_pad = node.attr("auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = (
            list(output_shape)[-2:] if output_shape is not None else [x_shape[2 + a] * strides[a] for a in range(2)]
        )
        for a in range(2):
            total = full[a] - target[a]
            if total < 0 and output_shape is not None:  # onnxruntime: zeros appended at the end
                pads[a], pads[a + 2], full[a] = 0, 0, target[a]
                continue
            small, big = total // 2, total - total // 2
            pads[a], pads[a + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    out_hw = (full[0] - pads[0] - pads[2], full[1] - pads[1] - pads[3])
    if min(out_hw) <= 0 or min(pads) < 0:
        raise unsupported(node, f"ConvTranspose output size {list(out_hw)} is not positive")
    geom = ConvGeometry(tuple(strides), tuple(dilations), tuple(pads), int(node.attr("group", 1)))
    return geom, out_hw


def conv_transpose(x: np.ndarray, weight: np.ndarray, geom: ConvGeometry, out_hw) -> np.ndarray:
    """ONNX ConvTranspose (no bias): the adjoint of the Conv with the same weight and geometry."""
    return conv2d_adjoint(x, weight, geom, out_hw)


def conv_transpose_abs_adjoint(cot: np.ndarray, weight: np.ndarray, geom: ConvGeometry, in_shape) -> np.ndarray:
    """|W|ᵀ of a ConvTranspose (a Conv with |W|) applied to [K, 1, C_out, Ho, Wo]."""
    k = cot.shape[0]
    grad = cot.reshape((k,) + tuple(cot.shape[2:]))
    out = conv2d_nonzero_rows(grad, np.abs(weight), geom)[:, :, : in_shape[2], : in_shape[3]]
    return out.reshape((k,) + tuple(in_shape))


@register
class ConvTransposeRule(OpRule):
    op_types = ("ConvTranspose",)
    role = Role.AFFINE
    attributes = {
        "ConvTranspose": {
            "auto_pad": STRING,
            "dilations": INTS,
            "group": INT,
            "kernel_shape": INTS,
            "output_padding": INTS,
            "output_shape": INTS,
            "pads": INTS,
            "strides": INTS,
        },
    }

    def interval(self, node, args):
        x, w, b = (args + [None])[:3]
        if not isinstance(x, Interval) or isinstance(w, Interval) or isinstance(b, Interval):
            raise unsupported(node, "ConvTranspose is supported with a variable input and constant weights")
        w = np.asarray(w, np.float64)
        geom, out_hw = conv_transpose_geometry(node, x.shape, w.shape)

        def apply(v, signed):
            out = conv_transpose(v, w if signed else np.abs(w), geom, out_hw)
            if signed and b is not None:
                out = out + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
            return out

        return [affine_interval(x, apply)]


@register
class ScalerRule(ElementwiseAffine):
    """scikit-learn's ``Scaler``: y = (x − offset)·scale along the last axis (constants)."""

    op_types = ("Scaler",)
    domain = "ai.onnx.ml"
    attributes = {"Scaler": {"offset": FLOATS, "scale": FLOATS}}

    def scale_shift(self, node, args, rank):
        scale = np.asarray(node.attr("scale", [1.0]), np.float64).reshape(-1)
        offset = np.asarray(node.attr("offset", [0.0]), np.float64).reshape(-1)
        return scale, -offset * scale
