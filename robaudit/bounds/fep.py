"""The Forward Error Propagation bound (docs/method.md §2, §3): the paper method, what both methods
share (:class:`Analysis`), and the inverse problems (largest tolerated failures per layer,
uniform, total budget). The tight method is :mod:`robaudit.bounds.tight`.

The pure formulas (numbers in, numbers out) come first; :class:`PaperBound` applies them
to a :class:`~robaudit.graph.network.Network`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx

from robaudit.bounds.ranges import faulty_ranges
from robaudit.bounds.slack import epsilon_limit, within
from robaudit.errors import OptionError, RoundingOverflowError
from robaudit.graph.ibp import FlipTerms, SiteRange
from robaudit.graph.layers import Layer
from robaudit.graph.network import Network
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext
from robaudit.graph.ops.base import rule_for
from robaudit.graph.ops.dynamic import faulty_radii
from robaudit.graph.stored_words import FLOAT32, FloatWord

#: Largest failure budget searched by the paper method's dynamic programme.
MAX_TOTAL_BUDGET = 4096


# --------------------------------------------------------------------------- pure math


def neuron_delta(failure_range: tuple[float, float], ylo, yhi):
    """δ = max(b − ylo, yhi − a): the largest change one failed neuron causes (docs/method.md §2.1).

    Crash is the range [0, 0], giving max(|ylo|, |yhi|).
    """
    a, b = failure_range
    return np.maximum(np.maximum(b - ylo, yhi - a), 0.0)


def synapse_delta(failure_range: tuple[float, float], w_min: float, w_max: float, y_lo: float, y_hi: float) -> float:
    """d = max(b − w⁻, w⁺ − a), w⁻/w⁺ the extremes of w·y over the layer (docs/method.md §2.2)."""
    products = [w_min * y_lo, w_min * y_hi, w_max * y_lo, w_max * y_hi]
    a, b = failure_range
    return max(b - min(products), max(products) - a, 0.0)


def paper_layer_error(
    e_prev,
    failed: int,
    delta: float,
    neurons: int,
    fanout: int,
    lipschitz: float,
    max_weight: float,
    synapses: int = 0,
    synapse_d: float = 0.0,
):
    """E_l = f·δ + s·K·d + min(fanout, N − f)·K·w_m·E_{l−1} (docs/method.md §3.1)."""
    carried = min(fanout, neurons - failed) * lipschitz * max_weight
    with np.errstate(over="ignore", invalid="ignore"):  # past float64's range the bound is +inf (unbounded)
        return failed * delta + synapses * lipschitz * synapse_d + carried * e_prev


def largest_within(values: np.ndarray, epsilon: float) -> int:
    """Largest index i with values[i] ≤ ε for a non-decreasing ``values`` (−1 if none)."""
    return int(np.searchsorted(values, epsilon_limit(epsilon), side="right")) - 1


def top_prefix_sums(values: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Per row, the sums of the f largest entries for f = 0..n (or 0..limit): shape [rows, n + 1].

    With ``limit`` only the ``limit`` largest entries are sorted (a partition first).
    """
    if limit is not None and limit < values.shape[-1]:
        values = -np.partition(-values, limit - 1, axis=-1)[..., :limit] if limit > 0 else values[..., :0]
    ordered = -np.sort(-values, axis=-1)
    zeros = np.zeros(values.shape[:-1] + (1,))
    return np.concatenate([zeros, np.cumsum(ordered, axis=-1)], axis=-1)


# --------------------------------------------------------------------------- stored-value faults (method §1.3, §2.3)

#: δ standing in for "no finite bound" (a float bit flip may give ±Inf or NaN): any bound that
#: uses it is reported as unbounded; finite, so that a layer with no failure still adds 0·δ = 0.
UNBOUNDED = 1e300

#: Bounds at or above this are reported as unbounded.
UNBOUNDED_REPORTED = 1e250


def protected_delta(failure_range: tuple, ylo, yhi, protection: tuple | None):
    """δ of a failure range [a, b] when the failed value and the clean one pass through a Clip
    [lo, hi] (docs/method.md §1.3): δ = max(clip(b) − clip(ylo), clip(yhi) − clip(a))."""
    a, b = failure_range
    if protection is not None:
        lo, hi = protection
        a, b, ylo, yhi = (np.clip(v, lo, hi) for v in (a, b, ylo, yhi))
    return neuron_delta((a, b), ylo, yhi)


def integer_bit_delta(codes: tuple, bit: int | None, ylo, yhi, protection: tuple | None):
    """δ per neuron of an integer-coded value q = round(y/s) + zp under one flipped or stuck bit
    (docs/method.md §2.3): exactly 2^B·s for bit B; any other code for an unknown bit."""
    scale, zp, qmin, qmax = codes
    width = int(np.ceil(np.log2(qmax - qmin + 1)))
    if bit is not None:
        if not 0 <= bit < width:
            raise OptionError(
                f"--bit (a policy's 'bit') must be in 0..{width - 1} for {width}-bit integer codes, got {bit}"
            )
        delta = 2.0**bit * scale
        return delta if protection is None else np.minimum(delta, protection[1] - protection[0])
    return protected_delta(((qmin - zp) * scale, (qmax - zp) * scale), ylo, yhi, protection)


def stays_finite(word: FloatWord, bit: int | None, stuck: int | None) -> bool:
    """Whether a stored float keeps a finite value under the fault: a mantissa bit, the sign, or any bit stuck at 0
    (clearing an exponent bit only shrinks |y|); a flipped or set exponent bit may give ±Inf or NaN (§2.3)."""
    return stuck == 0 or (bit is not None and (bit < word.mantissa_bits or bit == word.sign_bit))


def _one_bit_delta(bit: int, y, ylo, yhi, word: FloatWord, stuck: int | None):
    """δ of one bit position, without the guard and the word's own rounding: UNBOUNDED where the value may not
    stay finite (:func:`float_bit_delta`)."""
    if bit < word.mantissa_bits:
        return 2.0 ** (bit - word.mantissa_bits) * y + 2.0**bit * word.subnormal_step
    if bit == word.sign_bit:  # flip: −y; stuck at 0: |y| (moves only negatives); at 1: −|y| (only positives)
        if stuck is None:
            return 2.0 * y
        return 2.0 * np.maximum(0.0, -np.asarray(ylo) if stuck == 0 else np.asarray(yhi))
    if stuck == 0:  # an exponent bit cleared: y' between 0 and y
        return y
    return np.full(np.shape(y), UNBOUNDED)


def float_bit_delta(
    bit: int | None, ylo, yhi, protection, nan_safe: bool, word: FloatWord = FLOAT32, stuck: int | None = None
):
    """δ per neuron of a float value stored as ``word`` (float32, float16) under one flipped bit, or one stuck at
    ``stuck`` (docs/method.md §2.3).

    With m mantissa bits, a mantissa bit B < m changes y = ±1.f·2^E by 2^(E−m+B) ≤ 2^(B−m)·|y|
    (2^B times the subnormal spacing for a subnormal); the sign bit by 2|y| (stuck at 0: 2·max(0, −ylo), at 1:
    2·max(0, yhi)); an exponent bit stuck at 0 moves y towards 0, by |y| at most; a flipped or set one may give
    ±Inf or NaN: UNBOUNDED, unless a NaN-guarded Clip protects the layer. Any bit: the largest of these. A
    float16 word also adds its own rounding u·|y| + t: it holds the rounded result, which the clean run may not
    have rounded.

    Raises:
        OptionError: ``bit`` is not a bit of ``word``.
    """
    y = np.maximum(np.abs(ylo), np.abs(yhi))
    if bit is not None and not 0 <= bit < word.width:
        raise OptionError(f"--bit (a policy's 'bit') must be in 0..{word.width - 1} for {word.name} values, got {bit}")
    bits = range(word.width) if bit is None else [bit]
    delta = np.max([np.broadcast_to(_one_bit_delta(b, y, ylo, yhi, word, stuck), np.shape(y)) for b in bits], axis=0)
    if np.any(delta >= UNBOUNDED):
        if protection is not None and nan_safe:
            return protected_delta(protection, ylo, yhi, protection)
        return np.full(np.shape(y), UNBOUNDED)
    if word.width < 32:  # the word holds r(y); the clean run may carry y unrounded (a skipped rounding, §1.2)
        delta = delta + 2.0 ** -(word.mantissa_bits + 1) * y + word.subnormal_step / 2
    return delta if protection is None else np.minimum(delta, protection[1] - protection[0])


def unbounded_note(layers: Sequence[str]) -> str:
    """Why a bit-flip bound is unbounded and what restores it (docs/method.md §2.3)."""
    return (
        f"unbounded for layers {', '.join(layers)}: they store floats (float32 or float16 words), and a flipped "
        "exponent bit can make a value ±Inf or NaN, which no later op bounds; remedy: restrict their range "
        "(`robaudit harden`: a NaN-guarded Clip after each layer) or quantize the model to int8"
    )


# --------------------------------------------------------------------------- failure model

#: Failure modes that hit the stored representation: the values they send are bit positions (2^B).
STORED_MODES = ("bit_flip", "stuck_at")


@dataclass(frozen=True)
class FailureModel:
    """What a failed neuron sends (docs/method.md §2.1)."""

    #: ``crash`` or ``byzantine``.
    mode: str = "crash"
    #: [a, b]; crash is [0, 0], byzantine [−C, C] or the user's range.
    failure_range: tuple[float, float] = (0.0, 0.0)
    #: |y| ≤ Y for every neuron output, replacing the ranges (``--activation-bound``).
    activation_bound: float | None = None
    #: ``bit_flip``/``stuck_at``: the bit position (0 = least significant), None for any bit.
    bit: int | None = None
    #: ``stuck_at``: the value (0 or 1) the bit is stuck at.
    stuck: int | None = None

    @property
    def stored(self) -> bool:
        """Whether failures hit the stored representation (bit flips, stuck-at bits)."""
        return self.mode in STORED_MODES

    @property
    def count_flag(self) -> str:
        """The flag that gives this failure's per-layer counts, for messages."""
        return "--bit-flip" if self.stored else "--crash/--byzantine"

    @staticmethod
    def bit_flip(bit: int | None = None, activation_bound: float | None = None) -> FailureModel:
        """One bit of each failed neuron's stored value flipped (bit ``bit``, or any)."""
        return FailureModel("bit_flip", (0.0, 0.0), activation_bound, bit)

    @staticmethod
    def stuck_at(value: int, bit: int | None = None, activation_bound: float | None = None) -> FailureModel:
        """One bit of each failed neuron's stored value stuck at ``value`` (0 or 1)."""
        if value not in (0, 1):
            raise OptionError(f"--stuck-at must be 0 or 1, got {value}")
        return FailureModel("stuck_at", (0.0, 0.0), activation_bound, bit, value)

    @staticmethod
    def crash(activation_bound: float | None = None) -> FailureModel:
        """Crashed neurons send 0."""
        return FailureModel("crash", (0.0, 0.0), activation_bound)

    @staticmethod
    def byzantine(
        capacity: float | None = None,
        failure_range: tuple[float, float] | None = None,
        activation_bound: float | None = None,
    ) -> FailureModel:
        """Byzantine neurons send any value in [−C, C] or in the given range."""
        if failure_range is None:
            if capacity is None:
                raise OptionError("byzantine failures need --capacity C or --failure-range A,B")
            if not capacity > 0 or not np.isfinite(capacity):
                raise OptionError(f"--capacity must be a positive finite number, got {capacity}")
            failure_range = (-float(capacity), float(capacity))
        a, b = failure_range
        if not (np.isfinite(a) and np.isfinite(b)) or a > b:
            raise OptionError(f"--failure-range must be finite A,B with A ≤ B, got {a},{b}")
        return FailureModel("byzantine", (float(a), float(b)), activation_bound)


# --------------------------------------------------------------------------- shared analysis


class Analysis:
    """Per-network quantities shared by both methods: ranges, δ, d, faulty intervals."""

    def __init__(self, network: Network, failure: FailureModel, synapses: Sequence[int] | None = None):
        self.network = network
        self.failure = failure
        self.hidden = network.hidden_layers
        self.synapses = list(synapses) if synapses is not None else [0] * len(self.hidden)
        recurrent = [la.name for la, s in zip(self.hidden, self.synapses, strict=False) if s and la.tied]
        if recurrent:
            raise OptionError(
                f"--synapse: synapse failures are not modelled for recurrent layers ('{recurrent[0]}'); "
                "their hidden units' failures are"
            )
        self.deltas = [float(np.max(self.neuron_deltas(la, *self._site_paper_range(la)))) for la in self.hidden]
        self.synapse_ds = [self._synapse_d(la) for la in self.hidden]
        self._faulty: dict[str, Interval] | None = None
        if network.rounding:  # a value that fails may push a float16 cast past its largest value (§1.2)
            radii = faulty_radii(network.steps, self.faulty())
            if radii:  # a dynamic quantization step grows with the faulty tensor (§11)
                self.network = replace(network, rounding={**network.rounding, **radii})

    def paper_range(self, value: str) -> tuple[float, float]:
        """[ylo, yhi] of a value for the paper method: activation range or IBP (docs/method.md §2.1), narrowed by
        ``--activation-bound`` Y to [−Y, Y] but never widened by it."""
        net = self.network
        if value in net.input_boxes:
            box = net.input_boxes[value]
            return float(box.lo.min()), float(box.hi.max())
        lo, hi = self._computed_range(value)
        if self.failure.activation_bound is not None:
            y = self.failure.activation_bound
            return float(np.clip(lo, -y, y)), float(np.clip(hi, -y, y))
        return lo, hi

    def _site_paper_range(self, layer: Layer) -> tuple[float, float]:
        """[ylo, yhi] of a failure site: its output's, joined over every time step of a recurrent
        layer (a failed unit fails at every step: docs/method.md §14.2)."""
        ranges = [self.paper_range(value) for value in site_values(layer)]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def _computed_range(self, value: str) -> tuple[float, float]:
        for layer in self.network.layers:
            if layer.output_value == value and layer.activation_range is not None:
                return layer.activation_range
        box = self.network.clean[value]
        return float(box.lo.min()), float(box.hi.max())

    def neuron_deltas(self, layer: Layer, ylo, yhi) -> np.ndarray:
        """δ per neuron (N_l) given the clean range [ylo, yhi] (per neuron or one for the layer):
        the failure model's range, through the Clip that protects the layer if any, or the
        stored-value fault's δ (docs/method.md §2.1, §1.3, §2.3); UNBOUNDED when none is finite."""
        failure, guard = self.failure, self.network.protections.get(layer.output_value)
        protection = None if guard is None else (guard.low, guard.high)
        if not failure.stored:
            delta = protected_delta(failure.failure_range, ylo, yhi, protection)
        elif layer.codes is not None:
            delta = integer_bit_delta(layer.codes, failure.bit, ylo, yhi, protection)
        else:
            nan_safe = guard is not None and guard.nan_safe
            delta = float_bit_delta(failure.bit, ylo, yhi, protection, nan_safe, layer.word, failure.stuck)
        values = np.asarray(delta, np.float64)
        return values.reshape(-1) if values.ndim else np.full(layer.neurons, float(values))

    def carried(self, failed: int) -> int:
        """Failed neurons that also pass on their input's deviation (added to N_l − f_l in the paper
        recursion): a flipped bit changes the stored, already deviated value (docs/method.md §2.3)."""
        return failed if self.failure.stored else 0

    def carry_factor(self, failures: Sequence[int]) -> float:
        """The product of 1 + 2^(B−m) over the float layers with failures but the one where it is least, for
        a mantissa bit B < m of each layer's word (m = 23 for float32, 10 for float16): a flip changes ỹ by up to
        2^(B−m)·|ỹ|, and |ỹ| exceeds |y| by the deviation it already carries, which the first layer to fail has
        none of. The sign, a cleared exponent bit and any bit stuck at 0 (whose δ is at least |y|max: a cleared
        bit of the magnitude leaves ỹ' between 0 and ỹ) carry it unchanged (docs/method.md §2.3)."""
        failure = self.failure
        if not failure.stored:
            return 1.0
        factors = []
        for la, f in zip(self.hidden, failures, strict=True):
            if f and la.codes is None:
                m = la.word.mantissa_bits
                bit = failure.bit
                # any bit flipped or set: unbounded, or the guard's δ, which no carried deviation passes; any bit
                # stuck at 0: |ỹ' − y| ≤ max(|y|, |ỹ − y|) (magnitude bits) or ≤ |ỹ − y| + 2·max(0, −y) (the sign)
                gain = 1.0 + 2.0 ** (bit - m) if bit is not None and bit < m else 1.0
                # a recurrent layer's flips repeat at each of its time steps, each carrying the earlier ones (§14.2)
                factors += [gain] * (1 + len(la.tied))
        return math.prod(sorted(factors)[1:])

    def unbounded(self) -> list[str]:
        """Names of the hidden layers whose failed neurons have no finite δ."""
        return [la.name for la, d in zip(self.hidden, self.deltas, strict=True) if d >= UNBOUNDED_REPORTED]

    def neuron_ranges(self, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        """Per-neuron [lo, hi] of a layer's output (tight method), joined over the time steps of a
        recurrent layer (docs/method.md §14.2); ``--activation-bound`` Y only narrows it."""
        boxes = [self.network.clean[value] for value in site_values(layer)]
        lo = np.min([box.lo.reshape(-1) for box in boxes], axis=0)
        hi = np.max([box.hi.reshape(-1) for box in boxes], axis=0)
        if self.failure.activation_bound is not None:
            y = self.failure.activation_bound
            return np.clip(lo, -y, y), np.clip(hi, -y, y)
        return lo, hi

    def _synapse_d(self, layer: Layer) -> float:
        """d of one failed synapse into ``layer``; into a sum layer, the largest of its summands' (its synapses
        are theirs, each moving the sum, its pre-activation, by at most its own d: docs/method.md §1.4)."""
        if layer.summands:
            return max(self._synapse_d(part) for part in layer.summands)
        y_lo, y_hi = self.paper_range(layer.input_value)
        return synapse_delta(self.failure.failure_range, *layer.weight_range, y_lo, y_hi)

    def faulty(self) -> dict[str, Interval]:
        """Intervals of every value when every hidden neuron may fail (sound for all failure sets)."""
        if self._faulty is None:
            self._faulty = self._faulty_intervals()
        return self._faulty

    def faulty_if_computed(self) -> dict[str, Interval] | None:
        """:meth:`faulty` when some bound has already asked for it (no pass of its own), else None."""
        return self._faulty

    def faulty_ibp(self) -> dict[str, Interval]:
        """The faulty intervals by IBP alone when :meth:`faulty` has not run (one interval pass; on a chain
        the same boxes, docs/method.md §5.3)."""
        return self._faulty if self._faulty is not None else self._faulty_intervals("ibp")

    def _faulty_intervals(self, method: str | None = None) -> dict[str, Interval]:
        """IBP of the input box with every hidden layer's output widened by the failure range
        (and pre-activations by s·d for failed synapses), for chains too: the slopes of the
        tight method need each pre-activation's faulty range (docs/method.md §4.3)."""
        net = self.network
        a, b = self.failure.failure_range
        widen: dict[str, SiteRange] = {value: (a, b) for la in self.hidden for value in site_values(la)}
        radius = {
            la.preact_value: s * d for la, s, d in zip(self.hidden, self.synapses, self.synapse_ds, strict=True) if s
        }
        relative: dict[str, FlipTerms] = {}
        if self.failure.stored:  # a flipped value lies within δ of the (faulty) stored one (docs/method.md §2.3)
            widen = {}
            toward_zero = self.failure.stuck == 0  # and a bit stuck at 0 only moves a float toward 0 or to |v|
            for la, d in zip(self.hidden, self.deltas, strict=True):
                terms, guarded = self.float_flip_terms(la), self.guarded_range(la)
                for value in site_values(la) if d < UNBOUNDED_REPORTED else ():
                    if guarded is not None:  # the guard's [low, high], as a failed neuron's value (§2.3)
                        shape = net.clean[value].shape
                        widen[value] = (_shaped(guarded[0], shape), _shaped(guarded[1], shape))
                    elif terms is None:
                        radius[value] = d
                    else:  # the sign bit (flipped or stuck) only mirrors the value: ỹ' ∈ hull(box, −box)
                        relative[value] = (*terms, toward_zero, self.failure.bit == la.word.sign_bit)
        boxes = faulty_ranges(net, widen, radius, method, relative=relative)
        refuse_float32_overflow(net, boxes)
        return boxes

    def stored_values_bounded(self) -> bool:
        """Whether every value a flipped (or stuck) bit can leave at a failure site lies in the site's faulty box
        (:meth:`faulty`): a finite δ in every hidden layer, from integer codes or a float mantissa or sign bit —
        not an exponent bit, whose value may be ±Inf or NaN before a guard (docs/method.md §2.3, §4.1)."""
        return self.failure.stored and all(
            d < UNBOUNDED_REPORTED
            and (la.codes is not None or self.float_flip_terms(la) is not None or self.guarded_range(la) is not None)
            for la, d in zip(self.hidden, self.deltas, strict=True)
        )

    def guarded_range(self, layer: Layer) -> tuple[float | np.ndarray, float | np.ndarray] | None:
        """[low, high] of the NaN-guarded Clip that is the only reader of ``layer``'s output (what ``harden`` writes),
        where the stored-value fault may leave ±Inf or NaN there (an exponent bit flipped or set); None elsewhere.

        Whatever the word then holds, the guard maps it to a value of [low, high] and nothing else reads it, so the
        network computes what it would with that value itself at the site: a failed neuron acts as one sending a
        value of [low, high] (docs/method.md §2.3, "Guarded sites"). Floats, or per neuron (flat, N_l)."""
        if not self.failure.stored or layer.codes is not None or layer.tied or self.float_flip_terms(layer) is not None:
            return None
        guard = self.network.protections.get(layer.output_value)
        if guard is None or not guard.nan_safe:
            return None
        return guard.low, guard.high

    def flip_radius(self, layer: Layer, stored: Interval) -> np.ndarray:
        """Per neuron (flat), r_i with |ỹ'_i − ỹ_i| ≤ r_i for a stored value ỹ_i in the box ``stored`` and its
        flipped (or stuck) bit (docs/method.md §2.3): c·|ỹ|max + t for a float mantissa or sign bit, 2^B·s for
        bit B of integer codes, the farther end of the code range for any bit of them; at a guarded site
        (:meth:`guarded_range`), the farther end of the guard's [low, high] from ỹ's box.

        Raises:
            ValueError: a float bit that may leave ±Inf or NaN (no finite radius: :meth:`stored_values_bounded` is
                false).
        """
        lo, hi = stored.lo.reshape(-1), stored.hi.reshape(-1)
        if layer.codes is not None:
            scale, zp, qmin, qmax = layer.codes
            if self.failure.bit is not None:
                return 2.0**self.failure.bit * np.abs(scale) * np.ones_like(lo)
            return np.maximum((qmax - zp) * scale - lo, hi - (qmin - zp) * scale)
        guarded = self.guarded_range(layer)
        if guarded is not None:  # the value the guard outputs, within [low, high] (docs/method.md §2.3)
            return np.maximum(np.abs(guarded[1] - lo), np.abs(hi - guarded[0]))
        terms = self.float_flip_terms(layer)
        if terms is None:
            raise ValueError(f"layer '{layer.name}': this bit may leave ±Inf or NaN, no finite flip radius")
        return terms[0] * np.maximum(np.abs(lo), np.abs(hi)) + terms[1]

    def float_flip_terms(self, layer: Layer) -> tuple[float, float] | None:
        """(c, t) with |ỹ' − ỹ| ≤ c·|ỹ| + t for the flipped (or stuck) bit of a stored float ỹ — the *faulty*
        stored value, which may lie outside the clean range (docs/method.md §2.3): 2^(B−m) and 2^B times the
        subnormal spacing for a mantissa bit B < m, (2, 0) for the sign, (1, 0) for an exponent bit stuck at 0 (any
        bit stuck at 0: the largest of these); None for integer codes (their δ does not depend on the value) and
        where the value may not stay finite (no finite δ, or the guard's)."""
        bit, word, stuck = self.failure.bit, layer.word, self.failure.stuck
        if not self.failure.stored or layer.codes is not None or not stays_finite(word, bit, stuck):
            return None
        if bit is None:  # stuck at 0: the sign's 2|ỹ| is the largest c, the top mantissa bit's t the largest t
            return 2.0, 2.0 ** (word.mantissa_bits - 1) * word.subnormal_step
        if bit < word.mantissa_bits:
            return 2.0 ** (bit - word.mantissa_bits), 2.0**bit * word.subnormal_step
        return (2.0, 0.0) if bit == word.sign_bit else (1.0, 0.0)

    @property
    def ranges_known(self) -> bool:
        """Whether per-neuron slopes may be used (not under ``--activation-bound``: the global K is kept there)."""
        return self.failure.activation_bound is None

    def context(self, use_ranges: bool = False) -> PropagationContext:
        """What op rules may look up while propagating deviations (``use_ranges``: docs/method.md §4.3)."""
        use = use_ranges and self.ranges_known
        # without ranges a chain's rules never read the faulty intervals (only two-variable products do)
        # (nor do they unless an op's bound reads faulty ranges: normalization, inner Softmax, §13)
        net = self.network
        faulty = self.faulty() if use or not net.is_chain() or _range_dependent(net) else net.clean
        return PropagationContext(self.network.clean, faulty, self.network.constants, use, net.sigma_floors)


#: The largest finite float32 value: past it a float32 model's arithmetic gives ±inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def refuse_float32_overflow(network: Network, boxes: dict[str, Interval]) -> None:
    """Refuse a float32 model one of whose values may pass float32's largest value under failures (the faulty
    ``boxes``): onnxruntime then computes ±inf where the bounds, in float64, stay finite (docs/method.md §10.2).

    Raises:
        RoundingOverflowError: the first such value, named.
    """
    if any(info.elem_type == onnx.TensorProto.DOUBLE for info in network.graph.inputs):
        return
    for name, box in boxes.items():
        if max(float(np.max(np.abs(box.lo))), float(np.max(np.abs(box.hi)))) > FLOAT32_MAX:
            raise RoundingOverflowError(
                f"'{name}' may exceed the largest float32 value ({FLOAT32_MAX:.4g}) on the input range or under "
                "failures, where it overflows to ±inf: a narrower --input-range, a smaller --capacity, or a Clip "
                "(robaudit harden) keeps it finite"
            )


def _shaped(bound: float | np.ndarray, shape: tuple[int, ...]) -> float | np.ndarray:
    """A guard's end (a float, or flat per neuron) in a value's ``shape``."""
    return bound if np.ndim(bound) == 0 else np.reshape(bound, shape)


def site_values(layer: Layer) -> list[str]:
    """The values a failure site's failed neurons replace: its output, and for a recurrent layer its
    hidden state at every later time step too (docs/method.md §14.1)."""
    return [layer.output_value] + [member.output_value for member in layer.tied]


def tied_index(hidden: Sequence[Layer]) -> dict[int, int]:
    """id(layer) → index of its failure site, for the later time steps of recurrent layers."""
    return {id(member): i for i, la in enumerate(hidden) for member in la.tied}


def _range_dependent(net: Network) -> bool:
    """Whether an op's deviation bound reads faulty ranges (normalization, inner Softmax; docs/method.md §13)."""
    return any(isinstance(s, Node) and getattr(rule_for(s), "range_dependent", False) for s in net.steps)


def _node_coefficients(node: Node, ctx: PropagationContext) -> list[list[float]]:
    """The paper rule of ``node`` is linear in its input errors: its matrix, per output."""
    rule = rule_for(node)
    variable = [i for i, v in enumerate(node.inputs) if v and ctx.is_variable(v)]
    columns = []
    for i in range(len(node.inputs)):
        if i not in variable:
            columns.append([0.0] * len(node.outputs))
            continue
        errs = [1.0 if j == i else (0.0 if j in variable else None) for j in range(len(node.inputs))]
        columns.append([float(x) for x in rule.paper(node, errs, ctx)])
    return [[columns[i][o] for i in range(len(node.inputs))] for o in range(len(node.outputs))]


# --------------------------------------------------------------------------- paper method


class PaperBound:
    """Fep of docs/method.md §3.1 over the layer graph; errors of branch inputs add up."""

    name = "paper"

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.network = analysis.network
        self._coefficients: dict[str, list[list[float]]] = {}
        #: :meth:`fep` and :meth:`fep_upto` per vector asked (the searches ask for some again: docs/method.md §4.4)
        self._feps: dict[tuple[bool, tuple[int, ...]], float] = {}

    def _coeffs(self, node: Node, ctx) -> list[list[float]]:
        if node.name not in self._coefficients:
            self._coefficients[node.name] = _node_coefficients(node, ctx)
        return self._coefficients[node.name]

    def propagate(self, layer_error) -> float | np.ndarray:
        """Run the forward recursion; ``layer_error(i, layer, e_in)`` gives E of hidden layer i."""
        net, ctx = self.network, self.analysis.context()
        errors: dict = dict.fromkeys(net.input_boxes, 0.0)
        hidden_index = {id(la): i for i, la in enumerate(self.analysis.hidden)}
        hidden_index.update(tied_index(self.analysis.hidden))  # a recurrent state fails with its site
        for step in net.steps:
            if isinstance(step, Layer):
                e_in = errors.get(step.input_value, 0.0)
                site = hidden_index.get(id(step))
                if step.is_output:
                    errors[step.output_value] = step.lipschitz * step.max_abs_weight * e_in
                elif site is None:  # a recurrent cell's gate: no failures, E_l of §3.1 with f_l = 0
                    errors[step.output_value] = step.fanout * step.lipschitz * step.max_abs_weight * e_in
                else:
                    errors[step.output_value] = layer_error(site, step, e_in)
                own = site is not None and self.analysis.synapses[site] > 0
                out = step.output_value
                errors[out] = _add_rounding(net, out, [e_in], errors[out], own)
                continue
            errs = [errors.get(v, 0.0) if v else 0.0 for v in step.inputs]
            for out, row in zip(step.outputs, self._coeffs(step, ctx), strict=True):
                errors[out] = _add_rounding(net, out, errs, sum(c * e for c, e in zip(row, errs, strict=True) if c))
        end = errors.get(net.tail_start, 0.0)
        return end * net.tail_factor + np.where(np.asarray(end) > 0, net.tail_rounding, 0.0)

    def fep(self, failures: Sequence[int]) -> float:
        """Fep for exactly ``failures[l]`` failed neurons in hidden layer l."""
        return self._remembered(False, failures)

    def fep_upto(self, failures: Sequence[int]) -> float:
        """The largest Fep over all vectors g ≤ failures (E_l is piecewise linear in g_l)."""
        return self._remembered(True, failures)

    def _remembered(self, upto: bool, failures: Sequence[int]) -> float:
        """:meth:`_fep` or :meth:`_fep_upto` of ``failures``, computed once per vector."""
        key = (upto, tuple(int(f) for f in failures))
        found = self._feps.get(key)
        if found is None:
            found = self._fep_upto(failures) if upto else self._fep(failures)
            self._feps[key] = found
        return found

    def _fep(self, failures: Sequence[int]) -> float:
        an = self.analysis

        def layer_error(i, la, e_in):
            return paper_layer_error(
                e_in,
                failures[i],
                an.deltas[i],
                la.neurons + an.carried(failures[i]),
                la.fanout,
                la.lipschitz,
                la.max_abs_weight,
                an.synapses[i],
                an.synapse_ds[i],
            )

        return float(self.propagate(layer_error)) * an.carry_factor(failures)

    def _fep_upto(self, failures: Sequence[int]) -> float:
        an = self.analysis

        def layer_error(i, la, e_in):
            f = failures[i]
            candidates = {0, f, min(f, max(0, la.neurons - la.fanout))}
            return max(
                paper_layer_error(
                    e_in,
                    g,
                    an.deltas[i],
                    la.neurons + an.carried(g),
                    la.fanout,
                    la.lipschitz,
                    la.max_abs_weight,
                    an.synapses[i],
                    an.synapse_ds[i],
                )
                for g in candidates
            )

        return float(self.propagate(layer_error)) * an.carry_factor(failures)

    def total_curve(self, budget: int) -> np.ndarray:
        """C[F] ≥ Fep of every distribution of at most F failures, F = 0..budget (DP over layers)."""
        an = self.analysis
        if any(la.tied for la in an.hidden):
            return self._uniform_envelope(budget)

        def layer_error(i, la, e_in):
            e_in = np.broadcast_to(np.asarray(e_in, dtype=np.float64), (budget + 1,))
            best = np.full(budget + 1, -np.inf)
            for g in range(min(budget, la.neurons) + 1):
                value = paper_layer_error(
                    e_in[: budget + 1 - g],
                    g,
                    an.deltas[i],
                    la.neurons + an.carried(g),
                    la.fanout,
                    la.lipschitz,
                    la.max_abs_weight,
                    an.synapses[i],
                    an.synapse_ds[i],
                )
                best[g:] = np.maximum(best[g:], value)
            return np.maximum.accumulate(best)

        curve = np.broadcast_to(np.asarray(self.propagate(layer_error), dtype=np.float64), (budget + 1,))
        return np.maximum.accumulate(curve) * an.carry_factor([budget] * len(an.hidden))

    def _uniform_envelope(self, budget: int) -> np.ndarray:
        """C[F] = fep_upto(min(F, N_l) in every layer): every distribution of at most F failures has
        g_l ≤ min(F, N_l). Used when a recurrent layer's failures repeat at every time step, where
        the dynamic programme (one budget share per step) would not hold (docs/method.md §14.2)."""
        an = self.analysis
        total = np.arange(budget + 1)

        def layer_error(i, la, e_in):
            f = np.minimum(total, la.neurons)
            best = None
            for g in (np.zeros_like(f), f, np.minimum(f, max(0, la.neurons - la.fanout))):
                carried = np.minimum(la.fanout, la.neurons + an.carried(g) - g) * la.lipschitz * la.max_abs_weight
                value = g * an.deltas[i] + an.synapses[i] * la.lipschitz * an.synapse_ds[i] + carried * e_in
                best = value if best is None else np.maximum(best, value)
            return best

        curve = np.broadcast_to(np.asarray(self.propagate(layer_error), dtype=np.float64), (budget + 1,))
        return np.maximum.accumulate(curve) * an.carry_factor([budget] * len(an.hidden))


# --------------------------------------------------------------------------- rounding (docs/method.md §1.2)


def _add_rounding(net: Network, value: str, e_inputs: list, error, always: bool = False):
    """E plus N·ρ (the sum of the value's rounding radii) wherever an input deviates (E_in > 0)."""
    radius = net.rounding.get(value)
    if radius is None:
        return error
    deviates = np.zeros(np.shape(error), dtype=bool) | bool(always)
    for e in e_inputs:
        deviates = deviates | (np.asarray(e) > 0)
    return error + np.where(deviates, float(radius.sum()), 0.0)


def rounding_sources(net: Network) -> dict[str, tuple[set[int], int | None]]:
    """Per rounding value: the hidden layers (0-based) whose failures make its input deviate,
    and the layer it belongs to (whose failed synapses make it deviate too), if any."""
    index = {id(la): i for i, la in enumerate(net.hidden_layers)}
    reach: dict[str, set[int]] = {}
    sources: dict[str, tuple[set[int], int | None]] = {}
    for step in net.steps:
        if isinstance(step, Layer):
            upstream, own = reach.get(step.input_value, set()), index.get(id(step))
            reach[step.output_value] = upstream | ({own} if own is not None else set())
            sources[step.output_value] = (upstream, own)
            continue
        upstream = set().union(*(reach.get(v, set()) for v in step.inputs))
        for out in step.outputs:
            reach[out] = upstream
            sources[out] = (upstream, None)
    return {v: sources.get(v, (set(), None)) for v in net.rounding}


class FepBound(Protocol):
    """A sound bound on the output error of failure vectors (docs/method.md §3, §4).

    Implemented by :class:`~robaudit.bounds.fep.PaperBound`,
    :class:`~robaudit.bounds.fep.TightBound` and every :class:`Bound`.
    """

    @property
    def analysis(self) -> Analysis:
        """The ranges, δ and d the bound is built on."""
        ...

    def fep(self, failures: Sequence[int]) -> float:
        """Bound on max_k |ΔF_k| for exactly ``failures[l]`` failed neurons in hidden layer l."""
        ...

    def fep_upto(self, failures: Sequence[int]) -> float:
        """Bound over every vector g ≤ ``failures`` (element-wise)."""
        ...

    def total_curve(self, budget: int) -> np.ndarray:
        """C[F], F = 0..budget: bound over every distribution of at most F failures; non-decreasing."""
        ...


def max_single_layer(method: FepBound, layer_index: int, neurons: int, epsilon: float) -> int:
    """Largest f with Fep ≤ ε when only hidden layer ``layer_index`` fails (binary search, docs/method.md §6.1)."""
    count = len(method.analysis.hidden)

    def ok(f: int) -> bool:
        vector = [0] * count
        vector[layer_index] = f
        return within(method.fep_upto(vector), epsilon)

    return _largest_true(ok, neurons)


def max_uniform(method: FepBound, epsilon: float) -> int:
    """Largest f such that f failures (capped at N_l) in every hidden layer keep Fep ≤ ε (docs/method.md §6.2)."""
    hidden = method.analysis.hidden
    limit = max((la.neurons for la in hidden), default=0)
    return _largest_true(lambda f: within(method.fep_upto([min(f, la.neurons) for la in hidden]), epsilon), limit)


def max_total(method: FepBound, epsilon: float) -> tuple[int, bool]:
    """Largest F such that every distribution of F failures keeps Fep ≤ ε; (F, exact?) (docs/method.md §6.3)."""
    total_neurons = sum(la.neurons for la in method.analysis.hidden)
    budget = min(64, total_neurons)
    while True:
        found = largest_within(method.total_curve(budget), epsilon)
        if found < budget or budget >= total_neurons:
            return max(found, -1), True
        if budget >= MAX_TOTAL_BUDGET:
            return budget, False
        budget = min(budget * 4, total_neurons, MAX_TOTAL_BUDGET)


def _largest_true(ok: Callable[[int], bool], limit: int) -> int:
    """Largest x in [0, limit] with ok(x), ok monotone decreasing; −1 when ok(0) fails.

    x = 1 is tried first: on deep networks most layers tolerate no failure at all, which
    then takes two evaluations instead of log2(limit). Then 2, 4, 8, … until one fails (or the
    limit), and bisection below it: no count past twice the answer is asked for (the tight
    bound keeps few values per output on a large network and runs its pass again for more:
    docs/method.md §4.4). The answer is the same.
    """
    if not ok(0):
        return -1
    if limit >= 1 and not ok(1):
        return 0
    lo, hi = min(1, limit), limit
    while lo < hi:  # ok(lo) holds
        probe = min(2 * lo, hi)
        if not ok(probe):
            hi = probe - 1
            break
        lo = probe
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
