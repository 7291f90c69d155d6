"""Clean ranges of single neurons refined by splitting the input box (docs/method.md §5.8).

* on small random residual ReLU networks (``tests/test_signed_residual.py``), the refined end of every
  pre-activation's range, both sides, holds every value onnxruntime computes there on dense samples and the
  corners of the input box, is never looser than the CROWN range and is tighter in some draws;
* a refined range shrunk by 10 % about its centre is exceeded by a sampled value (the check can fail);
* the vector's signed bound with the refined ranges stays above every fault the independent injector of
  ``tests/ort_faults.py`` produces, is never above the bound without them and is below it in some draws.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_signed_residual import _bound, _residual, _save, rule_lowers_soundly

from robaudit.bounds.fep import FailureModel
from robaudit.bounds.splitting import InputSplit

#: The residual network's layers with a pre-activation of their own (fc1 … fc4) and their ONNX names.
PREACTS = ("z1", "h2", "z3", "h4")


def _sampled(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per pre-activation, [samples, width] values onnxruntime computes on the box corners and dense samples."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    for name in PREACTS:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=3)))
    x = np.concatenate([corners, rng.uniform(0.0, 1.0, (20000, 3))]).astype(np.float32)
    found = session.run(list(PREACTS), {"x": x})
    return {name: np.asarray(v, np.float64) for name, v in zip(PREACTS, found, strict=True)}


def _refined(path, evaluations: int = 300):
    """Per layer with a pre-activation: (CROWN lo, CROWN hi, refined lo, refined hi), flattened."""
    bound = _bound(path, FailureModel.crash())
    net = bound.network
    out = {}
    for layer in net.layers:
        if layer.preact_value not in PREACTS:
            continue
        split = InputSplit(net, layer)
        box = net.clean[layer.preact_value]
        lo, hi = box.lo.reshape(-1), box.hi.reshape(-1)
        up = np.array([split.upper(i, 1.0, evaluations) for i in range(lo.size)])
        down = np.array([-split.upper(i, -1.0, evaluations) for i in range(lo.size)])
        out[layer.preact_value] = (lo, hi, down, up)
    return out


def _holds(sampled: dict, refined: dict) -> None:
    for name, (lo, hi, r_lo, r_hi) in refined.items():
        seen = sampled[name]
        # onnxruntime computes in float32: a relative 1e-6 covers its rounding
        assert np.all(seen.max(axis=0) <= r_hi + 1e-6 * (1 + np.abs(r_hi))), (name, seen.max(axis=0), r_hi)
        assert np.all(seen.min(axis=0) >= r_lo - 1e-6 * (1 + np.abs(r_lo))), (name, seen.min(axis=0), r_lo)
        assert np.all(r_hi <= hi) and np.all(r_lo >= lo), name  # never looser than CROWN


def test_refined_ranges_hold_narrow_and_a_shrunk_copy_is_caught(tmp_path):
    rng = np.random.default_rng(301)
    model = _residual(rng, 3, "dense", 2.5)
    sampled, refined = _sampled(model, rng), _refined(_save(model, tmp_path), 60)
    _holds(sampled, refined)
    narrowed, caught = False, False
    for name, (lo, hi, r_lo, r_hi) in refined.items():
        narrowed = narrowed or bool(np.any(r_hi < hi - 1e-3 * (hi - lo)) or np.any(r_lo > lo + 1e-3 * (hi - lo)))
        width = r_hi - r_lo
        s_lo, s_hi = r_lo + 0.05 * width, r_hi - 0.05 * width  # the refined range shrunk by 10 %
        seen = sampled[name]
        caught = caught or bool(np.any(seen.max(axis=0) > s_hi) or np.any(seen.min(axis=0) < s_lo))
    assert narrowed
    assert caught


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.floats(1.0, 3.0), st.integers(0, 2**31))
def test_refined_ranges_campaign(tmp_path_factory, scale, seed):
    rng = np.random.default_rng(seed)
    model = _residual(rng, 3, "dense", scale)
    _holds(_sampled(model, rng), _refined(_save(model, tmp_path_factory.mktemp("split")), 300))


def _bounds_hold(tmp_path, mode: str, seeds, vectors, monkeypatch) -> list[bool]:
    """:func:`test_signed_residual.rule_lowers_soundly` for this rule's budget."""
    return rule_lowers_soundly(tmp_path, mode, seeds, vectors, monkeypatch, "ROBAUDIT_SPLIT_BUDGET")


def test_bound_with_refined_ranges_is_sound(tmp_path, monkeypatch):
    lowered = _bounds_hold(tmp_path, "crash", [500], ([1, 1, 1, 1], [2, 0, 1, 0]), monkeypatch)
    assert any(lowered), lowered


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_bound_with_refined_ranges_campaign(tmp_path, mode, monkeypatch):
    vectors = ([1, 1, 1, 1], [2, 0, 1, 0], [1, 0, 2, 1], [0, 1, 1, 1])
    lowered = _bounds_hold(tmp_path, mode, range(600, 606), vectors, monkeypatch)
    assert any(lowered), lowered
