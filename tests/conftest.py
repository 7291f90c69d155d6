"""Shared test helpers: the real ``robaudit`` command (as a subprocess, or in this process
through the console script's own entry point), tiny ONNX graph builders, and session-scoped
exports of real models (PyTorch, scikit-learn).

Test modules import the plain helpers with ``from conftest import ...`` (pytest puts
``tests/`` on ``sys.path``); the exports are fixtures so that each model is exported
once per test session.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The command line's choice (robaudit/cli/__init__.py), for the in-process tests too: one BLAS
# thread per pytest worker (`make test` runs one worker per core). Before numpy is imported.
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
OPSET = 17


# --------------------------------------------------------------------------- the CLI


def run_cli(
    *args: object, expect: int | None = 0, cwd: Path | None = None, columns: int = 200,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m robaudit ARGS`` in a terminal ``columns`` wide (with the extra environment
    variables ``env``); assert the exit code, showing stdout and stderr if it differs."""
    cmd = [sys.executable, "-m", "robaudit", *map(str, args)]
    full_env = {k: v for k, v in os.environ.items() if k != "ROBAUDIT_DEBUG"}
    full_env["COLUMNS"] = str(columns)
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=full_env, timeout=300)
    _check_exit(proc, args, expect)
    return proc


#: Options whose work leaves this process (worker pools, a Ray cluster): such commands run as subprocesses.
_OUT_OF_PROCESS = ("--workers", "--backend")


def run_in_process(
    *args: object, expect: int | None = 0, cwd: Path | None = None, columns: int = 200,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """The same as :func:`run_cli`, run by ``robaudit.cli.main`` (what the console script calls) in this
    process, with stdout and stderr captured: the exit code, the report and the error line are the
    command's own, without a Python start-up and robaudit's imports per call (most of a small
    command's cost). What only a real process shows (the console script itself, signals, the BLAS
    setting made before numpy loads, output written below Python) is tested with :func:`run_cli`.
    Commands whose work leaves the process (worker pools, Ray) and every command when
    ``ROBAUDIT_TEST_SUBPROCESS=1`` run as a subprocess instead."""
    if os.environ.get("ROBAUDIT_TEST_SUBPROCESS") == "1" or any(str(a) in _OUT_OF_PROCESS for a in args):
        return run_cli(*args, expect=expect, cwd=cwd, columns=columns, env=env)
    from robaudit.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    extra = {"COLUMNS": str(columns), **(env or {})}
    saved = {name: os.environ.get(name) for name in ("ROBAUDIT_DEBUG", *extra)}
    directory = os.getcwd()
    os.environ.pop("ROBAUDIT_DEBUG", None)
    os.environ.update(extra)
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(directory)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    proc = subprocess.CompletedProcess(["robaudit", *argv], code, out.getvalue(), err.getvalue())
    _check_exit(proc, args, expect)
    return proc


def _check_exit(proc: subprocess.CompletedProcess, args: tuple, expect: int | None) -> None:
    if expect is not None:
        assert proc.returncode == expect, (
            f"robaudit {' '.join(map(str, args))}\nexit {proc.returncode}, expected {expect}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )


def cli_json(*args: object) -> dict:
    """Run a command with ``--format json`` (exit 0) and parse its report (see :func:`run_in_process`)."""
    proc = run_in_process(*args, "--format", "json")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:  # pragma: no cover - shown only on failure
        raise AssertionError(f"stdout is not JSON ({exc}):\n{proc.stdout}\n--- stderr ---\n{proc.stderr}") from None


@functools.cache
def onnxruntime_int8_exact() -> bool:
    """Whether onnxruntime's u8×s8 integer kernels compute exactly on this CPU. Without AVX-512 VNNI (an AVX2
    machine) they add a pair of products in 16 bits and saturate: MatMulInteger of [255, 255] by [127, 127] gives
    32767, not 64770 — the integer model is then not the exact one the QDQ form is compared with."""
    import onnxruntime

    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])
    weights = numpy_helper.from_array(np.full((2, 1), 127, np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe", [a], [y], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"a": np.full((1, 2), 255, np.uint8)})[0][0, 0]) == 2 * 255 * 127


def require_exact_int8() -> None:
    """Skip a test comparing with onnxruntime's integer kernels where they saturate (:func:`onnxruntime_int8_exact`)."""
    if not onnxruntime_int8_exact():
        pytest.skip("onnxruntime's u8×s8 kernels saturate on this CPU (no AVX-512 VNNI): its integer model is not "
                    "the exact one to compare with")


def describe(proc: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished command, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


# --------------------------------------------------------------------------- tiny ONNX graphs

#: Activation choices for the builders: (ONNX op type, attributes).
ACTIVATIONS: dict[str, tuple[str, dict]] = {
    "relu": ("Relu", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "leakyrelu": ("LeakyRelu", {"alpha": 0.1}),
    "leakyrelu_steep": ("LeakyRelu", {"alpha": 1.5}),
    "hardsigmoid": ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
    "elu": ("Elu", {"alpha": 1.7}),
    "elu_small": ("Elu", {"alpha": 0.5}),
}


@dataclass
class Chain:
    """A dense chain built by :func:`dense_chain`, with what a test needs to know about it."""

    model: onnx.ModelProto
    #: Layer sizes: input, hidden layers..., output.
    sizes: list[int]
    #: Value names of the hidden layers' outputs (after the activation), in order.
    hidden_outputs: list[str]
    input_name: str = "x"
    output_name: str = "y"
    weights: list[np.ndarray] = field(default_factory=list)

    def save(self, directory: Path, name: str = "model.onnx") -> Path:
        """Write the model to ``directory/name`` and return the path."""
        path = Path(directory) / name
        onnx.save(self.model, str(path))
        return path


def _float_tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _affine_nodes(index: int, x: str, w_out_in: np.ndarray, bias: np.ndarray, layout: str, alpha: float, beta: float):
    """Nodes + initializers computing ``x @ W.T + b`` for W [out, in] in the given ONNX layout."""
    name = f"fc{index}"
    out = f"{name}_pre"
    if layout == "gemm_t1":  # PyTorch layout: B [out, in], transB=1
        inits = [_float_tensor(f"{name}.W", w_out_in / alpha), _float_tensor(f"{name}.b", bias / beta)]
        node = helper.make_node(
            "Gemm", [x, f"{name}.W", f"{name}.b"], [out], name=name, transB=1, alpha=alpha, beta=beta
        )
        return [node], inits, out
    if layout == "gemm_t0":  # B [in, out], transB=0, bias as [1, out]
        inits = [
            _float_tensor(f"{name}.W", w_out_in.T / alpha),
            _float_tensor(f"{name}.b", (bias / beta).reshape(1, -1)),
        ]
        node = helper.make_node("Gemm", [x, f"{name}.W", f"{name}.b"], [out], name=name, alpha=alpha, beta=beta)
        return [node], inits, out
    if layout == "matmul_add":  # scikit-learn layout: MatMul by [in, out], then Add of the bias
        inits = [_float_tensor(f"{name}.W", w_out_in.T), _float_tensor(f"{name}.b", bias)]
        nodes = [
            helper.make_node("MatMul", [x, f"{name}.W"], [f"{name}_mm"], name=name),
            helper.make_node("Add", [f"{name}_mm", f"{name}.b"], [out], name=f"{name}_add"),
        ]
        return nodes, inits, out
    raise ValueError(f"unknown layout {layout}")


def dense_chain(
    sizes: list[int],
    activations: list[str],
    *,
    layouts: str | list[str] = "gemm_t1",
    alpha: float = 1.0,
    beta: float = 1.0,
    output_activation: str | None = None,
    softmax: bool = False,
    seed: int = 0,
    weight_scale: float = 0.5,
    bias_scale: float = 0.1,
    const_weight: float | None = None,
) -> Chain:
    """A dense chain ``sizes[0] → ... → sizes[-1]`` with one activation per hidden layer.

    Weights are U[−weight_scale, weight_scale] (or all ``const_weight`` with zero
    biases); ``layouts`` picks the ONNX encoding per layer (``gemm_t1``, ``gemm_t0``
    with ``alpha``/``beta``, ``matmul_add``). The stored float32 values are what
    the reference reads back, so alpha/beta scaling does not change the function.
    """
    assert len(activations) == len(sizes) - 2
    rng = np.random.default_rng(seed)
    layers = len(sizes) - 1
    layouts = [layouts] * layers if isinstance(layouts, str) else list(layouts)
    nodes, inits, weights, hidden_outputs = [], [], [], []
    current = "x"
    for i in range(layers):
        n_in, n_out = sizes[i], sizes[i + 1]
        if const_weight is not None:
            w, b = np.full((n_out, n_in), const_weight), np.zeros(n_out)
        else:
            w = rng.uniform(-weight_scale, weight_scale, (n_out, n_in))
            b = rng.uniform(-bias_scale, bias_scale, n_out)
        new_nodes, new_inits, current = _affine_nodes(i + 1, current, w, b, layouts[i], alpha, beta)
        nodes += new_nodes
        inits += new_inits
        weights.append(w)
        act = activations[i] if i < layers - 1 else output_activation
        if act is not None:
            op, attrs = ACTIVATIONS[act]
            out = f"h{i + 1}" if i < layers - 1 else "y_act"
            nodes.append(helper.make_node(op, [current], [out], name=f"act{i + 1}", **attrs))
            current = out
        if i < layers - 1:
            hidden_outputs.append(current)
    if softmax:
        nodes.append(helper.make_node("Softmax", [current], ["y"], name="softmax", axis=-1))
    else:
        nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "dense_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = make_model(graph)
    return Chain(model, list(sizes), hidden_outputs, weights=weights)


def make_model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    """A checked model of ``graph`` at the given opset (IR version 8, loadable by onnxruntime)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="robaudit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_fault_inputs(model: onnx.ModelProto, values: list[str], shapes: list) -> onnx.ModelProto:
    """Rewrite ``model`` so that each ``values[l]`` becomes ``values[l] * keep_l + inject_l``.

    ``keep_l`` and ``inject_l`` are new graph inputs of shape [N, *shapes[l]] (an int
    means [N, shapes[l]]): a failed neuron has keep 0 and inject its failure value, a
    healthy one keep 1, inject 0. Batching over N evaluates many inputs × failure sets
    in one onnxruntime run.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    renamed = {value: f"{value}__clean" for value in values}
    for node in graph.node:
        for k, out in enumerate(node.output):
            if out in renamed:
                node.output[k] = renamed[out]
    extra = []
    for index, (value, shape) in enumerate(zip(values, shapes, strict=True)):
        dims = ["N", shape] if isinstance(shape, int) else ["N", *shape]
        keep, inject = f"keep_{index}", f"inject_{index}"
        extra += [
            helper.make_node("Mul", [renamed[value], keep], [f"{value}__kept"], name=f"fault_mul_{index}"),
            helper.make_node("Add", [f"{value}__kept", inject], [value], name=f"fault_add_{index}"),
        ]
        for name in (keep, inject):
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    # keep a topological order: insert each pair right after its producer
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        graph.node.append(node)
        for out in node.output:
            if out.endswith("__clean"):
                index = values.index(out[: -len("__clean")])
                graph.node.extend(extra[2 * index : 2 * index + 2])
    onnx.checker.check_model(model)
    return model


def failure_rows(sizes, counts, failure_range, inputs, rng, draws: int = 1) -> list:
    """Every failure set with ``counts[l]`` of ``sizes[l]`` neurons per layer at each input, each failed value at an
    end of ``failure_range`` or random (``draws`` rows per set and input): (x, keeps, injects) for
    :func:`fault_errors`."""
    a, b = failure_range
    sets = [list(itertools.combinations(range(n), f)) for n, f in zip(sizes, counts, strict=True)]
    rows = []
    for choice in itertools.product(*sets):
        for x in inputs:
            for _ in range(draws):
                keeps, injects = [], []
                for n, chosen in zip(sizes, choice, strict=True):
                    keep, inject = np.ones(n), np.zeros(n)
                    keep[list(chosen)] = 0.0
                    inject[list(chosen)] = rng.choice([a, b, rng.uniform(a, b)], len(chosen))
                    keeps.append(keep)
                    injects.append(inject)
                rows.append((x, keeps, injects))
    return rows


def fault_errors(model: onnx.ModelProto, values: list[str], sizes: list[int], rows: list) -> np.ndarray:
    """max_k |F̃_k − F_k| per row (x, keeps, injects) of :func:`failure_rows`, by onnxruntime, the failed neurons
    being ``values[l]``'s (:func:`with_fault_inputs`)."""
    session = ort_session(with_fault_inputs(model, values, sizes))

    def feed(rs):
        out = {"x": np.stack([r[0] for r in rs]).astype(np.float32)}
        for layer in range(len(sizes)):
            out[f"keep_{layer}"] = np.stack([r[1][layer] for r in rs]).astype(np.float32)
            out[f"inject_{layer}"] = np.stack([r[2][layer] for r in rs]).astype(np.float32)
        return out

    healthy = [(x, [np.ones(n) for n in sizes], [np.zeros(n) for n in sizes]) for x, _, _ in rows]
    faulty = session.run(["y"], feed(rows))[0].astype(np.float64)
    clean = session.run(["y"], feed(healthy))[0].astype(np.float64)
    return np.abs(faulty - clean).max(axis=1)


def ort_session(model: onnx.ModelProto):
    """A single-threaded CPU onnxruntime session for ``model``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- real exports (session-scoped)


class _TorchMLP:
    @staticmethod
    def build():
        import torch

        return torch.nn.Sequential(
            torch.nn.Linear(20, 16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 12),
            torch.nn.Sigmoid(),
            torch.nn.Linear(12, 5),
        )


class _TorchLeNet:
    @staticmethod
    def build():
        import torch

        nn = torch.nn
        return nn.Sequential(
            nn.Conv2d(1, 4, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )


#: name → (builder, example input shape, expected hidden layers: (kind, neurons) in order).
TORCH_MODELS = {
    "mlp": (_TorchMLP, (1, 20), [("dense", 16), ("dense", 12)]),
    "lenet": (_TorchLeNet, (1, 1, 24, 24), [("conv", 4 * 24 * 24), ("conv", 8 * 8 * 8), ("dense", 32)]),
}


@dataclass
class Export:
    """One exported model and what the test knows about its source."""

    path: Path
    #: Largest |weight| of each affine layer of the source model, in order (hidden then output).
    max_weights: list[float]
    expected_hidden: list[tuple[str, int]]
    #: The tensor robaudit must audit by default.
    expected_output: str
    #: The source model's own prediction function (numpy in → numpy out), for cross-checks.
    predict: object = None
    extra: dict = field(default_factory=dict)


def _torch_export(name: str, dynamo: bool, directory: Path) -> Export:
    import torch

    torch.manual_seed(0)
    builder, shape, hidden = TORCH_MODELS[name]
    model = builder.build().eval()
    example = torch.rand(shape)
    path = directory / f"{name}.onnx"
    kwargs = dict(input_names=["input"], output_names=["logits"], dynamo=dynamo)
    if dynamo:
        kwargs["external_data"] = True
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
        kwargs["opset_version"] = OPSET
    torch.onnx.export(model, (example,), str(path), **kwargs)
    weights = [m.weight.detach().abs().max().item() for m in model if hasattr(m, "weight")]

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(x, np.float32))).numpy()

    return Export(path, weights, hidden, "logits", predict, {"input_shape": shape})


@pytest.fixture(scope="session")
def torch_export(tmp_path_factory):
    """``torch_export(name, dynamo)`` → :class:`Export`, each exported once per session."""
    cache: dict[tuple[str, bool], Export] = {}

    def get(name: str, dynamo: bool) -> Export:
        key = (name, dynamo)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"torch_{name}_{'dynamo' if dynamo else 'legacy'}")
            cache[key] = _torch_export(name, dynamo, directory)
        return cache[key]

    return get


def _sklearn_export(activation: str, zipmap: bool, directory: Path) -> Export:
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (120, 10)).astype(np.float32)
    labels = (x[:, 0] + x[:, 1] > 1).astype(int) + (x[:, 2] > 0.5).astype(int)  # 3 classes
    clf = MLPClassifier((12, 6), activation=activation, max_iter=200, random_state=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x, labels)
    options = {id(clf): {"zipmap": zipmap}}
    onx = to_onnx(clf, x[:1], options=options, target_opset={"": OPSET, "ai.onnx.ml": 3})
    path = directory / f"mlp_{activation}_{'zipmap' if zipmap else 'nozipmap'}.onnx"
    onnx.save(onx, str(path))
    weights = [float(np.abs(w).max()) for w in clf.coefs_]
    # the float scores: the graph output 'probabilities', or (ZipMap) the tensor ZipMap reads
    scores = next((n.input[0] for n in onx.graph.node if n.op_type == "ZipMap"), "probabilities")
    return Export(
        path,
        weights,
        [("dense", 12), ("dense", 6)],
        scores,
        clf.predict_proba,
        {"classes": 3, "features": 10},
    )


@pytest.fixture(scope="session")
def sklearn_export(tmp_path_factory):
    """``sklearn_export(activation, zipmap)`` → :class:`Export`, each exported once per session."""
    cache: dict[tuple[str, bool], Export] = {}

    def get(activation: str, zipmap: bool) -> Export:
        key = (activation, zipmap)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"sklearn_{activation}_{zipmap}")
            cache[key] = _sklearn_export(activation, zipmap, directory)
        return cache[key]

    return get
