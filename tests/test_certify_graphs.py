"""Certificates (docs/method.md §7) through MaxPool, and on models with several inputs or token
inputs (docs/method.md §7.6, §12.3), checked by injection.

Every model is built here with ``onnx.helper`` and faulted by the independent injector of
``tests/ort_faults.py`` (its own graph rewrite, run by onnxruntime in float32, sharing no code
with robaudit). For each case, every failure set with the given counts (byzantine values at both
ends of [a, b] and the midpoint) is applied at each given input and — with a radius — at the
corners of the float inputs' box and random points in it (token ids stay as given). No error
found may exceed that input's certificate (float32 tolerance), and no failure set may change the
arg-max of a certified input. Weakened copies — MaxPool candidates cut to the clean winner, or
the certificate × 0.9 — must be caught by the same search.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from ort_faults import instrument

import robaudit.bounds.certify as certify_module
from robaudit.bounds.audit import load_network
from robaudit.bounds.certify import Certifier
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions

#: float32 (onnxruntime) against the float64 certificate.
REL32, ABS32 = 2e-5, 2e-5

ACTS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}


@dataclass
class Case:
    """A model, its failure sites (hidden outputs in topological order) and how to feed it."""

    model: onnx.ModelProto
    sites: list[str]
    #: Per graph input: (name, per-sample shape, kind: float/token, [lo, hi]).
    inputs: list[tuple[str, tuple[int, ...], str, tuple[float, float]]]
    options: NetworkOptions

    def split(self, packed: np.ndarray) -> dict[str, np.ndarray]:
        """The packed samples [M, Σ elements] cut into the model's inputs (graph order)."""
        feed, offset = {}, 0
        for name, shape, kind, _ in self.inputs:
            size = int(np.prod(shape))
            part = packed[:, offset : offset + size].reshape((len(packed),) + shape)
            feed[name] = part.astype(np.int64) if kind == "token" else part.astype(np.float32)
            offset += size
        return feed


def _init(inits: list, name: str, array: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
    return name


def _model(nodes, inits, inputs, out_shape) -> onnx.ModelProto:
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])
    graph = helper.make_graph(nodes, "certify_case", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test_certify")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


#: MaxPool variants: (kernel, stride, pad) of the first pool; the second is always 2×2, stride 1.
POOLS = {"2x2 s2": (2, 2, 0), "3x3 s1 p1": (3, 1, 1), "2x2 s1": (2, 1, 0)}


def maxpool_case(rng: np.random.Generator, pool: str, act: str) -> Case:
    """x [1, 6, 6] → conv 3×3 (1 ch, pad 1) → act → MaxPool → conv 2×2 (2 ch) → act → MaxPool 2×2 s1 → dense 3."""
    kernel, stride, pad = POOLS[pool]
    inits: list = []
    nodes = [
        helper.make_node("Conv", ["x", _init(inits, "w1", rng.normal(0, 0.8, (1, 1, 3, 3))),
                                  _init(inits, "b1", rng.normal(0, 0.3, 1))], ["z1"], pads=[1, 1, 1, 1]),
        helper.make_node(ACTS[act], ["z1"], ["h1"]),
        helper.make_node("MaxPool", ["h1"], ["p1"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4),
        helper.make_node("Conv", ["p1", _init(inits, "w2", rng.normal(0, 0.8, (2, 1, 2, 2))),
                                  _init(inits, "b2", rng.normal(0, 0.3, 2))], ["z2"]),
        helper.make_node(ACTS[act], ["z2"], ["h2"]),
        helper.make_node("MaxPool", ["h2"], ["p2"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1),
    ]
    side = (6 + 2 * pad - kernel) // stride + 1 - 1 - 1  # after pool 1, conv 2×2, pool 2×2 s1
    w3 = rng.normal(0, 0.8, (3, 2 * side * side))
    nodes.append(helper.make_node("Gemm", ["flat", _init(inits, "w3", w3), _init(inits, "b3", np.zeros(3))], ["y"],
                                  transB=1))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])]
    model = _model(nodes, inits, inputs, [3])
    return Case(model, ["h1", "h2"], [("x", (1, 6, 6), "float", (0.0, 1.0))], NetworkOptions())


def several_inputs_case(rng: np.random.Generator, act: str) -> Case:
    """ids [3] (token, 6-row table of width 2), x [4] in [0, 1], v [2] in [−1, 1] → concat → 6 → 5 → 3."""
    inits: list = []
    nodes = [
        helper.make_node("Gather", [_init(inits, "table", rng.normal(0, 1, (6, 2))), "ids"], ["emb"]),
        helper.make_node("Flatten", ["emb"], ["emb_flat"], axis=1),
        helper.make_node("Concat", ["emb_flat", "x", "v"], ["joined"], axis=1),
        helper.make_node("Gemm", ["joined", _init(inits, "w1", rng.normal(0, 0.7, (6, 12))),
                                  _init(inits, "b1", rng.normal(0, 0.3, 6))], ["z1"], transB=1),
        helper.make_node(ACTS[act], ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", _init(inits, "w2", rng.normal(0, 0.7, (5, 6))),
                                  _init(inits, "b2", rng.normal(0, 0.3, 5))], ["z2"], transB=1),
        helper.make_node(ACTS[act], ["z2"], ["h2"]),
        helper.make_node("Gemm", ["h2", _init(inits, "w3", rng.normal(0, 0.7, (3, 5))),
                                  _init(inits, "b3", np.zeros(3))], ["y"], transB=1),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 2]),
    ]
    model = _model(nodes, inits, inputs, [3])
    specs = [("ids", (3,), "token", (0.0, 5.0)), ("x", (4,), "float", (0.0, 1.0)), ("v", (2,), "float", (-1.0, 1.0))]
    return Case(model, ["h1", "h2"], specs, NetworkOptions(named_ranges=(("v", -1.0, 1.0),)))


def _network(case: Case):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(case.model, str(path))
        return load_network(path, case.options)[1]


def _draw(case: Case, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` packed samples: ids uniform among the table's rows, floats uniform in their box."""
    parts = []
    for _, shape, kind, (lo, hi) in case.inputs:
        size = int(np.prod(shape))
        if kind == "token":
            parts.append(rng.integers(int(lo), int(hi) + 1, (count, size)).astype(np.float64))
        else:
            parts.append(rng.uniform(lo, hi, (count, size)))
    return np.concatenate(parts, axis=1).astype(np.float32).astype(np.float64)


def _box_points(case: Case, sample: np.ndarray, radius: float | None, rng: np.random.Generator) -> np.ndarray:
    """The sample and, with a radius, corners and inner points of its box (float parts moved, ids kept)."""
    if radius is None:
        return sample[None]
    lo, hi, movable, offset = [], [], [], 0
    for _, shape, kind, (low, high) in case.inputs:
        size = int(np.prod(shape))
        lo += [low] * size
        hi += [high] * size
        movable += [kind == "float"] * size
        offset += size
    lo, hi, movable = np.array(lo), np.array(hi), np.array(movable)
    signs = rng.choice([-1.0, 1.0], (6, sample.size))
    inner = rng.uniform(-1.0, 1.0, (6, sample.size))
    moved = sample[None] + radius * np.vstack([signs, inner]) * movable[None]
    points = np.vstack([sample[None], np.clip(moved, lo, hi)])
    return points.astype(np.float32).astype(np.float64)


def _configs(sizes: list[int], counts: list[int], values: tuple[float, ...]):
    """Every failure set with ``counts`` failed neurons per site and each value choice."""
    per_site = []
    for size, count in zip(sizes, counts, strict=True):
        choices = []
        for neurons in itertools.combinations(range(size), count):
            for sent in itertools.product(values, repeat=count):
                choices.append((neurons, sent))
        per_site.append(choices)
    return list(itertools.product(*per_site))


class Injector:
    """onnxruntime on the independently instrumented model (``ort_faults.instrument``)."""

    def __init__(self, case: Case, shapes: list[tuple[int, ...]]):
        self.case, self.shapes = case, shapes
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            instrument(case.model, case.sites).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def outputs(self, points: np.ndarray, configs: list) -> np.ndarray:
        """Outputs [configs (+1 clean first), points, 3] of every configuration at every point."""
        rows = len(configs) + 1
        feed = {k: np.tile(v, (rows,) + (1,) * (v.ndim - 1)) for k, v in self.case.split(points).items()}
        batch = rows * len(points)
        for index, shape in enumerate(self.shapes):
            keep = np.ones((rows, int(np.prod(shape))), np.float32)
            repl = np.zeros((rows, int(np.prod(shape))), np.float32)
            for row, config in enumerate(configs, start=1):
                neurons, sent = config[index]
                keep[row, list(neurons)] = 0.0
                repl[row, list(neurons)] = sent
            feed[f"keep{index}"] = np.repeat(keep, len(points), axis=0).reshape((batch,) + shape)
            feed[f"repl{index}"] = np.repeat(repl, len(points), axis=0).reshape((batch,) + shape)
        return self.session.run(["y"], feed)[0].astype(np.float64).reshape(rows, len(points), -1)


def _mode(kind: str) -> tuple[tuple[float, ...], FailureModel]:
    if kind == "crash":
        return (0.0,), FailureModel.crash()
    if kind == "byzantine":
        return (-1.0, 0.0, 1.0), FailureModel.byzantine(1.0)
    return (-0.25, 0.6, 1.5), FailureModel.byzantine(None, (-0.25, 1.5))


def violations(case: Case, counts: list[int], kind: str, radius: float | None, seed: int) -> list[str]:
    """What the exhaustive search finds above a certificate (or a certified class it changes)."""
    rng = np.random.default_rng(seed)
    network = _network(case)
    hidden = network.hidden_layers
    shapes = [tuple(network.clean[la.output_value].shape[1:]) for la in hidden]
    assert [la.output_value for la in hidden] == case.sites, [la.output_value for la in hidden]
    counts = [min(c, la.neurons) for c, la in zip(counts, hidden, strict=True)]
    values, failure = _mode(kind)
    samples = _draw(case, 3, rng)
    certifier = Certifier(network, failure, samples.astype(np.float32), radius)
    injector = Injector(case, shapes)
    configs = _configs([la.neurons for la in hidden], counts, values)
    found = []
    for i, sample in enumerate(samples):
        box = certifier.box(i, counts)
        out = injector.outputs(_box_points(case, sample, radius, rng), configs)
        clean, faulty = out[0], out[1:]
        err = float(np.abs(faulty - clean[None]).max()) if len(faulty) else 0.0
        scale = max(1.0, float(np.abs(out).max()))
        if err > box.bound * (1 + REL32) + ABS32 * scale:
            found.append(f"input {i}: error {err:.7g} > certificate {box.bound:.7g}")
        if box.certified(1.0) and len(faulty):
            c = int(np.argmax(clean[0]))
            margins = faulty[:, :, c][..., None] - faulty
            margins[..., c] = np.inf
            if (margins < -ABS32 * scale).any():
                found.append(f"input {i}: certified, but a failure set changes the arg-max")
    return found


COUNTS = st.sampled_from([(1, 1), (2, 0), (0, 2), (1, 0), (0, 1)])
KINDS = st.sampled_from(["crash", "byzantine", "asymmetric"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(POOLS)), st.sampled_from(sorted(ACTS)), KINDS, COUNTS,
       st.sampled_from([None, 0.05]), st.integers(0, 2**31))
def test_maxpool_certificates_hold(pool, act, kind, counts, radius, seed) -> None:
    case = maxpool_case(np.random.default_rng(seed), pool, act)
    assert violations(case, list(counts), kind, radius, seed) == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(ACTS)), KINDS, COUNTS, st.sampled_from([None, 0.1]), st.integers(0, 2**31))
def test_several_and_token_inputs_certificates_hold(act, kind, counts, radius, seed) -> None:
    case = several_inputs_case(np.random.default_rng(seed), act)
    assert violations(case, list(counts), kind, radius, seed) == []


# --------------------------------------------------------------------------- weakened copies


def _winner_only(node, box):
    """A wrong MaxPool rule: only the element with the largest lower end is a candidate."""
    found = real_candidates(node, box)
    if found is None:
        return None
    index, mask = found
    lows = np.where(index >= 0, box.lo.reshape(-1)[np.maximum(index, 0)], -np.inf)
    winner = lows.argmax(axis=1)
    only = np.zeros_like(mask)
    only[np.arange(len(mask)), winner] = True
    return index, mask & only


real_candidates = certify_module._maxpool_candidates


def _caught(cases, counts=(1, 1)) -> int:
    return sum(bool(violations(case, list(counts), kind, None, seed)) for case, kind, seed in cases)


def test_maxpool_winner_only_is_caught(monkeypatch) -> None:
    monkeypatch.setattr(certify_module, "_maxpool_candidates", _winner_only)
    pools = sorted(POOLS)
    cases = [(maxpool_case(np.random.default_rng(s), pools[s % 3], "relu"), "crash", s) for s in range(6)]
    assert _caught(cases) > 0


def test_token_rows_shifted_is_caught(monkeypatch) -> None:
    """A lookup that reads the row after each given id (a wrong embedding) is caught."""
    import robaudit.graph.ops.shape_ops as shape_ops
    from robaudit.graph.ops import Interval

    real = shape_ops.embedding_interval

    def shifted(node, table, ids):
        if np.array_equal(ids.lo, ids.hi):
            ids = Interval((ids.lo + 1) % table.shape[0], (ids.lo + 1) % table.shape[0])
        return real(node, table, ids)

    monkeypatch.setattr(shape_ops, "embedding_interval", shifted)
    cases = [(several_inputs_case(np.random.default_rng(s), "relu"), "crash", s) for s in range(4)]
    assert _caught(cases) > 0


def test_shrunk_certificate_is_caught(monkeypatch) -> None:
    real = certify_module.LocalCertifier.certify_box

    def shrunk(self, *args):
        b = real(self, *args)
        return certify_module.BoxBound(b.per_output * 0.9, b.predicted, b.margins, b.drops * 0.9)

    monkeypatch.setattr(certify_module.LocalCertifier, "certify_box", shrunk)
    cases = [(several_inputs_case(np.random.default_rng(s), "relu"), "crash", s) for s in range(4)]
    assert _caught(cases, (2, 0)) > 0


# --------------------------------------------------------------------------- the command


def _saved(tmp_path: Path, case: Case, samples: np.ndarray) -> tuple[Path, Path]:
    model, data = tmp_path / "m.onnx", tmp_path / "in.npz"
    onnx.save(case.model, str(model))
    np.savez(data, x=samples.astype(np.float32))
    return model, data


def test_command_on_several_inputs(tmp_path) -> None:
    """The packed inputs file of ``inject --inputs`` certifies; the bounds are those of the library."""
    import json

    case = several_inputs_case(np.random.default_rng(3), "relu")
    samples = _draw(case, 4, np.random.default_rng(4))
    model, data = _saved(tmp_path, case, samples)
    args = ["certify", model, "--inputs", data, "--input-range", "v=-1,1", "--crash", "1", "--radius", "0.05", "-q"]
    proc = run_in_process(*args, "--format", "json")
    report = json.loads(proc.stdout)
    certifier = Certifier(_network(case), FailureModel.crash(), samples.astype(np.float32), 0.05)
    assert [e["bound"] for e in report["inputs"]] == pytest.approx([certifier.box(i, [1, 1]).bound for i in range(4)])
    assert run_in_process(*args, "--format", "json", "--workers", "2").stdout == proc.stdout
    # the settings name every input with its own range, as bound's do (they gave one hull range and the first
    # input's shape, and a range method the network was not built with: a new-user trial)
    bound = json.loads(run_in_process("bound", model, "--input-range", "v=-1,1", "--format", "json").stdout)
    assert report["settings"]["inputs"] == bound["settings"]["inputs"] and len(report["settings"]["inputs"]) == 3
    assert report["settings"]["ranges"] == bound["settings"]["ranges"]
    assert "input 'v' float [-1, 1]" in run_in_process(*args).stdout


def test_command_with_a_held_input(tmp_path) -> None:
    """``--input-value v=FILE``: the packed samples hold only ids and x; v is a constant at that value."""
    import json

    case = several_inputs_case(np.random.default_rng(5), "tanh")
    samples = _draw(case, 3, np.random.default_rng(6))
    held = np.asarray([[0.25, -0.5]], np.float32)
    np.save(tmp_path / "v.npy", held)
    model, data = _saved(tmp_path, case, samples[:, :7])
    proc = run_in_process("certify", model, "--inputs", data, "--input-value", f"v={tmp_path / 'v.npy'}", "--byzantine",
                   "1", "--capacity", "1", "-q", "--format", "json")
    bounds = [e["bound"] for e in json.loads(proc.stdout)["inputs"]]
    full = np.concatenate([samples[:, :7], np.repeat(held, 3, axis=0)], axis=1)  # v given explicitly instead
    certifier = Certifier(_network(case), FailureModel.byzantine(1.0), full.astype(np.float32))
    held_options = dataclasses.replace(case.options, input_values=(("v", str(tmp_path / "v.npy")),))
    held_certifier = Certifier(load_network(model, held_options)[1], FailureModel.byzantine(1.0),
                               samples[:, :7].astype(np.float32))
    assert bounds == pytest.approx([held_certifier.box(i, [1, 1]).bound for i in range(3)], rel=1e-6)
    # holding v is giving it: the local certificates agree (the domain-wide cap of §7.4 may not: with v held its
    # domain is smaller, and the boxes' output cut of §4.1 then binds on two of these inputs)
    for i in range(3):
        assert _local_bound(held_certifier, i) == pytest.approx(_local_bound(certifier, i), rel=1e-6)


def _local_bound(certifier: Certifier, i: int) -> float:
    """The local certificate of input ``i`` under one byzantine neuron per layer, without the domain-wide cap."""
    certifier._prepare(None)
    clean, center = certifier._clean[i], certifier._centers[i]
    return certifier.local.certify_box(clean, center, [1, 1], certifier.classes, None).bound


@pytest.mark.parametrize(
    ("change", "extra", "needle"),
    [
        (lambda s: s.__setitem__((0, 1), 1.5), [], "whole numbers"),
        (lambda s: s.__setitem__((1, 0), 6.0), [], "outside the input range"),
        (lambda s: s.__setitem__((2, 5), 1.5), [], "'x'"),
        (lambda s: None, ["--radius", "0"], "--radius"),
    ],
)
def test_bad_packed_inputs_are_one_line(tmp_path, change, extra, needle) -> None:
    case = several_inputs_case(np.random.default_rng(3), "relu")
    samples = _draw(case, 3, np.random.default_rng(4))
    change(samples)
    model, data = _saved(tmp_path, case, samples)
    proc = run_in_process("certify", model, "--inputs", data, "--input-range", "v=-1,1", *extra, "-q", expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
