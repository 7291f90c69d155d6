"""One-sided clamps: ``Max(y, c)`` and ``Min(y, c)`` with a constant scalar c, as PyTorch's dynamo exporter
writes ``clamp(min=c)`` / ``clamp(max=c)`` (a Constant node for c), are bounded as a clip open on one side.

* dense → Max/Min (c from a Constant node or an initializer, on either operand) → dense, every crash and
  byzantine set with values at the ends and random inputs run in onnxruntime: within ``fep_tight``;
* the clamp's range equals the one onnxruntime reaches at the corners, and with the constant read 0.1
  further into y's range (a weakened copy) it misses values onnxruntime computes;
* a constant that is not one scalar (it could broadcast y to another shape) or two variable operands
  stay refused in one line.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import make_model, ort_session, run_cli, with_fault_inputs
from onnx import TensorProto, helper, numpy_helper

import robaudit.graph.ops.restriction as restriction
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions


def _model(op: str, c, constant_node: bool, first: bool):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 1, (2, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b2"),
    ]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1)]
    value = numpy_helper.from_array(np.asarray(c, np.float32), "c")
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["c"], value=value))
    else:
        inits.append(value)
    operands = ["h", "c"] if first else ["c", "h"]
    nodes += [
        helper.make_node(op, operands, ["clamped"], name="clamp"),
        helper.make_node("Gemm", ["clamped", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "clamp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return make_model(graph)


def _worst(model, counts: int, failure_range) -> float:
    session = ort_session(with_fault_inputs(model, ["h"], [4]))
    rng = np.random.default_rng(1)
    inputs = [np.array(p, np.float64) for p in itertools.product([0.0, 1.0], repeat=3)]
    inputs += list(rng.uniform(0, 1, (20, 3)))
    a, b = failure_range
    worst = 0.0
    for chosen in itertools.combinations(range(4), counts):
        for values in itertools.product([a, b], repeat=counts):
            keep, inject = np.ones((len(inputs), 4)), np.zeros((len(inputs), 4))
            keep[:, list(chosen)] = 0.0
            inject[:, list(chosen)] = values
            x = np.stack(inputs).astype(np.float32)
            faults = {"keep_0": keep.astype(np.float32), "inject_0": inject.astype(np.float32)}
            faulty = session.run(["y"], {"x": x, **faults})
            clean = session.run(["y"], {"x": x, "keep_0": np.ones_like(keep, np.float32),
                                        "inject_0": np.zeros_like(inject, np.float32)})
            worst = max(worst, float(np.abs(faulty[0].astype(np.float64) - clean[0]).max()))
    return worst


def _bound(tmp_path, model, failure, counts: int) -> float:
    path = tmp_path / "clamp.onnx"
    path.write_bytes(model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    return TightBound(Analysis(net, failure)).fep([counts])


@pytest.mark.parametrize(("op", "c"), [("Max", 0.0), ("Max", 0.4), ("Min", 0.5), ("Min", -0.2)])
@pytest.mark.parametrize(("constant_node", "first"), [(True, True), (False, False)])
def test_one_sided_clamps_are_sound(tmp_path, op, c, constant_node, first):
    model = _model(op, c, constant_node, first)
    for failure in (FailureModel.crash(), FailureModel.byzantine(failure_range=(-3.0, 3.0))):
        for counts in (1, 2):
            worst = _worst(model, counts, failure.failure_range)
            bound = _bound(tmp_path, model, failure, counts)
            assert worst <= bound * (1 + 1e-5) + 1e-6, (op, c, failure.mode, counts, worst, bound)


def _clamped_range(model) -> tuple[np.ndarray, np.ndarray]:
    """The clamp's output over the input box by onnxruntime: h is affine in x, the clamp monotone, so the
    corners reach both ends."""
    probe = type(model).FromString(model.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info("clamped", TensorProto.FLOAT, None))
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=3)), np.float32)
    got = ort_session(probe).run(["clamped"], {"x": corners})[0].astype(np.float64)
    return got.min(axis=0), got.max(axis=0)


@pytest.mark.parametrize(("op", "c"), [("Max", 0.4), ("Min", -0.2)])
def test_one_sided_clamp_ranges_are_exact_and_a_moved_constant_is_caught(tmp_path, monkeypatch, op, c):
    model = _model(op, c, True, True)
    path = tmp_path / "clamp.onnx"
    path.write_bytes(model.SerializeToString())
    lo, hi = _clamped_range(model)
    _, net = load_network(path, NetworkOptions(ranges="ibp"))
    box = net.clean["clamped"]
    assert np.allclose(box.lo.reshape(-1), lo, atol=1e-5) and np.allclose(box.hi.reshape(-1), hi, atol=1e-5)
    original = restriction._one_sided

    def moved(node, constants):  # the constant read 0.1 further into y's range: the clamp cuts more
        made = original(node, constants)
        if made is not None:
            side = "low" if node.op_type == "Max" else "high"
            made.attrs[side] = made.attrs[side] + (0.1 if side == "low" else -0.1)
        return made

    monkeypatch.setattr(restriction, "_one_sided", moved)
    _, net = load_network(path, NetworkOptions(ranges="ibp"))
    box = net.clean["clamped"]
    assert np.any(box.lo.reshape(-1) > lo + 0.05) or np.any(box.hi.reshape(-1) < hi - 0.05)


@pytest.mark.parametrize("kind", ["vector", "variable"])
def test_other_min_max_forms_stay_refused_in_one_line(tmp_path, kind):
    model = _model("Min", [0.5, 0.2, 0.1, 0.3], True, True)
    if kind == "variable":
        clamp = next(n for n in model.graph.node if n.name == "clamp")
        clamp.input[1] = "h"
    path = tmp_path / "other.onnx"
    path.write_bytes(model.SerializeToString())
    proc = run_cli("bound", path, "--crash", "1", expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'Min'" in lines[0] and "clamp" in lines[0], proc.stderr
