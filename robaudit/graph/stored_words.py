"""IEEE-754 words a failure site stores its values in, for bit flips and stuck-at bits (docs/method.md §2.3).

A float32 model's layers store float32 words; a model that computes in float16 (§1.2) stores its
float16 results as float16 words — bit 15 the sign, 10–14 the exponent, 0–9 the mantissa.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FloatWord:
    """One binary IEEE-754 format: y = ±(1 + M/2^m)·2^(e − bias) for 0 < e < all ones, ±M·2^(1 − bias − m)
    for e = 0 (subnormal), ±Inf or NaN for e all ones."""

    name: str
    #: Bits of the word; the sign is the highest.
    width: int
    #: m: mantissa bits (0..m−1); the exponent takes bits m..width−2.
    mantissa_bits: int
    bias: int

    @property
    def sign_bit(self) -> int:
        return self.width - 1

    @property
    def exponent_all_ones(self) -> int:
        """The biased exponent of ±Inf and NaN (255 for float32, 31 for float16)."""
        return 2 ** (self.width - 1 - self.mantissa_bits) - 1

    @property
    def min_normal(self) -> float:
        """The smallest positive normal value, 2^(1 − bias)."""
        return 2.0 ** (1 - self.bias)

    @property
    def subnormal_step(self) -> float:
        """The spacing of subnormal values, 2^(1 − bias − m) (also the smallest positive value)."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)


FLOAT32 = FloatWord("float32", 32, 23, 127)
FLOAT16 = FloatWord("float16", 16, 10, 15)
