"""The gated deviation network (docs/method.md §4.5) and a stand-alone op reading a layer's own output.

x ∈ [1, 2] → p = Gemm(x) (no activation) → g(p) → q = [1, 1]·g(p) (no activation) → g(q) → y = g(q₁) − g(q₂),
g the identity as a stand-alone op (``LeakyRelu`` with α = 1 beside a second reader ``Sub(v, v)``, or a range
restriction's NaN guard). Byzantine
values in [−5, 5]: p = 5 and q₂ = −5 move y from 0 to 10 (onnxruntime, below). The gate of such an op was keyed
by the value the layer's own gate is (its pre-activation is its output) and replaced it, losing the failure
site's slope with 0 added: the bound was 7 (found by an independent attack on the guard form, then the same
with LeakyRelu at the code of the day before). Such networks are now left to the signed terms' own enclosure.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model, ort_session, with_fault_inputs
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions


def _model(identity: str):
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def wrap(value):
        out = f"{value}_g"
        if identity == "leaky":  # Sub(v, v) = 0 is a second reader of v: the LeakyRelu stays a stand-alone op
            nodes.extend([helper.make_node("LeakyRelu", [value], [f"{value}_l"], alpha=1.0),
                          helper.make_node("Sub", [value, value], [f"{value}_0"]),
                          helper.make_node("Add", [f"{value}_l", f"{value}_0"], [out])])
        else:
            nodes.extend([helper.make_node("IsNaN", [value], [f"{value}_nan"]),
                          helper.make_node("Where", [f"{value}_nan", const(f"{value}_c", 0.0), value], [out])])
        return out

    nodes.append(helper.make_node("Gemm", ["x", const("w1", [[1.0]]), const("b1", [0.0])], ["p"]))
    nodes.append(helper.make_node("Gemm", [wrap("p"), const("w2", [[1.0, 1.0]]), const("b2", [0.0, 0.0])], ["q"]))
    nodes.append(helper.make_node("Gemm", [wrap("q"), const("w3", [[1.0], [-1.0]]), const("b3", [0.0])], ["y"]))
    graph = helper.make_graph(nodes, "gates", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    return make_model(graph)


@pytest.mark.parametrize("identity", ["leaky", "nan_guard"])
def test_a_stand_alone_op_on_a_layers_output_keeps_the_failure_sites_gate(tmp_path, identity) -> None:
    model = _model(identity)
    path = tmp_path / "gates.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort_session(with_fault_inputs(model, ["p", "q"], [1, 2]))
    x = np.full((1, 1), 1.2, np.float32)
    feed = {"x": x, "keep_0": np.zeros((1, 1), np.float32), "inject_0": np.full((1, 1), 5.0, np.float32),
            "keep_1": np.array([[1.0, 0.0]], np.float32), "inject_1": np.array([[0.0, -5.0]], np.float32)}
    faulty = session.run(["y"], feed)[0]
    clean = session.run(["y"], {**feed, "keep_0": np.ones((1, 1), np.float32), "inject_0": np.zeros((1, 1), np.float32),
                                "keep_1": np.ones((1, 2), np.float32), "inject_1": np.zeros((1, 2), np.float32)})[0]
    measured = float(np.abs(faulty - clean).max())
    assert measured == pytest.approx(10.0)
    _, net = load_network(path, NetworkOptions(input_range=(1.0, 2.0)))
    tight = TightBound(Analysis(net, FailureModel.byzantine(failure_range=(-5.0, 5.0))))
    assert tight.fep([1, 1]) >= measured * (1 - 1e-6) and tight.refined([1, 1]) >= measured * (1 - 1e-6), (
        tight.fep([1, 1]), tight.refined([1, 1]))
