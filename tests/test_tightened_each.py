"""The tightening of docs/method.md §5.6 computed per origin on the elements its deviation reaches.

* κ_i(λ, S) of a two-block convolutional residual network (5×5 planes, so a stem neuron's deviation reaches
  part of each plane and the second block's pre-gate boxes are tightened) written again in numpy — every
  convolution as a matrix built here by its own loops, random chord slopes at vertices and inside their box,
  random zeroed sets of at most f_m neurons per later failing layer — lies in the enclosure of
  :class:`TightenedDeviations`, with and without later failures;
* that enclosure is the one of the whole-plane back-substitution (:meth:`GatedDeviations._refined`, every
  origin's rows through every element, no one-point evaluation) to rounding;
* the relaxation's two matrix-vector products give what the choice of line by sign gives;
* caught by the comparison: a reached element dropped from the coefficients, and the one-point pre-gate values
  shrunk by 10 % (the κ check does not see a 10 % change of these boxes on this network: its enclosures have
  room; on the dense residual network of ``tests/test_tightened_signed.py``, which runs the same per-origin
  pass, it does).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_signed_residual import _bound, _save

from robaudit.bounds import tightened
from robaudit.bounds.fep import FailureModel
from robaudit.bounds.relational import GatedDeviations, _relax
from robaudit.bounds.tightened import TightenedDeviations

SIDE, CHANNELS = 5, 2
#: Failure counts of layers 2-5 (after the stem, whose neurons are the origins).
LATER = ([0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1])


def _two_blocks(rng: np.random.Generator, scale: float, dense_head: bool = False):
    """x[1, 5, 5] → s0 = relu(conv0 x) → h1 = relu(conv1 s0) → h2 = conv2 h1 → r1 = relu(s0 + h2) →
    h3 = relu(conv3 r1) → h4 = conv4 h3 → r2 = relu(r1 + h4) → GlobalAveragePool → Flatten → y = fc
    (3×3 kernels, padding 1; sites s0, h1-h4); with ``dense_head``, Flatten → h5 = relu(fc5 ·) →
    h6 = relu(fc6 h5) → y = fc (sites h5, h6: h6's rows meet h5's gate, then the reshape and the reduction)."""
    nodes, inits = [], []

    def conv(name: str, x: str, c_in: int, out: str) -> None:
        w = rng.normal(0.0, scale / np.sqrt(9 * c_in), (CHANNELS, c_in, 3, 3))
        inits.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                      numpy_helper.from_array(rng.normal(0.0, 0.3, CHANNELS).astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1, 1, 1, 1]))

    conv("conv0", "x", 1, "z0")
    nodes.append(helper.make_node("Relu", ["z0"], ["s0"], name="act0"))
    conv("conv1", "s0", CHANNELS, "z1")
    nodes.append(helper.make_node("Relu", ["z1"], ["h1"], name="act1"))
    conv("conv2", "h1", CHANNELS, "h2")
    nodes += [helper.make_node("Add", ["s0", "h2"], ["a1"], name="add1"),
              helper.make_node("Relu", ["a1"], ["r1"], name="merge1")]
    conv("conv3", "r1", CHANNELS, "z3")
    nodes.append(helper.make_node("Relu", ["z3"], ["h3"], name="act3"))
    conv("conv4", "h3", CHANNELS, "h4")
    nodes += [helper.make_node("Add", ["r1", "h4"], ["a2"], name="add2"),
              helper.make_node("Relu", ["a2"], ["r2"], name="merge2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat")]
    last, width = "f", CHANNELS
    if dense_head:
        for n in (5, 6):
            inits.extend([numpy_helper.from_array(rng.normal(0.0, 1.0, (3, width)).astype(np.float32), f"fc{n}_w"),
                          numpy_helper.from_array(rng.normal(0.0, 0.3, 3).astype(np.float32), f"fc{n}_b")])
            nodes += [helper.make_node("Gemm", [last, f"fc{n}_w", f"fc{n}_b"], [f"z{n}"], name=f"fc{n}", transB=1),
                      helper.make_node("Relu", [f"z{n}"], [f"h{n}"], name=f"act{n}")]
            last, width = f"h{n}", 3
    inits.extend([numpy_helper.from_array(rng.normal(0.0, 1.0, (2, width)).astype(np.float32), "fc_w"),
                  numpy_helper.from_array(np.zeros(2, np.float32), "fc_b")])
    nodes.append(helper.make_node("Gemm", [last, "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "two_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    return make_model(graph)


def _conv_matrix(w: np.ndarray) -> np.ndarray:
    """A 3×3 convolution with padding 1 on SIDE×SIDE planes as a matrix [(c_out, r, c), (c_in, r', c')]."""
    c_out, c_in = w.shape[:2]
    matrix = np.zeros((c_out, SIDE, SIDE, c_in, SIDE, SIDE))
    for r in range(SIDE):
        for c in range(SIDE):
            for i in range(3):
                for j in range(3):
                    rr, cc = r + i - 1, c + j - 1
                    if 0 <= rr < SIDE and 0 <= cc < SIDE:
                        matrix[:, r, c, :, rr, cc] = w[:, :, i, j]
    return matrix.reshape(c_out * SIDE * SIDE, c_in * SIDE * SIDE)


@functools.cache
def _model(seed: int, dense_head: bool = False):
    """The model of draw ``seed`` and its bound (built once per draw)."""
    model = _two_blocks(np.random.default_rng(seed), 2.5, dense_head)
    with tempfile.TemporaryDirectory() as tmp:
        return model, _bound(_save(model, Path(tmp)), FailureModel.crash())


def _setup(seed: int, counts: list[int], gated=TightenedDeviations, dense_head: bool = False):
    """The model's bound, its [lower, upper] of κ for every stem origin, and what numpy needs."""
    rng = np.random.default_rng(seed + 100)
    model, bound = _model(seed, dense_head)
    signed = bound.signed
    assert signed is not None and signed.hulls is not None
    hidden = bound.analysis.hidden
    failing = {id(hidden[j + 1]): f for j, f in enumerate(counts) if f > 0}
    lower, upper = gated(bound.network, signed.exact_slopes, signed.hulls, failing).coefficient_bounds(hidden[0])
    return model, signed, lower, upper, rng


def _kappa_outside(seed: int, counts: list[int], gated=TightenedDeviations, trials: int = 300) -> bool:
    """Whether some κ(λ, S) ([outputs, origins], numpy) falls outside the enclosure of ``gated``."""
    model, signed, lower, upper, rng = _setup(seed, counts, gated)
    weights = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    w1, w2, w3, w4 = (_conv_matrix(weights[f"conv{n}_w"]) for n in (1, 2, 3, 4))
    n = CHANNELS * SIDE * SIDE
    pool = np.kron(np.eye(CHANNELS), np.full((1, SIDE * SIDE), 1.0 / (SIDE * SIDE)))
    head = weights["fc_w"] @ pool
    hull = {v: (box.lo.ravel(), box.hi.ravel()) for v, box in signed.hulls.items()}
    boxes = [(np.where(hull[v][0] >= 0, 1.0, 0.0), np.where(hull[v][1] > 0, 1.0, 0.0))  # ReLU chord slopes
             for v in ("z1", "a1", "z3", "a2")]
    for trial in range(trials):
        lam1, lam_r1, lam3, lam_r2 = (
            np.where(rng.random(n) < 0.5, lo, hi) if trial % 2 else lo + (hi - lo) * rng.random(n) for lo, hi in boxes
        )
        keep = []
        for f in counts:  # at most f_m zeroed gates in each later failing layer
            mask = np.ones(n)
            mask[rng.permutation(n)[: rng.integers(0, f + 1)]] = 0.0
            keep.append(mask[:, None])
        d1, d2, d3, d4 = keep
        block1 = np.eye(n) + d2 * (w2 @ (d1 * (lam1[:, None] * w1)))
        block2 = np.eye(n) + d4 * (w4 @ (d3 * (lam3[:, None] * w3)))
        kappa = head @ (lam_r2[:, None] * block2) @ (lam_r1[:, None] * block1)
        if np.any(kappa < lower - 1e-9) or np.any(kappa > upper + 1e-9):
            return True
    return False


class _WholePlane(TightenedDeviations):
    """The reference: every origin's rows through every element of every plane, no one-point evaluation."""

    def _refined_each(self, origin, before, gates, step, lo, hi):
        return GatedDeviations._refined(self, origin, before, gates, step, lo, hi)

    def _note_point(self, value, lo, hi):
        self._pregates[value] = (lo, hi)


class _ReachDropped(TightenedDeviations):
    """Weakened copy: the first element each origin's rows reach through a layer's weights is dropped."""

    def _each_adjoint(self, layer, coef, out, into):
        moved = super()._each_adjoint(layer, coef, out, into)
        moved[:, :1] = 0.0
        return moved


class _PointShrunk(TightenedDeviations):
    """Weakened copy: every one-point pre-gate value shrunk by 10 %."""

    def _note_point(self, value, lo, hi):
        super()._note_point(value, lo, hi)
        if value in self._points:
            self._points[value] = 0.9 * lo


@pytest.mark.parametrize("counts", LATER)
def test_tightened_coefficients_hold_every_slope_and_zeroed_set(counts):
    assert not _kappa_outside(0, counts, trials=200), counts


@pytest.mark.parametrize("counts", LATER[:2])
def test_per_origin_enclosures_are_the_whole_plane_ones(counts):
    for seed in range(1):
        _, _, lower, upper, _ = _setup(seed, counts)
        _, _, low_ref, up_ref, _ = _setup(seed, counts, _WholePlane)
        _, _, low_plain, up_plain, _ = _setup(seed, counts, _without_refine)
        assert _same(lower, low_ref) and _same(upper, up_ref)
        assert np.any(upper < up_plain - 1e-6) or np.any(lower > low_plain + 1e-6)  # the tightening did something


@pytest.mark.parametrize("counts", [[1, 0, 1, 0, 1, 0]])
def test_per_origin_enclosures_behind_a_reduction_and_without_dense_weights(counts, monkeypatch):
    """A gate behind GlobalAveragePool and Flatten (their rule's adjoint on the reached elements), and every layer
    through its adjoint on whole planes instead of dense weights: still the whole-plane enclosures."""
    _, _, low_ref, up_ref, _ = _setup(0, counts, _WholePlane, dense_head=True)
    _, _, low_plain, up_plain, _ = _setup(0, counts, _without_refine, dense_head=True)
    assert np.any(up_ref < up_plain - 1e-6) or np.any(low_ref > low_plain + 1e-6)
    _, _, lower, upper, _ = _setup(0, counts, dense_head=True)
    assert _same(lower, low_ref) and _same(upper, up_ref)
    monkeypatch.setattr(tightened, "DENSE_ENTRIES", 0)
    _, _, lower, upper, _ = _setup(0, counts, dense_head=True)
    assert _same(lower, low_ref) and _same(upper, up_ref)


def _same(found: np.ndarray, reference: np.ndarray) -> bool:
    """Equal to rounding (the two passes sum in different orders)."""
    return bool(np.allclose(found, reference, rtol=1e-9, atol=1e-12))


def _without_refine(*args) -> TightenedDeviations:
    gated = TightenedDeviations(*args)
    gated.refine = False
    return gated


@pytest.mark.parametrize("weakened", [_ReachDropped, _PointShrunk])
def test_weakened_per_origin_pass_is_caught_by_the_comparison(weakened):
    _, _, lower, upper, _ = _setup(0, [0, 0, 0, 0], weakened)
    _, _, low_ref, up_ref, _ = _setup(0, [0, 0, 0, 0], _WholePlane)
    assert not (_same(lower, low_ref) and _same(upper, up_ref))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 3), st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_relaxation_is_the_choice_of_line_by_sign(origins, rows, shared_rows, same_lines, seed):
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=(1 if shared_rows else origins, rows, 7)) * (rng.random((1, rows, 7)) < 0.8)
    lines = [rng.normal(size=(1 if same_lines else origins, 1, 7)) for _ in range(4)]
    lines = [np.broadcast_to(g, (origins, 1, 7)) for g in lines]
    lines[1] = lines[1] * (rng.random(7) < 0.5)  # some gates without an intercept
    carried, const = _relax(coef, tuple(lines))
    positive = coef >= 0
    low_slope, low_cut, up_slope, up_cut = lines
    expected = coef * np.where(positive, up_slope, low_slope)
    expected_const = (np.broadcast_to(coef, expected.shape) * np.where(positive, up_cut, low_cut)).sum(axis=-1)
    assert np.allclose(np.broadcast_to(carried, expected.shape), expected, rtol=1e-12, atol=1e-14)
    assert np.allclose(np.broadcast_to(const, expected_const.shape), expected_const, rtol=1e-12, atol=1e-12)
