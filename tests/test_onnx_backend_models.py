"""Invariant: every model of onnx's own backend test data is bounded or refused in one line.

The onnx wheel ships ``onnx/backend/test/data/{simple,light,pytorch-converted,
pytorch-operator}`` (``real`` holds only download addresses, ``node`` is not shipped).
Each model goes through ``robaudit inspect`` and ``robaudit bound`` in this process: the
exit code is 0 (bounded) or 2 with exactly one ``robaudit: ...`` line on stderr, never an
internal error, a traceback or a leaked Python exception text. Where a model is bounded,
its clean interval at a point input domain is compared with onnxruntime's output.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from robaudit.bounds.audit import load_network
from robaudit.cli import main
from robaudit.graph.network import NetworkOptions

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
#: The ImageNet model skeletons (1000 outputs: the tight bound back-propagates every one through
#: the whole network, minutes each on two cores): slow suite (``make test-slow``).
SLOW = {path.stem for path in DATA.glob("light/*.onnx")}
#: Python exception texts that must never reach the user.
LEAKS = re.compile(
    r"internal error|Traceback|list index out of range|NoneType|KeyError|IndexError|AttributeError|"
    r"UnboundLocalError|TypeError|object has no attribute|not subscriptable|unpack"
)


def _models() -> list[Path]:
    paths = sorted(DATA.glob("*/*/model.onnx")) + sorted(DATA.glob("light/*.onnx"))
    return [p for p in paths if p.parent.name != "real"]


def _id(path: Path) -> str:
    return path.stem if path.parent.name == "light" else path.parent.name


MODELS = _models()


def run_main(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _check(path: Path) -> list[str]:
    """Problems with one model under both commands (empty when it is bounded or refused cleanly)."""
    problems = []
    for command in (["inspect"], ["bound", "-e", "0.1", "--include-output-layer"]):
        code, out, err = run_main(*command, path)
        if code == 0 and not LEAKS.search(err):
            continue
        if code == 2 and out == "" and err.count("\n") == 1 and err.startswith("robaudit: ") and not LEAKS.search(err):
            continue
        problems.append(f"{command[0]} {_id(path)}: exit {code}: {err.strip()[:300]}")
    return problems


def test_the_backend_data_is_present():
    assert len(MODELS) > 100, f"only {len(MODELS)} models under {DATA}"


def test_every_backend_model_is_bounded_or_refused_in_one_line():
    problems = [p for path in MODELS if _id(path) not in SLOW for p in _check(path)]
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_the_large_skeletons_too(name):
    (path,) = [p for p in MODELS if _id(p) == name]
    assert _check(path) == []


def _single_input(path: Path) -> tuple[str, list[int]] | None:
    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return None
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


SMALL = [p for p in MODELS if p.parent.parent.name in ("pytorch-converted", "pytorch-operator", "simple")]


def test_bounded_models_agree_with_onnxruntime():
    """For each small bounded model: the clean interval at input domain [c, c] is onnxruntime's output."""
    compared = 0
    for path in SMALL:
        if run_main("inspect", path)[0] != 0:
            continue
        name, dims = _single_input(path)
        _, network = load_network(path, NetworkOptions(input_range=(0.3, 0.3)))
        shape = [d if d > 0 else n for d, n in zip(dims, network.input_shape, strict=True)]
        try:  # onnxruntime has no kernels for some opset-6 ops (Gemm-6): nothing to compare with
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outputs = session.run(None, {name: np.full(shape, 0.3, np.float32)})  # the model's own batch size
        except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
            continue
        names = [o.name for o in session.get_outputs()]
        expected = outputs[names.index(network.output_name)][:1]  # every sample is the same
        box = network.clean[network.output_name]
        np.testing.assert_allclose(box.lo, expected, rtol=1e-4, atol=1e-5, err_msg=_id(path))
        np.testing.assert_allclose(box.hi, expected, rtol=1e-4, atol=1e-5, err_msg=_id(path))
        compared += 1
    assert compared >= 20, compared


# --------------------------------------------------------------------------- single-op forms

#: (op, attributes, extra inputs: "x" for the variable, arrays for constants, "" for absent, outputs)
SINGLE_OPS = [
    ("Relu", {}, [], 1),
    ("Exp", {}, [], 1),
    ("Log", {}, [], 1),
    ("Sqrt", {}, [], 1),
    ("Sign", {}, [], 1),
    ("Floor", {}, [], 1),
    ("Sin", {}, [], 1),
    ("Softmax", {"axis": 1}, [], 1),
    ("LayerNormalization", {}, [], 1),
    ("Pow", {}, [np.array(2.0, np.float32)], 1),
    ("Pow", {}, ["x"], 1),
    ("Pow", {}, [np.array([2.0, 3.0], np.float32)], 1),
    ("Div", {}, ["x"], 1),
    ("Mul", {}, ["x"], 1),
    ("Sum", {}, ["x", "x"], 1),
    ("Max", {}, ["x"], 1),
    ("Reciprocal", {}, [], 1),
    ("Dropout", {}, [], 2),
    ("Dropout", {}, [np.array(0.5, np.float32), np.array(True)], 2),
    ("Gather", {"axis": 1}, [np.array([0, 2], np.int64)], 1),
    ("GatherND", {}, [np.array([[0, 1]], np.int64)], 1),
    ("TopK", {}, [np.array([2], np.int64)], 2),
    ("ArgMax", {}, [], 1),
    ("Split", {"axis": 1}, [np.array([2, 2], np.int64)], 2),
    ("Upsample", {"scales": [1.0, 2.0]}, [], 1),
    ("Upsample", {"mode": "cubic"}, [np.array([1.0, 2.0], np.float32)], 1),
    ("Resize", {"mode": "cubic"}, ["", np.array([1.0, 2.0], np.float32)], 1),
    ("LRN", {"size": 3}, [], 1),
    ("Clip", {}, ["x", "x"], 1),
    ("Where", {}, ["x", "x"], 1),
    ("Expand", {}, [np.array([2, 4], np.int64)], 1),
    ("Tile", {}, [np.array([1, 2], np.int64)], 1),
    ("CumSum", {}, [np.array(1, np.int64)], 1),
    ("ReduceL2", {}, [], 1),
    ("Einsum", {"equation": "ij->ij"}, [], 1),
    ("MatMul", {}, ["x"], 1),
    ("Scaler", {"scale": [2.0], "offset": [1.0]}, [], 1),
    ("Identity", {}, [], 1),
    ("Cast", {"to": 7}, [], 1),
    ("Shape", {}, [], 1),
    ("Size", {}, [], 1),
    ("NonZero", {}, [], 1),
    ("Range", {}, [], 1),
]


def _single_op_model(op: str, attrs: dict, extra: list, outputs: int) -> onnx.ModelProto:
    """x [N, 4] → Gemm → op(h, extra...) → Gemm (when the op's output fits) → output."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.uniform(-1, 1, (4, 4)).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.uniform(-1, 1, (4, 3)).astype(np.float32), "w2"),
    ]
    names = ["h"]
    for index, value in enumerate(extra):
        if isinstance(value, str):
            names.append("h" if value == "x" else "")
            continue
        inits.append(onnx.numpy_helper.from_array(value, f"k{index}"))
        names.append(f"k{index}")
    domain = "ai.onnx.ml" if op == "Scaler" else ""
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        onnx.helper.make_node(
            op, names, ["y"] + [f"y{i}" for i in range(1, outputs)], name="the_op", domain=domain, **attrs
        ),
        onnx.helper.make_node("MatMul", ["y", "w2"], ["out"], name="fc2"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "single",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [onnx.helper.make_opsetid("", 9 if op == "Upsample" else 17), onnx.helper.make_opsetid("ai.onnx.ml", 3)]
    return onnx.helper.make_model(graph, opset_imports=opsets)


def test_single_op_forms_are_bounded_or_refused_in_one_line(tmp_path):
    problems = []
    for index, (op, attrs, extra, outputs) in enumerate(SINGLE_OPS):
        path = tmp_path / f"{index}_{op}.onnx"
        onnx.save(_single_op_model(op, attrs, extra, outputs), path)
        problems += [f"{op} {attrs}: {p}" for p in _check(path)]
    assert problems == [], "\n".join(problems)
