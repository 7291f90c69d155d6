"""Resize / Upsample (nearest and linear): a separable linear map with non-negative weights.

Per resized axis, the 1-D interpolation matrix A (out × in) of a ``Resize`` is obtained
by running the op itself (onnx's reference evaluator) on the identity basis, so every
coordinate-transformation and rounding mode is exactly the exporter's; ``Upsample``
(opsets 7–9, which the evaluator does not implement for every mode) has one fixed
coordinate rule, written out in :func:`upsample_matrix`. With A ≥ 0,
intervals map endpoint to endpoint, the absolute adjoint is Aᵀ and the paper scale is
the largest total weight one input element receives (max column sum).
"""

from __future__ import annotations

import numpy as np

from robaudit.graph.ops.base import (
    FLOAT,
    FLOATS,
    INT,
    INTS,
    STRING,
    Interval,
    OpRule,
    check_size,
    register,
    unsupported,
)


def _out_sizes(node, in_shape, args) -> list[int]:
    scales = args[2] if len(args) > 2 else (args[1] if node.op_type == "Upsample" else None)
    sizes = args[3] if len(args) > 3 else None
    if node.op_type == "Resize" and len(args) == 2:  # opset 10: (X, scales)
        scales = args[1]
    if sizes is not None and np.size(sizes):
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
        if len(sizes) != len(in_shape):
            raise unsupported(node, "Resize with an 'axes' subset is not supported")
        return sizes
    if scales is None or not np.size(scales):
        raise unsupported(node, "Resize needs constant scales or sizes")
    scales = np.asarray(scales, np.float64).reshape(-1)
    if len(scales) != len(in_shape):
        raise unsupported(node, "Resize with an 'axes' subset is not supported")
    return [int(np.floor(n * s)) for n, s in zip(in_shape, scales, strict=True)]


def upsample_scales(node, in_shape: tuple[int, ...], args: list) -> np.ndarray:
    """Upsample's scales: the ``scales`` attribute (opset 7) or the constant second input (opset 9)."""
    scales = args[1] if len(args) > 1 and args[1] is not None else node.attr("scales")
    if scales is None or isinstance(scales, Interval):
        raise unsupported(node, "Upsample needs constant scales (attribute or input)")
    scales = np.asarray(scales, np.float64).reshape(-1)
    if len(scales) != len(in_shape) or np.any(scales < 1):
        raise unsupported(node, f"Upsample scales {scales.tolist()} do not fit an input of rank {len(in_shape)}")
    return scales


def upsample_matrix(mode: str, n_in: int, n_out: int, scale: float) -> np.ndarray:
    """The 1-D Upsample interpolation A [out, in] (source coordinate o/scale, as onnxruntime).

    nearest: the element at ⌊o/scale⌋; linear: between ⌊o/scale⌋ and the next element,
    clamped to the last one. Rows are convex combinations, so A ≥ 0.
    """
    matrix = np.zeros((n_out, n_in))
    for o in range(n_out):
        source = min(o / scale, n_in - 1.0)
        low = int(np.floor(source))
        if mode == "nearest":
            matrix[o, low] = 1.0
            continue
        high, frac = min(low + 1, n_in - 1), source - low
        matrix[o, low] += 1.0 - frac
        matrix[o, high] += frac
    return matrix


def upsample_matrices(node, in_shape: tuple[int, ...], args: list) -> dict[int, np.ndarray]:
    """{axis: A_axis} of an ``Upsample`` (opset 7 attribute scales, opset 9 input scales)."""
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise unsupported(node, f"Upsample mode '{mode}' is not supported (nearest, linear)")
    scales = upsample_scales(node, in_shape, args)
    out_sizes = [int(np.floor(n * s)) for n, s in zip(in_shape, scales, strict=True)]
    check_size(node, out_sizes)
    matrices = {}
    for axis, (n_in, n_out, scale) in enumerate(zip(in_shape, out_sizes, scales, strict=True)):
        if scale == 1.0:
            continue
        if axis == 0:
            raise unsupported(node, "resizing the batch axis is not supported")
        matrices[axis] = upsample_matrix(mode, n_in, n_out, float(scale))
    return matrices


def axis_matrices(node, in_shape: tuple[int, ...], args: list) -> dict[int, np.ndarray]:
    """{axis: A_axis [out, in]} for every axis the node resizes."""
    if any(isinstance(a, Interval) for a in args[1:]):
        raise unsupported(node, "Resize scales/sizes must be constants")
    if node.op_type == "Upsample":
        return upsample_matrices(node, in_shape, args)
    if node.attr("mode", "nearest") not in ("nearest", "linear"):
        raise unsupported(node, f"Resize mode '{node.attr('mode')}' is not supported (nearest, linear)")
    if node.attr("coordinate_transformation_mode", "") == "tf_crop_and_resize":
        raise unsupported(node, "Resize with tf_crop_and_resize is not supported")
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch" or node.attr("axes") is not None:
        raise unsupported(node, "Resize with axes or keep_aspect_ratio_policy is not supported")
    out_sizes = _out_sizes(node, in_shape, args)
    check_size(node, out_sizes)
    matrices = {}
    for axis, (n_in, n_out) in enumerate(zip(in_shape, out_sizes, strict=True)):
        if n_in == n_out:  # scale 1: every coordinate mode maps sample i to i
            continue
        if axis == 0:
            raise unsupported(node, "resizing the batch axis is not supported")
        matrices[axis] = _axis_matrix(node, in_shape, args, axis, n_out)
    return matrices


def _axis_matrix(node, in_shape, args, axis: int, n_out: int) -> np.ndarray:
    n_in = in_shape[axis]
    basis_shape = [1] * len(in_shape)
    basis_shape[0], basis_shape[axis] = n_in, n_in
    basis = np.zeros(basis_shape, np.float32)
    index = [0] * len(in_shape)
    for i in range(n_in):
        index[0], index[axis] = i, i
        basis[tuple(index)] = 1.0
    call = list(args)
    call[0] = basis
    ratio = np.ones(len(in_shape), np.float32)
    target = np.array(basis_shape, np.int64)
    target[axis] = n_out
    uses_sizes = len(args) > 3 and args[3] is not None and np.size(args[3])
    if uses_sizes:
        call[3] = target
    else:
        scales = args[2] if len(args) > 2 else args[1]
        ratio[axis] = float(np.asarray(scales, np.float64).reshape(-1)[axis])
        call[2 if len(args) > 2 else 1] = ratio
    from robaudit.graph.folding import fold_node  # folding imports the op registry

    (out,) = fold_node(node, call, node.proto, node.opset or 18)
    matrix = np.asarray(out, np.float64).reshape(n_in, n_out).T
    if np.any(matrix < -1e-12):
        raise unsupported(node, "Resize weights are negative (cubic-like); cannot bound")
    return np.maximum(matrix, 0.0)


def _apply(matrices: dict[int, np.ndarray], x: np.ndarray, offset: int = 0, transpose: bool = False) -> np.ndarray:
    for axis, matrix in matrices.items():
        m = matrix.T if transpose else matrix
        x = np.moveaxis(np.tensordot(m, x, axes=([1], [axis + offset])), 0, axis + offset)
    return x


@register
class ResizeRule(OpRule):
    op_types = ("Resize", "Upsample")
    attributes = {
        "Resize": {
            "antialias": INT,
            "axes": INTS,
            "coordinate_transformation_mode": STRING,
            "cubic_coeff_a": FLOAT,
            "exclude_outside": INT,
            "extrapolation_value": FLOAT,
            "keep_aspect_ratio_policy": STRING,
            "mode": STRING,
            "nearest_mode": STRING,
        },
        "Upsample": {"height_scale": FLOAT, "mode": STRING, "scales": FLOATS, "width_scale": FLOAT},
    }

    def interval(self, node, args):
        x = args[0]
        matrices = axis_matrices(node, x.shape, args)
        return [Interval(_apply(matrices, x.lo), _apply(matrices, x.hi))]

    def _matrices(self, node, ctx):
        args = [None] + [ctx.constants.get(v) if v else None for v in node.inputs[1:]]
        return axis_matrices(node, ctx.shape(node.inputs[0]), args)

    def backward(self, node, cot, ctx):
        grad = _apply(self._matrices(node, ctx), cot[0], offset=1, transpose=True)
        return [grad] + [None] * (len(node.inputs) - 1)

    def paper(self, node, errs, ctx):
        factor = 1.0
        for matrix in self._matrices(node, ctx).values():
            factor *= float(matrix.sum(axis=0).max())
        return [errs[0] * factor]
