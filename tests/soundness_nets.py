"""Random networks for the soundness suite, their ONNX export, and an independent
numpy forward pass with failures (shares no code with robaudit).

A network is a :class:`Spec`: dense or conv hidden layers in a chain, a residual
pair ``act(fc1(x)) + act(fc2(act(fc1(x))))``, or a *summed* pair ``act(A·h + B·x)`` reading the
first hidden layer's output h and the input x (two affine ops of different inputs summed before one
activation: one failure site, docs/method.md §1.4), then a dense output layer. A *failure
site* is the output of a hidden layer after its activation (docs/method.md §1.1); a failed neuron
sends its value instead; a failed synapse i→j of a dense layer delivers its value
instead of w_ji·y_i (docs/method.md §2.1).

:func:`forward` also returns a running bound on float32 rounding (see
``test_soundness`` for where it is used): for each layer,
``E_l = K_l·(|W_l|·E_{l−1} + γ_{n+1}·(|W_l|·|y_{l−1}| + |b_l|)) + c·u·|y_l|`` with
u = 2⁻²⁴ and γ_n = n·u/(1 − n·u) — the textbook bound on a dot product of n terms
evaluated in any order, propagated through the Lipschitz activations, plus ``c`` units
in the last place for onnxruntime's activation kernels and the fault Mul/Add.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

U32 = 2.0**-24
#: Units in the last place allowed for one activation kernel plus the fault Mul/Add.
ACT_ULPS = 16


def relu(z):
    return np.maximum(z, 0.0)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def hardswish(z):
    return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0


#: name → (numpy function, ONNX op, Lipschitz constant (for the float32 error bound only)).
ACTIVATIONS = {
    "relu": (relu, "Relu", 1.0),
    "sigmoid": (sigmoid, "Sigmoid", 0.25),
    "tanh": (np.tanh, "Tanh", 1.0),
    "hardswish": (hardswish, "HardSwish", 1.5),
}


@dataclass
class Dense:
    """y = act(W·x + b), W [out, in] (float32 values held as float64)."""

    weight: np.ndarray
    bias: np.ndarray
    act: str | None

    @property
    def fan_in(self) -> int:
        return self.weight.shape[1]


@dataclass
class Conv:
    """y = act(conv(x, W) + b), W [C_out, C_in, k, k], square stride and padding."""

    weight: np.ndarray
    bias: np.ndarray
    act: str | None
    stride: int = 1
    pad: int = 0


@dataclass
class Summed:
    """y = act(A·h + a + B·x + b): two dense ops, A reading the previous hidden output h and B the network
    input x, summed before one activation. As one layer it is the dense map [A | B] on [h; x] (its synapses
    are A's and B's), which is how the forward pass below evaluates it."""

    first: Dense
    second: Dense
    act: str | None

    @property
    def weight(self) -> np.ndarray:
        return np.hstack([self.first.weight, self.second.weight])

    @property
    def bias(self) -> np.ndarray:
        return self.first.bias + self.second.bias

    @property
    def fan_in(self) -> int:
        return self.weight.shape[1]


@dataclass
class Spec:
    """A network: ``chain`` of hidden layers, or ``residual`` (exactly two dense hidden layers)."""

    topology: str
    in_shape: tuple[int, ...]
    hidden: list
    output: Dense
    merge_act: str | None = None
    #: Neurons per hidden layer (filled by :func:`shapes`).
    sizes: list[int] = field(default_factory=list)
    #: Per-sample shape of each hidden layer's output.
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        x = np.zeros((1,) + self.in_shape)
        outs = _hidden_outputs(self, x)
        self.out_shapes = [o.shape[1:] for o in outs]
        self.sizes = [int(np.prod(s)) for s in self.out_shapes]


def _f32(array: np.ndarray) -> np.ndarray:
    """Round to float32 and hold as float64: the exact numbers the ONNX file stores."""
    return np.asarray(array, np.float32).astype(np.float64)


# --------------------------------------------------------------------------- random networks


def random_dense(rng: np.random.Generator, n_in: int, n_out: int, act: str | None, scale: float) -> Dense:
    weight = _f32(rng.uniform(-scale, scale, (n_out, n_in)))
    bias = _f32(rng.uniform(-0.2, 0.2, n_out))
    return Dense(weight, bias, act)


def random_chain(rng, n_in: int, widths: list[int], n_out: int, acts: list[str], scale: float) -> Spec:
    hidden, prev = [], n_in
    for width, act in zip(widths, acts, strict=True):
        hidden.append(random_dense(rng, prev, width, act, scale))
        prev = width
    return Spec("chain", (n_in,), hidden, random_dense(rng, prev, n_out, None, scale))


def random_residual(rng, n_in: int, width: int, n_out: int, acts: list[str], merge_act: str | None, scale) -> Spec:
    fc1 = random_dense(rng, n_in, width, acts[0], scale)
    fc2 = random_dense(rng, width, width, acts[1], scale)
    return Spec("residual", (n_in,), [fc1, fc2], random_dense(rng, width, n_out, None, scale), merge_act)


def random_summed(rng, n_in: int, width: int, width2: int, n_out: int, acts: list[str], scale) -> Spec:
    """``act₁(W₁·x)`` then ``act₂(A·h + B·x)`` (the summed pair) then the output layer."""
    fc1 = random_dense(rng, n_in, width, acts[0], scale)
    pair = Summed(random_dense(rng, width, width2, None, scale), random_dense(rng, n_in, width2, None, scale), acts[1])
    return Spec("summed", (n_in,), [fc1, pair], random_dense(rng, width2, n_out, None, scale))


def random_conv(rng, in_shape: tuple[int, int, int], convs: list[tuple[int, int, int, int]], acts, n_out, scale):
    """``convs``: (C_out, kernel, stride, pad) per conv layer."""
    hidden, channels = [], in_shape[0]
    for (c_out, k, stride, pad), act in zip(convs, acts, strict=True):
        weight = _f32(rng.uniform(-scale, scale, (c_out, channels, k, k)))
        hidden.append(Conv(weight, _f32(rng.uniform(-0.2, 0.2, c_out)), act, stride, pad))
        channels = c_out
    spec = Spec("chain", in_shape, hidden, Dense(np.zeros((1, 1)), np.zeros(1), None))
    spec.output = random_dense(rng, spec.sizes[-1], n_out, None, scale)
    return spec


# --------------------------------------------------------------------------- ONNX export


def to_onnx(spec: Spec, fault_inputs: bool = False) -> onnx.ModelProto:
    """The network as an opset-17 float32 ONNX model (symbolic batch).

    With ``fault_inputs`` every hidden output y_l becomes ``y_l·keep_l + value_l`` where
    keep_l and value_l are extra inputs [N, *shape] (for replaying faults in onnxruntime).
    """
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *spec.in_shape])]
    current, outs = "x", []
    for index, layer in enumerate(spec.hidden):
        name = f"l{index + 1}"
        source = outs[0] if spec.topology == "residual" and index == 1 else current
        if isinstance(layer, Summed):
            first = _affine_nodes(nodes, inits, layer.first, f"{name}a", source)
            second = _affine_nodes(nodes, inits, layer.second, f"{name}b", "x")
            nodes.append(helper.make_node("Add", [first, second], [name], name=f"{name}_sum"))
            current = name
        else:
            current = _affine_nodes(nodes, inits, layer, name, source)
        if layer.act is not None:
            nodes.append(helper.make_node(ACTIVATIONS[layer.act][1], [current], [f"{name}_act"], name=f"{name}_a"))
            current = f"{name}_act"
        if fault_inputs:
            shape = ["N", *spec.out_shapes[index]]
            inputs += [
                helper.make_tensor_value_info(f"keep{index}", TensorProto.FLOAT, shape),
                helper.make_tensor_value_info(f"value{index}", TensorProto.FLOAT, shape),
            ]
            nodes += [
                helper.make_node("Mul", [current, f"keep{index}"], [f"{name}_k"]),
                helper.make_node("Add", [f"{name}_k", f"value{index}"], [f"{name}_f"]),
            ]
            current = f"{name}_f"
        outs.append(current)
    if spec.topology == "residual":
        nodes.append(helper.make_node("Add", outs, ["merged"], name="merge"))
        current = "merged"
        if spec.merge_act is not None:
            nodes.append(helper.make_node(ACTIVATIONS[spec.merge_act][1], [current], ["merged_act"], name="merge_a"))
            current = "merged_act"
    if isinstance(spec.hidden[-1], Conv):
        nodes.append(helper.make_node("Flatten", [current], ["flat"], name="flatten", axis=1))
        current = "flat"
    inits += [
        numpy_helper.from_array(spec.output.weight.astype(np.float32), "out.W"),
        numpy_helper.from_array(spec.output.bias.astype(np.float32), "out.b"),
    ]
    nodes.append(helper.make_node("Gemm", [current, "out.W", "out.b"], ["y"], name="out", transB=1))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", spec.output.weight.shape[0]])
    graph = helper.make_graph(nodes, "soundness", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test_soundness")
    model.ir_version = 8
    return model


def _affine_nodes(nodes: list, inits: list, layer, name: str, source: str) -> str:
    inits += [
        numpy_helper.from_array(layer.weight.astype(np.float32), f"{name}.W"),
        numpy_helper.from_array(layer.bias.astype(np.float32), f"{name}.b"),
    ]
    if isinstance(layer, Dense):
        nodes.append(helper.make_node("Gemm", [source, f"{name}.W", f"{name}.b"], [name], name=name, transB=1))
    else:
        p, s = layer.pad, layer.stride
        nodes.append(
            helper.make_node(
                "Conv", [source, f"{name}.W", f"{name}.b"], [name], name=name, pads=[p, p, p, p], strides=[s, s]
            )
        )
    return name


# --------------------------------------------------------------------------- forward pass


@dataclass
class Faults:
    """Failures for a batch of B evaluations (one row per configuration × input)."""

    #: Per hidden layer: keep [B, N_l] (1 = healthy, 0 = failed) and value [B, N_l], or None.
    keep: list[np.ndarray | None]
    value: list[np.ndarray | None]
    #: Per hidden layer: failed synapses as (j [B, s], i [B, s], v [B, s]) or None (dense only).
    synapses: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]


def conv2d(x: np.ndarray, weight: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation [B, C, H, W] * [O, C, k, k] by summing shifted slices."""
    k = weight.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (xp.shape[2] - k) // stride + 1
    wo = (xp.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], weight.shape[0], ho, wo))
    for di in range(k):
        for dj in range(k):
            patch = xp[:, :, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]
            out += np.einsum("bchw,oc->bohw", patch, weight[:, :, di, dj])
    return out


def _pre(layer, x: np.ndarray, absolute: bool = False) -> np.ndarray:
    weight = np.abs(layer.weight) if absolute else layer.weight
    bias = np.abs(layer.bias) if absolute else layer.bias
    if isinstance(layer, (Dense, Summed)):
        return x.reshape(x.shape[0], -1) @ weight.T + bias
    return conv2d(x, weight, layer.stride, layer.pad) + bias[None, :, None, None]


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _layer(layer, x, err, keep=None, value=None, synapses=None):
    """One hidden layer with faults; returns (y, float32 error bound of y)."""
    pre = _pre(layer, x)
    fan_in = layer.weight[0].size
    pre_err = _pre(layer, err, absolute=True) - np.abs(layer.bias).reshape((1, -1) + (1,) * (pre.ndim - 2))
    pre_err = pre_err + _gamma(fan_in + 1) * _pre(layer, np.abs(x), absolute=True)
    if isinstance(layer, Summed):  # two dot products, their biases and the Add, each rounded in float32
        biases = np.abs(layer.first.bias) + np.abs(layer.second.bias)
        rounded = biases + _pre(layer, np.abs(x), absolute=True)
        pre_err = pre_err + _gamma(fan_in + 2) * rounded + U32 * np.abs(pre)
    if synapses is not None:
        j, i, v = synapses
        rows = np.arange(x.shape[0])[:, None].repeat(j.shape[1], axis=1)
        flat = x.reshape(x.shape[0], -1)
        np.add.at(pre, (rows, j), v - layer.weight[j, i] * flat[rows, i])
    fn, _, lipschitz = ACTIVATIONS[layer.act] if layer.act else (lambda z: z, None, 1.0)
    y = fn(pre)
    err = lipschitz * pre_err + ACT_ULPS * U32 * np.abs(y)
    if keep is not None:
        shape = y.shape
        y = y * keep.reshape(shape) + value.reshape(shape)
        err = err * keep.reshape(shape) + ACT_ULPS * U32 * np.abs(y)
    return y, err


def _hidden_outputs(spec: Spec, x: np.ndarray, faults: Faults | None = None, track=None) -> list[np.ndarray]:
    outs, errs = [], []
    h, err = x, np.zeros_like(x)
    for index, layer in enumerate(spec.hidden):
        source, source_err = (outs[0], errs[0]) if spec.topology == "residual" and index == 1 else (h, err)
        if isinstance(layer, Summed):  # [h; x]: the pair as one dense map (see Summed)
            rows, flat = source.shape[0], x.reshape(x.shape[0], -1)
            source = np.hstack([source.reshape(rows, -1), np.broadcast_to(flat, (rows, flat.shape[1]))])
            source_err = np.hstack([source_err.reshape(rows, -1), np.zeros((rows, flat.shape[1]))])
        keep = value = syn = None
        if faults is not None:
            keep, value, syn = faults.keep[index], faults.value[index], faults.synapses[index]
        h, err = _layer(layer, source, source_err, keep, value, syn)
        outs.append(h)
        errs.append(err)
    if track is not None:
        track.extend(errs)
    return outs


def forward(spec: Spec, x: np.ndarray, faults: Faults | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Outputs [B, n_out] and a bound on their float32 rounding error (module docstring)."""
    errs: list[np.ndarray] = []
    outs = _hidden_outputs(spec, x, faults, errs)
    h, err = outs[-1], errs[-1]
    if spec.topology == "residual":
        h, err = outs[0] + outs[1], errs[0] + errs[1] + U32 * np.abs(outs[0] + outs[1])
        if spec.merge_act is not None:
            fn, _, lipschitz = ACTIVATIONS[spec.merge_act]
            h = fn(h)
            err = lipschitz * err + ACT_ULPS * U32 * np.abs(h)
    flat, flat_err = h.reshape(h.shape[0], -1), err.reshape(err.shape[0], -1)
    out = spec.output
    y = flat @ out.weight.T + out.bias
    y_err = flat_err @ np.abs(out.weight).T + _gamma(flat.shape[1] + 1) * (
        np.abs(flat) @ np.abs(out.weight).T + np.abs(out.bias)
    )
    return y, y_err


# --------------------------------------------------------------------------- failure configurations


@dataclass
class Config:
    """One failure configuration: failed neurons (and synapses) per layer with their values."""

    neurons: list[tuple[int, ...]]
    neuron_values: list[tuple[float, ...]]
    synapses: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    synapse_values: list[tuple[float, ...]] = field(default_factory=list)

    def counts(self) -> list[int]:
        return [len(n) for n in self.neurons]


def value_assignments(count: int, frange: tuple[float, float], rng: np.random.Generator, interior: int):
    """Every vertex of [a, b]^count, plus ``interior`` uniform draws (crash: just zeros)."""
    a, b = frange
    if a == b:
        return [(a,) * count]
    vertices = list(itertools.product((a, b), repeat=count))
    return vertices + [tuple(rng.uniform(a, b, count)) for _ in range(interior if count else 0)]


def configs_for(neuron_sets, synapse_sets, frange, rng, interior: int) -> list[Config]:
    """All value assignments for each (neuron set, synapse set) pair."""
    configs = []
    for neurons in neuron_sets:
        for synapses in synapse_sets:
            n_count = sum(len(n) for n in neurons)
            total = n_count + sum(len(s) for s in synapses)
            for values in value_assignments(total, frange, rng, interior):
                neuron_values, synapse_values, pos = [], [], 0
                for n in neurons:
                    neuron_values.append(values[pos : pos + len(n)])
                    pos += len(n)
                for s in synapses:
                    synapse_values.append(values[pos : pos + len(s)])
                    pos += len(s)
                configs.append(Config(list(neurons), neuron_values, list(synapses), synapse_values))
    return configs


def all_neuron_sets(sizes: list[int], counts: list[int]):
    """Every choice of counts[l] failed neurons in each layer l."""
    per_layer = [list(itertools.combinations(range(n), c)) for n, c in zip(sizes, counts, strict=True)]
    return list(itertools.product(*per_layer))


def all_synapse_sets(spec: Spec, counts: list[int]):
    """Every choice of counts[l] failed synapses (j, i) into each dense hidden layer l."""
    per_layer = []
    for layer, size, count in zip(spec.hidden, spec.sizes, counts, strict=True):
        dense = isinstance(layer, (Dense, Summed))
        if count and not dense:
            raise ValueError("synapse failures are tested on dense layers only")
        pairs = [(j, i) for j in range(size) for i in range(layer.fan_in if dense else 0)]
        per_layer.append(list(itertools.combinations(pairs, count)))
    return list(itertools.product(*per_layer))


def faults_for(spec: Spec, configs: list[Config], n_inputs: int) -> Faults:
    """Fault arrays for rows (config c, input i) in the order c-major (row = c·n_inputs + i)."""
    rows = len(configs) * n_inputs
    keep, value, synapses = [], [], []
    for layer_index, size in enumerate(spec.sizes):
        k = np.ones((len(configs), size))
        v = np.zeros((len(configs), size))
        for c, config in enumerate(configs):
            idx = list(config.neurons[layer_index])
            k[c, idx] = 0.0
            v[c, idx] = config.neuron_values[layer_index]
        keep.append(np.repeat(k, n_inputs, axis=0))
        value.append(np.repeat(v, n_inputs, axis=0))
        count = len(configs[0].synapses[layer_index]) if configs and configs[0].synapses else 0
        if count == 0:
            synapses.append(None)
            continue
        j = np.array([[p[0] for p in c.synapses[layer_index]] for c in configs])
        i = np.array([[p[1] for p in c.synapses[layer_index]] for c in configs])
        sv = np.array([c.synapse_values[layer_index] for c in configs], dtype=np.float64)
        synapses.append(tuple(np.repeat(a, n_inputs, axis=0) for a in (j, i, sv)))
    assert all(a.shape[0] == rows for a in keep)
    return Faults(keep, value, synapses)


def errors(spec: Spec, configs: list[Config], inputs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """err[c, i] = max_k |F̃_k − F_k| for configuration c on input i (float64)."""
    clean, _ = forward(spec, inputs)
    result = np.empty((len(configs), len(inputs)))
    per_chunk = max(1, chunk // len(inputs))
    for start in range(0, len(configs), per_chunk):
        part = configs[start : start + per_chunk]
        faults = faults_for(spec, part, len(inputs))
        x = np.tile(inputs, (len(part),) + (1,) * (inputs.ndim - 1))
        faulty, _ = forward(spec, x, faults)
        diff = np.abs(faulty - np.tile(clean, (len(part), 1))).max(axis=1)
        result[start : start + len(part)] = diff.reshape(len(part), len(inputs))
    return result


def domain_inputs(shape: tuple[int, ...], lo: float, hi: float, rng, corners: int = 16, interior: int = 8):
    """Corners of the input box (all of them when there are at most ``corners``) and random points."""
    n = int(np.prod(shape))
    if 2**n <= corners:
        bits = np.array(list(itertools.product((0.0, 1.0), repeat=n)))
    else:
        bits = np.vstack([np.zeros(n), np.ones(n), rng.integers(0, 2, (corners - 2, n))])
    points = np.vstack([lo + (hi - lo) * bits, rng.uniform(lo, hi, (interior, n))])
    return _f32(points).reshape((-1,) + tuple(shape))
