"""Pad modes reflect, edge and wrap (PyTorch's padding_mode reflect, replicate, circular).

Every output element of such a Pad is a copy of one input element, so intervals and
adjoints follow its index map. Checks: both exporters load, the layer ranges contain
what PyTorch computes, worst-case injection stays below the bound, and the two exports
give the same tight bound — for ``circular`` the legacy exporter writes Slice + Concat
instead of Pad(wrap), so that equality compares two independent op rules.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import OPSET, cli_json, make_model, run_cli
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.export

MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    import torch
    from torch import nn

    folder = tmp_path_factory.mktemp("pads")
    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, padding_mode=mode),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3, padding=2, padding_mode=mode),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 8 * 8, 3),
        ).eval()
        for dynamo in (True, False):
            path = folder / f"{mode}_{'dynamo' if dynamo else 'legacy'}.onnx"
            kwargs = {"dynamo": dynamo, "input_names": ["x"], "output_names": ["y"]}
            if not dynamo:
                kwargs["opset_version"] = OPSET
            torch.onnx.export(model, (torch.rand(1, 1, 6, 6),), str(path), **kwargs)
            out[mode, dynamo] = (model, path)
    return out


@pytest.mark.parametrize("mode", sorted(MODES))
def test_padded_convolutions_are_sound_and_agree_across_exporters(exports, mode):
    import torch

    reports = {}
    for dynamo in (True, False):
        model, path = exports[mode, dynamo]
        inspect = cli_json("inspect", path)
        hidden = [la for la in inspect["layers"] if not la["is_output"]]
        x = torch.rand(256, 1, 6, 6)
        with torch.no_grad():
            first = model[1](model[0](x))
            second = model[3](model[2](first))
        for layer, values in zip(hidden, (first, second), strict=True):
            lo, hi = layer["output_range"]
            assert lo <= float(values.min()) and float(values.max()) <= hi * (1 + 1e-6), layer
        report = cli_json("inject", path, "--crash", "2", "--search", "worst", "--samples", "12", "-q")
        assert report["violation"] is False and 0 < report["measured"]["max"] <= report["bound"]
        reports[dynamo] = cli_json("bound", path, "--byzantine", "1", "--capacity", "2")
    # the tight bound follows the function; the paper's scaling rules depend on how the graph is written
    assert reports[True]["fep_tight"] == pytest.approx(reports[False]["fep_tight"], rel=1e-9)
    assert all(r["fep_tight"] <= r["fep_paper"] for r in reports.values())


def _pad_model(mode: str, pads: list[int]):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode=mode),
        helper.make_node("Conv", ["p", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1),
    ]
    size = 4 + pads[2] + pads[6] - 2
    inits = [
        numpy_helper.from_array(np.array(pads, np.int64), "pads"),
        numpy_helper.from_array(rng.uniform(-1, 1, (2, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(-1, 1, (3, 2 * size * size)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    return make_model(graph, opset=19)  # wrap needs opset 19


def test_pad_longer_than_its_axis_is_refused(tmp_path):
    """numpy would reflect twice; ONNX does not define it: refused by name rather than guessed."""
    path = tmp_path / "long_reflect.onnx"
    path.write_bytes(_pad_model("reflect", [0, 0, 4, 4, 0, 0, 4, 4]).SerializeToString())
    assert_one_line_error(run_cli("bound", path, expect=None), "'pad'", "longer than the padded axis")


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_hand_built_pad_modes_stay_below_the_bound(tmp_path, mode):
    path = tmp_path / f"{mode}.onnx"
    path.write_bytes(_pad_model(mode, [0, 0, 2, 1, 0, 0, 1, 2]).SerializeToString())
    args = ["--byzantine", "1", "--capacity", "2", "--search", "worst", "--samples", "16", "-q"]
    report = cli_json("inject", path, *args)
    assert report["violation"] is False and 0 < report["measured"]["max"] <= report["bound"]
