"""The output cut of the boxes alone on recurrent networks (docs/method.md §4.1 "The output cut", §14.2):
|F̃_k − F_k| ≤ max(h̃i_k − lo_k, hi_k − l̃o_k), the faulty box widening every time step's state.

Checked against an independent numpy forward of ONNX's GRU (gate order z, r, h; linear_before_reset 0) that
replaces the failed units' state at every step by values chosen per step: a saturated GRU attains the cut
(and the cut shrunk by 10 % is exceeded); random GRUs with random failure sets, values and inputs stay under it;
an exported GRU/LSTM classifier's bound is at most the closed form 2·max_k Σ_j |W_out[k, j]| (states in
[−1, 1], failed values in [−1, 1]) — it was 40 to 900 times that before the cut.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds import tight
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gru_model(path, w, r, b, w_out, b_out) -> None:
    """x [1, T, F] (batch 1) → Transpose → GRU (hidden H = w.shape[0] // 3) → Y_h → Reshape → MatMul + Add."""
    steps, features, hidden = 3, w.shape[1], w.shape[0] // 3
    f32 = np.float32
    inits = [
        numpy_helper.from_array(w[None].astype(f32), "W"),
        numpy_helper.from_array(r[None].astype(f32), "R"),
        numpy_helper.from_array(b[None].astype(f32), "B"),
        numpy_helper.from_array(w_out.T.astype(f32), "Wo"),
        numpy_helper.from_array(b_out.astype(f32), "bo"),
        numpy_helper.from_array(np.array([1, hidden], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["xt", "W", "R", "B"], ["", "hT"], hidden_size=hidden, name="cell"),
        helper.make_node("Reshape", ["hT", "flat"], ["h"]),
        helper.make_node("MatMul", ["h", "Wo"], ["m"], name="out"),
        helper.make_node("Add", ["m", "bo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, steps, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w_out.shape[0]])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def gru_forward(x, w, r, b, w_out, b_out, sent: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """ONNX GRU in float64, x [N, T, F]; unit j sends ``sent[j][t]`` instead of its state at step t (as read by
    the next step and by the output). Returns the outputs [N, K]."""
    hidden = w.shape[0] // 3
    (wz, wr, wh), (rz, rr, rh) = np.split(w, 3), np.split(r, 3)
    (bwz, bwr, bwh, brz, brr, brh) = np.split(b, 6)
    h = np.zeros((x.shape[0], hidden))
    for t in range(x.shape[1]):
        xt = x[:, t]
        z = _sigmoid(xt @ wz.T + h @ rz.T + bwz + brz)
        g = _sigmoid(xt @ wr.T + h @ rr.T + bwr + brr)
        n = np.tanh(xt @ wh.T + (g * h) @ rh.T + brh + bwh)
        h = (1 - z) * n + z * h
        for unit, values in (sent or {}).items():
            h[:, unit] = values[t]
    return h @ w_out.T + b_out


def _as_stored(params: tuple) -> tuple:
    """The parameters as the float32 model stores them (the bound is that model's), in float64."""
    return tuple(np.asarray(p, np.float32).astype(np.float64) for p in params)


def tight_fep(path, failure: FailureModel, failed: int) -> float:
    _, network = load_network(path, NetworkOptions(input_range=(-1.0, 1.0)))
    (layer,) = [la for la in network.hidden_layers if la.kind == "gru"]
    counts = [failed if la is layer else 0 for la in network.hidden_layers]
    return TightBound(Analysis(network, failure)).refined(counts)


def _saturated(hidden: int = 4):
    """z ≈ 0 (bias −20), no reset path, n = tanh(30·s_j·x_t): the state is ±1 where x_t = ±1; the output row 0's
    signs are opposite to s, so x_T = 1 drives every state against W_out[0]."""
    rng = np.random.default_rng(3)
    w_out = rng.uniform(0.5, 1.5, (2, hidden)) * rng.choice([-1.0, 1.0], (2, hidden))
    signs = -np.sign(w_out[0])
    w = np.concatenate([np.zeros((2 * hidden, 1)), 30.0 * signs[:, None]])
    b = np.concatenate([np.full(hidden, -20.0), np.zeros(5 * hidden)])
    return w, np.zeros((3 * hidden, hidden)), b, w_out, np.array([0.25, -0.5])


def test_a_saturated_gru_attains_the_cut_and_the_cut_shrunk_is_exceeded(tmp_path, monkeypatch):
    """Every unit byzantine (capacity 1) sends sign(W_out[0, j]) at the last step while the clean states are
    −sign(W_out[0, j]): the deviation is 2·Σ_j |W_out[0, j]| up to tanh(30) and σ(−20) — the cut itself."""
    params = _as_stored(_saturated())
    w_out = params[3]
    path = tmp_path / "saturated.onnx"
    gru_model(path, *params)
    failure = FailureModel.byzantine(capacity=1.0)
    bound = tight_fep(path, failure, 4)
    x = np.ones((1, 3, 1))
    sent = {j: np.full(3, np.sign(w_out[0, j])) for j in range(4)}
    worst = float(np.abs(gru_forward(x, *params, sent) - gru_forward(x, *params)).max())
    assert worst == pytest.approx(2 * np.abs(w_out[0]).sum(), rel=1e-6)
    assert worst <= bound * (1 + 1e-9) and worst >= 0.999 * bound, (worst, bound)

    real = tight.BoxCut.__init__

    def shrunk(self, analysis):  # the rule with its width shrunk by 10 %
        real(self, analysis)
        self.value = 0.9 * self.value

    monkeypatch.setattr(tight.BoxCut, "__init__", shrunk)
    assert worst > tight_fep(path, failure, 4) * (1 + 1e-9)


def _random_gru(seed: int, hidden: int, scale: float):
    rng = np.random.default_rng(seed)
    return (
        scale * rng.standard_normal((3 * hidden, 2)),
        scale * rng.standard_normal((3 * hidden, hidden)),
        scale * rng.standard_normal(6 * hidden),
        rng.standard_normal((3, hidden)),
        rng.standard_normal(3),
    )


_BOUNDS: dict = {}


@pytest.mark.parametrize("mode", ["crash", "byzantine"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 7), failed=st.integers(1, 4), scale=st.sampled_from([0.5, 2.0, 6.0]),
       draw=st.integers(0, 2**16))
def test_random_failures_of_random_grus_stay_under_the_bound(tmp_path_factory, mode, seed, failed, scale, draw):
    """Random units, per-step values (the ends of [−1, 1] and between: a different value at each step) and
    inputs (corners and interior of [−1, 1]^(T·F)), by the numpy forward: never above the bound."""
    params = _as_stored(_random_gru(seed, 4, scale))
    key = (mode, seed, failed, scale)
    if key not in _BOUNDS:
        path = tmp_path_factory.mktemp("gru") / "m.onnx"
        gru_model(path, *params)
        failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(capacity=1.0)
        _BOUNDS[key] = tight_fep(path, failure, failed)
    bound = _BOUNDS[key]
    rng = np.random.default_rng(draw)
    x = rng.choice([-1.0, 1.0, 0.0, 0.5], (64, 3, 2)) * rng.uniform(0.5, 1.0, (64, 1, 1))
    x[:32] = np.sign(x[:32]) + (x[:32] == 0)  # corners
    units = rng.choice(4, failed, replace=False)
    sent = {int(u): (np.zeros(3) if mode == "crash" else rng.choice([-1.0, 1.0, rng.uniform(-1, 1)], 3))
            for u in units}
    worst = float(np.abs(gru_forward(x, *params, sent) - gru_forward(x, *params)).max())
    assert worst <= bound * (1 + 1e-9), (worst, bound)


def test_no_box_cut_on_a_network_whose_ranges_were_kept_after_scaling(tmp_path):
    """design's "weights scaled, ranges kept" networks carry the unscaled network's boxes: the cut read them and
    answered 3.716 whatever the output layer's scale (so the weight caps searched on it were unbounded). There it
    is not taken: the bound grows with the scale, as the closed form of the scaled network does."""
    from robaudit.graph.scaling import Ranges, scaled_network

    _, network = load_network(ROOT / "sample_models" / "text_gru.onnx", NetworkOptions())
    out = next(la for la in network.layers if la.is_output or la is network.layers[-1])
    failure = FailureModel.crash()
    base = TightBound(Analysis(network, failure)).fep([1])
    kept = scaled_network(network, {out.name: 100.0}, Ranges.KEPT)
    assert tight.BoxCut.build(Analysis(kept, failure)) is None
    assert TightBound(Analysis(kept, failure)).fep([1]) > 50 * base
