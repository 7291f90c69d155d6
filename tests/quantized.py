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
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
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
