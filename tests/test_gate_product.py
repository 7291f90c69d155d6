"""Products of two variable tensors in a squeeze-and-excitation gate (docs/method.md §4.2).

Small random SE-style networks built here (conv-ReLU, GlobalAveragePool, dense-ReLU,
dense-Sigmoid gate, channel product, strided conv-ReLU, dense output) are run with faults by
a separate numpy implementation (explicit loops over kernel taps, no robaudit code):

* every failure set of the small vectors (random ones past 3,000 sets), failed values at the
  ends of the range and inside, box corners and random inputs: the errors stay within
  ``fep_tight`` (whose signed terms carry the product with interval coefficients) and within
  the per-input certificate;
* the McCormick planes of the product used by the CROWN ranges hold the clean values of
  dense samples and corners, and the ranges contain every sampled value;
* weakened copies are caught: the signed product without the negative side of its
  coefficients, the coefficient of Δx taken on the *clean* box of the gate (the faulty gate
  lies outside it), and a McCormick plane lowered by 10 % of its gap.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import robaudit.bounds.certify as certify
import robaudit.bounds.ranges as ranges
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import Interval, PropagationContext
from robaudit.graph.ops.elementwise import product_planes

SIDE = 3  # input plane SIDE × SIDE, one channel
SITES = ("s0", "s1", "s2", "s3")


class SENet:
    """Weights of conv(1→C)-ReLU, GAP, fc(C→h)-ReLU, fc(h→C)-Sigmoid, x·gate, conv(C→D, stride 2)-ReLU, fc(→2)."""

    def __init__(self, channels: int, squeeze: int, seed: int, scale: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        c, h, d = channels, squeeze, 2
        self.w0, self.b0 = rng.normal(0, scale, (c, 1, 3, 3)), rng.normal(0, 0.3, c)
        self.w1, self.b1 = rng.normal(0, scale, (h, c)), rng.normal(0, 0.3, h)
        self.w2, self.b2 = rng.normal(0, 2 * scale, (c, h)), rng.normal(0, 0.5, c)
        self.w3, self.b3 = rng.normal(0, scale, (d, c, 3, 3)), rng.normal(0, 0.3, d)
        self.w4, self.b4 = rng.normal(0, scale, (2, d * 4)), rng.normal(0, 0.3, 2)
        self.sizes = [c * SIDE * SIDE, h, c, d * 4]
        for name in ("w0", "b0", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"):
            setattr(self, name, getattr(self, name).astype(np.float32).astype(np.float64))

    def onnx(self) -> onnx.ModelProto:
        c = self.w0.shape[0]
        init = [
            numpy_helper.from_array(getattr(self, n).astype(np.float32), n)
            for n in ("w0", "b0", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")
        ]
        init.append(numpy_helper.from_array(np.array([1, c, 1, 1], np.int64), "gate_shape"))
        nodes = [
            helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c0"], ["s0"]),
            helper.make_node("GlobalAveragePool", ["s0"], ["m"]),
            helper.make_node("Flatten", ["m"], ["mf"]),
            helper.make_node("Gemm", ["mf", "w1", "b1"], ["p1"], transB=1),
            helper.make_node("Relu", ["p1"], ["s1"]),
            helper.make_node("Gemm", ["s1", "w2", "b2"], ["p2"], transB=1),
            helper.make_node("Sigmoid", ["p2"], ["s2"]),
            helper.make_node("Reshape", ["s2", "gate_shape"], ["gate"]),
            helper.make_node("Mul", ["s0", "gate"], ["u"]),
            helper.make_node("Conv", ["u", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c3"], ["s3"]),
            helper.make_node("Flatten", ["s3"], ["f3"]),
            helper.make_node("Gemm", ["f3", "w4", "b4"], ["y"], transB=1),
        ]
        graph = helper.make_graph(
            nodes,
            "se",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, SIDE, SIDE])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
            init,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    def forward(self, x: np.ndarray, keeps=None, sends=None) -> np.ndarray:
        """Outputs [B, 2] for inputs [B, SIDE·SIDE]; site l's value becomes value·keep + send."""
        batch = x.shape[0]

        def site(index: int, value: np.ndarray) -> np.ndarray:
            if keeps is None:
                return value
            flat = value.reshape(batch, -1) * keeps[index] + sends[index]
            return flat.reshape(value.shape)

        s0 = site(0, np.maximum(_conv(x.reshape(batch, 1, SIDE, SIDE), self.w0, self.b0, 1), 0.0))
        s1 = site(1, np.maximum(s0.mean(axis=(2, 3)) @ self.w1.T + self.b1, 0.0))
        s2 = site(2, 1.0 / (1.0 + np.exp(-(s1 @ self.w2.T + self.b2))))
        u = s0 * s2[:, :, None, None]
        s3 = site(3, np.maximum(_conv(u, self.w3, self.b3, 2), 0.0))
        return s3.reshape(batch, -1) @ self.w4.T + self.b4


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """3×3 convolution, padding 1, written with one loop per kernel tap."""
    batch, _, height, width = x.shape
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    padded = np.zeros((batch, x.shape[1], height + 2, width + 2))
    padded[:, :, 1:-1, 1:-1] = x
    out = np.zeros((batch, w.shape[0], out_h, out_w)) + b[None, :, None, None]
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out


def _inputs(rng: np.random.Generator) -> np.ndarray:
    corners = rng.integers(0, 2, (24, SIDE * SIDE)).astype(np.float64)
    return np.concatenate([corners, rng.uniform(0, 1, (16, SIDE * SIDE)), np.zeros((1, SIDE * SIDE))])


def _failure_sets(sizes: list[int], counts: list[int], rng: np.random.Generator, limit: int = 3000):
    every = [list(itertools.combinations(range(n), f)) for n, f in zip(sizes, counts, strict=True)]
    total = int(np.prod([len(e) for e in every]))
    if total <= limit:
        return list(itertools.product(*every))
    return [tuple(e[rng.integers(len(e))] for e in every) for _ in range(limit)]


def worst_errors(net: SENet, counts: list[int], failure_range, inputs: np.ndarray, rng) -> np.ndarray:
    """Per input, the largest max_k |F̃_k − F_k| over the failure sets and sent values tried."""
    a, b = failure_range
    clean = net.forward(inputs)
    trials = [choice for choice in _failure_sets(net.sizes, counts, rng) for _ in range(1 if a == b else 4)]
    worst = np.zeros(len(inputs))
    batch = max(1, 4096 // len(inputs))
    for start in range(0, len(trials), batch):
        part = trials[start : start + batch]
        rows = len(part) * len(inputs)
        keeps, sends = [], []
        for layer, n in enumerate(net.sizes):
            keep, send = np.ones((len(part), len(inputs), n)), np.zeros((len(part), len(inputs), n))
            for t, choice in enumerate(part):
                chosen = list(choice[layer])
                keep[t][:, chosen] = 0.0
                send[t][:, chosen] = rng.choice([a, b, rng.uniform(a, b)], (len(inputs), len(chosen)))
            keeps.append(keep.reshape(rows, n))
            sends.append(send.reshape(rows, n))
        out = net.forward(np.tile(inputs, (len(part), 1)), keeps, sends).reshape(len(part), len(inputs), -1)
        worst = np.maximum(worst, np.abs(out - clean[None]).max(axis=2).max(axis=0))
    return worst


def _network(net: SENet, directory):
    path = directory / "se.onnx"
    onnx.save(net.onnx(), path)
    return load_network(path, NetworkOptions())[1], path


#: Failure vectors (s0, s1, s2, s3): the gate layers alone, with the layer before them, all together.
COUNTS = (
    [1, 0, 1, 0], [2, 0, 2, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
    [0, 0, 0, 1], [1, 1, 1, 1], [2, 0, 1, 0], [0, 1, 2, 1],
)


def test_numpy_forward_is_the_onnx_model(tmp_path):
    net = SENet(2, 2, seed=3)
    _, path = _network(net, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (5, SIDE * SIDE))
    ours = net.forward(x)
    theirs = np.concatenate([session.run(None, {"x": r.reshape(1, 1, SIDE, SIDE).astype(np.float32)})[0] for r in x])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


SE_CASES = given(
    st.integers(2, 3),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(0.5, 2.0),
    st.booleans(),
    st.integers(0, 2**31),
)


@settings(max_examples=4, deadline=None, derandomize=True)
@SE_CASES
def test_gate_bounds_are_sound_on_random_se_nets(tmp_path_factory, channels, mode, scale, linear, seed):
    check_gate_bounds(tmp_path_factory, channels, mode, scale, linear, seed)


@pytest.mark.slow
@settings(max_examples=24, deadline=None, derandomize=True)
@SE_CASES
def test_gate_bounds_are_sound_on_random_se_nets_thorough(tmp_path_factory, channels, mode, scale, linear, seed):
    check_gate_bounds(tmp_path_factory, channels, mode, scale, linear, seed)


def check_gate_bounds(tmp_path_factory, channels, mode, scale, linear, seed) -> None:
    """Every failure vector of COUNTS: the errors found stay below ``fep_tight`` and below the local certificates."""
    net = linear_se(seed % 10_000) if linear else SENet(channels, 2, seed=seed % 10_000, scale=scale)
    network, _ = _network(net, tmp_path_factory.mktemp("se"))
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(float(1 + seed % 3))
    bound = TightBound(Analysis(network, failure))
    assert bound.signed is not None  # the product is carried by the signed terms
    rng = np.random.default_rng(seed)
    inputs = _inputs(rng)
    certifier = Certifier(network, failure, inputs.reshape(-1, 1, SIDE, SIDE).astype(np.float32))
    lower = []
    for counts in COUNTS:
        counts = [min(c, n) for c, n in zip(counts, net.sizes, strict=True)]
        worst = worst_errors(net, counts, failure.failure_range, inputs, rng)
        fep = bound.fep(counts)
        assert worst.max() <= fep * (1 + 1e-5) + 1e-5, (channels, mode, counts, worst.max(), fep)
        lower.append(fep < float(bound.sums(counts).max()) * (1 - 1e-9))
        for i in range(0, len(inputs), 10):
            local = certifier.box(i, counts).bound
            assert worst[i] <= local * (1 + 1e-5) + 1e-5, (channels, mode, counts, i, worst[i], local)
    assert any(lower) or not linear  # on the near-linear nets the signed terms (or a cut) are what is checked


def _violations(net: SENet, network, failure: FailureModel, rng) -> int:
    """Failure vectors of COUNTS whose errors found exceed ``fep_tight``."""
    bound = TightBound(Analysis(network, failure))
    inputs = _inputs(rng)
    found = 0
    for counts in COUNTS:
        worst = worst_errors(net, counts, failure.failure_range, inputs, rng).max()
        found += bool(worst > bound.fep(counts) * (1 + 1e-5) + 1e-5)
    return found


def linear_se(seed: int) -> SENet:
    """An SE net whose ReLUs never change state and whose gate stays near σ's linear part, with
    negative weights after the product: the signed terms are nearly exact there, so a weakened
    product rule shows."""
    net = SENet(2, 2, seed=seed)
    net.w0, net.b0 = np.abs(net.w0) * 0.5, np.full(2, 0.2)
    net.w1, net.b1 = np.abs(net.w1), np.full(2, 0.5)
    net.w2, net.b2 = net.w2 * 0.2, np.zeros(2)
    net.w3, net.b3 = -np.abs(net.w3) * 0.3, np.full(2, 8.0)
    net.w4, net.b4 = np.abs(net.w4), np.zeros(2)
    for name in ("w0", "b0", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"):
        setattr(net, name, getattr(net, name).astype(np.float32).astype(np.float64))
    return net


@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_signed_product_without_its_negative_side_is_caught(mode, tmp_path, monkeypatch):
    net = linear_se(0)
    network, _ = _network(net, tmp_path)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(1.0)
    counts = [0, 1, 0, 0]  # the squeeze layer: it reaches the output through the gate only
    rng = np.random.default_rng(0)
    inputs = _inputs(rng)
    worst = worst_errors(net, counts, failure.failure_range, inputs, rng)
    assert worst.max() <= TightBound(Analysis(network, failure)).fep(counts) * (1 + 1e-5)
    at = int(np.argmax(worst))
    certifier = Certifier(network, failure, inputs.reshape(-1, 1, SIDE, SIDE).astype(np.float32))
    assert worst[at] <= certifier.box(at, counts).bound * (1 + 1e-5)
    original = certify.interval_product

    def positive_side(*args):
        lo, hi = original(*args)
        return np.maximum(lo, 0.0), np.maximum(hi, 0.0)

    monkeypatch.setattr(certify, "interval_product", positive_side)
    assert worst.max() > TightBound(Analysis(network, failure)).fep(counts) * (1 + 1e-5)
    weakened = Certifier(network, failure, inputs.reshape(-1, 1, SIDE, SIDE).astype(np.float32))
    assert worst[at] > weakened.box(at, counts).bound * (1 + 1e-5)


def _boxes(draw_lo, draw_width):
    lo = np.asarray(draw_lo, np.float64)
    return Interval(lo, lo + np.asarray(draw_width, np.float64))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.lists(st.floats(0, 4), min_size=4, max_size=4),
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.lists(st.floats(0, 4), min_size=4, max_size=4),
    st.integers(0, 2**31),
)
def test_mccormick_planes_hold_on_the_box(x_lo, x_width, y_lo, y_width, seed):
    x, y = _boxes(x_lo, x_width), _boxes(y_lo, y_width)
    (x_up, x_low), (y_up, y_low), (c_up, c_low) = product_planes(x, y)
    rng = np.random.default_rng(seed)
    corners = [(x.lo, y.lo), (x.lo, y.hi), (x.hi, y.lo), (x.hi, y.hi)]
    points = corners + [(rng.uniform(x.lo, x.hi), rng.uniform(y.lo, y.hi)) for _ in range(200)]
    for px, py in points:
        u = px * py
        slack = 1e-9 * (1 + np.abs(x.lo * y.hi) + np.abs(px * py) + np.abs(x.hi * y.hi))
        assert np.all(u <= x_up * px + y_up * py + c_up + slack)
        assert np.all(u >= x_low * px + y_low * py + c_low - slack)
    # the planes touch the product at the corners they are built on (nothing looser than McCormick)
    np.testing.assert_allclose(x_up * x.lo + y_up * y.hi + c_up, x.lo * y.hi, atol=1e-9)
    np.testing.assert_allclose(x_low * x.lo + y_low * y.lo + c_low, x.lo * y.lo, atol=1e-9)


def _conv3_inputs(net: SENet, x: np.ndarray) -> np.ndarray:
    """The strided convolution's pre-activations [B, D·4] (numpy, as in ``SENet.forward``)."""
    batch = len(x)
    s0 = np.maximum(_conv(x.reshape(batch, 1, SIDE, SIDE), net.w0, net.b0, 1), 0.0)
    s1 = np.maximum(s0.mean(axis=(2, 3)) @ net.w1.T + net.b1, 0.0)
    gate = 1.0 / (1.0 + np.exp(-(s1 @ net.w2.T + net.b2)))
    return _conv(s0 * gate[:, :, None, None], net.w3, net.b3, 2).reshape(batch, -1)


def _dense_inputs() -> np.ndarray:
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=SIDE * SIDE)))
    return np.concatenate([corners, np.random.default_rng(0).uniform(0, 1, (2000, SIDE * SIDE))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranges_through_the_product_hold_every_sample(seed, tmp_path):
    x = _dense_inputs()
    for net in (SENet(2, 2, seed=seed), linear_se(seed)):
        network, _ = _network(net, tmp_path)
        box = network.clean[network.hidden_layers[-1].preact_value]
        assert network.range_report.windows[network.hidden_layers[-1].preact_value][1]  # reached the input
        values = _conv3_inputs(net, x)
        assert np.all(values <= box.hi.reshape(-1) + 1e-5) and np.all(values >= box.lo.reshape(-1) - 1e-5)


def test_mccormick_gap_shrunk_is_caught(tmp_path, monkeypatch):
    net = linear_se(0)
    x = _dense_inputs()
    values = _conv3_inputs(net, x)
    network, _ = _network(net, tmp_path)
    box = network.clean[network.hidden_layers[-1].preact_value]
    assert np.all(values <= box.hi.reshape(-1) + 1e-5)

    def shrunk(x_box, y_box):
        (x_up, x_low), ys, cs = product_planes(x_box, y_box)
        gap = x_up - x_low
        return (x_up - 0.1 * gap, x_low + 0.1 * gap), ys, cs

    monkeypatch.setattr(ranges, "product_planes", shrunk)
    weakened, _ = _network(net, tmp_path)
    box = weakened.clean[weakened.hidden_layers[-1].preact_value]
    assert np.any(values > box.hi.reshape(-1) + 1e-5)


def test_unbounded_factor_gives_infinite_coefficients_not_nan():
    node = Node(name="mul", op_type="Mul", domain="", inputs=["x", "g"], outputs=["u"])
    x = Interval(np.array([[0.0, 0.0]]), np.array([[np.inf, 2.0]]))
    g = Interval(np.array([[0.5]]), np.array([[1.0]]))  # broadcast over x's two elements
    ctx = PropagationContext({"x": x, "g": g}, {"x": x, "g": g}, {})
    mid, rad = np.array([[[1.0, 0.0]]]), np.zeros((1, 1, 2))
    to_x, to_g = certify.product_signed_adjoint(node, mid, rad, ctx)
    assert not np.isnan(to_x).any() and not np.isnan(to_g).any()
    # towards g: Σ_p c_p·x_p with x_0 unbounded (c_0 = 1) and c_1 = 0: radius ∞, no NaN
    assert np.isinf(to_g[1]).all() and np.isfinite(to_g[0]).all()  # centre ± radius is never NaN
    # towards x: c·g = [0.5, 1] for the first element, exactly 0 for the second
    np.testing.assert_allclose(to_x[0], [[0.75, 0.0]])
    np.testing.assert_allclose(to_x[1], [[0.25, 0.0]])


@pytest.mark.parametrize(
    ("op", "inputs", "expected"),
    [
        ("Reciprocal", ["h"], True),
        ("LayerNormalization", ["h", "gamma"], True),
        ("RMSNormPattern", ["h"], True),
        ("Mul", ["h", "g"], True),
        ("Mul", ["h", "gamma"], False),  # times a constant: an affine op, its rule reads no clean range
        ("Reciprocal", ["gamma"], False),  # a constant's reciprocal is folded, nothing to cap
        ("Relu", ["h"], False),
    ],
)
def test_rules_that_read_a_clean_range_drop_the_cap_when_later_layers_fail(op, inputs, expected):
    """The signed terms' absolute cap holds between the clean and the faulty network only; ops whose rule
    reads a clean range (products of two variables, reciprocals, normalizations) switch it off when a
    later layer fails (docs/method.md §4.2)."""
    from types import SimpleNamespace

    from robaudit.bounds.signed import _is_product

    clean = {"h": None, "g": None}  # the variable values; 'gamma' is a constant
    assert _is_product(SimpleNamespace(op_type=op, inputs=inputs), clean) is expected
