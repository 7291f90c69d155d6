"""Real PyTorch 2.13 exports of residual and squeeze-and-excitation CNNs, with
both exporters (dynamo, which writes external data, and the legacy ``dynamo=False``),
load and give a bound whose tight value is below the paper value."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
from conftest import SAMPLES, cli_json

pytestmark = pytest.mark.export

torch = pytest.importorskip("torch")


def _sample_module(name: str):
    if str(SAMPLES) not in sys.path:
        sys.path.insert(0, str(SAMPLES))  # the scripts import their shared _torch_common
    spec = importlib.util.spec_from_file_location(name, SAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _models():
    resnet = _sample_module("make_resnet_small")
    mobile = _sample_module("make_mobilenet_se")
    return {"resnet": resnet.ResNetSmall, "mobilenet_se": mobile.MobileNetSE}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("cnn_exports")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in _models().items():
            model = cls().eval()
            example = (torch.rand(1, 3, 32, 32),)
            for dynamo in (True, False):
                path = folder / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
                kwargs = {"opset_version": 17} if not dynamo else {}
                torch.onnx.export(
                    model, example, str(path), dynamo=dynamo, input_names=["input"], output_names=["logits"], **kwargs
                )
                out[(name, dynamo)] = path
    return out


@pytest.mark.parametrize("name", ["resnet", "mobilenet_se"])
@pytest.mark.parametrize("dynamo", [True, False])
def test_export_gives_a_bound(exports, name, dynamo):
    path = exports[(name, dynamo)]
    report = cli_json("bound", path, "--crash", "1", "--epsilon", "1")
    layers = report["layers"]
    assert len(layers) >= 5, [la["name"] for la in layers]
    if name == "resnet":  # the downsample block's conv2 and shortcut are summed before its ReLU: one layer (§1.4)
        assert layers[-1]["name"] == "block2.conv2+block2.shortcut.0", [la["name"] for la in layers]
    assert all(la["neurons"] > 0 and la["max_weight"] > 0 for la in layers)
    assert 0 < report["fep_tight"] < report["fep_paper"]
    assert report["settings"]["output"] == "logits"


def test_dynamo_export_uses_external_data(exports):
    path = exports[("resnet", True)]
    assert path.with_name(path.name + ".data").exists()


def test_tight_is_100x_below_paper_on_the_resnet_sample():
    report = cli_json("bound", SAMPLES / "resnet_small.onnx", "--crash", "2", "--epsilon", "1")
    assert report["fep_paper"] / report["fep_tight"] >= 100
