"""A corpus of small models, one per reported exporter form, with the expected behaviour.

Each case rebuilds, with onnx.helper and seeded random weights, the graph form that an
exporter or a pretrained model really produced (legacy PyTorch export of a dynamic
flatten, training-mode BatchNormalization, SqueezeNet's Dropout with a mask, Upsample of
opsets 7 and 9, ...). ``expect`` is ``"bounded"`` or the text the one-line refusal must
contain. Run as a script to write the models into a folder:

    python tests/corpus/make_bug_reports.py OUT_DIR
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Case:
    """One bug-report model and what robaudit must do with it."""

    name: str
    build: Callable[[], onnx.ModelProto]
    #: "bounded", or a substring of the one-line refusal.
    expect: str = "bounded"


class Builder:
    """Tiny graph builder: constants from a seeded generator, one call per node."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array, dtype=np.float32) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> str | list[str]:
        name = self.name(op_type.lower())
        outs = [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def weights(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return self.rng.uniform(-scale, scale, shape)

    def gemm(self, x: str, n_in: int, n_out: int, **attrs) -> str:
        w, b = self.const(self.weights(n_out, n_in)), self.const(self.weights(n_out, scale=0.1))
        return self.op("Gemm", [x, w, b], transB=1, **attrs)

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, pad: int = 1, dims: int = 2) -> str:
        w = self.const(self.weights(c_out, c_in, *([k] * dims)))
        b = self.const(self.weights(c_out, scale=0.1))
        return self.op("Conv", [x, w, b], kernel_shape=[k] * dims, pads=[pad] * 2 * dims)

    def model(self, output: str, input_shape: list, opset: int = 17, ml: bool = False) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "bug_report",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.inits,
        )
        opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("ai.onnx.ml", 1)] if ml else [])
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = min(model.ir_version, 8)
        return model


# --------------------------------------------------------------------------- internal errors


def dynamic_flatten() -> onnx.ModelProto:
    """``x.view(x.size(0), -1)`` from the legacy exporter with a dynamic batch."""
    b = Builder(1)
    h = b.op("Relu", [b.conv("x", 1, 2)])
    shape = b.op("Shape", [h])
    batch = b.op("Gather", [shape, b.const(0, np.int64)], axis=0)
    batch = b.op("Unsqueeze", [batch, b.const([0], np.int64)])
    target = b.op("Concat", [batch, b.const([-1], np.int64)], axis=0)
    flat = b.op("Reshape", [h, target])
    return b.model(b.gemm(flat, 2 * 5 * 5, 3), ["N", 1, 5, 5], opset=13)


def batchnorm_training_outputs() -> onnx.ModelProto:
    """``training=TrainingMode.TRAINING`` at opset 11: running/saved statistics as outputs."""
    b = Builder(2)
    h = b.gemm("x", 4, 5)
    stats = [b.const(v) for v in (np.ones(5), np.zeros(5), np.zeros(5), np.ones(5))]
    outs = b.op("BatchNormalization", [h, *stats], outputs=5, epsilon=1e-5, momentum=0.9)
    return b.model(b.gemm(b.op("Relu", [outs[0]]), 5, 2), ["N", 4], opset=11)


def batchnorm_training_mode() -> onnx.ModelProto:
    """``training_mode=1`` with a single output (opset 15): onnxruntime refuses to load it."""
    b = Builder(3)
    h = b.gemm("x", 4, 5)
    stats = [b.const(v) for v in (np.ones(5), np.zeros(5), np.zeros(5), np.ones(5))]
    h = b.op("BatchNormalization", [h, *stats], training_mode=1)
    return b.model(b.gemm(b.op("Relu", [h]), 5, 2), ["N", 4], opset=15)


def dropout_with_mask() -> onnx.ModelProto:
    """Old-style ``Dropout`` with its mask output (onnx's SqueezeNet test model, opset 9)."""
    b = Builder(4)
    h = b.op("Relu", [b.gemm("x", 4, 6)])
    kept, _mask = b.op("Dropout", [h], outputs=2, ratio=0.5)
    return b.model(b.gemm(kept, 6, 3), ["N", 4], opset=9)


def unknown_op() -> onnx.ModelProto:
    """An op without a rule on the audited path (``Exp``): one line naming op and node."""
    b = Builder(5)
    h = b.op("Exp", [b.gemm("x", 3, 4)])
    return b.model(b.gemm(h, 4, 2), ["N", 3])


# --------------------------------------------------------------------------- exporter forms


def upsample_opset7() -> onnx.ModelProto:
    """``Upsample`` with the ``scales`` attribute (opset 7), nearest."""
    b = Builder(6)
    h = b.op("Relu", [b.conv("x", 1, 2)])
    up = b.op("Upsample", [h], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")
    return b.model(b.conv(up, 2, 1), ["N", 1, 3, 3], opset=7)


def upsample_opset9_linear() -> onnx.ModelProto:
    """``Upsample`` with scales as an input (opset 9), ``mode="linear"``."""
    b = Builder(7)
    h = b.op("Relu", [b.conv("x", 1, 2)])
    up = b.op("Upsample", [h, b.const([1.0, 1.0, 2.0, 1.5])], mode="linear")
    return b.model(b.conv(up, 2, 1), ["N", 1, 3, 4], opset=9)


def conv_transpose_output_shape() -> onnx.ModelProto:
    """``ConvTranspose`` with ``output_shape`` one past the natural size (pads derived as onnxruntime)."""
    b = Builder(8)
    h = b.op("Relu", [b.conv("x", 1, 2)])
    w = b.const(b.weights(2, 2, 3, 3))
    up = b.op("ConvTranspose", [h, w], kernel_shape=[3, 3], strides=[2, 2], output_shape=[10, 8])
    return b.model(b.conv(b.op("Relu", [up]), 2, 1), ["N", 1, 4, 4])


def gemm_trans_a() -> onnx.ModelProto:
    """``Gemm`` with ``transA=1`` after a Transpose (A is [features, batch])."""
    b = Builder(9)
    h = b.op("Relu", [b.gemm("x", 4, 5)])
    t = b.op("Transpose", [h], perm=[1, 0])
    return b.model(b.gemm(t, 5, 3, transA=1), ["N", 4])


def gelu_tanh_pow() -> onnx.ModelProto:
    """tanh-GELU as the dynamo exporter writes it at opset 18: ``Pow(x, 3)``."""
    b = Builder(10)
    h = b.gemm("x", 4, 6)
    cube = b.op("Pow", [h, b.const(3.0)])
    inner = b.op("Add", [h, b.op("Mul", [cube, b.const(0.044715)])])
    t = b.op("Tanh", [b.op("Mul", [inner, b.const(math.sqrt(2.0 / math.pi))])])
    gate = b.op("Mul", [b.op("Add", [t, b.const(1.0)]), b.const(0.5)])
    return b.model(b.gemm(b.op("Mul", [h, gate]), 6, 3), ["N", 4], opset=18)


def pow_square() -> onnx.ModelProto:
    """``Pow`` by a constant exponent on its own (a squared activation)."""
    b = Builder(11)
    h = b.op("Pow", [b.op("Relu", [b.gemm("x", 4, 6)]), b.const(2.0)])
    return b.model(b.gemm(h, 6, 3), ["N", 4])


def sum_branches() -> onnx.ModelProto:
    """``Sum`` of three branches (ResNet-50 / ShuffleNet in onnx's model skeletons)."""
    b = Builder(12)
    h = b.op("Relu", [b.conv("x", 1, 2)])
    s = b.op("Sum", [h, b.op("Relu", [b.conv(h, 2, 2)]), b.conv(h, 2, 2)])
    return b.model(b.conv(b.op("Relu", [s]), 2, 1), ["N", 1, 4, 4])


def lrn() -> onnx.ModelProto:
    """``LRN`` between convolutions (AlexNet, ZFNet, Inception v1)."""
    b = Builder(13)
    h = b.op("Relu", [b.conv("x", 1, 5)])
    n = b.op("LRN", [h], size=3, alpha=0.5, beta=0.75, bias=1.0)
    return b.model(b.conv(n, 5, 2), ["N", 1, 4, 4])


def gather_nd() -> onnx.ModelProto:
    """``h[:, idx]`` from the dynamo exporter: Transpose, GatherND with constant indices, Transpose."""
    b = Builder(14)
    h = b.op("Relu", [b.gemm("x", 4, 6)])
    t = b.op("Transpose", [h], perm=[1, 0])
    g = b.op("GatherND", [t, b.const([[0], [2], [5]], np.int64)], batch_dims=0)
    back = b.op("Transpose", [g], perm=[1, 0])
    return b.model(b.gemm(back, 3, 2), ["N", 4], opset=18)


def reciprocal_div() -> onnx.ModelProto:
    """``Reciprocal`` and ``Div`` by a variable whose range excludes 0 (a learned normalizer)."""
    b = Builder(15)
    h = b.op("Relu", [b.gemm("x", 4, 6)])
    scale = b.op("Add", [b.op("Sigmoid", [b.gemm("x", 4, 6)]), b.const(0.5)])
    d = b.op("Div", [h, scale])
    r = b.op("Reciprocal", [b.op("Add", [h, b.const(1.0)])])
    return b.model(b.gemm(b.op("Add", [d, r]), 6, 3), ["N", 4])


def summed_gemms() -> onnx.ModelProto:
    """``relu(Gemm_a(h) + Gemm_b(h))``: one layer whose neurons are relu(a + b)."""
    b = Builder(17)
    h = b.op("Relu", [b.gemm("x", 4, 6)])
    s = b.op("Relu", [b.op("Add", [b.gemm(h, 6, 5), b.gemm(h, 6, 5)])])
    return b.model(b.gemm(s, 5, 3), ["N", 4])


def volume_conv_pool() -> onnx.ModelProto:
    """3-D ``Conv`` and pooling (video / medical volumes): Conv3d, MaxPool3d, AvgPool3d."""
    b = Builder(18)
    h = b.op("Relu", [b.conv("x", 1, 2, dims=3)])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2, 2], strides=[1, 2, 2])
    w, bias = b.const(b.weights(3, 2, 2, 3, 3)), b.const(b.weights(3, scale=0.1))
    h = b.op("Relu", [b.op("Conv", [h, w, bias], kernel_shape=[2, 3, 3], strides=[1, 1, 1], pads=[0, 1, 1, 1, 1, 0])])
    h = b.op("AveragePool", [h], kernel_shape=[2, 2, 2], pads=[0, 1, 1, 1, 0, 0], strides=[2, 2, 2])
    flat = b.op("Flatten", [h])
    return b.model(b.gemm(flat, 3 * 2 * 1 * 1, 2), ["N", 1, 4, 5, 5])


def sklearn_scaler_mlp() -> onnx.ModelProto:
    """scikit-learn's most common pipeline, StandardScaler → MLPClassifier, via skl2onnx (``Scaler``)."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(16)
    x = rng.uniform(0, 1, (90, 5)).astype(np.float32)
    labels = (x[:, 0] > x[:, 1]).astype(int) + (x[:, 2] > 0.6).astype(int)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((8,), max_iter=150, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(x, labels)
    options = {id(pipe.steps[-1][1]): {"zipmap": False}}
    return to_onnx(pipe, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})


CASES = [
    Case("dynamic_flatten", dynamic_flatten),
    Case("batchnorm_training_outputs", batchnorm_training_outputs, "training form (4 extra outputs"),
    Case("batchnorm_training_mode", batchnorm_training_mode, "attribute training_mode=1"),
    Case("dropout_with_mask", dropout_with_mask),
    Case("unknown_op", unknown_op, "unsupported op 'Exp' at node 'exp"),
    Case("upsample_opset7", upsample_opset7),
    Case("upsample_opset9_linear", upsample_opset9_linear),
    Case("conv_transpose_output_shape", conv_transpose_output_shape),
    Case("gemm_trans_a", gemm_trans_a),
    Case("gelu_tanh_pow", gelu_tanh_pow),
    Case("pow_square", pow_square),
    Case("sum_branches", sum_branches),
    Case("lrn", lrn),
    Case("gather_nd", gather_nd),
    Case("reciprocal_div", reciprocal_div),
    Case("summed_gemms", summed_gemms),
    Case("volume_conv_pool", volume_conv_pool),
    Case("sklearn_scaler_mlp", sklearn_scaler_mlp),
]


def write_corpus(folder: Path) -> dict[str, Path]:
    """Write every case as ``folder/NAME.onnx``; return name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in CASES:
        paths[case.name] = folder / f"{case.name}.onnx"
        onnx.save(case.build(), paths[case.name])
    return paths


if __name__ == "__main__":
    for name, path in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "bug_reports")).items():
        print(f"{name}: {path}")
