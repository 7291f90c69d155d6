"""Neuron ranges (docs/method.md §5.1–5.3): CROWN back-substitution against what the
network really computes, against a plain second CROWN, and against IBP.

The networks are random small dense, conv and residual nets built as ONNX graphs in
code; the reference forward pass is PyTorch's functional API on the same weights
(sharing no code with robaudit), with failed neurons replaced by values of the failure
range. Observed values come from uniform samples, box corners and a projected
gradient-ascent attack on every element of every value, one batch row per element
and direction.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import network_of
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.ranges import tighten_network
from robaudit.graph.loader import load_model
from robaudit.graph.network import NetworkOptions

ACTIVATIONS = {
    "relu": ("Relu", torch.relu),
    "sigmoid": ("Sigmoid", torch.sigmoid),
    "tanh": ("Tanh", torch.tanh),
    "hardswish": ("HardSwish", F.hardswish),
}
#: Absolute slack of a containment check (float32 ONNX weights, float64 everywhere else).
SLACK = 1e-7


# --------------------------------------------------------------------------- the nets


@dataclass
class Net:
    """Weights of one of three architectures and the names of the values to check."""

    kind: str
    act: str
    weights: list[tuple[np.ndarray, np.ndarray]]
    in_shape: tuple[int, ...]
    #: Values that may fail (hidden layer outputs), in order.
    sites: list[str]
    #: Every value whose range is checked.
    values: list[str]
    #: Constants of the ``mixed`` net (BatchNorm parameters, the concatenated tensor, Sub/Mul operands).
    extra: dict = field(default_factory=dict)


def make_net(kind: str, act: str, rng: np.random.Generator, scale: float) -> Net:
    """Random float32-exact weights for ``dense`` (3 hidden layers), ``conv`` (2 convs) or ``residual``."""

    def w(*shape):
        return (rng.normal(size=shape) * scale).astype(np.float32).astype(np.float64)

    if kind == "dense":
        sizes = [5, 6, 5, 4, 3]
        weights = [(w(b, a), w(b)) for a, b in itertools.pairwise(sizes)]
        return Net(kind, act, weights, (1, 5), ["y0", "y1", "y2"], ["z0", "y0", "z1", "y1", "z2", "y2", "out"])
    if kind == "conv":
        weights = [(w(3, 2, 3, 3), w(3)), (w(2, 3, 3, 3), w(2)), (w(3, 2 * 4 * 4), w(3))]
        return Net(kind, act, weights, (1, 2, 4, 4), ["y0", "y1"], ["z0", "y0", "z1", "y1", "out"])
    if kind == "deconv":  # ConvTranspose (stride 2, output padding) and MatMul + Add as the head
        weights = [(w(2, 3, 3, 3), w(3)), (w(3 * 6 * 6, 4), w(4))]
        return Net(kind, act, weights, (1, 2, 3, 3), ["y0"], ["z0", "y0", "out"])
    if kind == "residual":
        weights = [(w(2, 2, 3, 3), w(2)), (w(2, 2, 3, 3), w(2)), (w(3, 2 * 4 * 4), w(3))]
        return Net(kind, act, weights, (1, 2, 4, 4), ["y0", "z1"], ["z0", "y0", "z1", "r", "y2", "out"])
    # mixed: BatchNorm after the activation, Concat with a constant, AveragePool, Sub/Mul by
    # constants, a constant Pad with value 0.5, a Sub of two variables before a stand-alone activation
    weights = [(w(3, 2, 3, 3), w(3)), (w(2, 4, 3, 3), w(2)), (w(2, 4, 3, 3), w(2)), (w(3, 2 * 2 * 2), w(3))]
    extra = {
        "gamma": w(3),
        "beta": w(3),
        "mean": w(3),
        "var": np.abs(w(3)) + 0.5,
        "C": w(1, 1, 4, 4),
        "K": w(1, 4, 1, 1),
        "M": w(1, 4, 1, 1),
    }
    values = ["z0", "y0", "n", "c", "p", "s", "m", "z1", "y1", "z2", "r", "y2", "out"]
    return Net(kind, act, weights, (1, 2, 4, 4), ["y0", "y1", "z2"], values, extra)


def to_onnx(net: Net) -> onnx.ModelProto:
    """The ONNX graph of ``net`` (Gemm/Conv with biases, the activation as its own op)."""
    op = ACTIVATIONS[net.act][0]
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def affine(i, x, out, pads=1):
        weight, bias = net.weights[i]
        if weight.ndim == 2:
            nodes.append(helper.make_node("Gemm", [x, const(f"W{i}", weight), const(f"b{i}", bias)], [out], transB=1))
        else:
            inputs = [x, const(f"W{i}", weight), const(f"b{i}", bias)]
            nodes.append(helper.make_node("Conv", inputs, [out], pads=[pads] * 4))

    if net.kind == "dense":
        x = "x"
        for i in range(3):
            affine(i, x, f"z{i}")
            nodes.append(helper.make_node(op, [f"z{i}"], [f"y{i}"]))
            x = f"y{i}"
        affine(3, x, "out")
    elif net.kind == "conv":
        affine(0, "x", "z0")
        nodes.append(helper.make_node(op, ["z0"], ["y0"]))
        affine(1, "y0", "z1")
        nodes.append(helper.make_node(op, ["z1"], ["y1"]))
        nodes.append(helper.make_node("Flatten", ["y1"], ["f"]))
        affine(2, "f", "out")
    elif net.kind == "deconv":
        weight, bias = net.weights[0]
        nodes.append(
            helper.make_node(
                "ConvTranspose",
                ["x", const("W0", weight), const("b0", bias)],
                ["z0"],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                output_padding=[1, 1],
            )
        )
        nodes.append(helper.make_node(op, ["z0"], ["y0"]))
        nodes.append(helper.make_node("Flatten", ["y0"], ["f"]))
        nodes.append(helper.make_node("MatMul", ["f", const("W1", net.weights[1][0])], ["g"]))
        nodes.append(helper.make_node("Add", ["g", const("b1", net.weights[1][1])], ["out"]))
    elif net.kind == "mixed":
        e = {k: const(k, v) for k, v in net.extra.items()}
        affine(0, "x", "z0")
        nodes.append(helper.make_node(op, ["z0"], ["y0"]))
        nodes.append(helper.make_node("BatchNormalization", ["y0", e["gamma"], e["beta"], e["mean"], e["var"]], ["n"]))
        nodes.append(helper.make_node("Concat", ["n", e["C"]], ["c"], axis=1))
        nodes.append(helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
        nodes.append(helper.make_node("Sub", ["p", e["K"]], ["s"]))
        nodes.append(helper.make_node("Mul", [e["M"], "s"], ["m"]))
        pads = const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1]))
        inits[-1] = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
        nodes.append(helper.make_node("Pad", ["m", pads, const("pad_value", 0.5)], ["q"], mode="constant"))
        affine(1, "q", "z1", pads=0)
        nodes.append(helper.make_node(op, ["z1"], ["y1"]))
        affine(2, "m", "z2")
        nodes.append(helper.make_node("Sub", ["y1", "z2"], ["r"]))
        nodes.append(helper.make_node(op, ["r"], ["y2"]))
        nodes.append(helper.make_node("Flatten", ["y2"], ["f"]))
        affine(3, "f", "out")
    else:
        affine(0, "x", "z0")
        nodes.append(helper.make_node(op, ["z0"], ["y0"]))
        affine(1, "y0", "z1")
        nodes.append(helper.make_node("Add", ["z1", "y0"], ["r"]))
        nodes.append(helper.make_node(op, ["r"], ["y2"]))
        nodes.append(helper.make_node("Flatten", ["y2"], ["f"]))
        affine(2, "f", "out")
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(net.in_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def forward(net: Net, x: torch.Tensor, faults: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Every checked value for a batch of inputs; ``faults[site] = (mask, value)`` replaces failed neurons."""
    act = ACTIVATIONS[net.act][1]
    faults = faults or {}
    params = [(torch.tensor(a), torch.tensor(b)) for a, b in net.weights]
    seen: dict[str, torch.Tensor] = {}

    def keep(name, value):
        if name in faults:
            mask, sent = faults[name]
            value = torch.where(mask, sent, value)
        seen[name] = value
        return value

    def affine(i, v):
        weight, bias = params[i]
        return v @ weight.T + bias if weight.ndim == 2 else F.conv2d(v, weight, bias, padding=1)

    if net.kind == "dense":
        v = x
        for i in range(3):
            v = keep(f"y{i}", act(keep(f"z{i}", affine(i, v))))
        keep("out", affine(3, v))
    elif net.kind == "conv":
        y0 = keep("y0", act(keep("z0", affine(0, x))))
        y1 = keep("y1", act(keep("z1", affine(1, y0))))
        keep("out", affine(2, y1.flatten(1)))
    elif net.kind == "deconv":
        weight, bias = params[0]
        z0 = F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=1)
        y0 = keep("y0", act(keep("z0", z0)))
        keep("out", y0.flatten(1) @ params[1][0] + params[1][1])
    elif net.kind == "mixed":
        e = {k: torch.tensor(v) for k, v in net.extra.items()}
        y0 = keep("y0", act(keep("z0", affine(0, x))))
        n = keep("n", F.batch_norm(y0, e["mean"], e["var"], e["gamma"], e["beta"], training=False, eps=1e-5))
        c = keep("c", torch.cat([n, e["C"].expand(len(x), -1, -1, -1)], 1))
        m = keep("m", e["M"] * keep("s", keep("p", F.avg_pool2d(c, 2)) - e["K"]))
        y1 = keep("y1", act(keep("z1", F.conv2d(F.pad(m, (1, 1, 1, 1), value=0.5), *params[1]))))
        z2 = keep("z2", affine(2, m))
        y2 = keep("y2", act(keep("r", y1 - z2)))
        keep("out", affine(3, y2.flatten(1)))
    else:
        y0 = keep("y0", act(keep("z0", affine(0, x))))
        z1 = keep("z1", affine(1, y0))
        y2 = keep("y2", act(keep("r", z1 + y0)))
        keep("out", affine(2, y2.flatten(1)))
    return seen


# --------------------------------------------------------------------------- observed values


def random_faults(net: Net, batch: int, failure_range, gen: torch.Generator) -> dict:
    """Each hidden neuron fails with probability ½ and sends a, b or a uniform value of [a, b]."""
    a, b = failure_range
    probe = torch.zeros((1,) + net.in_shape[1:], dtype=torch.float64)
    shapes = {k: v.shape[1:] for k, v in forward(net, probe).items()}
    faults = {}
    for site in net.sites:
        shape = (batch,) + tuple(shapes[site])
        mask = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5
        pick = torch.rand(shape, generator=gen, dtype=torch.float64)
        sent = torch.where(pick < 1 / 3, a, torch.where(pick < 2 / 3, b, a + (b - a) * pick))
        faults[site] = (mask, sent.to(torch.float64))
    return faults


def observe(net: Net, box: tuple[float, float], failure_range=None, seed: int = 0, steps: int = 25) -> dict:
    """Per value, [min, max] over samples, corners and a PGD attack on each element (both directions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    try:
        return _observe(net, box, failure_range, seed, steps)
    finally:
        torch.set_num_threads(threads)


def _observe(net: Net, box: tuple[float, float], failure_range, seed: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = box
    shape = net.in_shape[1:]
    dim = int(np.prod(shape))
    samples = [lo + (hi - lo) * torch.rand((512,) + shape, generator=gen, dtype=torch.float64)]
    if dim <= 10:
        corners = torch.tensor(list(itertools.product([lo, hi], repeat=dim)), dtype=torch.float64)
        samples.append(corners.reshape((-1,) + shape))
    else:
        samples.append(torch.where(torch.rand((512,) + shape, generator=gen) < 0.5, lo, hi).to(torch.float64))
    seen: dict[str, list] = {}

    def record(batch, faults):
        for name, value in forward(net, batch, faults).items():
            flat = value.detach().reshape(value.shape[0], -1)
            seen.setdefault(name, []).append(torch.stack([flat.min(0).values, flat.max(0).values]))

    for batch in samples:
        record(batch, random_faults(net, len(batch), failure_range, gen) if failure_range else None)
    # one batch row per (value, element, direction), all attacked together
    sizes = {k: v[0].shape[1] for k, v in seen.items()}
    targets = [(name, i, sign) for name in net.values for sign in (1.0, -1.0) for i in range(sizes[name])]
    rows = len(targets)
    x = (lo + (hi - lo) * torch.rand((rows,) + shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    faults = random_faults(net, rows, failure_range, gen) if failure_range else None
    picks = {name: [r for r, t in enumerate(targets) if t[0] == name] for name in net.values}
    for _ in range(steps):
        values = forward(net, x, faults)
        objective = sum(
            (
                torch.tensor([targets[r][2] for r in chosen], dtype=torch.float64)
                * values[name].reshape(rows, -1)[chosen, [targets[r][1] for r in chosen]]
            ).sum()
            for name, chosen in picks.items()
        )
        (grad,) = torch.autograd.grad(objective, x)
        with torch.no_grad():
            x += 0.1 * (hi - lo) * grad.sign()
            x.clamp_(lo, hi)
    record(x.detach(), faults)
    return {
        k: (torch.stack(v)[:, 0].min(0).values.numpy(), torch.stack(v)[:, 1].max(0).values.numpy())
        for k, v in seen.items()
    }


def violations(ranges: dict, observed: dict, names: list[str]) -> list[str]:
    """Values of which some observed element falls outside its range."""
    bad = []
    for name in names:
        lo, hi = ranges[name].lo.reshape(-1), ranges[name].hi.reshape(-1)
        seen_lo, seen_hi = observed[name]
        tol = SLACK * (1 + np.abs(seen_lo) + np.abs(seen_hi))
        if np.any(seen_lo < lo - tol) or np.any(seen_hi > hi + tol):
            worst = max(float(np.max(lo - seen_lo)), float(np.max(seen_hi - hi)))
            bad.append(f"{name} (by {worst:.3g})")
    return bad


# --------------------------------------------------------------------------- helpers


def build(net: Net, tmp_path, box, ranges: str, budget: float | None = None, alpha_budget: float | None = None):
    path = tmp_path / f"{net.kind}_{net.act}.onnx"
    onnx.save(to_onnx(net), path)
    network = network_of(load_model(path), NetworkOptions(input_range=box, ranges="ibp"))
    ibp = dict(network.clean)
    if ranges == "crown":
        tighten_network(network, "crown", budget, alpha_budget)
    return network, ibp


def shrunk(ranges: dict, factor: float = 0.9) -> dict:
    """Every range shrunk about its centre (a deliberately unsound copy)."""
    from robaudit.graph.ops import Interval

    out = {}
    for name, box in ranges.items():
        centre, radius = (box.lo + box.hi) / 2, (box.hi - box.lo) / 2 * factor
        out[name] = Interval(centre - radius, centre + radius)
    return out


NETS = st.tuples(
    st.sampled_from(["dense", "conv", "residual", "mixed", "deconv"]),
    st.sampled_from(sorted(ACTIVATIONS)),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.4, 1.0, 2.0]),
    st.sampled_from([None, 2e4]),  # 2e4: most targets only get a window (or IBP)
)
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- tests


@FAST
@given(NETS)
def test_clean_ranges_contain_every_value_seen(tmp_path, params):
    kind, act, seed, scale, budget = params
    net = make_net(kind, act, np.random.default_rng(seed), scale)
    box = (-1.0, 1.0) if seed % 2 else (0.0, 1.0)
    network, ibp = build(net, tmp_path, box, "crown", budget)
    observed = observe(net, box, seed=seed)
    assert not violations(network.clean, observed, net.values)
    for name in net.values:  # never looser than IBP
        assert np.all(network.clean[name].lo >= ibp[name].lo) and np.all(network.clean[name].hi <= ibp[name].hi)


@FAST
@given(NETS, st.sampled_from([(0.0, 0.0), (-3.0, 3.0), (-0.5, 2.0)]))
def test_faulty_ranges_contain_every_value_seen_under_failures(tmp_path, params, failure_range):
    kind, act, seed, scale, budget = params
    net = make_net(kind, act, np.random.default_rng(seed), scale)
    box = (0.0, 1.0)
    network, _ = build(net, tmp_path, box, "crown", budget)
    failure = FailureModel.crash() if failure_range == (0.0, 0.0) else FailureModel.byzantine(None, failure_range)
    faulty = Analysis(network, failure).faulty()
    observed = observe(net, box, failure_range=failure_range, seed=seed)
    assert not violations(faulty, observed, net.values)


@pytest.mark.parametrize("kind", ["dense", "conv", "residual", "mixed", "deconv"])
def test_ranges_shrunk_by_ten_percent_are_caught(tmp_path, kind):
    """The checks above can fail: a copy of the ranges shrunk by 10 % is refuted, clean and faulty."""
    net = make_net(kind, "relu", np.random.default_rng(3), 1.0)
    network, _ = build(net, tmp_path, (0.0, 1.0), "crown")
    observed = observe(net, (0.0, 1.0), seed=3, steps=40)
    assert not violations(network.clean, observed, net.values)
    assert violations(shrunk(network.clean), observed, net.values)
    faulty = Analysis(network, FailureModel.byzantine(None, (-1.0, 1.0))).faulty()
    observed = observe(net, (0.0, 1.0), failure_range=(-1.0, 1.0), seed=3, steps=40)
    assert not violations(faulty, observed, net.values)
    assert violations(shrunk(faulty), observed, net.values)


def plain_crown(weights, lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """CROWN for a dense ReLU chain, written out plainly: pre-activation bounds of every layer.

    Triangle upper line, lower line of slope 1 when u ≥ −l else 0; each layer's bounds are
    intersected with IBP from the previous layer's bounds.
    """
    bounds: list[tuple[np.ndarray, np.ndarray]] = []
    y_lo, y_hi = lo, hi
    for j, (w_j, b_j) in enumerate(weights):
        pos, neg = np.maximum(w_j, 0), np.minimum(w_j, 0)
        ibp_lo, ibp_hi = pos @ y_lo + neg @ y_hi + b_j, pos @ y_hi + neg @ y_lo + b_j
        result = []
        for sign in (1.0, -1.0):
            lam = sign * np.eye(len(b_j))
            const = lam @ b_j
            lam = lam @ w_j
            for i in range(j - 1, -1, -1):
                l_i, u_i = bounds[i]
                up_slope = np.where(u_i <= 0, 0.0, np.where(l_i >= 0, 1.0, u_i / np.where(u_i > l_i, u_i - l_i, 1)))
                up_icpt = np.where((l_i < 0) & (u_i > 0), -up_slope * l_i, 0.0)
                low_slope = np.where(u_i <= 0, 0.0, np.where(l_i >= 0, 1.0, (u_i >= -l_i).astype(float)))
                lam_z = np.where(lam > 0, lam * up_slope, lam * low_slope)
                const = const + np.where(lam > 0, lam * up_icpt, 0.0).sum(axis=1)
                const = const + lam_z @ weights[i][1]
                lam = lam_z @ weights[i][0]
            result.append(const + np.maximum(lam, 0) @ hi + np.minimum(lam, 0) @ lo)
        z_lo, z_hi = np.maximum(-result[1], ibp_lo), np.minimum(result[0], ibp_hi)
        bounds.append((z_lo, z_hi))
        y_lo, y_hi = np.maximum(z_lo, 0), np.maximum(z_hi, 0)
    return bounds


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 3.0]))
def test_crown_agrees_with_a_plain_second_implementation(tmp_path, seed, scale):
    net = make_net("dense", "relu", np.random.default_rng(seed), scale)
    box = (-1.0, 1.0) if seed % 2 else (0.0, 1.0)
    network, _ = build(net, tmp_path, box, "crown", alpha_budget=0.0)  # without the optimised lower slopes
    expected = plain_crown(net.weights, np.full(5, box[0]), np.full(5, box[1]))
    for name, (lo, hi) in zip(["z0", "z1", "z2", "out"], expected, strict=True):
        got = network.clean[name]
        # equal up to the outward rounding margin (10⁻⁹ of the summed terms' magnitude), never tighter
        tol = 1e-6 * (1 + np.abs(lo)), 1e-6 * (1 + np.abs(hi))
        assert np.all(got.lo.reshape(-1) <= lo + 1e-12 * (1 + np.abs(lo))), name
        assert np.all(got.lo.reshape(-1) >= lo - tol[0]), name
        assert np.all(got.hi.reshape(-1) >= hi - 1e-12 * (1 + np.abs(hi))), name
        assert np.all(got.hi.reshape(-1) <= hi + tol[1]), name


def test_crown_is_tighter_than_ibp_on_a_deep_dense_net(tmp_path):
    """Not only sound: on a 3-hidden-layer ReLU net the last ranges shrink clearly."""
    net = make_net("dense", "relu", np.random.default_rng(7), 1.0)
    network, ibp = build(net, tmp_path, (0.0, 1.0), "crown")
    width = lambda box: float((box.hi - box.lo).sum())  # noqa: E731
    assert width(network.clean["out"]) < 0.9 * width(ibp["out"])
    assert network.ranges == "crown" and network.range_report.windows


# --------------------------------------------------------------------------- the flag


def test_ranges_flag_is_recorded_and_checked(tmp_path):
    """``--ranges`` on bound and inject, the ``ranges`` policy key of check, and a clear refusal."""
    from conftest import ROOT, cli_json, run_in_process

    lenet = ROOT / "sample_models" / "lenet.onnx"
    crown = cli_json("bound", lenet, "--epsilon", "1")
    ibp = cli_json("bound", lenet, "--epsilon", "1", "--ranges", "ibp")
    assert crown["settings"]["ranges"] == "crown" and ibp["settings"]["ranges"] == "ibp"
    # tighter ranges can only shrink δ (both sound)
    for tight, loose in zip(crown["layers"], ibp["layers"], strict=True):
        assert tight["delta"] <= loose["delta"] * (1 + 1e-9)
    assert "ranges crown" in run_in_process("bound", lenet, "--epsilon", "1").stdout
    injected = cli_json(
        "inject", lenet, "--crash", "1", "--trials", "2", "--samples", "2", "--in-process", "--ranges", "ibp", "--quiet"
    )
    assert injected["settings"]["ranges"] == "ibp"
    bad = run_in_process("bound", lenet, "--epsilon", "1", "--ranges", "exact", expect=2)
    assert "--ranges" in bad.stderr and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    policy = tmp_path / "robaudit.yaml"
    policy.write_text(f"epsilon: 100\nranges: ibp\nmodels:\n  - path: {lenet}\n    require: {{crash: 0}}\n")
    checked = cli_json("check", "--policy", policy)
    assert checked["models"][0]["settings"]["ranges"] == "ibp"
    policy.write_text(f"epsilon: 100\nranges: exact\nmodels:\n  - path: {lenet}\n    require: {{crash: 0}}\n")
    refused = run_in_process("check", "--policy", policy, expect=2)
    assert "'ranges'" in refused.stderr and "Traceback" not in refused.stderr
