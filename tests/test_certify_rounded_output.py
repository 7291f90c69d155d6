"""Certificates of models whose output is rounded (docs/method.md §7.4, "Rounded outputs").

An int8 model's output QDQ pair can round two logits to one code: a failure that leaves the predicted class
ahead before the rounding by less than a step can still change onnxruntime's arg-max (the first of a tie).
A new-user trial saw `certify` call such an input certified. Checked here against onnxruntime on models with
every crash set injected (``conftest.with_fault_inputs``): a hand-derived tie, random MLPs, and the margin the
report shows, which must not exceed the rounded output's own.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, with_fault_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds import tail_order
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions


def rounded_mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, scale: float, zero_point: int = 0) -> onnx.ModelProto:
    """x [1, D] → Gemm → Relu (hidden 'h') → Gemm → QuantizeLinear/DequantizeLinear (int8, ``scale``) → y."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    inits += [numpy_helper.from_array(np.array(scale, np.float32), "s"),
              numpy_helper.from_array(np.array(zero_point, np.int8), "z")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc0"),
        helper.make_node("Relu", ["z1"], ["h"], name="relu0"),
        helper.make_node("Gemm", ["h", "w2"], ["logits"], name="fc1"),
        helper.make_node("QuantizeLinear", ["logits", "s", "z"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant"),
    ]
    graph = helper.make_graph(
        nodes, "rounded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w2.shape[1]])], inits,
    )
    return make_model(graph)


def arg_max_under_crashes(model: onnx.ModelProto, x: np.ndarray, sets: list[tuple[int, ...]]) -> np.ndarray:
    """onnxruntime's arg-max (the first of a tie, as np.argmax) of each crash set of 'h' (rows), at input x."""
    hidden = model.graph.initializer[0].dims[1]
    faulty = with_fault_inputs(model, ["h"], [hidden])
    faulty.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    faulty.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    session = ort.InferenceSession(faulty.SerializeToString(), providers=["CPUExecutionProvider"])
    keep = np.ones((len(sets), hidden), np.float32)
    for row, crashed in enumerate(sets):
        keep[row, list(crashed)] = 0.0
    feeds = {"x": np.repeat(x.reshape(1, -1).astype(np.float32), len(sets), 0), "keep_0": keep,
             "inject_0": np.zeros_like(keep)}
    return np.argmax(session.run(None, feeds)[0], axis=1)


def certifier(model: onnx.ModelProto, x: np.ndarray, tmp_path: Path) -> Certifier:
    path = tmp_path / "rounded.onnx"
    onnx.save(model, path)
    _, network = load_network(path, NetworkOptions())
    return Certifier(network, FailureModel.crash(), x.reshape(-1, 1, x.shape[-1]).astype(np.float32))


HAND = dict(w1=np.eye(2), b1=np.zeros(2), w2=np.array([[1.9, 2.0], [0.5, 1.0]]), scale=0.5)


def test_a_tie_after_the_output_rounding_is_not_certified(tmp_path) -> None:
    """Clean logits (2.4, 3.0) → codes 5, 6: class 1. Crash h1: (1.9, 2.0), 0.1 apart before the rounding,
    codes 4 and 4 after it: onnxruntime answers class 0. Before the rounding class 1 stays ahead under
    either crash (margins 0.1 and 0.5), which is all the certificate used to look at."""
    model, x = rounded_mlp(**HAND), np.ones((1, 2))
    assert list(arg_max_under_crashes(model, x[0], [(), (0,), (1,)])) == [1, 1, 0]
    box = certifier(model, x, tmp_path).box(0, [1])
    assert box.predicted == 1 and not box.certified(1.0)
    assert box.margin_slack is not None and box.margin_slack < 0
    assert box.margin is not None and box.margin <= 0.5 + 1e-9  # the rounded clean margin: 3.0 − 2.5


def test_the_margin_taken_by_the_rounding_left_out_is_caught(tmp_path, monkeypatch) -> None:
    """The rule without what the rounding takes (the certificate before the fix) certifies the tie above."""
    model, x = rounded_mlp(**HAND), np.ones((1, 2))
    monkeypatch.setattr(tail_order.TailOrder, "room", lambda self, lo, hi, c, others: (
        np.zeros(len(others)), np.full(len(others), np.inf), np.full(len(others), -np.inf)))
    assert certifier(model, x, tmp_path).box(0, [1]).certified(1.0)


def test_a_clip_at_the_top_code_is_not_certified_as_an_order(tmp_path) -> None:
    """Both logits past the top code (127·s) after a crash: they saturate to one code, a tie, though the margin
    before the rounding stays large. Clean: (20, 40) with s = 0.25, top 31.75: class 1 at code 127 already,
    class 0 at 80; crash h1 (which only lowers class 0 by much less): both high."""
    w2 = np.array([[40.0, 41.0], [-30.0, 0.0]])  # h0 = h1 = 1: logits (10, 41); crash h1: (40, 41), both ≥ 31.75
    model, x = rounded_mlp(np.eye(2), np.zeros(2), w2, 0.25), np.ones((1, 2))
    assert list(arg_max_under_crashes(model, x[0], [(), (1,)])) == [1, 0]
    assert not certifier(model, x, tmp_path).box(0, [1]).certified(1.0)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.02, 0.1, 0.3, 1.0]), count=st.integers(1, 2))
def test_certified_inputs_keep_their_class_under_every_crash_set(tmp_path_factory, seed, scale, count) -> None:
    """Random 3-4-3 MLPs with a rounded output: every certified input keeps onnxruntime's arg-max under every
    set of ``count`` crashed hidden neurons, and the margin shown is at most the rounded output's own."""
    rng = np.random.default_rng(seed)
    model = rounded_mlp(rng.normal(0, 1, (3, 4)), rng.normal(0, 0.3, 4), rng.normal(0, 1, (4, 3)), scale)
    inputs = rng.uniform(0, 1, (8, 3))
    cert = certifier(model, inputs, tmp_path_factory.mktemp("rounded"))
    sets = [()] + list(itertools.combinations(range(4), count))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, x in enumerate(inputs):
        classes = arg_max_under_crashes(model, x, sets)
        box = cert.box(i, [count])
        if box.certified(1.0):
            assert np.all(classes == classes[0]), (i, classes)
        clean = np.sort(session.run(None, {"x": x.reshape(1, -1).astype(np.float32)})[0][0])
        if box.margin is not None and box.margin > 0:
            assert box.margin <= clean[-1] - clean[-2] + 1e-6, (i, box.margin, clean)


@pytest.mark.parametrize("flag", [[], ["--no-layer-counts"]])
def test_certify_command_on_the_tie(tmp_path, flag) -> None:
    from conftest import cli_json

    path = tmp_path / "tie.onnx"
    onnx.save(rounded_mlp(**HAND), path)
    np.savez(tmp_path / "x.npz", x=np.ones((1, 2), np.float32))
    report = cli_json("certify", path, "--inputs", tmp_path / "x.npz", "--crash", 1, *flag)
    assert report["inputs"][0]["certified"] is False


def test_the_saturation_left_out_is_caught(tmp_path, monkeypatch) -> None:
    """The margin rule without the distances to the codes' ends (a QDQ pair read as rounding only) certifies the
    saturated tie above."""
    from robaudit.graph.ops.rounding import QuantizeDequantize

    monkeypatch.setattr(QuantizeDequantize, "saturation", lambda self, node, shape: (-np.inf, np.inf))
    w2 = np.array([[40.0, 41.0], [-30.0, 0.0]])
    model, x = rounded_mlp(np.eye(2), np.zeros(2), w2, 0.25), np.ones((1, 2))
    assert certifier(model, x, tmp_path).box(0, [1]).certified(1.0)


def test_the_margin_shown_takes_the_top_code(tmp_path) -> None:
    """Logits (10, 41) at s = 0.25: class 1 saturates at the top code 31.75, so the rounded margin is 21.75, not
    41 − 10 less the rounding (an independent attack saw 30.5 shown)."""
    w2 = np.array([[10.0, 10.0], [-30.0, 0.0]])
    model = rounded_mlp(np.eye(2), np.array([0.0, 0.0]), w2, 0.25)
    b2 = numpy_helper.from_array(np.array([30.0, 31.0], np.float32), "b2")
    model.graph.initializer.append(b2)
    model.graph.node[2].input.append("b2")
    x = np.ones((1, 2))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rounded = np.sort(session.run(None, {"x": x.astype(np.float32)})[0][0])
    assert rounded[-1] - rounded[-2] == pytest.approx(21.75)
    box = certifier(model, x, tmp_path).box(0, [0])
    assert box.margin is not None and 0 < box.margin <= 21.75 + 1e-9


def test_int8_codes_named_only_by_output_dtype(tmp_path) -> None:
    """QuantizeLinear of opset 21 with output_dtype INT8 and no zero-point input rounds to −128..127, not uint8's
    0..255 (robaudit read the latter; an independent attack's crash then tied two logits at the top code 31.75 in an
    input it certified)."""
    from robaudit.graph.onnx_graph import Node
    from robaudit.graph.ops.rounding import fuse_rounding

    quant = Node("q", "QuantizeLinear", "", ["y", "s"], ["c"], {"output_dtype": TensorProto.INT8})
    dequant = Node("dq", "DequantizeLinear", "", ["c", "s"], ["z"], {})
    fused = fuse_rounding([quant, dequant], {"s": np.float32(0.25)})
    assert len(fused) == 1 and (fused[0].attr("qmin"), fused[0].attr("qmax")) == (-128, 127)
    int4 = Node("q", "QuantizeLinear", "", ["y", "s"], ["c"], {"output_dtype": TensorProto.INT4})
    assert [n.op_type for n in fuse_rounding([int4, dequant], {"s": np.float32(0.25)})] == [
        "QuantizeLinear", "DequantizeLinear"]  # not read as uint8: left to be refused by name


def test_a_pair_read_into_a_pair_of_other_codes_is_refused(tmp_path) -> None:
    """Q1 → DQ1 → Q2 → DQ2 with other scales: onnxruntime's default session runs them as one rounding of its own
    (an independent attack measured different outputs and a broken certificate): refused in one line."""
    from conftest import run_cli

    model = rounded_mlp(**HAND)
    graph = model.graph
    graph.node[-1].output[0] = "y1"
    graph.initializer.append(numpy_helper.from_array(np.array(0.9, np.float32), "s2"))
    graph.node.extend([helper.make_node("QuantizeLinear", ["y1", "s2", "z"], ["q2"], name="quant2"),
                       helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["y"], name="dequant2")])
    path = tmp_path / "double.onnx"
    onnx.save(model, path)
    proc = run_cli("bound", path, expect=2)
    assert "read straight into another pair 'quant2'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    same = rounded_mlp(**HAND)  # the same codes twice: the identity on the first pair's codes, accepted
    same.graph.node[-1].output[0] = "y1"
    same.graph.node.extend([helper.make_node("QuantizeLinear", ["y1", "s", "z"], ["q2"], name="quant2"),
                            helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="dequant2")])
    onnx.save(same, tmp_path / "same.onnx")
    run_cli("bound", tmp_path / "same.onnx")


def test_a_tie_on_the_clean_rounded_output_is_predicted_as_onnxruntime_reads_it(tmp_path) -> None:
    """Clean logits (2.9, 3.0) at s = 0.5 round to 3.0 and 3.0: onnxruntime's arg-max is 0 (the first), and so is
    the class certify reports (it was 1, the arg-max before the rounding); nothing is certified there."""
    w2 = np.array([[1.9, 2.0], [1.0, 1.0]])
    model, x = rounded_mlp(np.eye(2), np.zeros(2), w2, 0.5), np.ones((1, 2))
    assert list(arg_max_under_crashes(model, x[0], [()])) == [0]
    box = certifier(model, x, tmp_path).box(0, [0])
    assert box.predicted == 0 and not box.certified(1.0)


def test_the_margin_shown_when_both_classes_saturate() -> None:
    """Logits (20, −20) at s = 0.1: class 0 saturates at the top code 12.7, class 1 at the bottom one −12.8, so the
    rounded margin is 25.5 = top − bottom, which the margin shown must not exceed (a second attack saw 32.5)."""
    import tempfile

    model, x = rounded_mlp(np.eye(2), np.zeros(2), np.array([[20.0, -20.0], [0.0, 0.0]]), 0.1), np.ones((1, 2))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rounded = session.run(None, {"x": x.astype(np.float32)})[0][0]
    assert rounded[0] - rounded[1] == pytest.approx(25.5, abs=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        box = certifier(model, x, Path(folder)).box(0, [0])
    assert box.predicted == 0 and box.margin is not None and 0 < box.margin <= 25.5 + 1e-5
