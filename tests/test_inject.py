"""Fault injection core (docs/method.md §8.1): instrumentation against independent forward passes,
the worst-case search on the tight docs/method.md §3.1 network, reproducibility, replay, batching
fallbacks and the containment of onnxruntime.

Independent references: a numpy forward pass of dense chains read back from the ONNX
initializers, the separate injector of ``tests/ort_faults.py`` for LeNet, and the
closed form of Fep on the all-equal-weights ReLU network.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, SAMPLES, dense_chain, make_model
from onnx import TensorProto, helper, numpy_helper
from ort_faults import instrument as independent_instrument

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import FailureModel
from robaudit.errors import InjectionRuntimeError, OptionError
from robaudit.graph.network import NetworkOptions
from robaudit.injection.campaign import failure_vector, inject_model
from robaudit.injection.instrument import FaultBatch, instrument, neuron_site, synapse_site
from robaudit.injection.results import FailureVector, InjectOptions
from robaudit.injection.sandbox import Evaluator, Limits, open_evaluator

# --------------------------------------------------------------------------- references


def chain_forward(model: onnx.ModelProto, x: np.ndarray, faults: dict) -> np.ndarray:
    """numpy forward of a ``dense_chain`` (gemm_t1, relu/sigmoid/tanh) with faults.

    ``faults[l]`` = {"neurons": {i: v}, "synapses": {(i, j): v}} for hidden layer l (0-based):
    a failed neuron outputs v; a failed synapse i→j delivers v instead of w_ji·y_i.
    """
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    acts = {n.input[0]: n.op_type for n in model.graph.node if n.op_type in ("Relu", "Sigmoid", "Tanh")}
    functions = {"Relu": lambda z: np.maximum(z, 0), "Sigmoid": lambda z: 1 / (1 + np.exp(-z)), "Tanh": np.tanh}
    y = x.astype(np.float64)
    layer = 1
    while f"fc{layer}.W" in inits:
        w, b = inits[f"fc{layer}.W"], inits[f"fc{layer}.b"]
        z = y @ w.T + b
        spec = faults.get(layer - 1, {})
        for (i, j), v in spec.get("synapses", {}).items():
            z[:, j] += v - w[j, i] * y[:, i]
        op = acts.get(f"fc{layer}_pre")
        y = functions[op](z) if op else z
        for i, v in spec.get("neurons", {}).items():
            y[:, i] = v
        layer += 1
    return y


def evaluator_for(path, layers, kinds=("neuron",), inputs=None, samples=6):
    loaded, network = load_network(path, NetworkOptions())
    hidden = network.hidden_layers
    sites = []
    for i in layers:
        if "neuron" in kinds:
            sites.append(neuron_site(hidden[i], i))
        if "synapse" in kinds:
            sites.append(synapse_site(hidden[i], i))
    spec = instrument(network, tuple(sites), loaded.opset)
    if inputs is None:
        inputs = np.random.default_rng(1).uniform(0, 1, (samples, *network.input_shape[1:])).astype(np.float32)
    return Evaluator(spec, inputs), spec, network, inputs


# --------------------------------------------------------------------------- instrumentation


@pytest.mark.parametrize("activations", [["relu", "sigmoid"], ["tanh", "relu"]])
def test_neuron_faults_match_numpy_forward(tmp_path, activations):
    chain = dense_chain([5, 7, 6, 3], activations, seed=3)
    path = chain.save(tmp_path)
    evaluator, _, _, x = evaluator_for(path, [0, 1])
    rng = np.random.default_rng(0)
    configs = 9
    ids0 = np.stack([rng.choice(7, 2, replace=False) for _ in range(configs)])
    ids1 = np.stack([rng.choice(6, 3, replace=False) for _ in range(configs)])
    vals0, vals1 = rng.uniform(-2, 2, (configs, 2)), rng.uniform(-2, 2, (configs, 3))
    batch = FaultBatch(configs, {0: (ids0, vals0), 1: (ids1, vals1)})
    got = evaluator.evaluate(batch).errors
    clean = chain_forward(chain.model, x, {})
    for c in range(configs):
        faults = {
            0: {"neurons": dict(zip(ids0[c].tolist(), vals0[c].tolist(), strict=True))},
            1: {"neurons": dict(zip(ids1[c].tolist(), vals1[c].tolist(), strict=True))},
        }
        want = np.abs(chain_forward(chain.model, x, faults) - clean).max(axis=1)
        np.testing.assert_allclose(got[c], want, rtol=1e-4, atol=1e-5)


def test_synapse_faults_match_numpy_forward(tmp_path):
    chain = dense_chain([4, 6, 5, 2], ["relu", "sigmoid"], seed=7)
    path = chain.save(tmp_path)
    evaluator, spec, _, x = evaluator_for(path, [0, 1], kinds=("synapse",))
    assert [s.kind for s in spec.sites] == ["synapse", "synapse"]
    rng = np.random.default_rng(2)
    configs = 7
    flat0 = np.stack([rng.choice(6 * 4, 3, replace=False) for _ in range(configs)])  # j * fan_in + i
    flat1 = np.stack([rng.choice(5 * 6, 2, replace=False) for _ in range(configs)])
    vals0, vals1 = rng.uniform(-1, 1, (configs, 3)), rng.uniform(-1, 1, (configs, 2))
    batch = FaultBatch(configs, synapses={0: (flat0 % 4, flat0 // 4, vals0), 1: (flat1 % 6, flat1 // 6, vals1)})
    got = evaluator.evaluate(batch).errors
    clean = chain_forward(chain.model, x, {})
    for c in range(configs):
        faults = {
            0: {"synapses": {(k % 4, k // 4): v for k, v in zip(flat0[c].tolist(), vals0[c].tolist(), strict=True)}},
            1: {"synapses": {(k % 6, k // 6): v for k, v in zip(flat1[c].tolist(), vals1[c].tolist(), strict=True)}},
        }
        want = np.abs(chain_forward(chain.model, x, faults) - clean).max(axis=1)
        np.testing.assert_allclose(got[c], want, rtol=1e-4, atol=1e-5)


def test_lenet_faults_match_independent_injector():
    path = SAMPLES / "lenet.onnx"
    x = np.load(SAMPLES / "lenet_inputs.npz")["x"][:5]
    evaluator, spec, network, _ = evaluator_for(path, [0, 3], inputs=x)
    hidden = network.hidden_layers
    values = [hidden[0].output_value, hidden[3].output_value]
    model = onnx.load(str(path))
    import onnxruntime as ort

    session = ort.InferenceSession(
        independent_instrument(model, values).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(5)
    configs = 6
    ids0 = np.stack([rng.choice(hidden[0].neurons, 4, replace=False) for _ in range(configs)])
    ids3 = np.stack([rng.choice(hidden[3].neurons, 2, replace=False) for _ in range(configs)])
    vals0, vals3 = rng.uniform(-3, 3, (configs, 4)), np.zeros((configs, 2))
    got = evaluator.evaluate(FaultBatch(configs, {0: (ids0, vals0), 1: (ids3, vals3)})).errors

    def run(keeps, repls):
        feed = {"input": x}
        for k, (keep, repl) in enumerate(zip(keeps, repls, strict=True)):
            feed[f"keep{k}"], feed[f"repl{k}"] = keep, repl
        return session.run([network.output_name], feed)[0].astype(np.float64)

    shapes = [(len(x), *hidden[0].out_shape[1:]), (len(x), *hidden[3].out_shape[1:])]
    clean = run([np.ones(s, np.float32) for s in shapes], [np.zeros(s, np.float32) for s in shapes])
    for c in range(configs):
        keeps = [np.ones(s, np.float32) for s in shapes]
        repls = [np.zeros(s, np.float32) for s in shapes]
        for k, (ids, vals) in enumerate([(ids0[c], vals0[c]), (ids3[c], vals3[c])]):
            keeps[k].reshape(len(x), -1)[:, ids] = 0
            repls[k].reshape(len(x), -1)[:, ids] = vals
        want = np.abs(run(keeps, repls) - clean).max(axis=1)
        np.testing.assert_allclose(got[c], want, rtol=1e-4, atol=1e-5)


def test_clean_run_matches_the_original_model():
    """With no fault, the prefix + suffix compute the model's own output (every sample model)."""
    import onnxruntime as ort

    for name in ("digits_mlp", "resnet_small_bn", "mobilenet_se"):
        path = SAMPLES / f"{name}.onnx"
        last = len(load_network(path, NetworkOptions())[1].hidden_layers) - 1
        evaluator, _, network, x = evaluator_for(path, [0, last])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want = session.run([network.output_name], {network.input_name: x})[0].reshape(len(x), -1)
        np.testing.assert_allclose(evaluator.ready().outputs, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- search and report


def equal_weight_fep(sizes: list[int], weight: float, failures: list[int]) -> float:
    """Closed form of docs/method.md §3.1 on an all-equal-weights ReLU chain with input 1: exact Fep."""
    outputs, y = [], 1.0
    for fan_in in sizes[:-2]:
        y = weight * fan_in * y
        outputs.append(y)  # δ_l = y_l (crash), every neuron of layer l equal
    error = 0.0
    for index, (f, delta) in enumerate(zip(failures, outputs, strict=True)):
        error = f * delta + (sizes[index + 1] - f) * weight * error
    return weight * error


@pytest.mark.parametrize("failures", [[1, 0], [0, 3], [2, 2], [6, 1]])
def test_worst_search_attains_fep_on_equal_weights(tmp_path, failures):
    sizes = [4, 6, 5, 3]
    path = dense_chain(sizes, ["relu", "relu"], const_weight=0.25).save(tmp_path)
    options = InjectOptions(vectors=(FailureVector(tuple(failures)),), search="worst", samples=3, isolate=False)
    result = inject_model(path, options, NetworkOptions(input_range=(1.0, 1.0)))
    vector = result.vectors[0]
    fep = equal_weight_fep(sizes, 0.25, failures)
    assert vector.fep_paper == pytest.approx(fep, rel=1e-5)
    assert vector.measured.max == pytest.approx(fep, rel=0.01), vector
    assert not vector.violation


def trap_for_greedy(tmp_path) -> Path:
    """x (2) → 4 ReLU neurons that are 1 whatever the input → outputs o1 = 1.2·y0 + 0.8·y1, o2 = 1.1·(y2 + y3).

    Crashing two: {0, 1} moves o1 by 2.0 and {2, 3} moves o2 by 2.2 (by hand). The greedy pick starts from y0
    (1.2 alone) and ends at {0, 1}; no single swap from there does better (≤ 1.2), so only trying the sets finds 2.2.
    """
    w1 = np.zeros((4, 2), np.float32)
    b1 = np.ones(4, np.float32)
    w2 = np.array([[1.2, 0.8, 0, 0], [0, 0, 1.1, 1.1]], np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h_pre"], transB=1),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], transB=1),
    ]
    arrays = {"W1": w1, "b1": b1, "W2": w2, "b2": np.zeros(2, np.float32)}
    inits = [numpy_helper.from_array(array, name) for name, array in arrays.items()]
    graph = helper.make_graph(
        nodes, "trap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    path = tmp_path / "trap.onnx"
    onnx.save(make_model(graph), path)
    return path


@pytest.mark.parametrize("mode", ["crash", "byzantine"])
def test_worst_search_tries_every_set_when_there_are_few(tmp_path, mode):
    """C(4, 2) = 6 sets (× 2² values for byzantine): the worst search tries them all and finds the hand-derived
    worst, where greedy construction and swaps stop at a local optimum (2.0 for crash)."""
    failure = FailureModel(mode="byzantine", failure_range=(-1.0, 1.0)) if mode == "byzantine" else FailureModel()
    options = InjectOptions(
        vectors=(FailureVector((2,)),), failure=failure, search="worst", samples=3, isolate=False, move_inputs=False
    )
    result = inject_model(trap_for_greedy(tmp_path), options, NetworkOptions())
    vector = result.vectors[0]
    # crash: o2 loses 1.1 + 1.1; byzantine: y2 = y3 = −1 moves o2 by 1.1·2·2 = 4.4 (o1's best: 1.2·2 + 0.8·2 = 4.0)
    expected = 2.2 if mode == "crash" else 4.4
    assert vector.measured.max == pytest.approx(expected, rel=1e-6), vector.worst
    assert not vector.violation and vector.fep_tight >= expected * (1 - 1e-6)


def test_same_seed_same_result_and_replay(tmp_path):
    path = SAMPLES / "paper_mlp_sigmoid.onnx"
    options = InjectOptions(
        failure=FailureModel.byzantine(capacity=1.0), vectors=(FailureVector((2, 1)),), trials=40, samples=10
    )
    local = InjectOptions(**{**options.__dict__, "isolate": False})
    first, second = inject_model(path, options), inject_model(path, local)
    assert first.vectors == second.vectors
    other = inject_model(path, InjectOptions(**{**local.__dict__, "seed": 1}))
    assert other.vectors[0].measured != first.vectors[0].measured
    # the reported worst fault set, replayed, gives the reported error on the reported input
    worst = first.vectors[0].worst[0]
    loaded, network = load_network(path, NetworkOptions())
    sites = (neuron_site(network.hidden_layers[0], 0), neuron_site(network.hidden_layers[1], 1))
    x = np.random.default_rng(0).uniform(0, 1, (10, 16)).astype(np.float32)  # the seed-0 samples
    evaluator = Evaluator(instrument(network, sites, loaded.opset), x)
    batch = FaultBatch(1, {k: (np.array([f.neurons]), np.array([f.values])) for k, f in enumerate(worst.faults)})
    errors = evaluator.evaluate(batch).errors[0]
    assert errors.max() == pytest.approx(worst.error, rel=1e-6)
    assert int(errors.argmax()) == worst.input_index


def test_progress_is_reported_and_statistics_are_consistent():
    seen = []
    options = InjectOptions(vectors=(FailureVector((1, 1)),), trials=30, samples=8, isolate=False)
    loaded, network = load_network(SAMPLES / "paper_mlp_sigmoid.onnx", NetworkOptions())
    from robaudit.bounds.audit import model_info
    from robaudit.injection.campaign import run_injection

    result = run_injection(network, options, model_info(loaded), lambda *args: seen.append(args))
    assert seen and seen[-1][1] == seen[-1][2] == 30
    vector = result.vectors[0]
    assert vector.configurations == 30 and vector.evaluations == 30 * 8
    assert 0 <= vector.measured.mean <= vector.measured.p95 <= vector.measured.max <= vector.bound
    assert [w.error for w in vector.worst] == sorted((w.error for w in vector.worst), reverse=True)
    assert vector.worst[0].error == vector.measured.max


def test_labels_give_accuracy():
    data = np.load(SAMPLES / "digits_inputs.npz")
    options = InjectOptions(
        vectors=(FailureVector((0, 0)),), inputs=data["x"][:50], labels=data["labels"][:50], trials=3, isolate=False
    )
    result = inject_model(SAMPLES / "digits_mlp.onnx", options)
    assert result.inputs.clean_accuracy == 1.0  # training samples, see sample_models/README.md
    vector = result.vectors[0]
    assert vector.accuracy == 1.0 and vector.flip_rate == 0.0 and vector.measured.max == 0.0
    assert vector.ratio is None and not vector.violation


# --------------------------------------------------------------------------- batching


def _fixed_batch_model(mixing: bool) -> onnx.ModelProto:
    """x [1, 4] → Gemm → Relu → (Reshape [2,4] → Transpose →) Reshape [1, 8] → Gemm: batch fixed to 1."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1, name="fc1"), helper.make_node("Relu", ["h"], ["r"])]
    flat = "r"
    if mixing:  # moves elements across the batch axis once the batch is larger than 1
        nodes += [
            helper.make_node("Reshape", ["r", "s24"], ["r24"], name="rs1"),
            helper.make_node("Transpose", ["r24"], ["t"], perm=[1, 0], name="tr"),
        ]
        flat = "t"
    nodes += [
        helper.make_node("Reshape", [flat, "s18"], ["r18"], name="rs2"),
        helper.make_node("Gemm", ["r18", "W2"], ["y"], transB=1, name="fc2"),
    ]
    inits = [
        numpy_helper.from_array(rng.uniform(-1, 1, (8, 4)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.uniform(-1, 1, (3, 8)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array([2, 4], np.int64), "s24"),
        numpy_helper.from_array(np.array([1, 8], np.int64), "s18"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    return make_model(graph)


@pytest.mark.parametrize("mixing", [False, True])
def test_fixed_batch_models_are_batched_or_looped(tmp_path, mixing):
    model = _fixed_batch_model(mixing)
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    options = InjectOptions(vectors=(FailureVector((3,)),), trials=12, samples=5, isolate=False)
    result = inject_model(path, options)
    assert result.batched is (not mixing)
    if mixing:  # a fixed batch of 1 made symbolic is no news; looping row by row is
        looped = [n for n in result.notes if "one row per onnxruntime run" in n]
        assert looped and "dynamic_shapes" in looped[0], result.notes  # what to export differently
    else:
        assert not any("batch" in n for n in result.notes), result.notes
    # every reported worst set, replayed through the untouched batch-1 model, gives its error
    import onnxruntime as ort

    independent = ort.InferenceSession(
        independent_instrument(model, ["r"]).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).uniform(0, 1, (5, 4)).astype(np.float32)
    for worst in result.vectors[0].worst:
        row = x[worst.input_index : worst.input_index + 1]
        keep, repl = np.ones((1, 8), np.float32), np.zeros((1, 8), np.float32)
        clean = independent.run(None, {"x": row, "keep0": keep, "repl0": repl})[0]
        keep[0, list(worst.faults[0].neurons)] = 0
        faulty = independent.run(None, {"x": row, "keep0": keep, "repl0": repl})[0]
        assert np.abs(faulty - clean).max() == pytest.approx(worst.error, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- options and containment


def test_option_errors(tmp_path):
    path = SAMPLES / "lenet.onnx"
    _, network = load_network(path, NetworkOptions())
    with pytest.raises(OptionError, match="--search"):
        InjectOptions(search="best").check()
    with pytest.raises(OptionError, match="--trials"):
        InjectOptions(trials=0).check()
    with pytest.raises(OptionError, match="only 4 hidden|4 hidden layers"):
        failure_vector(network, (1, 2, 3), None)
    with pytest.raises(OptionError, match="has 84"):
        inject_model(path, InjectOptions(vectors=(FailureVector((0, 0, 0, 85)),), isolate=False))
    with pytest.raises(OptionError, match="dense layers"):
        inject_model(path, InjectOptions(vectors=(FailureVector((0, 0, 0, 0), (1, 0, 0, 0)),), isolate=False))
    vector = failure_vector(network, (2,), (1,), layers=["classifier.1", "features.0"])
    assert vector.neurons == (2, 0, 2, 0) and vector.synapses == (0, 0, 1, 0)


def _small_spec():
    loaded, network = load_network(SAMPLES / "paper_mlp_sigmoid.onnx", NetworkOptions())
    spec = instrument(network, (neuron_site(network.hidden_layers[0], 0),), loaded.opset)
    return spec, np.zeros((2, 16), np.float32)


def test_child_crash_becomes_one_clear_error():
    spec, x = _small_spec()
    evaluator = open_evaluator(spec, x, Limits(timeout_s=60))
    try:
        errors = evaluator.evaluate(FaultBatch(1, {0: (np.array([[3]]), np.array([[0.0]]))})).errors
        assert errors.shape == (1, 2)
        with pytest.raises(InjectionRuntimeError, match="crashed.*SIGABRT"):
            evaluator.abort_for_test()
    finally:
        evaluator.close()


def test_memory_limit_and_timeout_are_enforced():
    spec, x = _small_spec()
    with pytest.raises(InjectionRuntimeError, match="onnxruntime (failed|crashed)"):
        open_evaluator(spec, x, Limits(memory_bytes=64 * 2**20, timeout_s=60)).close()
    with pytest.raises(InjectionRuntimeError, match="did not finish"):
        open_evaluator(spec, x, Limits(timeout_s=0.001)).close()


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
def test_child_never_raises_an_inherited_memory_limit():
    """A parent limited to 3 GiB gets a child limited to 3 GiB even when 16 GiB is asked for."""
    script = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.path.insert(0, "tests")
from test_inject import _small_spec
from robaudit.injection.sandbox import Limits, open_evaluator
spec, x = _small_spec()
evaluator = open_evaluator(spec, x, Limits(memory_bytes=16 * 2**30))
line = next(l for l in open(f"/proc/{evaluator._process.pid}/limits") if l.startswith("Max address space"))
evaluator.close()
print(line.split()[3])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == 3 * 2**30, proc.stdout


@pytest.mark.parametrize("isolate", [True, False], ids=["child", "here"])
def test_evaluate_at_other_inputs_is_a_fresh_evaluator_there(isolate):
    """The joint search confirms its moved input with the campaign's own session (evaluate_at): the
    errors are those of an evaluator opened on that input, and the campaign's inputs stay as they were."""
    spec, _ = _small_spec()
    rng = np.random.default_rng(3)
    campaign_x = rng.uniform(0, 1, (3, 16)).astype(np.float32)
    moved = rng.uniform(0, 1, (1, 16)).astype(np.float32)
    batch = FaultBatch(2, {0: (np.array([[3], [7]]), np.array([[0.0], [5.0]]))})
    evaluator = open_evaluator(spec, campaign_x, Limits(timeout_s=60), isolate)
    fresh = open_evaluator(spec, moved, Limits(timeout_s=60), isolate)
    try:
        before = evaluator.evaluate(batch).errors
        at = evaluator.evaluate_at(moved, batch).errors
        np.testing.assert_array_equal(at, fresh.evaluate(batch).errors)
        assert at.shape == (2, 1) and at[1, 0] > 0
        np.testing.assert_array_equal(evaluator.evaluate(batch).errors, before)
    finally:
        evaluator.close()
        fresh.close()


def test_error_statistics_with_infinite_errors_are_numbers():
    """A flipped float exponent bit gives inf errors: the interpolated 95th percentile was nan (inf − inf) with a
    numpy warning on stderr (a new-user trial). It is then the order statistic at or above 95 %."""
    import warnings

    from robaudit.injection.search import error_stats

    few = np.array([[*range(19), np.inf]], dtype=np.float64)  # sorted: 0..18, inf; 95 % of 19 = 18.05 → the 20th
    many = np.array([[*range(99), np.inf]], dtype=np.float64)  # 95 % of 99 = 94.05 → the 96th value, 95
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert error_stats(few).p95 == np.inf and error_stats(few).max == np.inf
        assert error_stats(many).p95 == 95.0
    assert error_stats(np.array([[0.0, 1.0, 2.0, 3.0]])).p95 == pytest.approx(2.85)  # finite: interpolated as before


def test_inject_sets_the_vectors_refined_bound_beside_its_measurement():
    """inject's bound for a vector is the one ``bound --crash`` reports for it, refined for that vector (docs/method.md
    §4.1 "The output cut"), not the looser bound the count searches use (a new-user trial saw 0.01203 beside
    bound's 0.01125 for the same vector)."""
    from conftest import cli_json

    from robaudit.bounds.bound import make_bound
    from robaudit.bounds.fep import Analysis

    model = SAMPLES / "paper_mlp_sigmoid.onnx"
    injected = cli_json("inject", model, "-e", "0.5", "--crash", "1", "--trials", "10", "-q")
    bound = cli_json("bound", model, "-e", "0.5", "--crash", "1")
    assert injected["vectors"][0]["bound"] == bound["fep"]
    _, network = load_network(model, NetworkOptions())
    unrefined = make_bound(Analysis(network, FailureModel.crash()), "tight").fep([1, 1])
    assert bound["fep"] < unrefined  # the case can fail: the refinement matters on this vector
