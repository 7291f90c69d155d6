"""A layer whose activation is followed by a rounding op (Sigmoid then a float16 cast) keeps ranges that
hold its real values: the linear relaxations take a layer's last node as its activation, so such a model
keeps IBP ranges (docs/method.md §1.2, §5.2). Regression: the CROWN pass once applied the cast's rule to the
pre-activation box, giving the sigmoid outputs a range of [1.2, 3.0]."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from robaudit.bounds.audit import load_model, network_of
from robaudit.bounds.ranges import tighten_network
from robaudit.graph.network import NetworkOptions
from robaudit.graph.ops import Interval
from tests.conftest import make_model


def _model(path, cast_after: bool):
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(4, 3)) * 3 + 2).astype(np.float32)
    nodes = [h.make_node("Gemm", ["x", "W1", "b1"], ["z"], transB=1), h.make_node("Sigmoid", ["z"], ["s"])]
    last = "s"
    if cast_after:
        nodes += [h.make_node("Cast", ["s"], ["h16"], to=T.FLOAT16), h.make_node("Cast", ["h16"], ["h"], to=T.FLOAT)]
        last = "h"
    nodes.append(h.make_node("Gemm", [last, "W2"], ["y"], transB=1))
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3])], [h.make_tensor_value_info("y", T.FLOAT, [1, 2])],
        [nh.from_array(w1, "W1"), nh.from_array(np.full(4, 3, np.float32), "b1"),
         nh.from_array(rng.normal(size=(2, 4)).astype(np.float32), "W2")],
    )
    onnx.save(make_model(graph), path)
    return last


def _observed(path, value: str) -> tuple[np.ndarray, np.ndarray]:
    """Every value of ``value`` onnxruntime computes on the box's corners and 2,000 random inputs."""
    model = onnx.load(path)
    model.graph.output.append(h.make_tensor_value_info(value, T.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 3)).reshape(3, -1).T
    xs = np.vstack([corners, np.random.default_rng(1).random((2000, 3))]).astype(np.float32)
    seen = np.stack([session.run([value], {"x": x[None]})[0][0] for x in xs])
    return seen.min(axis=0), seen.max(axis=0)


def _crown_ranges(path) -> dict:
    network = network_of(load_model(path), NetworkOptions(input_range=(0.0, 1.0), ranges="ibp"))
    tighten_network(network, "crown")
    return network.clean


def _holds(box: Interval, seen: tuple[np.ndarray, np.ndarray]) -> bool:
    lo, hi = box.lo.reshape(-1), box.hi.reshape(-1)
    return bool(np.all(seen[0] >= lo - 1e-6) and np.all(seen[1] <= hi + 1e-6))


def test_ranges_after_a_rounded_activation_hold_the_real_values(tmp_path):
    path = tmp_path / "cast.onnx"
    value = _model(path, cast_after=True)
    seen = _observed(path, value)
    ranges = _crown_ranges(path)
    assert float(seen[0].min()) > 0.7  # the sigmoid outputs sit well inside (0, 1)
    assert _holds(ranges[value], seen), (ranges[value], seen)


def test_the_pre_activation_box_as_the_output_range_is_caught(tmp_path):
    """The weakened rule (the cast's interval on the pre-activation box, as before the fix) misses them."""
    path = tmp_path / "cast.onnx"
    value = _model(path, cast_after=True)
    seen = _observed(path, value)
    pre = _crown_ranges(path)["z"]
    assert not _holds(pre, seen)


def test_a_plain_activation_still_gets_crown_ranges(tmp_path):
    path = tmp_path / "plain.onnx"
    value = _model(path, cast_after=False)
    seen = _observed(path, value)
    network = network_of(load_model(path), NetworkOptions(input_range=(0.0, 1.0), ranges="ibp"))
    ibp = network.clean[value]
    tighten_network(network, "crown")
    assert _holds(network.clean[value], seen)
    assert network.ranges == "crown"
    assert np.all(network.clean[value].hi <= ibp.hi + 1e-12)


def test_certify_output_box_of_a_rounded_activation_holds_the_real_values(tmp_path):
    """Certification's local output box of such a layer runs the activation and then the rounding op
    (docs/method.md §7), not the rounding op alone on the pre-activation box."""
    from robaudit.bounds.certify import LocalCertifier
    from robaudit.bounds.fep import FailureModel

    path = tmp_path / "cast.onnx"
    value = _model(path, cast_after=True)
    seen = _observed(path, value)
    network = network_of(load_model(path), NetworkOptions(input_range=(0.0, 1.0), ranges="ibp"))
    certifier = LocalCertifier(network, FailureModel())
    layer = next(la for la in network.layers if la.output_value == value)
    box = certifier._activation(layer, network.clean[layer.preact_value])
    assert _holds(box, seen), (box, seen)
    assert not _holds(network.clean[layer.preact_value], seen)  # the weakened rule's box misses them


def test_the_report_names_the_ranges_it_used(tmp_path):
    """Asked for CROWN where it does not apply, the report's ``settings.ranges`` says ``ibp`` (the method the
    ranges came from), and the bound is the one ``--ranges ibp`` gives; where it applies it says ``crown``."""
    from tests.conftest import cli_json

    rounded, plain = tmp_path / "cast.onnx", tmp_path / "plain.onnx"
    _model(rounded, cast_after=True)
    _model(plain, cast_after=False)
    asked = cli_json("bound", rounded, "--epsilon", "1", "--crash", "1")
    ibp = cli_json("bound", rounded, "--epsilon", "1", "--crash", "1", "--ranges", "ibp")
    assert asked["settings"]["ranges"] == "ibp"
    assert any("CROWN does not model the float16 rounding in layer" in note for note in asked["notes"]), asked
    assert not any("CROWN" in note for note in ibp.get("notes", [])), "asked for IBP: nothing to explain"
    assert asked["layers"] == ibp["layers"] and asked.get("fep_tight") == ibp.get("fep_tight")
    assert cli_json("bound", plain, "--epsilon", "1")["settings"]["ranges"] == "crown"
