"""InstanceNormalization (docs/method.md §13.1): each channel normalized over its positions, with a scale
and bias per channel — PyTorch's ``InstanceNorm2d`` and, between two reshapes, ``GroupNorm``.

* random conv → InstanceNormalization (signed scales, biases, ε) → ReLU → dense networks (hypothesis):
  the normalization's output computed by onnxruntime at box corners and random inputs lies in the
  range the rule gives, and every crash / byzantine set of the conv layer at those inputs moves the
  output by at most ``fep_tight``;
* the rule weakened (γ halved, or the range shrunk by 10 %) is caught by the same points;
* ``GroupNorm`` and ``InstanceNorm2d`` exported by PyTorch (legacy exporter; the dynamo one under
  ``-m slow``: 10 s) are bounded, and the worst error ``inject --search worst`` finds stays under the bound.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import cli_json, make_model, ort_session, with_fault_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops.base import Interval
from robaudit.graph.ops.normalization import InstanceNormalization

SIDE = 3  # input planes SIDE × SIDE


def _model(rng, channels: int, eps: float, scale: float, grouped: bool):
    """x [N, 2, 3, 3] → Conv 2→C (3×3, pad 1) → InstanceNormalization → ReLU → Flatten → Gemm → y [N, 2];
    ``grouped``: the normalization sees [N, C/2, 2·9] (GroupNorm's reshapes), then [N, C, 3, 3] again."""
    inits = [
        numpy_helper.from_array(rng.normal(0, scale, (channels, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 1, channels).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.3, (2, channels * SIDE * SIDE)).astype(np.float32), "w_out"),
        numpy_helper.from_array(rng.normal(0, 1, 2).astype(np.float32), "b_out"),
    ]
    groups = channels // 2 if grouped else channels
    inits += [
        numpy_helper.from_array((rng.uniform(0.3, 2.0, groups) * rng.choice([-1, 1], groups)).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(0, 1, groups).astype(np.float32), "beta"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if grouped:
        inits += [
            numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped_shape"),
            numpy_helper.from_array(np.array([0, channels, SIDE, SIDE], np.int64), "plane_shape"),
        ]
        nodes += [
            helper.make_node("Reshape", ["c", "grouped_shape"], ["c_grouped"]),
            helper.make_node("InstanceNormalization", ["c_grouped", "g", "beta"], ["n_grouped"], epsilon=eps),
            helper.make_node("Reshape", ["n_grouped", "plane_shape"], ["n"]),
        ]
        normalized = "n_grouped"
    else:
        nodes.append(helper.make_node("InstanceNormalization", ["c", "g", "beta"], ["n"], epsilon=eps))
        normalized = "n"
    nodes += [
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "w_out", "b_out"], ["y"], name="out", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "instance_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return make_model(graph), normalized


def _points(rng) -> list[np.ndarray]:
    corners = [np.full((2, SIDE, SIDE), v) for v in (0.0, 1.0)]
    corners += [rng.integers(0, 2, (2, SIDE, SIDE)).astype(np.float64) for _ in range(20)]
    return corners + list(rng.uniform(0, 1, (30, 2, SIDE, SIDE)))


def _outside(model, value: str, box: Interval, points) -> float:
    """How far the value computed by onnxruntime at ``points`` leaves ``box`` (0: never)."""
    probe = helper.make_tensor_value_info(value, TensorProto.FLOAT, None)
    extended = type(model).FromString(model.SerializeToString())
    extended.graph.output.append(probe)
    session = ort_session(extended)
    worst = 0.0
    for x in points:
        got = session.run([value], {"x": x[None].astype(np.float32)})[0].astype(np.float64)
        slack = 1e-5 * (1 + np.abs(got))
        worst = max(worst, float(np.max(box.lo.reshape(got.shape) - slack - got)))
        worst = max(worst, float(np.max(got - box.hi.reshape(got.shape) - slack)))
    return worst


def _errors(model, counts: int, failure_range, points, rng, channels: int) -> float:
    """Largest |ΔF| over every set of ``counts`` failed conv outputs (a sample of sets when there are many)."""
    shape = (channels, SIDE, SIDE)
    session = ort_session(with_fault_inputs(model, ["c"], [shape]))
    size = int(np.prod(shape))
    sets = list(itertools.combinations(range(size), counts))
    if len(sets) > 60:
        sets = [sets[i] for i in rng.choice(len(sets), 60, replace=False)]
    a, b = failure_range
    worst = 0.0
    for chosen in sets:
        keep, inject = np.ones((len(points), size)), np.zeros((len(points), size))
        keep[:, list(chosen)] = 0.0
        inject[:, list(chosen)] = rng.choice([a, b], (len(points), len(chosen)))
        feed = {"x": np.stack(points).astype(np.float32)}
        ones = np.ones_like(keep)
        faulty = session.run(["y"], {**feed, "keep_0": keep.reshape(-1, *shape).astype(np.float32),
                                     "inject_0": inject.reshape(-1, *shape).astype(np.float32)})[0]
        clean = session.run(["y"], {**feed, "keep_0": ones.reshape(-1, *shape).astype(np.float32),
                                    "inject_0": (0 * inject).reshape(-1, *shape).astype(np.float32)})[0]
        worst = max(worst, float(np.abs(faulty.astype(np.float64) - clean).max()))
    return worst


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    st.sampled_from([2, 4]),
    st.sampled_from([1e-5, 1e-2, 1.0]),
    st.floats(0.3, 3.0),
    st.booleans(),
    st.sampled_from(["crash", "byzantine"]),
    st.integers(0, 2**31),
)
def test_instance_normalization_ranges_and_bound_hold_at_every_point(
    tmp_path_factory, channels, eps, scale, grouped, mode, seed
):
    rng = np.random.default_rng(seed)
    model, normalized = _model(rng, channels, eps, scale, grouped)
    path = tmp_path_factory.mktemp("inorm") / "net.onnx"
    path.write_bytes(model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    points = _points(rng)
    assert _outside(model, normalized, net.clean[normalized], points) <= 0.0
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=(-2.0, 2.0))
    bound = TightBound(Analysis(net, failure))
    for counts in (1, 2):
        worst = _errors(model, counts, failure.failure_range, points[:12], rng, channels)
        assert worst <= bound.fep([counts]) * (1 + 1e-5) + 1e-6, (counts, worst, bound.fep([counts]))


def _weakened_range_is_caught(monkeypatch, weaken) -> None:
    rng = np.random.default_rng(3)
    model, normalized = _model(rng, 2, 1e-5, 2.0, False)
    original = InstanceNormalization.interval
    monkeypatch.setattr(InstanceNormalization, "interval", lambda self, node, args: weaken(original(self, node, args)))
    path_bytes = model.SerializeToString()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        path.write_bytes(path_bytes)
        _, net = load_network(path, NetworkOptions(ranges="ibp"))
    assert _outside(model, normalized, net.clean[normalized], _points(rng)) > 1e-3


def test_instance_normalization_range_shrunk_ten_percent_is_caught(monkeypatch):
    def shrink(out):
        box = out[0]
        middle, radius = (box.lo + box.hi) / 2, (box.hi - box.lo) / 2
        return [Interval(middle - 0.9 * radius, middle + 0.9 * radius)]

    _weakened_range_is_caught(monkeypatch, shrink)


def test_instance_normalization_scale_halved_is_caught(monkeypatch):
    original = InstanceNormalization._affine

    def halved(self, node, args, shape):
        gamma, beta = original(self, node, args, shape)
        return 0.5 * gamma, beta

    monkeypatch.setattr(InstanceNormalization, "_affine", halved)
    rng = np.random.default_rng(3)
    model, normalized = _model(rng, 2, 1e-5, 2.0, False)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        path.write_bytes(model.SerializeToString())
        _, net = load_network(path, NetworkOptions(ranges="ibp"))
    assert _outside(model, normalized, net.clean[normalized], _points(rng)) > 1e-3


@pytest.mark.parametrize(
    ("norm", "dynamo"), [("group", False), pytest.param("group", True, marks=pytest.mark.slow), ("instance", False)]
)
def test_exported_group_and_instance_norms_are_bounded_and_injection_stays_under(tmp_path, norm, dynamo):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            made = torch.nn.GroupNorm(2, 4) if norm == "group" else torch.nn.InstanceNorm2d(4, affine=True)
            self.norm = made
            self.head = torch.nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial affine parts
        net.norm.weight.uniform_(-2.0, 2.0)
        net.norm.bias.uniform_(-1.0, 1.0)
    path = tmp_path / f"{norm}.onnx"
    example = (torch.rand(2, 1, 5, 5),)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(net, example, str(path), dynamo=True, dynamic_shapes=({0: batch},),
                          input_names=["x"], output_names=["y"])
    else:
        torch.onnx.export(net, example, str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    report = cli_json("inject", path, "--crash", "1", "--search", "worst", "--samples", "20", "--format", "json")
    bound = report["bound"]
    assert np.isfinite(bound) and report["violation"] is False
    assert 0 < report["bracket"]["best_found"] <= bound * (1 + 1e-5)
