"""PyTorch exports (both exporters) of a small transformer encoder, an embedding MLP and a
two-input model (docs/method.md §12, §13): bounded, and no failure set found by an independent
injector (tests/ort_faults.py) or by ``inject --search worst`` exceeds the bound."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SAMPLES, run_in_process
from ort_faults import instrument

from robaudit.bounds.audit import load_network
from robaudit.graph.network import NetworkOptions

torch = pytest.importorskip("torch")

sys.path.insert(0, str(SAMPLES))
# the encoder is the bundled sample's (sample_models/encoder.onnx), exported here by both exporters
from make_sequence import FEATURES, HEADS, TOKENS, D, Encoder  # noqa: E402

VOCAB = 20


class EmbeddingMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.out = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, 12), torch.nn.Linear(12, 3)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.emb(ids).mean(1))))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = torch.nn.Linear(4, 10), torch.nn.Linear(3, 10), torch.nn.Linear(10, 2)

    def forward(self, a, b):
        return self.out(torch.tanh(self.a(a) + self.b(b)))


class DecomposedNorms(torch.nn.Module):
    """LayerNorm and a hand-written RMSNorm; exported at opset 14 both become ReduceMean/Pow/Sqrt/Div."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.out = torch.nn.Linear(FEATURES, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        h = self.a(x)
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        return self.out(torch.relu(self.norm(h) + rms))


class TokenAttention(torch.nn.Module):
    """ids → Embedding → nn.MultiheadAttention (batch first, residual) → mean over tokens → Linear → ReLU → Linear:
    a text classifier whose attention reads token ids (robaudit could not place its batch axis: a new user's
    trial, nu26)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.att = torch.nn.Embedding(VOCAB, 8), torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc, self.out = torch.nn.Linear(8, 12), torch.nn.Linear(12, 3)

    def forward(self, ids):
        e = self.emb(ids)
        h = e + self.att(e, e, e, need_weights=False)[0]
        return self.out(torch.relu(self.fc(h.mean(1))))


MODELS = {
    "encoder": (Encoder, {"x": (1, TOKENS, FEATURES)}),
    "embedding": (EmbeddingMLP, {"ids": (1, 5)}),
    "two_inputs": (TwoInputs, {"a": (1, 4), "b": (1, 3)}),
    "decomposed": (DecomposedNorms, {"x": (1, 3, FEATURES)}),
}


def export(name: str, dynamo: bool, directory: Path) -> Path:
    torch.manual_seed(0)
    builder, shapes = MODELS[name]
    model = builder().eval()
    examples = tuple(
        torch.randint(0, VOCAB, shape) if key == "ids" else torch.rand(shape) for key, shape in shapes.items()
    )
    path = directory / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
    kwargs: dict = {"input_names": list(shapes), "output_names": ["y"], "dynamo": dynamo}
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in shapes)
    else:
        kwargs["opset_version"] = 14 if name == "decomposed" else 17
        kwargs["dynamic_axes"] = {**{key: {0: "N"} for key in shapes}, "y": {0: "N"}}
    torch.onnx.export(model, examples, str(path), **kwargs)
    return path


CASES = [(name, dynamo) for name in MODELS for dynamo in (False, True) if not (name == "decomposed" and dynamo)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sequence_exports")
    cache: dict = {}

    def get(name: str, dynamo: bool) -> Path:
        if (name, dynamo) not in cache:
            cache[name, dynamo] = export(name, dynamo, directory)
        return cache[name, dynamo]

    return get


def bound_of(path: Path, *flags: str) -> dict:
    return json.loads(run_in_process("bound", path, "--format", "json", *flags).stdout)


def draw_inputs(model: onnx.ModelProto, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs drawn from the default domain, independently of robaudit: floats in [0, 1], ids in the vocabulary."""
    feeds = {}
    for info in model.graph.input:
        shape = (count,) + tuple(d.dim_value for d in info.type.tensor_type.shape.dim[1:])
        if info.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[info.name] = rng.integers(0, VOCAB, shape).astype(np.int64)
        else:
            feeds[info.name] = rng.uniform(0, 1, shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize(("name", "dynamo"), CASES)
def test_independent_injection_stays_under_the_bound(exported, name, dynamo):
    """One failed neuron per layer, byzantine in [−1, 1]: random failure sets, values and inputs."""
    path = exported(name, dynamo)
    report = bound_of(path, "--byzantine", "1", "--capacity", "1")
    _, network = load_network(path, NetworkOptions())
    layers = network.hidden_layers
    assert len(layers) == len(report["failures"]) >= 1
    model = onnx.load(str(path))
    session = ort.InferenceSession(
        instrument(model, [la.output_value for la in layers]).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    count = 256
    feeds = draw_inputs(model, count, rng)
    clean = session.run(["y"], {**feeds, **_faults(layers, network, count, rng, none=True)})[0]
    worst = 0.0
    for _ in range(4):
        faulty = session.run(["y"], {**feeds, **_faults(layers, network, count, rng)})[0]
        worst = max(worst, float(np.abs(faulty - clean).max()))
    assert worst > 0
    assert worst <= report["fep"] * (1 + 1e-5) + 1e-5, (worst, report["fep"])


def _faults(layers, network, count: int, rng: np.random.Generator, none: bool = False) -> dict[str, np.ndarray]:
    feeds = {}
    for index, layer in enumerate(layers):
        shape = (count,) + tuple(network.clean[layer.output_value].shape[1:])
        keep = np.ones((count, layer.neurons), np.float32)
        repl = np.zeros((count, layer.neurons), np.float32)
        if not none:
            chosen = rng.integers(0, layer.neurons, count)
            keep[np.arange(count), chosen] = 0.0
            repl[np.arange(count), chosen] = rng.choice([-1.0, 1.0], count) * rng.uniform(0.5, 1.0, count)
        feeds[f"keep{index}"], feeds[f"repl{index}"] = keep.reshape(shape), repl.reshape(shape)
    return feeds


@pytest.mark.parametrize(("name", "dynamo"), CASES)
def test_worst_search_stays_under_the_bound(exported, name, dynamo):
    path = exported(name, dynamo)
    result = run_in_process(
        "inject", path, "--crash", "1", "--samples", "16", "--search", "worst", "--trials", "3", "--format", "json"
    )
    report = json.loads(result.stdout)
    assert all(v["violation"] is False for v in report["vectors"]), report["vectors"]
    assert all(0 < v["measured"]["max"] <= v["bound"] for v in report["vectors"])


def test_settings_name_every_input(exported, tmp_path):
    path = exported("two_inputs", True)
    np.savez(tmp_path / "r.npz", **{"a.lo": np.full(4, -1.0), "a.hi": np.linspace(0, 2, 4)})
    np.save(tmp_path / "b.npy", np.full((1, 3), 0.25, np.float32))
    report = bound_of(path, "--input-range-file", tmp_path / "r.npz", "--input-value", f"b={tmp_path / 'b.npy'}")
    inputs = {item["name"]: item for item in report["settings"]["inputs"]}
    assert inputs["a"]["kind"] == "float" and inputs["a"]["range"] == [-1.0, 2.0]
    assert inputs["b"]["kind"] == "constant" and inputs["b"]["range"] == [0.25, 0.25]
    # b held constant: its layer no longer varies, so only a's layer is a failure site
    assert len(report["layers"]) == 1


def test_a_wider_named_range_loosens_the_bound(exported):
    path = exported("two_inputs", False)
    plain = bound_of(path, "--crash", "1")["fep"]
    wider = bound_of(path, "--crash", "1", "--input-range", "a=-2,2")
    assert wider["fep"] > plain
    assert {i["name"]: i["range"] for i in wider["settings"]["inputs"]} == {"a": [-2.0, 2.0], "b": [0.0, 1.0]}


def test_token_input_ranges_are_the_embedding_table(exported):
    path = exported("embedding", False)
    _, network = load_network(path, NetworkOptions())
    table = next(np.asarray(v) for v in network.graph.initializers.values() if np.shape(v) == (VOCAB, 8))
    (spec,) = network.inputs
    assert spec.kind == "token" and spec.hull == (0.0, VOCAB - 1.0)
    gathered = next(n.outputs[0] for n in network.nodes if n.op_type == "Gather")
    box = network.clean[gathered]
    np.testing.assert_array_equal(box.lo[0, 0], table.min(axis=0))
    np.testing.assert_array_equal(box.hi[0, 0], table.max(axis=0))


def test_bad_input_options_are_one_line(exported, tmp_path):
    path = exported("two_inputs", False)
    for flags, fragment in (
        (("--input-range", "c=0,1"), "'c' is not an input"),
        (("--input-range", "a=1,0"), "LO ≤ HI"),
        (("--input-value", "b"), "NAME=FILE.npy"),
        (("--input-value", f"b={tmp_path / 'missing.npy'}"), "missing.npy"),
        (("--input-range-file", tmp_path / "missing.npz"), "missing.npz"),
    ):
        result = run_in_process("bound", path, *flags, expect=2)
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_decomposed_normalizations_are_fused(exported):
    path = exported("decomposed", False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Pow", "Sqrt", "Div", "ReduceMean"} <= ops and "LayerNormalization" not in ops
    _, network = load_network(path, NetworkOptions())
    fused = {node.op_type for node in network.nodes}
    assert {"LayerNormPattern", "RMSNormPattern"} <= fused and not {"Pow", "Sqrt", "Div"} & fused


@pytest.mark.parametrize("dynamo", [False, True])
def test_first_layer_norm_gets_the_true_smallest_deviation(exported, dynamo):
    """The LayerNorm after the input projection: its σ floor (from the back-substituted lines, docs/method.md
    §13.1) lies below σ at every sampled input and within 10⁻³ of the minimum an independent solver finds;
    its output box holds every sampled output."""
    from scipy.optimize import minimize

    path = exported("encoder", dynamo)
    _, network = load_network(path, NetworkOptions())
    node = next(n for n in network.nodes if n.op_type == "LayerNormalization")
    box, floor = network.sigma_floors[node.name]
    assert box is network.clean[node.inputs[0]]
    torch.manual_seed(0)
    model = Encoder().eval()
    weight, bias = model.inp.weight.detach().double().numpy(), model.inp.bias.detach().double().numpy()

    def variance(x):  # one token: the projection's outputs, their population variance
        return float(np.var(weight @ x + bias))

    solved = min(
        minimize(variance, start, method="L-BFGS-B", bounds=[(0, 1)] * FEATURES).fun
        for start in np.random.default_rng(0).uniform(0, 1, (8, FEATURES))
    )
    true_floor = np.sqrt(solved + model.n1.eps)
    assert np.all(floor <= true_floor + 1e-9) and np.all(floor >= true_floor - 1e-3)
    x = torch.rand(2000, TOKENS, FEATURES, dtype=torch.float64)
    with torch.no_grad():
        model = model.double()
        sigma = torch.sqrt(model.inp(x).var(-1, unbiased=False) + model.n1.eps).numpy()
        normalized = model.n1(model.inp(x)).numpy()
    assert sigma.min() >= floor.min() - 1e-9
    box = network.clean[node.outputs[0]]
    assert np.all(normalized >= box.lo - 1e-6) and np.all(normalized <= box.hi + 1e-6)


def two_input_model():
    torch.manual_seed(0)
    return TwoInputs().eval()


def packed_inputs(directory: Path, count: int = 30) -> tuple[Path, np.ndarray, np.ndarray]:
    """One vector per sample, the inputs flattened and concatenated in graph order (a then b)."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 1, (count, 4)).astype(np.float32), rng.uniform(0, 1, (count, 3)).astype(np.float32)
    np.save(directory / "packed.npy", np.concatenate([a, b], axis=1))
    return directory / "packed.npy", a, b


@pytest.mark.parametrize("dynamo", [False, True])
def test_harden_on_two_inputs(exported, tmp_path, dynamo):
    """The Clip ranges are those of each layer on the inputs, computed again from the torch weights; the
    hardened model gives the original's outputs on them, both fed the two inputs separately."""
    path = exported("two_inputs", dynamo)
    inputs, a, b = packed_inputs(tmp_path)
    out = tmp_path / "hardened.onnx"
    report = json.loads(run_in_process("harden", path, "--inputs", inputs, "-o", out, "--format", "json").stdout)
    model = two_input_model()
    with torch.no_grad():  # tanh(a(a) + b(b)): the sum and its activation are one layer (docs/method.md §1.4)
        seen = {"a+b": torch.tanh(model.a(torch.from_numpy(a)) + model.b(torch.from_numpy(b))).numpy()}
    for layer in report["layers"]:
        assert layer["seen_low"] == pytest.approx(float(seen[layer["name"]].min()), abs=1e-5)
        assert layer["seen_high"] == pytest.approx(float(seen[layer["name"]].max()), abs=1e-5)
    assert {la["name"] for la in report["layers"]} == {"a+b"}
    outputs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["y"], {"a": a, "b": b})[0]
        for p in (path, out)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert report["inputs"] == len(a) and report["max_output_change"] == 0.0
    assert sum(n.op_type == "Clip" for n in onnx.load(str(out)).graph.node) == 1  # after the one layer a+b


def test_design_check_on_two_inputs(exported, tmp_path):
    """design --check compares the scaled model with the original on packed inputs: the agreement it reports
    is the one onnxruntime gives on the two inputs fed separately to both written models."""
    path = exported("two_inputs", False)
    inputs, a, b = packed_inputs(tmp_path)
    scaled = tmp_path / "scaled.onnx"
    flags = ("--tolerate", "1", "-e", "0.5", "--check", "--inputs", inputs, "--write", scaled, "--format", "json")
    result = run_in_process("design", path, *flags, expect=None)
    check = json.loads(result.stdout)["check"]
    outputs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["y"], {"a": a, "b": b})[0]
        for p in (path, scaled)
    ]
    assert check["inputs"] == len(a)
    assert check["agreement"] == pytest.approx(float(np.mean(outputs[0].argmax(1) == outputs[1].argmax(1))))
    assert check["max_output_change"] == pytest.approx(float(np.abs(outputs[0] - outputs[1]).max()), abs=1e-6)


def test_packed_vectors_split_into_the_inputs():
    """Graph order, token ids rounded to int64, a held input repeated along the batch, wrong lengths refused."""
    from robaudit.errors import InputDataError
    from robaudit.graph.inputs import CONSTANT, TOKEN, InputSpec, split_feed
    from robaudit.graph.ops.base import Interval

    box = Interval(np.zeros((1, 2)), np.ones((1, 2)))
    specs = [
        InputSpec("ids", (1, 3), Interval(np.zeros((1, 3)), np.full((1, 3), 9.0)), TOKEN, elem_type=7),
        InputSpec("state", (1, 2), box, CONSTANT, elem_type=1, value=np.array([[0.5, -0.5]], np.float32)),
        InputSpec("x", (1, 2), box),
    ]
    packed = np.array([[1, 2, 3, 0.25, 0.75], [9, 0, 4, 0.5, 0.0]], np.float32)
    feeds = split_feed(specs, packed)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].tolist() == [[1, 2, 3], [9, 0, 4]]
    assert feeds["x"].tolist() == [[0.25, 0.75], [0.5, 0.0]]
    assert feeds["state"].tolist() == [[0.5, -0.5], [0.5, -0.5]]
    with pytest.raises(InputDataError, match="need 5"):
        split_feed(specs, packed[:, :4])


# --------------------------------------------------------------------------- torch's own attention modules


class TorchEncoder(torch.nn.Module):
    """features → Linear → nn.TransformerEncoderLayer → mean → Linear. Sequence-first (batch_first=False, the
    input transposed to [tokens, batch, features]) or batch-first: both export attention sequence-first inside."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp, self.out = torch.nn.Linear(FEATURES, D), torch.nn.Linear(D, 3)
        self.enc = torch.nn.TransformerEncoderLayer(D, HEADS, 24, dropout=0.0, batch_first=batch_first)

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            return self.out(self.enc(h.transpose(0, 1)).transpose(0, 1).mean(1))
        return self.out(self.enc(h).mean(1))


def export_torch_encoder(batch_first: bool, dynamo: bool, directory: Path, batch: int = 2, fixed: bool = False) -> Path:
    """Exported with a symbolic batch (the dynamo exporter needs an example batch ≥ 2 for that), or with
    the legacy exporter's batch fixed at ``batch`` (``fixed``: no ``dynamic_axes``)."""
    torch.manual_seed(0)
    model = TorchEncoder(batch_first).eval()
    path = directory / f"torch_encoder_{'bf' if batch_first else 'sf'}_{'dynamo' if dynamo else 'legacy'}.onnx"
    kwargs: dict = {"input_names": ["x"], "output_names": ["y"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    else:
        kwargs["opset_version"] = 17
        kwargs["dynamic_axes"] = {} if fixed else {"x": {0: "N"}, "y": {0: "N"}}
    torch.onnx.export(model, (torch.rand(batch, TOKENS, FEATURES),), str(path), **kwargs)
    return path


TORCH_CASES = [(bf, dynamo) for bf in (False, True) for dynamo in (False, True)]


@pytest.fixture(scope="module")
def torch_encoders(tmp_path_factory):
    directory = tmp_path_factory.mktemp("torch_encoders")
    cache: dict = {}

    def get(batch_first: bool, dynamo: bool) -> Path:
        if (batch_first, dynamo) not in cache:
            cache[batch_first, dynamo] = export_torch_encoder(batch_first, dynamo, directory)
        return cache[batch_first, dynamo]

    return get


def membership(
    session: ort.InferenceSession, value: str, x: np.ndarray, name: str = "x", change=lambda sample: 1.0 - sample
) -> np.ndarray:
    """Which sample each element of ``value`` (at batch len(x)) belongs to, found by changing one sample's
    input ``name`` at a time (``change`` of it): nothing of robaudit's layout logic is used."""
    base = session.run([value], {name: x})[0]
    owner = np.full(base.shape, -1)
    for n in range(len(x)):
        moved = x.copy()
        moved[n] = change(moved[n])
        changed = np.abs(session.run([value], {name: moved})[0] - base) > 1e-6
        assert np.all(owner[changed] == -1)
        owner[changed] = n
    return owner


def preact_session(model: onnx.ModelProto, layers: list) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` (its batch free) that also outputs each layer's pre-activation."""
    probe = instrument(model, [])
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(la.preact_value, 1, None) for la in layers])
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])


def injected_worst(session: ort.InferenceSession, feeds: dict, owners: list, rng: np.random.Generator) -> float:
    """The largest output change of six rounds that fail one random neuron per layer and sample, in the model's own
    layout (``owners``: :func:`membership` per layer), each sending ±[0.5, 1]; ``feeds`` holds the inputs."""
    count = int(max(owner.max() for owner in owners)) + 1
    for index, owner in enumerate(owners):
        feeds[f"keep{index}"] = np.ones(owner.shape, np.float32)
        feeds[f"repl{index}"] = np.zeros(owner.shape, np.float32)
    clean = session.run(["y"], feeds)[0]
    worst = 0.0
    for _ in range(6):
        for index, owner in enumerate(owners):
            keep, repl = np.ones(owner.shape, np.float32), np.zeros(owner.shape, np.float32)
            for n in range(count):
                chosen = rng.choice(np.flatnonzero(owner.reshape(-1) == n))
                keep.reshape(-1)[chosen] = 0.0
                repl.reshape(-1)[chosen] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
            feeds[f"keep{index}"], feeds[f"repl{index}"] = keep, repl
        worst = max(worst, float(np.abs(session.run(["y"], feeds)[0] - clean).max()))
    return worst


@pytest.mark.parametrize(("batch_first", "dynamo"), TORCH_CASES)
def test_torch_attention_is_bounded_and_injection_stays_under(torch_encoders, batch_first, dynamo):
    """nn.TransformerEncoderLayer (attention laid out sequence-first inside): each layer's neurons are one
    sample's elements, wherever the batch axis sits; one byzantine neuron per layer and sample, injected by
    an independent injector in the model's own layout, stays under the bound."""
    path = torch_encoders(batch_first, dynamo)
    report = bound_of(path, "--byzantine", "1", "--capacity", "1")
    _, network = load_network(path, NetworkOptions())
    layers = network.hidden_layers
    assert len(layers) == len(report["layers"]) == 5
    model = onnx.load(str(path))
    plain = preact_session(model, layers)
    rng = np.random.default_rng(0)
    count = 24
    x = rng.uniform(0, 1, (count, TOKENS, FEATURES)).astype(np.float32)
    # the pre-activation (linear in the layer's input, so every element moves) shares the output's layout
    owners = [membership(plain, la.preact_value, x) for la in layers]
    for owner, entry in zip(owners, report["layers"], strict=True):
        assert np.all(np.bincount(owner.reshape(-1), minlength=count) == entry["neurons"])
    session = ort.InferenceSession(
        instrument(model, [la.output_value for la in layers]).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    worst = injected_worst(session, {"x": x}, owners, rng)
    assert worst > 0
    assert worst <= report["fep"] * (1 + 1e-5) + 1e-5, (worst, report["fep"])


@pytest.mark.parametrize(("batch_first", "dynamo"), [(False, False), (True, True)])
def test_torch_attention_worst_search_stays_under_the_bound(torch_encoders, batch_first, dynamo):
    path = torch_encoders(batch_first, dynamo)
    result = run_in_process(
        "inject", path, "--crash", "1", "--samples", "16", "--search", "worst", "--trials", "3", "--format", "json"
    )
    report = json.loads(result.stdout)
    assert all(v["violation"] is False for v in report["vectors"]), report["vectors"]
    assert all(0 < v["measured"]["max"] <= v["bound"] for v in report["vectors"])


@pytest.mark.parametrize("dynamo", [False, True])
def test_attention_with_the_batch_written_into_its_reshapes_is_refused(tmp_path, dynamo):
    """An export with its batch fixed at 1 (the legacy exporter without dynamic_axes, or the dynamo exporter
    from an example batch of 1) writes batch 1 into the sequence-first reshapes ([tokens, batch·heads, d]):
    onnxruntime itself refuses it at batch 2, so the batch axis of the attention layers cannot be placed.
    The one line names the layer and says how to re-export (the symbolic-batch exports are bounded above)."""
    path = export_torch_encoder(True, dynamo, tmp_path, batch=1, fixed=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(["y"], {"x": np.zeros((1, TOKENS, FEATURES), np.float32)})[0].shape == (1, 3)
    with pytest.raises(Exception, match="(?i)reshape|shape|dimension"):
        session.run(["y"], {"x": np.zeros((2, TOKENS, FEATURES), np.float32)})
    for command in ("bound", "inspect"):
        result = run_in_process(command, path, expect=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "'enc.self_attn'" in lines[0] and "batch size 2" in lines[0], result.stderr
        assert "re-export it with a dynamic batch axis" in lines[0], result.stderr
        assert "dynamic_axes={'x': {0: 'batch'}}" in lines[0], result.stderr


def instrumentation_mismatch(path: Path) -> float:
    """Largest |robaudit's error − the independent injector's| (beyond float32 tolerance) when neuron k of a
    layer fails: robaudit's instrumentation (batch moved to the front and back around the fault) against the
    independent injector failing the k-th element of each sample in the model's own layout."""
    from robaudit.bounds.audit import load_network as loaded_network
    from robaudit.injection.campaign import fault_sites
    from robaudit.injection.instrument import FaultBatch
    from robaudit.injection.instrument import instrument as robaudit_instrument
    from robaudit.injection.sandbox import Evaluator

    loaded, network = loaded_network(path, NetworkOptions())
    layers = network.hidden_layers
    rng = np.random.default_rng(3)
    count = 5
    x = rng.uniform(0, 1, (count, TOKENS, FEATURES)).astype(np.float32)
    model = onnx.load(str(path))
    plain = preact_session(model, layers)
    owners = [membership(plain, la.preact_value, x) for la in layers]
    independent = ort.InferenceSession(
        instrument(model, [la.output_value for la in layers]).SerializeToString(), providers=["CPUExecutionProvider"]
    )

    def feeds(chosen: dict[int, tuple[int, float]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"x": x}
        for index, owner in enumerate(owners):
            keep, repl = np.ones(owner.shape, np.float32), np.zeros(owner.shape, np.float32)
            if index in chosen:
                k, value = chosen[index]
                for n in range(count):
                    element = np.flatnonzero(owner.reshape(-1) == n)[k]
                    keep.reshape(-1)[element], repl.reshape(-1)[element] = 0.0, value
            out[f"keep{index}"], out[f"repl{index}"] = keep, repl
        return out

    vector = type("Vector", (), {"neurons": [1] * len(layers), "synapse_counts": lambda self: [0] * len(layers)})()
    sites = fault_sites(network, [vector])
    evaluator = Evaluator(robaudit_instrument(network, sites, loaded.opset), x)
    # and each layer alone: the clean part before it runs once, handing its batch-moved values on batch-first
    alone = [Evaluator(robaudit_instrument(network, (site,), loaded.opset), x) for site in sites]
    clean = independent.run(["y"], feeds({}))[0]
    worst = -np.inf
    for index, layer in enumerate(layers):
        for k in rng.choice(layer.neurons, 3, replace=False):
            value = float(rng.uniform(-2, 2))
            expected = np.abs(independent.run(["y"], feeds({index: (int(k), value)}))[0] - clean).max(axis=1)
            for runner, site in ((evaluator, index), (alone[index], 0)):
                batch = FaultBatch(1, {site: (np.array([[k]]), np.array([[value]]))})
                measured = runner.evaluate(batch).errors[0]
                worst = max(worst, float((np.abs(measured - expected) - 1e-4 * np.abs(expected) - 1e-6).max()))
    return worst


@pytest.mark.parametrize(("batch_first", "dynamo"), [(False, False), (True, True)])
def test_injection_fails_the_neuron_the_bound_counts(torch_encoders, batch_first, dynamo):
    """Per layer, neuron and input, robaudit's injected error is the independent injector's."""
    assert instrumentation_mismatch(torch_encoders(batch_first, dynamo)) <= 0


def test_a_wrong_batch_layout_is_caught(torch_encoders, monkeypatch):
    """The same check with outer and inner swapped in every layout found ([T·B, d] read batch-major)."""
    from robaudit.graph import network as layer_graph

    found = layer_graph._layout

    def swapped(shape, doubled):
        layout = found(shape, doubled)
        return None if layout is None else layer_graph.BatchLayout(layout.axis, layout.inner, layout.outer)

    monkeypatch.setattr(layer_graph, "_layout", swapped)
    assert instrumentation_mismatch(torch_encoders(False, False)) > 0


@pytest.mark.parametrize("dynamo", [False, True])
def test_certify_on_the_encoder_stays_above_injected_errors(exported, tmp_path, dynamo):
    """certify on a per-token model (its dense layers act on every token): each input's certificate is at
    least the error of 40 random crash sets (one neuron per layer) injected at that input."""
    path = exported("encoder", dynamo)
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (3, TOKENS, FEATURES)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = run_in_process("certify", path, "--inputs", tmp_path / "x.npy", "--crash", "1", "-f", "json")
    report = json.loads(proc.stdout)
    _, network = load_network(path, NetworkOptions())
    layers = network.hidden_layers
    session = ort.InferenceSession(
        instrument(onnx.load(str(path)), [la.output_value for la in layers]).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    count = 40
    feeds = {"x": np.repeat(x, count, axis=0)}
    shapes = [(len(feeds["x"]),) + tuple(network.clean[la.output_value].shape[1:]) for la in layers]
    for index, shape in enumerate(shapes):
        feeds[f"keep{index}"], feeds[f"repl{index}"] = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    clean = session.run(["y"], feeds)[0]
    for index, (layer, shape) in enumerate(zip(layers, shapes, strict=True)):
        keep = np.ones((shape[0], layer.neurons), np.float32)
        keep[np.arange(shape[0]), rng.integers(0, layer.neurons, shape[0])] = 0.0
        feeds[f"keep{index}"] = keep.reshape(shape)
    errors = np.abs(session.run(["y"], feeds)[0] - clean).max(axis=1).reshape(len(x), count).max(axis=1)
    bounds = np.array([item["bound"] for item in report["inputs"]])
    assert np.all(errors > 0) and np.all(errors <= bounds * (1 + 1e-5) + 1e-5), (errors, bounds)


def test_inspect_and_errors_name_each_input(exported, tmp_path):
    """inspect of a two-input model lists each input (it showed one 'input shape, input range' line as if the model
    had one); a per-input range error quotes NAME=LO,HI, and certify's suggested range names the input (a new-user
    trial)."""
    path = exported("two_inputs", False)
    text = run_in_process("inspect", path).stdout
    assert "input 'a' float [0, 1]" in text and "input 'b' float [0, 1]" in text and "input shape" not in text
    bad = run_in_process("bound", path, "--input-range", "b=1,0", expect=2).stderr
    assert "--input-range b=LO,HI must be finite with LO ≤ HI, got b=1,0" in bad
    inputs, _, _ = packed_inputs(tmp_path)
    narrow = run_in_process("certify", path, "--inputs", inputs, "--crash", 1, "--input-range", "b=0,0.5", expect=2)
    assert "--input-range b=" in narrow.stderr, narrow.stderr


def test_attention_over_token_ids_is_bounded_and_injection_stays_under(tmp_path):
    """Embedding → nn.MultiheadAttention (sequence-first inside) → classifier: the batch axis is found at batch 2
    (the probe's second sample holds fixed ids, whose rows the lookup now reads exactly — before, every element
    got the table's range and the model was refused); each layer's neurons are one sample's elements, and one
    byzantine neuron per layer and sample, injected in the model's own layout, stays under the bound."""
    torch.manual_seed(0)
    path = tmp_path / "token_attention.onnx"
    torch.onnx.export(TokenAttention().eval(), (torch.randint(0, VOCAB, (2, 5)),), str(path), dynamo=False,
                      opset_version=17, input_names=["ids"], output_names=["y"],
                      dynamic_axes={"ids": {0: "N"}, "y": {0: "N"}})
    report = bound_of(path, "--byzantine", "1", "--capacity", "1")
    _, network = load_network(path, NetworkOptions())
    layers = network.hidden_layers
    model = onnx.load(str(path))
    plain = preact_session(model, layers)
    rng = np.random.default_rng(0)
    count = 16
    ids = rng.integers(0, VOCAB, (count, 5)).astype(np.int64)
    owners = [membership(plain, la.preact_value, ids, "ids", lambda row: (row + 7) % VOCAB) for la in layers]
    for owner, entry in zip(owners, report["layers"], strict=True):
        assert np.all(np.bincount(owner.reshape(-1), minlength=count) == entry["neurons"])
    session = ort.InferenceSession(
        instrument(model, [la.output_value for la in layers]).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    worst = injected_worst(session, {"ids": ids}, owners, rng)
    assert 0 < worst <= report["fep"] * (1 + 1e-5) + 1e-5, (worst, report["fep"])
