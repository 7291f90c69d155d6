"""Flipped and stuck bits of stored values in numpy, for the joint search's concrete network (docs/method.md §2.3,
§8.2): the same faults the instrumented graph applies in onnxruntime (``instrument._flipped``/``_flipped_float``),
on the values of one input. What the search finds is evaluated again in onnxruntime.
"""

from __future__ import annotations

import numpy as np

from robaudit.graph.layers import Layer
from robaudit.graph.stored_words import FloatWord

#: IEEE-754 words by width: the float type and the unsigned integer of the same size.
_WORDS = {32: (np.float32, np.uint32), 16: (np.float16, np.uint16)}


def bit_positions(sent: np.ndarray) -> np.ndarray:
    """The bit B of each failed neuron from the value the campaign sends for it, 2^B."""
    return np.rint(np.log2(np.asarray(sent, np.float64))).astype(np.int64)


def _changed(pattern: np.ndarray, bits: np.ndarray, stuck: int | None, unsigned) -> np.ndarray:
    masks = np.left_shift(np.ones_like(pattern, dtype=unsigned), bits.astype(unsigned))
    if stuck is None:
        return pattern ^ masks
    return pattern | masks if stuck else pattern & ~masks


def flipped_words(values: np.ndarray, bits: np.ndarray, word: FloatWord, stuck: int | None = None) -> np.ndarray:
    """``values`` stored as ``word`` (rounded to it first) with bit ``bits[i]`` of each flipped, or stuck at
    ``stuck``; float64 (±Inf or NaN where an exponent bit makes them)."""
    floating, unsigned = _WORDS[word.width]
    pattern = np.asarray(values, np.float64).astype(floating).view(unsigned)
    with np.errstate(invalid="ignore"):  # a NaN made by an exponent bit stays NaN
        return _changed(pattern, np.asarray(bits), stuck, unsigned).view(floating).astype(np.float64)


def flipped_codes(values: np.ndarray, bits: np.ndarray, codes: tuple, stuck: int | None = None) -> np.ndarray:
    """``values`` stored as integer codes q = round(y/s) + zp (``codes``: scale and zero point per value, qmin,
    qmax) with bit ``bits[i]`` of each code's two's-complement pattern flipped or stuck, dequantized; float64."""
    scale, zp, qmin, qmax = codes
    span = int(qmax - qmin + 1)
    q = np.clip(np.rint(np.asarray(values, np.float64) / scale) + zp, qmin, qmax).astype(np.int64)
    pattern = np.mod(q, span).astype(np.uint64)
    changed = _changed(pattern, np.asarray(bits), stuck, np.uint64).astype(np.int64)
    signed = np.where(changed > qmax, changed - span, changed)
    return (signed - zp) * scale


def flipped_values(layer: Layer, values: np.ndarray, ids: np.ndarray, sent: np.ndarray,
                   stuck: int | None = None) -> np.ndarray:
    """The values neurons ``ids`` of ``layer`` keep after their stored bit (2^B in ``sent``) flipped or stuck, from
    their values ``values[ids]`` (flat)."""
    bits = bit_positions(sent)
    if layer.codes is not None:
        scale, zp, qmin, qmax = layer.codes
        return flipped_codes(values[ids], bits, (scale[ids], zp[ids], qmin, qmax), stuck)
    return flipped_words(values[ids], bits, layer.word, stuck)
