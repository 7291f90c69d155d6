"""Residual/branching graphs and modern blocks — soundness of both bounds.

Each network is built inline with onnx.helper, random weights; faults are injected
with the independent injector of ``tests/ort_faults.py`` (onnxruntime, float32), and
the largest measured deviation must stay below ``fep_tight`` ≤ ``fep_paper``. The
failure sets include the ones a worst-case adversary would pick (the neurons with the
largest sensitivities of the tight method, byzantine values at the range's ends with
both signs) and random ones.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from ort_faults import FaultRunner

from robaudit.bounds.audit import BoundOptions, bound_network, inspect_model, load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.results import ModelInfo
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import Node

#: float32 inference vs float64 bound: relative slack for rounding in onnxruntime.
RTOL = 1e-4


class GraphBuilder:
    """A few lines per op: ``b.conv('x', 4, k=3)`` returns the output value name."""

    def __init__(self, seed: int, input_shape: list, positive: bool = False):
        self.rng = np.random.default_rng(seed)
        self.positive = positive
        self.nodes, self.inits, self.count = [], [], 0
        self.input_shape = input_shape

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array, prefix="c") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def op(self, op_type, inputs, name=None, outputs=1, **attrs):
        name = name or self._name(op_type.lower())
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def weights(self, *shape, scale=0.5):
        if self.positive:
            return self.rng.uniform(0.05, scale, shape)
        return self.rng.uniform(-scale, scale, shape)

    def conv(self, x, c_in, c_out, k=3, stride=1, pad=1, group=1, name=None):
        w = self.const(self.weights(c_out, c_in // group, k, k))
        b = self.const(self.weights(c_out, scale=0.1))
        return self.op(
            "Conv", [x, w, b], name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group
        )

    def gemm(self, x, n_in, n_out, name=None):
        return self.op(
            "Gemm",
            [x, self.const(self.weights(n_out, n_in)), self.const(self.weights(n_out, scale=0.1))],
            name,
            transB=1,
        )

    def model(self, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + self.input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def residual_net(seed: int, positive: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed, [2, 6, 6], positive)
    h1 = b.op("Relu", [b.conv("x", 2, 3, name="conv1")])
    h2 = b.conv(h1, 3, 3, name="conv2")
    scale, bias, mean, var = (
        b.const(v) for v in (b.rng.uniform(0.5, 1.5, 3), b.weights(3), b.weights(3), b.rng.uniform(0.5, 2, 3))
    )
    h2 = b.op("BatchNormalization", [h2, scale, bias, mean, var], epsilon=1e-5)
    s = b.op("Relu", [b.op("Add", [h2, h1])])
    p = b.op("AveragePool" if positive else "MaxPool", [s], kernel_shape=[2, 2], strides=[2, 2])
    return b.model(b.gemm(b.op("Flatten", [p]), 27, 4, name="fc"))


def unet_like(seed: int, positive: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed, [1, 4, 4], positive)
    h1 = b.op("Relu", [b.conv("x", 1, 2, name="down")])
    wt = b.const(b.weights(2, 2, 2, 2))
    up = b.op("Relu", [b.op("ConvTranspose", [h1, wt], "up", kernel_shape=[2, 2], strides=[2, 2])])
    near = b.op("Resize", [h1, "", b.const([1, 1, 2, 2])], mode="nearest")
    lin = b.op("Resize", [up, "", b.const([1, 1, 0.5, 0.5])], mode="linear")
    cat = b.op("Concat", [up, near], axis=1)
    mix = b.conv(cat, 4, 2, k=1, pad=0, name="mix")
    pooled = b.op(
        "GlobalAveragePool", [b.op("Add", [b.op("AveragePool", [mix], kernel_shape=[2, 2], strides=[2, 2]), lin])]
    )
    return b.model(b.gemm(b.op("Flatten", [pooled]), 2, 3, name="fc"))


def se_block(seed: int) -> onnx.ModelProto:
    b = GraphBuilder(seed, [2, 4, 4])
    feat = b.op("HardSwish", [b.conv("x", 2, 4, name="stem")])
    squeeze = b.op("GlobalAveragePool", [feat])
    gate = b.op(
        "HardSigmoid",
        [b.conv(b.op("Relu", [b.conv(squeeze, 4, 2, k=1, pad=0, name="se1")]), 2, 4, k=1, pad=0, name="se2")],
        alpha=1 / 6,
        beta=0.5,
    )
    gated = b.op("Mul", [feat, gate])
    proj = b.conv(gated, 4, 2, k=1, pad=0, name="proj")
    out = b.op("GlobalAveragePool", [proj])
    return b.model(b.gemm(b.op("Flatten", [out]), 2, 3, name="fc"))


def dense_patterns(seed: int) -> onnx.ModelProto:
    b = GraphBuilder(seed, [6])
    h = b.gemm("x", 6, 8, name="fc1")
    h = b.op("Mul", [h, b.op("Sigmoid", [h])])  # SiLU as exported
    g = b.gemm(h, 8, 8, name="fc2")
    erf = b.op("Erf", [b.op("Div", [g, b.const(math.sqrt(2.0))])])
    g = b.op("Mul", [b.op("Mul", [g, b.op("Add", [erf, b.const(1.0)])]), b.const(0.5)])  # GELU as exported
    first, second = b.op("Split", [g, b.const_int([5, 3])], outputs=2, axis=1)
    part = b.op("Slice", [first, b.const_int([1]), b.const_int([5]), b.const_int([1])])
    padded = b.op("Pad", [part, b.const_int([0, 0, 0, 3])])
    cat = b.op("Concat", [padded, second], axis=1)
    t = b.op("Tanh", [b.gemm(cat, 10, 5, name="fc3")])
    return b.model(b.op("Softmax", [b.gemm(t, 5, 3, name="out")], axis=1))


def _const_int(self, values):
    name = self._name("i")
    self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


GraphBuilder.const_int = _const_int

NETWORKS = {"residual": residual_net, "unet": unet_like, "se": se_block, "dense_patterns": dense_patterns}


def _network(model: onnx.ModelProto, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    _, network = load_network(path, NetworkOptions())
    return path, network


def _failure_sets(tight: TightBound, hidden, counts, rng, n_random=6):
    """Per hidden layer, index sets: the top-sensitivity neurons for each output, plus random ones."""
    sets = []
    for k in range(tight.weighted[0].shape[0]):
        sets.append([np.argsort(-w[k])[:f] for w, f in zip(tight.weighted, counts, strict=True)])
    for _ in range(n_random):
        sets.append([rng.choice(la.neurons, size=f, replace=False) for la, f in zip(hidden, counts, strict=True)])
    return sets


def _measure(model, network, failure: FailureModel, counts, rng) -> float:
    hidden = network.hidden_layers
    shapes = [la.out_shape[1:] for la in hidden]
    runner = FaultRunner(model, [la.output_value for la in hidden], shapes)
    tight = TightBound(Analysis(network, failure))
    shape = network.input_shape[1:]
    lo, hi = network.input_range
    inputs = np.concatenate([rng.uniform(lo, hi, (6,) + shape), np.full((1,) + shape, hi), np.full((1,) + shape, lo)])
    a, b = failure.failure_range
    worst = 0.0
    for chosen in _failure_sets(tight, hidden, counts, rng):
        for sign_seed in range(3):
            batch = inputs.shape[0]
            keeps, repls = [], []
            for layer_shape, idx in zip(shapes, chosen, strict=True):
                keep = np.ones((batch, int(np.prod(layer_shape))))
                repl = np.zeros_like(keep)
                keep[:, idx] = 0.0
                if a != b:
                    ends = np.array([a, b])
                    pick = rng.integers(0, 2, (batch, len(idx))) if sign_seed else np.zeros((batch, len(idx)), int)
                    repl[:, idx] = ends[pick] if sign_seed < 2 else ends[1 - pick]
                keeps.append(keep.reshape((batch,) + layer_shape))
                repls.append(repl.reshape((batch,) + layer_shape))
            faulty = runner.run(inputs, keeps, repls)
            clean = runner.clean(inputs)
            worst = max(worst, float(np.abs(faulty - clean).max()))
    return worst


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_measured_below_both_bounds(name, seed, mode, tmp_path):
    model = NETWORKS[name](seed)
    path, network = _network(model, tmp_path)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(capacity=2.0)
    rng = np.random.default_rng(seed)
    hidden = network.hidden_layers
    for counts in ([1] * len(hidden), [min(2, la.neurons) for la in hidden]):
        options = BoundOptions(epsilon=1.0, failure=failure, failures=tuple(counts))
        result = bound_network(network, options, ModelInfo(str(path), "", "", 17))
        measured = _measure(model, network, failure, counts, rng)
        assert result.fep_tight <= result.fep_paper * (1 + 1e-12)
        assert measured <= result.fep_tight * (1 + RTOL) + 1e-6, (name, counts, measured, result.fep_tight)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_clean_intervals_contain_onnxruntime_outputs(name, tmp_path):
    model = NETWORKS[name](7)
    _, network = _network(model, tmp_path)
    hidden = network.hidden_layers
    runner = FaultRunner(model, [la.output_value for la in hidden], [la.out_shape[1:] for la in hidden])
    x = np.random.default_rng(0).uniform(0, 1, (64,) + network.input_shape[1:])
    y = runner.clean(x)
    box = network.clean[network.output_name]
    assert np.all(y >= box.lo - 1e-5) and np.all(y <= box.hi + 1e-5)


def test_patterns_are_recognized_as_activations(tmp_path):
    path, network = _network(dense_patterns(0), tmp_path)
    activations = {la.name: (la.activation, la.lipschitz) for la in network.layers}
    assert activations["fc1"] == ("SiLU", pytest.approx(1.1))
    assert activations["fc2"] == ("Gelu", pytest.approx(1.13))
    assert activations["fc3"] == ("Tanh", 1.0)


def test_inspect_shows_the_branches(tmp_path):
    path, _ = _network(residual_net(0), tmp_path)
    result = inspect_model(path)
    assert not result.is_chain
    (merge,) = [b for b in result.branches if b.op_type == "Add"]
    assert set(merge.inputs_from) == {"conv1", "conv2"}


@pytest.mark.parametrize("op_type", ["Hardmax", "Sign", "Round"])
def test_unbounded_ops_are_refused_with_op_and_node(op_type, tmp_path):
    from robaudit.errors import UnsupportedModelError

    b = GraphBuilder(0, [4])
    h = b.gemm("x", 4, 4, name="fc1")
    if op_type == "LayerNormalization":
        h = b.op(op_type, [h, b.const(np.ones(4)), b.const(np.zeros(4))], name="bad", axis=-1)
    else:
        h = b.op(op_type, [h], name="bad")
    model = b.model(b.gemm(h, 4, 2, name="fc2"))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError) as info:
        load_network(tmp_path / "m.onnx", NetworkOptions())
    assert f"'{op_type}'" in str(info.value) and "'bad'" in str(info.value)


def test_attention_product_of_two_activations_is_bounded_between_layers(tmp_path):
    b = GraphBuilder(0, [4])
    q, k = b.gemm("x", 4, 4, name="q"), b.gemm("x", 4, 4, name="k")
    scores = b.op(
        "MatMul", [b.op("Unsqueeze", [q, b.const_int([2])]), b.op("Unsqueeze", [k, b.const_int([1])])], name="qk"
    )
    model = b.model(b.gemm(b.op("Flatten", [scores]), 16, 2, name="out"))
    onnx.save(model, tmp_path / "m.onnx")
    _, network = load_network(tmp_path / "m.onnx", NetworkOptions())
    assert [la.name for la in network.hidden_layers] == ["q", "k"]
    assert any(isinstance(step, Node) and step.name == "qk" for step in network.steps)


@pytest.mark.parametrize("name", ["residual", "unet"])
@pytest.mark.parametrize("seed", [0, 1])
def test_tight_bound_is_attained_on_positive_networks(name, seed, tmp_path):
    """With positive weights every ReLU is active at the top of the domain and the network is
    linear there: crashing the f neurons of one layer with the largest P·δ for the worst output
    moves that output by exactly fep_tight (an independent check of δ and of every adjoint)."""
    model = NETWORKS[name](seed, positive=True)
    path, network = _network(model, tmp_path)
    hidden = network.hidden_layers
    runner = FaultRunner(model, [la.output_value for la in hidden], [la.out_shape[1:] for la in hidden])
    tight = TightBound(Analysis(network, FailureModel.crash()))
    x = np.ones((1,) + network.input_shape[1:])
    clean = runner.clean(x).reshape(-1)
    for index, layer in enumerate(hidden):
        for count in (1, 3):
            counts = [0] * len(hidden)
            counts[index] = count
            per_output = tight.per_output(counts)
            k = int(np.argmax(per_output))
            chosen = np.argsort(-tight.weighted[index][k])[:count]
            keeps = [np.ones((1,) + la.out_shape[1:]) for la in hidden]
            repls = [np.zeros((1,) + la.out_shape[1:]) for la in hidden]
            keeps[index].reshape(-1)[chosen] = 0.0
            faulty = runner.run(x, keeps, repls).reshape(-1)
            assert abs(faulty[k] - clean[k]) == pytest.approx(per_output[k], rel=1e-4), (layer.name, count)


def test_a_refused_fused_node_is_named_by_the_ops_the_model_holds():
    """A decomposed RMSNorm over a non-trailing axis was refused as "unsupported op 'RMSNormPattern' (domain
    'robaudit')", robaudit's internal name (an attack helper's finding): the message names the model's ops."""
    from robaudit.graph.onnx_graph import Node
    from robaudit.graph.ops.base import unsupported

    fused = Node("n9_Div", "RMSNormPattern", "robaudit", ["x"], ["y"], {"axes": [-2], "epsilon": 1e-5})
    message = str(unsupported(fused, "normalizing over axes [-2] that are not the trailing ones"))
    assert "'RMSNormalization (written out op by op)'" in message and "n9_Div" in message, message
    assert "Pattern" not in message and "domain" not in message, message
    foreign = Node("n1", "Custom", "com.example", ["x"], ["y"])
    assert "unsupported op 'Custom' (domain 'com.example') at node 'n1'" in str(unsupported(foreign, "why"))
