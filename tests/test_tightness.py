"""docs/method.md §3.1 tightness and soundness, measured with onnxruntime.

* Tightness: a chain whose weights are all w > 0, with ReLU activations, zero biases and
  the input at the top of its domain; crashing any f_l neurons of each hidden layer
  (the test rewrites the graph to multiply each layer's output by a 0/1 mask) moves
  the output by exactly ``fep`` of the paper method — and ``fep_tight``, which is
  sound and never above it, must then equal it too.
* Soundness: on random chains with random failure sets, inputs and byzantine values,
  the measured error never exceeds ``fep_tight`` (nor ``fep_paper``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import SAMPLES, cli_json, dense_chain, ort_session, with_fault_inputs

from robaudit.bounds.audit import BoundOptions, compute_bound, load_network
from robaudit.bounds.fep import FailureModel
from robaudit.graph.network import NetworkOptions


def library_fep(path, failures, mode="crash", failure_range=None, input_range=(0.0, 1.0)) -> tuple[float, float]:
    """(fep_paper, fep_tight) of ``robaudit.bounds.audit.compute_bound`` for a failure vector."""
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=failure_range)
    options = BoundOptions(
        epsilon=1.0,
        failure=failure,
        method="paper",
        network=NetworkOptions(input_range=input_range),
        failures=tuple(failures),
    )
    result = compute_bound(path, options)
    return result.fep_paper, result.fep_tight


def fault_feeds(rows: list[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]) -> dict[str, np.ndarray]:
    """Stack (x, keeps, injects) rows into one onnxruntime feed."""
    feed = {"x": np.stack([r[0] for r in rows]).astype(np.float32)}
    for layer in range(len(rows[0][1])):
        feed[f"keep_{layer}"] = np.stack([r[1][layer] for r in rows]).astype(np.float32)
        feed[f"inject_{layer}"] = np.stack([r[2][layer] for r in rows]).astype(np.float32)
    return feed


def measured_errors(chain, rows) -> np.ndarray:
    """Per row: max_k |F̃_k(x) − F_k(x)| with the row's failures, by onnxruntime."""
    sizes = chain.sizes[1:-1]
    session = ort_session(with_fault_inputs(chain.model, chain.hidden_outputs, sizes))
    faulty = session.run(["y"], fault_feeds(rows))[0]
    healthy_rows = [(x, [np.ones(n) for n in sizes], [np.zeros(n) for n in sizes]) for x, _, _ in rows]
    healthy = session.run(["y"], fault_feeds(healthy_rows))[0]
    return np.abs(faulty.astype(np.float64) - healthy.astype(np.float64)).max(axis=1)


def crash_masks(sizes: list[int], failures: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """A 0/1 keep-mask per layer with ``failures[l]`` zeros at random positions."""
    masks = []
    for n, f in zip(sizes, failures, strict=True):
        keep = np.ones(n)
        keep[rng.choice(n, size=f, replace=False)] = 0.0
        masks.append(keep)
    return masks


TIGHT_NETS = [
    ([3, 4, 3, 2], 0.5),
    ([2, 5, 4, 3, 2], 0.3),
    ([4, 6, 1], 0.25),
    ([3, 3, 3, 3, 3], 0.7),
]


@pytest.mark.parametrize(("sizes", "weight"), TIGHT_NETS, ids=[f"{'-'.join(map(str, s))}_w{w}" for s, w in TIGHT_NETS])
def test_equal_weights_relu_chain_is_tight(sizes, weight, tmp_path):
    chain = dense_chain(sizes, ["relu"] * (len(sizes) - 2), const_weight=weight)
    path = chain.save(tmp_path)
    hidden = sizes[1:-1]
    rng = np.random.default_rng(len(sizes))
    vectors = [list(v) for v in itertools.product(*(range(n + 1) for n in hidden))]
    vectors = [vectors[i] for i in sorted(rng.choice(len(vectors), size=min(8, len(vectors)), replace=False))]
    vectors.append(list(hidden))  # every hidden neuron crashed
    top = np.ones(sizes[0])  # the input at the top of the domain [0, 1]
    rows, expected = [], []
    for failures in vectors:
        paper, tight = library_fep(path, failures)
        for _ in range(3):  # which neurons fail does not matter: all weights are equal
            masks = crash_masks(hidden, failures, rng)
            rows.append((top, masks, [np.zeros(n) for n in hidden]))
            expected.append((failures, paper, tight))
    errors = measured_errors(chain, rows)
    for error, (failures, paper, tight) in zip(errors, expected, strict=True):
        assert error == pytest.approx(paper, rel=1e-5, abs=1e-7), f"f = {failures}: measured {error}, fep {paper}"
        assert tight == pytest.approx(paper, rel=1e-9, abs=1e-12), f"f = {failures}: fep_tight {tight} ≠ {paper}"


def test_tightness_through_the_cli(tmp_path):
    """The same equality with ``fep`` read from ``robaudit bound --method paper --format json``."""
    sizes = [3, 4, 3, 2]
    chain = dense_chain(sizes, ["relu", "relu"], const_weight=0.5)
    path = chain.save(tmp_path)
    rng = np.random.default_rng(0)
    for failures in ([1, 0], [0, 2], [2, 1], [4, 3]):
        report = cli_json("bound", path, "--epsilon", "1", "--method", "paper", "--crash", ",".join(map(str, failures)))
        masks = crash_masks(sizes[1:-1], failures, rng)
        error = measured_errors(chain, [(np.ones(3), masks, [np.zeros(4), np.zeros(3)])])[0]
        # closed form: δ1 = 3w, δ2 = 4w·3w; E1 = f1·δ1; E2 = f2·δ2 + (3 − f2)·w·E1; Fep = w·E2
        w = 0.5
        closed = w * (failures[1] * 12 * w * w + (3 - failures[1]) * w * failures[0] * 3 * w)
        assert report["fep"] == pytest.approx(closed, rel=1e-6)
        assert error == pytest.approx(report["fep"], rel=1e-5, abs=1e-7), (failures, error, report)


SOUND_NETS = [
    ("relu", [4, 5, 4, 3], ["relu", "relu"], "crash"),
    ("sigmoid_tanh", [5, 4, 4, 2], ["sigmoid", "tanh"], "crash"),
    ("leaky_elu", [3, 4, 3, 3, 2], ["leakyrelu_steep", "elu", "relu"], "crash"),
    ("hardsigmoid_softmax", [4, 4, 3, 3], ["hardsigmoid", "relu"], "crash"),
    ("byzantine_relu", [4, 4, 3, 2], ["relu", "relu"], "byzantine"),
    ("byzantine_tanh_elu", [3, 5, 3, 2], ["tanh", "elu_small"], "byzantine"),
]


@pytest.mark.parametrize(("name", "sizes", "acts", "mode"), SOUND_NETS, ids=[n[0] for n in SOUND_NETS])
def test_fep_tight_bounds_measured_error(name, sizes, acts, mode, tmp_path):
    seed = sum(map(ord, name))
    chain = dense_chain(sizes, acts, softmax="softmax" in name, seed=seed, weight_scale=1.0, layouts="matmul_add")
    path = chain.save(tmp_path)
    rng = np.random.default_rng(seed)
    hidden = sizes[1:-1]
    a, b = (0.0, 0.0) if mode == "crash" else (-1.5, 2.5)
    input_range = (-1.0, 1.0)
    failure_vectors = [[int(rng.integers(0, n + 1)) for n in hidden] for _ in range(5)] + [[1] * len(hidden)]
    worst_ratio = 0.0
    for failures in failure_vectors:
        paper, tight = library_fep(path, failures, mode, (a, b), input_range)
        rows = []
        for _ in range(400):
            x = rng.choice([input_range[0], input_range[1]], size=sizes[0]) if rng.random() < 0.5 else None
            if x is None:
                x = rng.uniform(*input_range, size=sizes[0])
            masks = crash_masks(hidden, failures, rng)
            injects = [(1 - m) * rng.choice([a, b, rng.uniform(a, b)], size=len(m)) for m in masks]
            rows.append((x, masks, injects))
        measured = float(measured_errors(chain, rows).max())
        assert measured <= tight * (1 + 1e-5) + 1e-6, f"f = {failures}: measured {measured} > fep_tight {tight}"
        assert tight <= paper * (1 + 1e-12), f"f = {failures}: fep_tight {tight} > fep_paper {paper}"
        worst_ratio = max(worst_ratio, measured / tight if tight else 0.0)
    assert worst_ratio > 0.0  # the failures did move the output: the comparison is not vacuous


def test_fep_tight_bounds_measured_error_on_lenet():
    """The sample CNN: crash random (channel, row, column) neurons of every hidden layer."""
    path = SAMPLES / "lenet.onnx"
    import onnx

    _, network = load_network(path, NetworkOptions())
    hidden = network.hidden_layers
    shapes = [la.out_shape[1:] for la in hidden]
    model = onnx.load(str(path))
    session = ort_session(with_fault_inputs(model, [la.output_value for la in hidden], shapes))
    inputs = np.load(SAMPLES / "lenet_inputs.npz")["x"][:16]
    rng = np.random.default_rng(0)
    for failures in ([1, 1, 1, 1], [20, 5, 3, 2], [0, 0, 10, 0]):
        bound = compute_bound(path, BoundOptions(epsilon=1.0, failures=tuple(failures)))
        neurons = [la.neurons for la in hidden]
        keeps = [
            [m.reshape(s) for m, s in zip(crash_masks(neurons, failures, rng), shapes, strict=True)] for _ in inputs
        ]
        feed = {network.input_name: inputs}
        healthy = dict(feed)
        for layer, shape in enumerate(shapes):
            feed[f"keep_{layer}"] = np.stack([k[layer] for k in keeps]).astype(np.float32)
            feed[f"inject_{layer}"] = np.zeros((len(inputs), *shape), np.float32)
            healthy[f"keep_{layer}"] = np.ones((len(inputs), *shape), np.float32)
            healthy[f"inject_{layer}"] = feed[f"inject_{layer}"]
        name = network.output_name
        error = np.abs(session.run([name], feed)[0] - session.run([name], healthy)[0]).max()
        assert 0 < error <= bound.fep_tight * (1 + 1e-5), (failures, error, bound.fep_tight)
        assert bound.fep_tight <= bound.fep_paper
