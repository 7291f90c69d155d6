"""Quantized copies of float models, as onnxruntime's quantization tool writes them:
``quantize_static`` (QDQ or QOperator format, calibrated on given inputs) and
``quantize_dynamic``. Shared by the tests and ``sample_models/make_digits_int8.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, inputs: np.ndarray) -> None:
        self._feeds = iter([{name: inputs[i : i + 1].astype(np.float32)} for i in range(len(inputs))])

    def get_next(self):
        return next(self._feeds, None)


def quantize(source: Path, target: Path, calibration: np.ndarray, fmt: str = "QDQ",
             per_channel: bool = False) -> Path:
    """Statically quantized copy of ``source`` (uint8 activations, int8 weights), or ``fmt="dynamic"``."""
    if fmt == "dynamic":
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
        return target
    name = onnx.load(str(source)).graph.input[0].name
    quantize_static(
        str(source),
        str(target),
        _Reader(name, calibration),
        quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
    )
    return target


def every_qlinear_op_source(target: Path, seed: int = 0) -> Path:
    """A small float CNN whose QOperator form uses every integer op onnxruntime writes for CNNs:
    Conv, LeakyRelu, AveragePool, Sigmoid, Add, Mul (of two variables), Concat, GlobalAveragePool, Gemm.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...]):
        return numpy_helper.from_array(rng.normal(0.0, 0.5, shape).astype(np.float32), name)

    make = helper.make_node
    nodes = [
        make("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="/conv1/Conv"),
        make("LeakyRelu", ["c1"], ["a1"], alpha=0.1, name="/lrelu/LeakyRelu"),
        make("AveragePool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="/pool/AveragePool"),
        make("Conv", ["p1", "W2", "b2"], ["c2"], name="/conv2/Conv"),
        make("Sigmoid", ["c2"], ["s2"], name="/sig/Sigmoid"),
        make("Conv", ["p1", "W3", "b3"], ["c3"], name="/conv3/Conv"),
        make("Relu", ["c3"], ["r3"], name="/relu3/Relu"),
        make("Add", ["s2", "r3"], ["sum"], name="/add/Add"),
        make("Mul", ["sum", "r3"], ["prod"], name="/mul/Mul"),
        make("Concat", ["prod", "r3"], ["cat"], axis=1, name="/cat/Concat"),
        make("GlobalAveragePool", ["cat"], ["g"], name="/gap/GlobalAveragePool"),
        make("Flatten", ["g"], ["f"], name="/flat/Flatten"),
        make("Gemm", ["f", "W4", "b4"], ["y"], transB=1, name="/fc/Gemm"),
    ]
    weights = [init("W1", (4, 2, 3, 3)), init("b1", (4,)), init("W2", (4, 4, 1, 1)), init("b2", (4,)),
               init("W3", (4, 4, 1, 1)), init("b3", (4,)), init("W4", (3, 8)), init("b4", (3,))]
    graph = helper.make_graph(
        nodes, "every_qlinear_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, target)
    return target
