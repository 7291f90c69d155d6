"""Activations that PyTorch exports as subgraphs or rarer ops: Softplus(beta, threshold), Softsign, CELU.

The default (dynamo) exporter writes ``nn.Softplus`` as ``Where(β·x > 20, x,
Softplus(β·x)/β)`` and both exporters write ``nn.Softsign`` as ``x / (1 + |x|)``; ``nn.CELU``
is the ONNX op Celu. Each is exported with both exporters and run through the real
``robaudit`` command: the layer ranges must contain what PyTorch computes, and the
worst-case injection must stay below the bound. Hand-built graphs check that look-alikes
which are *not* these functions are refused by name.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import OPSET, cli_json, make_model, run_cli
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.export

#: name → (module factory, robaudit's activation name for the dynamo and the legacy export). The legacy
#: exporter writes Softplus(beta=2) as Mul(x, 2) → Softplus → Div(·, 2), recognized as one activation.
ACTIVATIONS = {
    "softplus": (lambda nn: nn.Softplus(), ("Softplus", "Softplus")),
    "softplus_beta2": (lambda nn: nn.Softplus(beta=2.0), ("Softplus(beta=2)", "Softplus(beta=2)")),
    "softsign": (lambda nn: nn.Softsign(), ("Softsign", "Softsign")),
    "celu_half": (lambda nn: nn.CELU(alpha=0.5), ("Celu", "Celu")),
    "gelu_tanh": (lambda nn: nn.GELU(approximate="tanh"), ("Gelu", "GeluTanh")),
}
CASES = [(name, dynamo) for name in ACTIVATIONS for dynamo in (True, False)]
SIZES = (8, 12, 10, 4)


def _export(name: str, dynamo: bool, directory):
    import torch
    from torch import nn

    torch.manual_seed(1)
    make = ACTIVATIONS[name][0]
    model = nn.Sequential(
        nn.Linear(SIZES[0], SIZES[1]), make(nn), nn.Linear(SIZES[1], SIZES[2]), make(nn), nn.Linear(SIZES[2], SIZES[3])
    ).eval()
    with torch.no_grad():  # larger weights: pre-activations reach both sides of 0 and beyond softplus' threshold/β
        for layer in (model[0], model[2]):
            layer.weight.mul_(30.0)
    path = directory / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
    kwargs = {"input_names": ["input"], "output_names": ["logits"], "dynamo": dynamo}
    if not dynamo:
        kwargs["opset_version"] = OPSET
    torch.onnx.export(model, (torch.rand(1, SIZES[0]),), str(path), **kwargs)
    return model, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, dynamo)`` → (module, ONNX path), each exported once per module."""
    cache: dict[tuple[str, bool], tuple] = {}

    def get(name: str, dynamo: bool):
        if (name, dynamo) not in cache:
            cache[name, dynamo] = _export(name, dynamo, tmp_path_factory.mktemp(name))
        return cache[name, dynamo]

    return get


@pytest.mark.parametrize(("name", "dynamo"), CASES, ids=[f"{n}-{'dynamo' if d else 'legacy'}" for n, d in CASES])
def test_exported_activation_is_bounded_and_sound(exported, name, dynamo):
    import torch

    model, path = exported(name, dynamo)
    inspect = cli_json("inspect", path)
    hidden = [la for la in inspect["layers"] if not la["is_output"]]
    assert [la["activation"] for la in hidden] == [ACTIVATIONS[name][1][0 if dynamo else 1]] * 2
    assert [la["lipschitz"] for la in hidden] == ([1.13, 1.13] if name.startswith("gelu") else [1.0, 1.0])
    x = torch.rand(512, SIZES[0])
    with torch.no_grad():
        first = model[1](model[0](x))
        second = model[3](model[2](first))
    for layer, values in zip(hidden, (first, second), strict=True):
        lo, hi = layer["output_range"]
        assert lo <= float(values.min()) and float(values.max()) <= hi * (1 + 1e-6) + 1e-6, (layer, values.max())
    if name.startswith("softplus"):
        beta = 2.0 if name.endswith("beta2") else 1.0
        with torch.no_grad():
            assert float((model[0](x) * beta).max()) > 20, "the threshold branch was never taken"
    report = cli_json("inject", path, "--crash", "2", "--search", "worst", "--samples", "32", "--trials", "30", "-q")
    assert report["violation"] is False and 0 < report["measured"]["max"] <= report["bound"], report["measured"]
    byzantine = cli_json("inject", path, "--byzantine", "1", "--capacity", "3", "--samples", "32", "-q")
    assert byzantine["violation"] is False and byzantine["measured"]["max"] <= byzantine["bound"]


def _chain_with(activation_nodes: list, inits: list, out: str):
    """x [N, 3] → Gemm (3→4) → activation subgraph (ending in ``out``) → Gemm (4→2) → y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(-3, 3, (4, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.uniform(-3, 3, (2, 4)).astype(np.float32), "w2"),
        *inits,
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
        *activation_nodes,
        helper.make_node("Gemm", [out, "w2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return make_model(graph)


def _scalar(name: str, value: float):
    return numpy_helper.from_array(np.array(value, np.float32), name)


def test_softplus_switch_at_a_low_threshold_is_refused(tmp_path):
    """Where(x > 1, x, Softplus(x)) jumps by log(1 + e⁻¹) ≈ 0.31 at x = 1: not softplus, refused by name."""
    nodes = [
        helper.make_node("Softplus", ["h"], ["sp"], name="sp"),
        helper.make_node("Greater", ["h", "t"], ["c"], name="gt"),
        helper.make_node("Where", ["c", "h", "sp"], ["a"], name="switch"),
    ]
    path = tmp_path / "low_threshold.onnx"
    path.write_bytes(_chain_with(nodes, [_scalar("t", 1.0)], "a").SerializeToString())
    assert_one_line_error(run_cli("bound", path, expect=None), "unsupported op", "'gt'")


def test_softplus_switch_at_pytorch_threshold_is_recognized(tmp_path):
    nodes = [
        helper.make_node("Softplus", ["h"], ["sp"], name="sp"),
        helper.make_node("Greater", ["h", "t"], ["c"], name="gt"),
        helper.make_node("Where", ["c", "h", "sp"], ["a"], name="switch"),
    ]
    path = tmp_path / "threshold20.onnx"
    path.write_bytes(_chain_with(nodes, [_scalar("t", 20.0)], "a").SerializeToString())
    (layer,) = [la for la in cli_json("inspect", path)["layers"] if not la["is_output"]]
    assert layer["activation"] == "Softplus" and layer["lipschitz"] == 1.0


@pytest.mark.parametrize(("offset", "softsign"), [(2.0, False), (1.0, True)])
def test_division_pattern_other_than_softsign(tmp_path, offset, softsign):
    """x / (2 + |x|) is not c·softsign(x) (it is softsign(x/2)): not fused, bounded by the rule for a
    division by a variable that stays away from 0 (docs/method.md §3.2); x / (1 + |x|) is Softsign."""
    nodes = [
        helper.make_node("Abs", ["h"], ["ab"], name="abs"),
        helper.make_node("Add", ["ab", "one"], ["den"], name="add"),
        helper.make_node("Div", ["h", "den"], ["a"], name="div"),
    ]
    path = tmp_path / "div.onnx"
    path.write_bytes(_chain_with(nodes, [_scalar("one", offset)], "a").SerializeToString())
    (layer,) = [la for la in cli_json("inspect", path)["layers"] if not la["is_output"]]
    assert (layer["activation"] == "Softsign") == softsign


def test_celu_range_is_exact_at_the_ends(tmp_path):
    """A single Gemm + Celu: the interval is [celu(min pre-activation), celu(max pre-activation)] per neuron."""
    nodes = [helper.make_node("Celu", ["h"], ["a"], name="celu", alpha=0.5)]
    path = tmp_path / "celu.onnx"
    model = _chain_with(nodes, [], "a")
    path.write_bytes(model.SerializeToString())
    (layer,) = [la for la in cli_json("inspect", path, "--input-range", "-1,1")["layers"] if not la["is_output"]]
    w1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    pre_lo, pre_hi = -np.abs(w1).sum(axis=1), np.abs(w1).sum(axis=1)  # box [-1, 1]³, no bias

    def celu(v):
        return np.where(v > 0, v, 0.5 * np.expm1(np.minimum(v, 0) / 0.5))

    assert layer["output_range"] == pytest.approx([celu(pre_lo).min(), celu(pre_hi).max()], rel=1e-6)


def _gelu(x: float, approximate: str) -> float:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_op_follows_its_approximate_attribute(tmp_path, approximate):
    """ONNX Gelu (opset 20) with approximate="tanh" is the tanh form: GELU_tanh(3) = 2.99636 > GELU_erf(3) = 2.99595."""
    rng = np.random.default_rng(0)
    w1 = np.array([[3.0], [-1.0]], np.float32)  # pre-activations [0, 3] and [−1, 0] on x ∈ [0, 1]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
        helper.make_node("Gelu", ["h"], ["a"], name="gelu", approximate=approximate),
        helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(rng.uniform(-1, 1, (2, 2)).astype(np.float32), "w2"),
        ],
    )
    path = tmp_path / f"gelu_{approximate}.onnx"
    path.write_bytes(make_model(graph, opset=20).SerializeToString())
    (layer,) = [la for la in cli_json("inspect", path)["layers"] if not la["is_output"]]
    minimum = min(_gelu(-1.0 + k * 1e-6, approximate) for k in range(1_000_001))  # the minimum on [−1, 0]
    assert layer["output_range"] == pytest.approx([minimum, _gelu(3.0, approximate)], abs=1e-9)
    report = cli_json("inject", path, "--byzantine", "1", "--capacity", "1", "--search", "worst", "-q")
    assert report["violation"] is False


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_both_exporters_give_the_same_bound(exported, name):
    """The neuron is the module's output whatever the exporter wrote (byzantine values are sent there)."""
    reports = [
        cli_json("bound", exported(name, dynamo)[1], "--byzantine", "1", "--capacity", "1") for dynamo in (True, False)
    ]
    assert reports[0]["fep_tight"] == pytest.approx(reports[1]["fep_tight"], rel=1e-6)
    assert [la["max_weight"] for la in reports[0]["layers"]] == pytest.approx(
        [la["max_weight"] for la in reports[1]["layers"]], rel=1e-6
    )


@pytest.mark.parametrize("dynamo", [True, False])
def test_byzantine_softplus_beta_covers_the_module_output(tmp_path, dynamo):
    """Linear(1,1; w=1) → Softplus(β=2) → Linear(1,1; w=1) on x ∈ [0, 1]: replacing the Softplus module's
    output by −1 moves the output by softplus(2)/2 + 1 = 2.0635 (at x = 1), which the bound must cover."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(1, 1), nn.Softplus(beta=2.0), nn.Linear(1, 1)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(1.0)
            layer.bias.fill_(0.0)
    path = tmp_path / f"softplus_b2_{'dynamo' if dynamo else 'legacy'}.onnx"
    kwargs = {"dynamo": dynamo} if dynamo else {"dynamo": False, "opset_version": OPSET}
    torch.onnx.export(model, (torch.rand(1, 1),), str(path), **kwargs)
    worst = math.log1p(math.exp(2.0)) / 2.0 + 1.0
    report = cli_json("bound", path, "--byzantine", "1", "--capacity", "1")
    assert report["fep"] >= worst * (1 - 1e-6), report["fep"]
    assert report["layers"][0]["max_weight"] == pytest.approx(1.0)


def test_layer_names_do_not_depend_on_the_exporter(tmp_path):
    """Dynamo fuses BatchNorm into the Linear/Conv under the BatchNorm's scope; the layer keeps its own name."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3)
            self.stem_bn = nn.BatchNorm2d(4)
            self.fc1 = nn.Linear(4 * 4 * 4, 8)
            self.bn1 = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.stem_bn(self.stem(x))).flatten(1)
            return self.head(torch.relu(self.bn1(self.fc1(x))))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # non-trivial running statistics, so that folding changes the weights
        for bn in (model.stem_bn, model.bn1):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    names = {}
    for dynamo in (True, False):
        path = tmp_path / f"bn_{dynamo}.onnx"
        kwargs = {"dynamo": True} if dynamo else {"dynamo": False, "opset_version": OPSET}
        torch.onnx.export(model, (torch.rand(1, 1, 6, 6),), str(path), **kwargs)
        names[dynamo] = [la["name"] for la in cli_json("inspect", path)["layers"]]
    assert names[True] == names[False] == ["stem", "fc1", "head"], names
