"""The worst search that also moves the input (``robaudit.injection.joint``, docs/method.md §8.2).

On the trained digits MLP (logits): the configuration it returns is real — an independent
numpy forward pass read from the ONNX initializers gives the same error at the returned input
with the returned failed neurons —, it is at least the exhaustive worst case on the given
input it starts from (seeded with that failure pair, as the campaign seeds it with its own
best set), it stays inside the domain (or the radius), and below the domain-wide bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from test_certify import _digits_forward, _digits_numpy

from robaudit.bounds.audit import BoundOptions, bound_network, load_network, model_info
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions
from robaudit.injection.joint import JointSearch


def _exhaustive(layers, x):
    """(largest error, best pair) over every crashed pair at the inputs x."""
    clean = _digits_forward(layers, x)
    best, pair = -1.0, None
    for i in range(layers[0][0].shape[1]):
        for j in range(layers[1][0].shape[1]):
            faulty = _digits_forward(layers, x, np.full(len(x), i), np.full(len(x), j))
            err = float(np.abs(faulty - clean).max())
            if err > best:
                best, pair = err, (i, j)
    return best, pair


@pytest.mark.parametrize("radius", [None, 0.1])
def test_joint_search_is_real_and_beats_the_fixed_input(radius) -> None:
    layers = _digits_numpy()
    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:1].astype(np.float64)
    fixed, (i, j) = _exhaustive(layers, x)
    loaded, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    search = JointSearch(network, FailureModel.crash(), np.random.default_rng(0))
    seed = [(np.array([i]), np.zeros(1)), (np.array([j]), np.zeros(1))]
    found = search.search([1, 1], x.astype(np.float32), [seed], radius)
    at = found.x.astype(np.float64)[None]
    ids = [int(found.chosen[0][0][0]), int(found.chosen[1][0][0])]
    independent = np.abs(
        _digits_forward(layers, at, np.array([ids[0]]), np.array([ids[1]])) - _digits_forward(layers, at)
    ).max()
    assert found.error == pytest.approx(independent, rel=1e-9)
    assert found.error >= fixed * (1 - 1e-9)
    assert at.min() >= 0.0 and at.max() <= 1.0
    if radius is not None:
        assert np.abs(at - x).max() <= radius * (1 + 1e-6)
    else:
        assert found.error > 1.5 * fixed  # the domain holds much worse inputs than this digit
    bound = bound_network(network, BoundOptions(epsilon=1.0, failures=(1, 1)), model_info(loaded)).fep
    assert found.error <= bound


def _number_after(text: str, pattern: str) -> float:
    import re

    match = re.search(pattern + r"\s*([0-9.e+-]+)", text)
    assert match is not None, f"no '{pattern}' in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("epsilon, exceeded", [(0.5, True), (1000.0, False)])
def test_epsilon_line_quotes_the_largest_error_found(epsilon, exceeded) -> None:
    """The ε summary quotes the best error found (moved input included) and says on which inputs."""
    from conftest import run_in_process

    args = ["inject", SAMPLES / "digits_mlp.onnx", "--output", "add_result2", "--crash", "1", "--search", "worst"]
    proc = run_in_process(*args, "--samples", "8", "--trials", "20", "-e", epsilon, "-q")
    out = " ".join(proc.stdout.split())
    fixed = _number_after(out, r"worst fault set \(error")
    moved = _number_after(out, r"moving the input too \(within the domain, from [a-z0-9 ]+\): error")
    line = out[out.index(f"ε = {epsilon:g}:") :]
    quoted = _number_after(line, r"\(measured" if exceeded else r"\(largest")
    assert quoted == pytest.approx(max(fixed, moved), rel=1e-3), line
    assert quoted == pytest.approx(_number_after(out, "bracket: best found"), rel=1e-3)
    where = "on the moved input" if moved > fixed else "on the campaign's inputs"
    assert where in line, line


def test_check_empirical_compares_the_error_inject_found(tmp_path) -> None:
    """check's empirical requirement uses the same best found error as inject's ε line and bracket."""
    import json

    from conftest import cli_json, run_in_process

    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:8]
    np.savez(tmp_path / "in.npz", x=x)
    common = ["--crash", "1", "--search", "worst", "--trials", "20", "--inputs", tmp_path / "in.npz", "-q"]
    report = cli_json("inject", SAMPLES / "digits_mlp.onnx", "--output", "add_result2", *common)
    vector = report["vectors"][0]
    fixed, found = vector["measured"]["max"], vector["bracket"]["best_found"]
    assert found > fixed  # the moved input beats the given ones here, so the two comparisons differ
    epsilon = (fixed + found) / 2
    (tmp_path / "robaudit.yaml").write_text(
        f"epsilon: {epsilon!r}\nmodels:\n  - path: {SAMPLES / 'digits_mlp.onnx'}\n    output: add_result2\n"
        f"    empirical:\n      inputs: in.npz\n      failures: 1\n      search: worst\n      trials: 20\n",
        encoding="utf-8",
    )
    proc = run_in_process("check", "--format", "json", cwd=tmp_path, expect=1)
    verdicts = {v["key"]: v for m in json.loads(proc.stdout)["models"] for v in m["requirements"]}
    verdict = verdicts["empirical.max_error"]
    assert verdict["status"] == "fail" and verdict["achieved"] == pytest.approx(found, rel=1e-9)
    assert "moved" in verdict["detail"]


def test_the_status_says_when_only_the_moved_input_exceeds(tmp_path) -> None:
    """ε between the max over the given inputs and the error on the moved input: the table's status says
    '> ε (moved input)' — the max column stays below ε there (a new-user trial read '16.91 … > ε' as a
    contradiction)."""
    from conftest import cli_json, run_in_process

    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:8]
    np.savez(tmp_path / "in.npz", x=x)
    common = ["--crash", "1", "--search", "worst", "--trials", "20", "--inputs", tmp_path / "in.npz", "-q"]
    model = SAMPLES / "digits_mlp.onnx"
    vector = cli_json("inject", model, "--output", "add_result2", *common)["vectors"][0]
    fixed, found = vector["measured"]["max"], vector["bracket"]["best_found"]
    assert found > fixed
    epsilon = (fixed + found) / 2
    table = run_in_process("inject", model, "--output", "add_result2", *common, "-e", repr(epsilon), columns=240,
                           expect=None).stdout
    assert "> ε (moved input)" in table and "'> ε (moved input)': only on the input" in table, table
    above = run_in_process("inject", model, "--output", "add_result2", *common, "-e", repr(fixed / 2), columns=240,
                           expect=None).stdout
    assert "(moved input)" not in above and "> ε" in above, above


def test_check_empirical_radius_and_default_trials_are_injects(tmp_path) -> None:
    """A policy's ``empirical.radius`` keeps the worst search within that radius of each input, and its default
    ``trials`` is inject's: the same campaign as ``inject --search worst --radius R`` without ``--trials`` (a
    new-user trial saw check fail on an input moved to a corner, with no key to stop it, and measure another
    figure than inject on the same flags: 100 trials against 200)."""
    import json

    from conftest import cli_json, run_in_process

    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:6]
    np.savez(tmp_path / "in.npz", x=x)
    model = SAMPLES / "digits_mlp.onnx"
    common = ["--crash", "1", "--search", "worst", "--inputs", tmp_path / "in.npz", "-q"]
    near = cli_json("inject", model, "--output", "add_result2", "--radius", "0.01", *common)["vectors"][0]
    anywhere = cli_json("inject", model, "--output", "add_result2", *common)["vectors"][0]
    assert near["bracket"]["best_found"] < anywhere["bracket"]["best_found"]
    entry = (f"epsilon: 1000.0\nmodels:\n  - path: {model}\n    output: add_result2\n"
             "    empirical:\n      inputs: in.npz\n      failures: 1\n")
    for extra, expected in (("", anywhere), ("      radius: 0.01\n", near)):
        (tmp_path / "robaudit.yaml").write_text(entry + extra, encoding="utf-8")
        proc = run_in_process("check", "--format", "json", cwd=tmp_path)
        verdicts = {v["key"]: v for m in json.loads(proc.stdout)["models"] for v in m["requirements"]}
        verdict = verdicts["empirical.max_error"]
        assert verdict["achieved"] == pytest.approx(expected["bracket"]["best_found"], rel=1e-9)
        assert f"{expected['configurations']} fault sets" in verdict["detail"]  # the same campaign
    drawn = cli_json("inject", model, "--output", "add_result2", *common[:2], "--search", "random",
                     *common[4:])["vectors"][0]
    (tmp_path / "robaudit.yaml").write_text(entry + "      search: random\n", encoding="utf-8")
    proc = run_in_process("check", "--format", "json", cwd=tmp_path)
    verdicts = {v["key"]: v for m in json.loads(proc.stdout)["models"] for v in m["requirements"]}
    assert f"{drawn['configurations']} fault sets" in verdicts["empirical.max_error"]["detail"]
    (tmp_path / "robaudit.yaml").write_text(entry + "      radius: 0.01\n      search: random\n", encoding="utf-8")
    proc = run_in_process("check", cwd=tmp_path, expect=2)
    assert "empirical.radius" in proc.stderr and "search: worst" in proc.stderr and len(proc.stderr.splitlines()) == 1


def _two_input_chain(tmp_path, inputs: int):
    """A 7 → 5 → 3 ReLU chain fed one input x[N, 7], or two, a[N, 4] and b[N, 3], concatenated."""
    from conftest import dense_chain, make_model
    from onnx import TensorProto, helper

    graph = dense_chain([7, 5, 3], ["relu"]).model.graph
    if inputs == 2:
        concat = helper.make_node("Concat", ["a", "b"], ["x"], name="concat", axis=1)
        feeds = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", k]) for n, k in (("a", 4), ("b", 3))]
        graph = helper.make_graph([concat, *graph.node], "two_inputs", feeds, graph.output, graph.initializer)
    path = tmp_path / f"chain{inputs}.onnx"
    path.write_bytes(make_model(graph).SerializeToString())
    return path


@pytest.mark.parametrize("inputs", [1, 2])
def test_worst_search_moves_the_inputs_of_a_two_input_model_by_measurements(tmp_path, inputs) -> None:
    """A two-input model: the numpy model follows one float input, so the input moves by onnxruntime's measurements
    alone (it was kept, with a note saying so); the notes say how it moved, the moved inputs lie in their own ranges,
    beat the given inputs, and their error is the one an independent numpy forward pass gives with the same crashed
    neuron. A one-input model moves the input by the gradient and has neither note."""
    from robaudit.injection.campaign import failure_vector, run_injection
    from robaudit.injection.results import InjectOptions

    ranges = (("a", 0.0, 1.0), ("b", -2.0, 2.0)) if inputs == 2 else ()
    path = _two_input_chain(tmp_path, inputs)
    loaded, network = load_network(path, NetworkOptions(named_ranges=ranges))
    inject = InjectOptions(vectors=(failure_vector(network, (1,)),), search="worst", trials=10, samples=8)
    result = run_injection(network, inject, model_info(loaded))
    vector = result.vectors[0]
    measured = [note for note in result.notes if "measurements alone" in note]
    assert not [note for note in result.notes if "kept the given inputs" in note]
    assert vector.moved is not None
    if inputs == 1:
        assert measured == []
        return
    assert measured == [
        "the worst search moved the input by onnxruntime's measurements alone, with the fault set it found kept "
        "(sign ascent along random directions): its gradient is not followed through models with several inputs"
    ]
    x = np.array(vector.moved.input)
    assert np.all((x[:4] >= 0.0) & (x[:4] <= 1.0)) and np.all((x[4:] >= -2.0) & (x[4:] <= 2.0))
    assert vector.moved.error > vector.measured.max
    from onnx import numpy_helper

    model = onnx.load(path)
    stored = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    (w1, b1), (w2, b2) = ((stored[n.input[1]], stored[n.input[2]]) for n in model.graph.node if n.op_type == "Gemm")
    (crashed,) = vector.moved.faults.faults[0].neurons

    def forward(kill: int | None) -> np.ndarray:
        h = np.maximum(w1 @ x + b1, 0.0)
        if kill is not None:
            h[kill] = 0.0
        return w2 @ h + b2

    independent = float(np.abs(forward(crashed) - forward(None)).max())
    assert vector.moved.error == pytest.approx(independent, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape, share", [((3, 5), 0.999), ((8, 8), 0.85)])
def test_the_measured_climb_reaches_the_corner_of_a_linear_error(shape, share) -> None:
    """climb_input on |w·x| over a per-element box: the largest error is at the corner x_i = hi_i where w_i > 0 and
    lo_i where w_i < 0 (or the opposite corner). From the box's centre it reaches it along every axis (15 elements:
    central differences per axis) and comes within 15 % with 16 random directions per step (64 elements: 90 %; 82 %
    without the momentum; the centre itself 5 %); every input it measures lies in the box."""
    from robaudit.injection.input_climb import climb_input

    rng = np.random.default_rng(4)
    w = rng.normal(size=shape)
    low, high = rng.uniform(-1.0, 0.0, shape), rng.uniform(0.5, 2.0, shape)
    seen: list[np.ndarray] = []

    def error_at(inputs: np.ndarray) -> np.ndarray:
        seen.append(inputs)
        return np.abs((inputs.astype(np.float64) * w).reshape(len(inputs), -1).sum(axis=1))

    best = max(abs(float(np.sum(np.where(w > 0, high, low) * w))), abs(float(np.sum(np.where(w > 0, low, high) * w))))
    x, error = climb_input(error_at, (low + high) / 2, low, high, np.random.default_rng(0))
    assert error >= share * best and error == pytest.approx(float(error_at(x[None])[0]))
    every = np.concatenate(seen).astype(np.float64)
    assert np.all(every >= low.astype(np.float32) - 1e-7) and np.all(every <= high.astype(np.float32) + 1e-7)


def _smooth_chain(tmp_path, activation: str):
    """x [1, 4] → act(W1·x + b1) [6] → act(W2·h + b2) [5] → W3·h + b3 [3], opset 20 (Gelu is an op there)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    shapes = [(6, 4), (5, 6), (3, 5)]
    inits, nodes, current = [], [], "x"
    for k, (rows, cols) in enumerate(shapes):
        inits += [
            numpy_helper.from_array(rng.uniform(-1.5, 1.5, (rows, cols)).astype(np.float32), f"w{k}"),
            numpy_helper.from_array(rng.uniform(-0.5, 0.5, rows).astype(np.float32), f"b{k}"),
        ]
        nodes.append(helper.make_node("Gemm", [current, f"w{k}", f"b{k}"], [f"z{k}"], name=f"fc{k}", transB=1))
        current = f"z{k}"
        if k < 2:
            nodes.append(helper.make_node(activation, [current], [f"h{k}"], name=f"act{k}"))
            current = f"h{k}"
    graph = helper.make_graph(
        nodes, "smooth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "smooth.onnx")
    return load_network(tmp_path / "smooth.onnx", NetworkOptions(input_range=(-2.0, 2.0)))[1]


@pytest.mark.parametrize("activation", ["Gelu", "Softplus", "Elu", "Tanh", "Relu"])
def test_the_input_gradient_is_the_derivative_of_the_error(tmp_path, activation) -> None:
    """The direction the joint search climbs is d(F̃_k − F_k)/dx, checked against central differences of the
    network's own point evaluation; on smooth activations without an exact chord rule at a point (GELU,
    Softplus, ELU) it was the lower end of a [−K, K] slope interval, and the search undershot (GELU MLP: 12.7
    found where random points reach 16)."""
    from robaudit.injection.joint import ConcreteNetwork

    network = _smooth_chain(tmp_path, activation)
    model = ConcreteNetwork(network, FailureModel.byzantine(1.0))
    chosen = [(np.array([2]), np.array([1.0])), (np.array([0, 3]), np.array([-1.0, 0.5]))]
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.uniform(-1.5, 1.5, 4)
        k = int(rng.integers(0, 3))
        grad, _ = model.gradients(x, chosen, k)

        def diff(u: np.ndarray, k: int = k) -> float:
            return float(model.tail(model.run(u, chosen))[k] - model.tail(model.run(u))[k])

        numeric = np.array([(diff(x + h) - diff(x - h)) / 2e-6 for h in np.eye(4) * 1e-6])
        assert np.allclose(grad, numeric, rtol=1e-3, atol=1e-4), (grad, numeric)


def test_the_joint_search_starts_from_the_input_of_the_best_fault_set() -> None:
    """Seeded with a fault set and the given input where it was found, the moved configuration is at least as
    bad (a new-user trial saw 5.04 reported as "moving the input too" beside 7.97 found without moving)."""
    layers = _digits_numpy()
    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:40].astype(np.float64)
    errors = []
    for i in range(len(x)):
        errors.append(_exhaustive(layers, x[i : i + 1]))
    first = int(np.argmax([e for e, _ in errors]))
    fixed, (i, j) = errors[first]
    _, network = load_network(SAMPLES / "digits_mlp.onnx", NetworkOptions(output="add_result2"))
    search = JointSearch(network, FailureModel.crash(), np.random.default_rng(1))
    search.calls = 200  # a small budget: one given input is climbed
    seed = [(np.array([i]), np.zeros(1)), (np.array([j]), np.zeros(1))]
    found = search.search([1, 1], x.astype(np.float32), [seed], 0.02, first=first)
    assert found.start == f"given input {first}" and found.error >= fixed * (1 - 1e-6)


def _rounded_models(tmp_path):
    """(name, ONNX model, input shape, output QDQ scale or 0): the int8 digits CNN (QDQ pairs as its
    activations, one on the logits) and a CNN computing in float16 (a rounding after every op)."""
    from test_float16 import _cnn

    half = tmp_path / "cnn16.onnx"
    onnx.save(_cnn(), half)
    return [(SAMPLES / "digits_cnn_int8.onnx", (1, 8, 8), 0.1620268), (half, (1, 8, 8), 0.0)]


@pytest.mark.parametrize("case", [0, 1], ids=["int8 QDQ", "float16"])
def test_the_search_moves_the_input_of_a_rounded_model(tmp_path, case) -> None:
    """On an int8 or float16 model the input's gradient went through each rounding op as a bare magnitude and
    came out 0: the search kept every start where it was (the int8 digits CNN: 11.99 found with or without
    moving; 19.1 now). The rounding now passes with its straight-through derivative and the numpy model rounds
    as onnxruntime does; the configuration it returns is checked by an independent injector in onnxruntime."""
    from ort_faults import FaultRunner

    path, shape, out_scale = _rounded_models(tmp_path)[case]
    _, network = load_network(path, NetworkOptions())
    search = JointSearch(network, FailureModel.crash(), np.random.default_rng(0))
    search.calls = 120  # a short climb is enough to leave the start
    x0 = np.random.default_rng(1).uniform(0.0, 1.0, shape)
    chosen = search.initial_set(x0, [1] * len(network.hidden_layers))
    start = search.model.error(x0, chosen)
    grad, _ = search.model.gradients(x0, chosen, int(search._objective(x0, chosen)[1]))
    assert np.abs(grad).sum() > 0.0
    found = search.climb(x0, chosen, None, "test", steps=12)
    assert found.error > 1.3 * start, (found.error, start)

    model = onnx.load(path)
    values = [la.output_value for la in network.hidden_layers]
    shapes = [tuple(network.clean[v].shape[1:]) for v in values]
    dtype = np.float16 if case == 1 else np.float32
    runner = FaultRunner(model, values, shapes, dtype)
    at = found.x[None].astype(dtype)
    keeps, repls = [np.ones((1,) + s) for s in shapes], [np.zeros((1,) + s) for s in shapes]
    for keep, (ids, _) in zip(keeps, found.chosen, strict=True):
        keep.reshape(-1)[ids] = 0.0  # crashed: the value is 0
    measured = np.abs(runner.run(at, keeps, repls).astype(np.float64) - runner.clean(at).astype(np.float64)).max()
    if case == 1:  # float16 values that onnxruntime rounds in its own order: a few of their ulps apart
        allowed = 8 * float(np.spacing(np.float16(np.abs(runner.clean(at)).max())))
        assert abs(measured - found.error) <= allowed, (measured, found.error)
        return
    # the numpy model's error is of the logits before their QDQ pair (uint8 codes, zero point 143): through it
    # the codes saturate, and each logit may land one code from onnxruntime's
    model_values = search.model.run(at[0].astype(np.float64), found.chosen), search.model.run(at[0].astype(np.float64))
    faulty, clean = (_uint8_qdq(search.model.tail(v), out_scale, 143) for v in model_values)
    assert abs(measured - np.abs(faulty - clean).max()) <= 2 * out_scale + 1e-6, (measured, found.error)


def _uint8_qdq(v: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (np.clip(np.rint(v / scale) + zero_point, 0, 255) - zero_point) * scale


def test_the_straight_through_derivative_of_a_qdq_pair_is_relus_on_its_codes() -> None:
    """A uint8 QDQ pair with zero point 0 (quantize_static's ReLU) passes d/dx = 1 on [0, 255·s] and 0 outside;
    per channel, each channel's own ends; a float16 cast 1 up to ±65504."""
    from robaudit.graph.onnx_graph import Node
    from robaudit.graph.ops import lookup
    from robaudit.graph.ops.rounding import QuantizeDequantize
    from robaudit.injection.joint import straight_through

    x = np.array([[-0.3, 0.0, 0.2, 2.55, 2.56, 9.0]])
    node = Node("q", "QuantizeDequantize", "robaudit", ["a"], ["b"], {"scale": 0.01, "zero_point": 0, "qmin": 0,
                                                                       "qmax": 255})
    rule = lookup(node)
    assert isinstance(rule, QuantizeDequantize)
    assert straight_through(node, rule, x).tolist() == [[0, 1, 1, 1, 0, 0]]
    per_channel = Node("q", "QuantizeDequantize", "robaudit", ["a"], ["b"],
                       {"scale": [0.01, 0.1], "zero_point": [128, 0], "qmin": -128, "qmax": 127, "axis": 1})
    y = np.array([[-2.57, -1.0], [1.28, 12.7]]).T.reshape(1, 2, 2)  # channel 0: -2.57, 1.28; channel 1: -1, 12.7
    # channel 0: codes -128..127 less zero point 128, ×0.01: [-2.56, -0.01]; channel 1: [-12.8, 12.7]
    assert straight_through(per_channel, lookup(per_channel), y).tolist() == [[[0, 0], [1, 1]]]
    cast = Node("c", "FloatRound", "robaudit", ["a"], ["b"], {"to": 10})
    wide = np.array([-7e4, -65504.0, 0.5, 65504.0, 1e5])
    assert straight_through(cast, lookup(cast), wide).tolist() == [0, 1, 1, 1, 0]


def test_the_moved_input_stays_in_a_per_element_domain(tmp_path) -> None:
    """With ``--input-range-file`` the domain is a box per element; the search moved inside the hull [min lo, max hi]
    of it instead (53 of 64 pixels outside a ±0.05 box around a digit), where an error it finds is no error the
    bound speaks of. Every start (given input, random point, corners) and every step now stays in the box."""
    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:2].astype(np.float64)
    lo, hi = (np.clip(x[0] + d, 0.0, 1.0).astype(np.float32).astype(np.float64) for d in (-0.05, 0.05))
    np.savez(tmp_path / "box.npz", lo=lo.astype(np.float32), hi=hi.astype(np.float32))
    options = NetworkOptions(output="add_result2", input_range_file=str(tmp_path / "box.npz"))
    _, network = load_network(SAMPLES / "digits_mlp.onnx", options)
    search = JointSearch(network, FailureModel.byzantine(1.0), np.random.default_rng(0))
    found = search.search([1, 1], x.astype(np.float32))
    at = found.x.astype(np.float64).reshape(-1)
    assert np.all(at >= lo) and np.all(at <= hi), (int(np.sum(at < lo)), int(np.sum(at > hi)))
    low, high = search._box(np.zeros(64), None)  # where every climb moves, from any start
    assert np.array_equal(low, lo) and np.array_equal(high, hi)


def _replays_match(network, failure) -> bool:
    """Whether every run of one ConcreteNetwork (runs repeated, fault sets alternated, the input moved in place after
    a run) gives the values and failed neurons' computed values of a fresh one."""
    from robaudit.injection.joint import ConcreteNetwork

    model = ConcreteNetwork(network, failure)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1.5, 1.5, 4), rng.uniform(-1.5, 1.5, 4)
    a = [(np.array([2]), np.array([2.0**22])), (np.array([0, 3]), np.array([2.0**22, 2.0**30]))]
    b = [(np.array([1]), np.array([2.0**31])), (np.array([0, 3]), np.array([2.0**22, 2.0**30]))]
    for point, chosen in [(x, None), (x, a), (x, b), (x, a), (y, a), (x, None), (x, b), (y, a)]:
        moving = point.copy()
        got = model.run(moving, chosen)
        moving += 1.0  # the caller moves its input in place: what was remembered stays
        fresh = ConcreteNetwork(network, failure)
        expected = fresh.run(point, chosen)
        if got.keys() != expected.keys() or not all(np.array_equal(got[k], expected[k]) for k in got):
            return False
        failed = [] if chosen is None else [i for i, (ids, _) in enumerate(chosen) if len(ids)]
        if not all(np.array_equal(model.computed[i], fresh.computed[i]) for i in failed):
            return False
    return True


def test_remembered_runs_equal_fresh_ones(tmp_path) -> None:
    """A search evaluates a configuration and then takes its gradient there: the numpy model remembers its last
    runs, keyed by the input and the whole fault set (its failed neurons' computed values restored with them)."""
    assert _replays_match(_smooth_chain(tmp_path, "Tanh"), FailureModel.bit_flip(22))


def test_runs_remembered_without_the_fault_set_are_caught(tmp_path, monkeypatch) -> None:
    import robaudit.injection.joint as joint

    monkeypatch.setattr(joint, "_signature", lambda part: ())
    assert not _replays_match(_smooth_chain(tmp_path, "Tanh"), FailureModel.bit_flip(22))


def test_a_moved_input_below_the_given_ones_is_said(tmp_path) -> None:
    """On the digits MLP's probabilities the given inputs already reach the whole reach (1) and the climb from a
    corner finds far less: the line says the moved input's error is below the given inputs' (a new-user trial
    read 'moving the input too: error 0.002273' as the search's result); on its logits the moved input is above
    them, and nothing is said."""
    from conftest import run_in_process

    x = np.load(SAMPLES / "digits_inputs.npz")["x"][:8]
    np.savez(tmp_path / "in.npz", x=x)
    common = ["inject", SAMPLES / "digits_mlp.onnx", "--crash", "1", "--search", "worst", "--trials", "20",
              "--inputs", tmp_path / "in.npz", "-q"]
    probabilities = run_in_process(*common, columns=240, expect=None).stdout
    assert "of the given inputs, which stays the best found" in probabilities, probabilities
    logits = run_in_process(*common, "--output", "add_result2", columns=240, expect=None).stdout
    assert "moving the input too" in logits and "which stays the best found" not in logits, logits
