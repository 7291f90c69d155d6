"""docs/method.md §9.1 applications against closed forms computed independently in this file.

The networks are tiny dense chains built inline with ``onnx.helper``. The expected
numbers come from a direct implementation of the formulas with plain numpy (explicit
products over layers, brute-force loops over bit counts and failure vectors), never
from robaudit's own output.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.applications import (
    CheckOptions,
    bits_needed,
    compute_design,
    compute_precision,
    compute_wait,
    failure_curves,
    fewest_bits_together,
    largest_scale,
    max_ignored,
    rounding_error,
)
from robaudit.applications.check import check_precision_outputs, load_inputs, quantize
from robaudit.bounds.audit import BoundOptions, load_network
from robaudit.graph.network import NetworkOptions

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
K = {"Sigmoid": 0.25, "Tanh": 1.0, "Relu": 1.0}
SLACK = 1 + 1e-12


# --------------------------------------------------------------------------- a tiny dense chain


def build_chain(sizes: list[int], activation: str, seed: int = 0, scale: float = 0.5) -> tuple[onnx.ModelProto, list]:
    """x [N, sizes[0]] → Gemm(transB=1) + activation → … → Gemm → y; weights U[−scale, scale]."""
    rng = np.random.default_rng(seed)
    nodes, inits, weights, biases = [], [], [], []
    current = "x"
    for i in range(len(sizes) - 1):
        w = rng.uniform(-scale, scale, (sizes[i + 1], sizes[i])).astype(np.float32)
        b = rng.uniform(-0.1, 0.1, sizes[i + 1]).astype(np.float32)
        weights.append(w.astype(np.float64))
        biases.append(b.astype(np.float64))
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        pre = f"pre{i}" if i < len(sizes) - 2 else "y"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [pre], name=f"fc{i + 1}", transB=1))
        current = pre
        if i < len(sizes) - 2:
            nodes.append(helper.make_node(activation, [pre], [f"h{i}"], name=f"act{i + 1}"))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, list(zip(weights, biases, strict=True))


def save(model: onnx.ModelProto, tmp_path: Path, name: str = "chain.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


class Reference:
    """The docs/method.md §3.1, §9.1 quantities of a dense chain, computed directly."""

    def __init__(self, layers, activation: str, input_range=(0.0, 1.0)):
        self.w = [w for w, _ in layers]
        self.b = [b for _, b in layers]
        self.hidden = len(self.w) - 1
        self.k = [K[activation]] * self.hidden
        self.n = [w.shape[0] for w in self.w]
        self.fan_in = [w.shape[1] for w in self.w]
        self.wm = [float(np.abs(w).max()) for w in self.w]
        self.ranges = self._ranges(activation, input_range)

    def _ranges(self, activation, input_range):
        """Layer-wide output range: the activation's when bounded, else interval propagation."""
        lo = np.full(self.w[0].shape[1], input_range[0])
        hi = np.full(self.w[0].shape[1], input_range[1])
        ranges = []
        for i in range(self.hidden):
            pos, neg = np.maximum(self.w[i], 0), np.minimum(self.w[i], 0)
            pre_lo = pos @ lo + neg @ hi + self.b[i]
            pre_hi = pos @ hi + neg @ lo + self.b[i]
            if activation == "Relu":
                lo, hi = np.maximum(pre_lo, 0), np.maximum(pre_hi, 0)
                ranges.append((float(lo.min()), float(hi.max())))
            else:
                lo, hi = pre_lo, pre_hi  # not used further: bounded activations below
                ranges.append((0.0, 1.0) if activation == "Sigmoid" else (-1.0, 1.0))
        return ranges

    def paper_gain(self, site: int, wm=None) -> float:
        """Fep for σ = 1 at every neuron of hidden layer ``site``: N_l·Π_{k>l}(N_k·K_k·w_k)·w_out."""
        wm = wm or self.wm
        gain = self.n[site]
        for k in range(site + 1, self.hidden):
            gain *= self.n[k] * self.k[k] * wm[k]
        return gain * wm[self.hidden]

    def sensitivity_rows(self) -> list[np.ndarray]:
        """S_l[k] = Σ_i P[k, i] with P chained through K·|W| from the output back."""
        p = [None] * self.hidden
        p[-1] = np.abs(self.w[-1])
        for li in range(self.hidden - 2, -1, -1):
            p[li] = p[li + 1] @ (self.k[li + 1] * np.abs(self.w[li + 1]))
        return [m.sum(axis=1) for m in p]

    def joint(self, sigmas, method: str) -> float:
        paper = sum(self.paper_gain(li) * s for li, s in enumerate(sigmas))
        if method == "paper":
            return paper
        rows = self.sensitivity_rows()
        tight = max(sum(rows[li][k] * s for li, s in enumerate(sigmas)) for k in range(self.n[-1]))
        return min(paper, tight)

    def alone_gain(self, site: int, method: str) -> float:
        sig = [0.0] * self.hidden
        sig[site] = 1.0
        return self.joint(sig, method)

    def fep_paper(self, failures, deltas, wm=None) -> float:
        """docs/method.md §3.1 recursion with E_l = f·δ + (N − f)·K·w·E_{l−1} (dense: fanout = N)."""
        wm = wm or self.wm
        error = 0.0
        for li in range(self.hidden):
            error = failures[li] * deltas[li] + (self.n[li] - failures[li]) * self.k[li] * wm[li] * error
        return wm[self.hidden] * error

    def fep_upto(self, failures, deltas, wm=None) -> float:
        vectors = itertools.product(*[range(f + 1) for f in failures])
        return max(self.fep_paper(g, deltas, wm) for g in vectors)


def first_bits(gain: float, width: float, epsilon: float) -> int:
    """Brute force: the first b with gain·R/(2·(2^b − 1)) ≤ ε."""
    for b in range(1, 200):
        if gain * width / (2 * (2**b - 1)) <= epsilon * SLACK:
            return b
    raise AssertionError("no bit count found")


def bisect_largest(fep, epsilon: float, lo: float = 1e-9, hi: float = 1e6) -> float:
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fep(mid) <= epsilon else (lo, mid)
    return lo


# --------------------------------------------------------------------------- pure formulas


@given(
    gain=st.floats(1e-6, 1e6),
    width=st.floats(1e-6, 1e3),
    epsilon=st.floats(1e-6, 10.0),
)
def test_bits_needed_is_the_first_count_meeting_epsilon(gain, width, epsilon):
    assert bits_needed(gain, width, epsilon) == first_bits(gain, width, epsilon)


@given(cost=st.floats(0.0, 10.0), fan_in=st.integers(1, 500), epsilon=st.floats(1e-4, 10.0))
def test_max_ignored_is_the_largest_count_meeting_epsilon(cost, fan_in, epsilon):
    expected = max(r for r in range(fan_in + 1) if r * cost <= epsilon * SLACK)
    assert max_ignored(cost, fan_in, epsilon) == expected


@settings(max_examples=30)
@given(
    values=st.lists(st.floats(-50, 50), min_size=2, max_size=40),
    bits=st.integers(1, 12),
)
def test_rounding_to_b_bits_errs_by_at_most_q(values, bits):
    w = np.array(values)
    q = rounding_error(float(w.max() - w.min()), bits)
    assert q == pytest.approx((w.max() - w.min()) / (2 * (2**bits - 1)))
    rounded = quantize(w, bits)
    assert np.all(np.abs(rounded - w) <= q * (1 + 1e-9) + 1e-12)
    assert len(np.unique(np.round(rounded, 9))) <= 2**bits


@pytest.mark.parametrize("power,c", [(1, 3.0), (3, 0.02), (5, 1e4)])
def test_largest_scale_solves_a_power_law(power, c):
    epsilon = 0.1
    s = largest_scale(lambda x: c * x**power, epsilon, rel_tol=1e-9)
    assert s == pytest.approx((epsilon / c) ** (1 / power), rel=1e-8)
    assert c * s**power <= epsilon * SLACK


def test_largest_scale_reports_unbounded_and_impossible():
    assert math.isinf(largest_scale(lambda s: 0.0, 0.1))
    assert largest_scale(lambda s: 1.0 + s, 0.1) is None


def test_together_bits_meet_epsilon_and_cost_no_more_memory_than_uniform():
    gains, widths, values = [5.0, 40.0, 0.5], [1.0, 2.0, 10.0], [100, 10, 1000]

    def fep(bits):
        return sum(g * rounding_error(r, b) for g, r, b in zip(gains, widths, bits, strict=True))

    alone = [first_bits(g, r, 0.01) for g, r in zip(gains, widths, strict=True)]
    together = fewest_bits_together(fep, alone, values, 0.01)
    assert fep(together) <= 0.01 * SLACK
    assert all(t >= a for t, a in zip(together, alone, strict=True))
    uniform = next(b for b in range(1, 64) if fep([b] * 3) <= 0.01)
    assert sum(v * b for v, b in zip(values, together, strict=True)) <= uniform * sum(values)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("method", ["paper", "tight"])
@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh", "Relu"])
@pytest.mark.parametrize("epsilon", [0.005, 0.05, 0.4])
def test_precision_bits_match_the_closed_form(tmp_path, method, activation, epsilon):
    model, layers = build_chain([6, 5, 4, 3], activation, seed=1)
    ref = Reference(layers, activation)
    options = BoundOptions(epsilon=epsilon, method=method, network=NetworkOptions(ranges="ibp"))  # ref: IBP ranges
    result = compute_precision(save(model, tmp_path), options)
    widths = [hi - lo for lo, hi in ref.ranges]
    for li, row in enumerate(result.layers):
        assert row.range == pytest.approx(ref.ranges[li], rel=1e-5, abs=1e-6)
        assert row.gain == pytest.approx(ref.alone_gain(li, method), rel=1e-9)
        assert row.bits == first_bits(ref.alone_gain(li, method), widths[li], epsilon)
    uniform = next(
        b for b in range(1, 65) if ref.joint([r / (2 * (2**b - 1)) for r in widths], method) <= epsilon * SLACK
    )
    assert result.uniform_bits == uniform
    together = [row.bits_together for row in result.layers]
    assert ref.joint([r / (2 * (2**b - 1)) for r, b in zip(widths, together, strict=True)], method) <= epsilon * SLACK
    assert result.memory_together <= result.memory_uniform


@pytest.mark.parametrize("method", ["paper", "tight"])
def test_together_allocation_never_stores_more_than_uniform_on_a_cnn(method):
    result = compute_precision(SAMPLES / "lenet.onnx", BoundOptions(epsilon=0.5, method=method))
    neurons = [row.neurons for row in result.layers]
    together = [row.bits_together for row in result.layers]
    assert result.memory_together == sum(n * b for n, b in zip(neurons, together, strict=True))
    assert result.memory_together <= result.uniform_bits * sum(neurons)
    assert all(t >= row.bits for t, row in zip(together, result.layers, strict=True))


def test_precision_weights_match_the_closed_form(tmp_path):
    model, layers = build_chain([5, 4, 3, 2], "Sigmoid", seed=2)
    ref = Reference(layers, "Sigmoid")
    epsilon = 0.02
    result = compute_precision(save(model, tmp_path), BoundOptions(epsilon=epsilon, method="paper"), weights=True)
    inputs_bound = [1.0] + [1.0] * ref.hidden  # input range [0, 1], sigmoid outputs in (0, 1)
    # σ per unit Δw: K_l·fan-in·Y_{l−1}; the output layer's σ adds to the output directly
    unit = [ref.paper_gain(li) * ref.k[li] * ref.fan_in[li] * inputs_bound[li] for li in range(ref.hidden)]
    unit.append(1.0 * ref.fan_in[-1] * inputs_bound[-1])
    widths = [float(w.max() - w.min()) for w in ref.w]
    assert [row.name for row in result.layers] == ["fc1", "fc2", "fc3"]
    assert result.layers[-1].is_output
    for row, g, r in zip(result.layers, unit, widths, strict=True):
        assert row.range == pytest.approx((row.range[0], row.range[0] + r))
        assert row.gain == pytest.approx(g, rel=1e-9)
        assert row.bits == first_bits(g, r, epsilon)
    uniform = next(
        b for b in range(1, 65) if sum(g * r / (2 * (2**b - 1)) for g, r in zip(unit, widths, strict=True)) <= epsilon
    )
    assert result.uniform_bits == uniform


def test_precision_float_and_int8_verdicts_match_the_closed_form(tmp_path):
    model, layers = build_chain([6, 5, 4, 3], "Tanh", seed=3)
    ref = Reference(layers, "Tanh")
    epsilon = 0.01
    result = compute_precision(save(model, tmp_path), BoundOptions(epsilon=epsilon, method="paper"))
    gains = [ref.paper_gain(li) for li in range(ref.hidden)]
    magnitude = [max(abs(lo), abs(hi)) for lo, hi in ref.ranges]
    fp16 = sum(g * max(2**-11 * y, 2**-25) for g, y in zip(gains, magnitude, strict=True)) * (1 + 2**-11) ** 2
    bf16 = sum(g * 2**-8 * y for g, y in zip(gains, magnitude, strict=True)) * (1 + 2**-8) ** 2
    int8 = sum(g * (hi - lo) / 510 for g, (lo, hi) in zip(gains, ref.ranges, strict=True))
    verdicts = {f.name: f for f in result.formats}
    assert verdicts["fp16"].bound == pytest.approx(fp16, rel=1e-9)
    assert verdicts["bf16"].bound == pytest.approx(bf16, rel=1e-9)
    assert verdicts["int8"].bound == pytest.approx(int8, rel=1e-9)
    for name, bound in (("fp16", fp16), ("bf16", bf16), ("int8", int8)):
        assert verdicts[name].safe == (bound <= epsilon)
    assert verdicts["int8"].safe == (result.uniform_bits <= 8)


def test_precision_check_measures_within_the_bound_and_can_fail(tmp_path):
    model, _ = build_chain([8, 6, 5, 3], "Relu", seed=4)
    path = save(model, tmp_path)
    options = BoundOptions(epsilon=0.05, method="tight")
    result = compute_precision(path, options, check=CheckOptions(samples=100))
    assert result.check is not None and result.check.ok, result.check
    assert all(run.max <= run.bound for run in result.check.runs)
    assert max(run.max for run in result.check.runs) > 0, "the simulation changed nothing"
    # the same simulation against bounds that are too small must be flagged
    loaded, network = load_network(path, NetworkOptions())
    too_small = result.__class__(
        **{
            **result.__dict__,
            "layers": tuple(
                row.__class__(**{**row.__dict__, "bound_at_bits": row.bound_at_bits * 1e-6}) for row in result.layers
            ),
        }
    )
    inputs, source, _ = load_inputs(None, 100, network)
    flagged = check_precision_outputs(network, loaded.opset, too_small, inputs, source)
    assert not flagged.ok


def test_rounded_layer_outputs_lie_on_the_grid(tmp_path):
    """The simulation itself: with only fc1 rounded to 3 bits, fc1's outputs are grid points."""
    import onnxruntime as ort

    from robaudit.applications.check import rounding_model

    model, _ = build_chain([4, 5, 2], "Sigmoid", seed=5)
    loaded, network = load_network(save(model, tmp_path), NetworkOptions())
    rewritten, _ = rounding_model(network, loaded.opset)
    rewritten.graph.output.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, None))
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (50, 4)).astype(np.float32)
    feeds = {"x": x, "ra/q/0/on": np.array(1.0), "ra/q/0/lo": np.array(0.0), "ra/q/0/step": np.array(1 / 7)}
    _, h = session.run(["y", "h0"], feeds)
    levels = h * 7
    assert np.allclose(levels, np.round(levels), atol=1e-5)
    clean = 1 / (1 + np.exp(-(x.astype(np.float64) @ np.asarray(network.layers[0].weight).T + network.layers[0].bias)))
    assert np.all(np.abs(h - clean) <= 1 / 14 + 1e-6)


# --------------------------------------------------------------------------- wait


@pytest.mark.parametrize("method", ["paper", "tight"])
@pytest.mark.parametrize("epsilon", [0.05, 0.5, 3.0])
def test_wait_counts_match_the_closed_form(tmp_path, method, epsilon):
    model, layers = build_chain([10, 8, 6, 3], "Sigmoid", seed=6)
    ref = Reference(layers, "Sigmoid")
    result = compute_wait(save(model, tmp_path), BoundOptions(epsilon=epsilon, method=method))
    inputs_bound = [1.0, 1.0, 1.0]
    for li, row in enumerate(result.layers):
        d = ref.wm[li] * inputs_bound[li]  # crash synapse: d_l = w_m·Y_{l−1}
        cost = ref.alone_gain(li, method) * ref.k[li] * d
        ignore = max(r for r in range(ref.fan_in[li] + 1) if r * cost <= epsilon * SLACK)
        assert row.synapse_delta == pytest.approx(d, rel=1e-9)
        assert row.ignore == ignore
        assert row.wait_for == ref.fan_in[li] - ignore
        assert row.wait_for_together >= row.wait_for
    sigmas = [ref.k[li] * (row.fan_in - row.wait_for_together) * ref.wm[li] for li, row in enumerate(result.layers)]
    assert ref.joint(sigmas, method) <= epsilon * SLACK
    if method == "paper":  # ε shared equally, no repair needed
        for li, row in enumerate(result.layers):
            cost = ref.paper_gain(li) * ref.k[li] * ref.wm[li]
            share = max(r for r in range(ref.fan_in[li] + 1) if r * cost <= epsilon / ref.hidden * SLACK)
            assert row.wait_for_together == ref.fan_in[li] - share


def test_wait_check_never_measures_above_the_bound(tmp_path):
    model, _ = build_chain([10, 8, 6, 3], "Relu", seed=7)
    result = compute_wait(
        save(model, tmp_path), BoundOptions(epsilon=5.0, method="tight"), CheckOptions(samples=50, trials=5)
    )
    assert any(row.ignore > 0 for row in result.layers)
    assert result.check.ok, result.check
    assert max(run.max for run in result.check.runs) > 0


# --------------------------------------------------------------------------- design


@pytest.mark.parametrize("tolerate", [(1,), (2, 1)])
def test_design_weight_caps_and_shrink_match_the_closed_form(tmp_path, tolerate):
    model, layers = build_chain([6, 5, 4, 3], "Sigmoid", seed=8)
    ref = Reference(layers, "Sigmoid")
    deltas = [1.0, 1.0]  # crash, sigmoid outputs in (0, 1)
    epsilon = 0.3
    f = list(tolerate) * (2 if len(tolerate) == 1 else 1)
    result = compute_design(save(model, tmp_path), BoundOptions(epsilon=epsilon, method="paper", failures=tolerate))
    assert list(result.tolerate) == f
    assert result.fep == pytest.approx(ref.fep_upto(f, deltas), rel=1e-9)
    for site in range(ref.hidden + 1):

        def fep_with(alpha, site=site):
            wm = list(ref.wm)
            wm[site] *= alpha
            return ref.fep_upto(f, deltas, wm)

        expected = None if fep_with(1e-12) > epsilon else bisect_largest(fep_with, epsilon)
        row = result.layers[site] if site < ref.hidden else result.output_layer
        if expected is None:
            assert row.max_weight_allowed is None
        else:
            assert row.max_weight_allowed == pytest.approx(expected * ref.wm[site], rel=1e-6)
    shrink = bisect_largest(lambda s: ref.fep_upto(f, deltas, [w * s for w in ref.wm]), epsilon)
    assert result.shrink_factor == pytest.approx(shrink, rel=1e-5)  # float32 weights in the scaled copy


def test_failure_curves_follow_the_closed_form(tmp_path):
    model, layers = build_chain([6, 5, 4, 3], "Sigmoid", seed=9)
    ref = Reference(layers, "Sigmoid")
    _, network = load_network(save(model, tmp_path), NetworkOptions())
    curves = failure_curves(network, BoundOptions(epsilon=0.1, method="paper"), max_count=4)
    for li, name in enumerate(["fc1", "fc2"]):
        counts, values = curves[name]
        assert counts == [1, 2, 3, 4]
        for count, value in zip(counts, values, strict=True):
            f = [0, 0]
            f[li] = count
            assert value == pytest.approx(ref.fep_upto(f, [1.0, 1.0]), rel=1e-9)
