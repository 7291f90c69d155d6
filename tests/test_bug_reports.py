"""The bug-report corpus (``tests/corpus/make_bug_reports.py``): each model is bounded or
refused in one line, as its case expects.

For a bounded model:

* the clean intervals are checked against onnxruntime: with the input domain a single
  point c, the audited output's interval is onnxruntime's output at x = c; on random inputs
  of [0, 1], onnxruntime's outputs lie inside the clean interval;
* faults are injected with the independent injector of ``tests/ort_faults.py`` (crash and
  byzantine, on the neurons the tight sensitivities rank first and on random ones): the
  largest measured error stays below ``fep_tight`` ≤ ``fep_paper``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ort_faults import FaultRunner

from robaudit.bounds.audit import BoundOptions, bound_network, inspect_model, load_network, model_info
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import TightBound
from robaudit.cli import main
from robaudit.graph.network import NetworkOptions

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
from make_bug_reports import CASES, write_corpus  # noqa: E402

#: float32 inference vs float64 bounds.
RTOL = 1e-4
BOUNDED = [c.name for c in CASES if c.expect == "bounded"]
REFUSED = [c.name for c in CASES if c.expect != "bounded"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("bug_reports"))


def run_main(*args: str) -> tuple[int, str, str]:
    """``robaudit ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", REFUSED)
def test_refused_in_one_line(name, corpus):
    expect = next(c.expect for c in CASES if c.name == name)
    for command in (["inspect"], ["bound", "--crash", "1"]):
        code, out, err = run_main(*command, corpus[name])
        assert code == 2 and out == "", (out, err)
        assert err.count("\n") == 1 and err.startswith("robaudit: unsupported op"), err
        assert expect in err, err


@pytest.mark.parametrize("name", BOUNDED)
def test_bounded_by_both_commands(name, corpus):
    for command in (["inspect"], ["bound", "--crash", "1"]):
        code, out, err = run_main(*command, corpus[name])
        assert code == 0, err
        assert "internal error" not in err and "Traceback" not in err


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", BOUNDED)
def test_clean_intervals_agree_with_onnxruntime(name, corpus):
    path = corpus[name]
    _, point = load_network(path, NetworkOptions(input_range=(0.4, 0.4)))
    session = _session(path)
    feed = {session.get_inputs()[0].name: np.full(point.input_shape, 0.4, np.float32)}
    (expected,) = [
        o
        for o, info in zip(session.run(None, feed), session.get_outputs(), strict=True)
        if info.name == point.output_name
    ]
    box = point.clean[point.output_name]
    np.testing.assert_allclose(box.lo, expected, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(box.hi, expected, rtol=RTOL, atol=1e-5)
    _, network = load_network(path, NetworkOptions())
    box = network.clean[network.output_name]
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.uniform(0, 1, network.input_shape).astype(np.float32)
        (y,) = [
            o
            for o, info in zip(session.run(None, {session.get_inputs()[0].name: x}), session.get_outputs(), strict=True)
            if info.name == network.output_name
        ]
        assert np.all(y >= box.lo - 1e-5) and np.all(y <= box.hi + 1e-5)


def _worst_measured(model: onnx.ModelProto, network, failure: FailureModel, rng) -> float:
    """Largest error over chosen failure sets (one failed neuron per hidden layer) and inputs."""
    hidden = network.hidden_layers
    shapes = [la.out_shape[1:] for la in hidden]
    runner = FaultRunner(model, [la.output_value for la in hidden], shapes)
    tight = TightBound(Analysis(network, failure))
    shape = network.input_shape[1:]
    inputs = np.concatenate([rng.uniform(0, 1, (8,) + shape), np.ones((1,) + shape), np.zeros((1,) + shape)])
    batch = inputs.shape[0]
    sets = [[int(np.argmax(w[k])) for w in tight.weighted] for k in range(tight.weighted[0].shape[0])]
    sets += [[int(rng.integers(la.neurons)) for la in hidden] for _ in range(6)]
    a, b = failure.failure_range
    clean = runner.clean(inputs, network.output_name)
    worst = 0.0
    for chosen in sets:
        for value in {a, b}:
            keeps, repls = [], []
            for layer_shape, index in zip(shapes, chosen, strict=True):
                keep = np.ones((batch, int(np.prod(layer_shape))))
                repl = np.zeros_like(keep)
                keep[:, index], repl[:, index] = 0.0, value
                keeps.append(keep.reshape((batch,) + layer_shape))
                repls.append(repl.reshape((batch,) + layer_shape))
            faulty = runner.run(inputs, keeps, repls, network.output_name)
            worst = max(worst, float(np.abs(faulty - clean).max()))
    return worst


@pytest.mark.parametrize("mode", ["crash", "byzantine"])
@pytest.mark.parametrize("name", BOUNDED)
def test_injection_stays_below_the_bounds(name, mode, corpus):
    path = corpus[name]
    loaded, network = load_network(path, NetworkOptions())
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(capacity=0.4)
    options = BoundOptions(epsilon=0.1, failure=failure, failures=(1,))
    result = bound_network(network, options, model_info(loaded))
    measured = _worst_measured(onnx.load(path), network, failure, np.random.default_rng(1))
    assert measured > 0
    assert measured <= result.fep_tight * (1 + RTOL) + 1e-6, (measured, result.fep_tight)
    assert result.fep_tight <= result.fep_paper * (1 + 1e-9)


def test_tanh_gelu_with_pow_is_one_activation(corpus):
    layers = inspect_model(corpus["gelu_tanh_pow"]).layers
    assert [la.activation for la in layers][0] == "GeluTanh"


def test_dropout_mask_and_shape_subgraph_are_not_steps(corpus):
    for name in ("dropout_with_mask", "dynamic_flatten"):
        _, network = load_network(corpus[name], NetworkOptions())
        ops = {s.op_type for s in network.steps if not hasattr(s, "neurons")}
        assert not ops & {"Shape", "Gather", "Unsqueeze", "Concat"}, ops


def test_a_divisor_reaching_zero_under_failures_is_refused(corpus):
    """h + 1 with h a ReLU layer: byzantine values down to −1 make the divisor reach 0."""
    code, out, err = run_main("bound", corpus["reciprocal_div"], "--byzantine", "1", "--capacity", "1")
    assert code == 2 and err.count("\n") == 1, err
    assert "range under failures contains 0" in err or "range contains 0" in err, err


def test_summed_affine_ops_and_their_activation_are_one_layer(corpus):
    """relu(A·h + B·h): one hidden layer of 5 neurons (relu's outputs), weight A + B."""
    result = inspect_model(corpus["summed_gemms"])
    hidden = [la for la in result.layers if la.name != result.layers[-1].name]
    assert [(la.neurons, la.activation) for la in hidden] == [(6, "Relu"), (5, "Relu")], hidden
    model = onnx.load(corpus["summed_gemms"])
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"][1:3]
    expected = np.abs(weights[gemms[0].input[1]].astype(np.float64) + weights[gemms[1].input[1]]).max()
    assert hidden[1].max_weight == pytest.approx(expected)
