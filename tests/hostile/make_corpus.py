"""Generate the hostile-input corpus (malformed files and graphs, external data) into a directory.

    .venv/bin/python tests/hostile/make_corpus.py OUTDIR

writes ``OUTDIR/cases/<name>/…`` (one directory per case, so every case has its own
"model directory"), ``OUTDIR/outside/`` (files that lie outside every model directory
and must never be opened) and ``OUTDIR/manifest.json``. Nothing large is checked in:
every file is built here from a few lines of ``onnx.helper`` or raw bytes.

Every case has an expected outcome:

* ``error``: ``robaudit`` exits 2 with exactly one line on stderr, matching the
  case's ``match`` regular expression (so it is refused *for the right reason*);
* ``ok``: ``robaudit`` exits 0 and its JSON report holds the numbers in ``check``,
  which are worked out by hand below (see :func:`reference_model`).

Cases that point at a file outside their model directory list it in ``canaries``; the
test watches those files with inotify (``IN_OPEN | IN_ACCESS``, which the kernel reports
for any process, native code included, and for root too) and fails if robaudit opens
one. A hard link is the same inode as its target, so the watch catches reads through
it as well.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: The expected report of the reference model with ``bound -e 1 --crash 1``
#: (hand-worked in :func:`reference_model`).
REFERENCE_CHECK = {"fep_paper": 0.5, "fep_tight": 0.5, "neurons": [3], "max_failures": [2]}
OPSET = 17


@dataclass
class Case:
    """One hostile input and what robaudit must do with it."""

    #: Short identifier, also the case's directory name.
    name: str
    #: ``error`` (exit 2, one line) or ``ok`` (exit 0, correct numbers).
    expect: str
    #: The path given to robaudit, relative to the corpus root.
    path: str = ""
    #: For ``error``: a regular expression the one-line message must match (case-insensitive).
    match: str = ""
    #: For ``ok``: expected report values (see REFERENCE_CHECK).
    check: dict = field(default_factory=dict)
    #: Files (relative to the corpus root) that must never be opened.
    canaries: list[str] = field(default_factory=list)
    #: The case's group (1-*: files, protobufs and graphs; 2-*: external data) and a one-line description.
    group: str = ""
    note: str = ""


# --------------------------------------------------------------------------- reference model


def _weights(w1: np.ndarray | None = None, w2: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    w1 = np.full((4, 3), 0.5, np.float32) if w1 is None else w1
    w2 = np.full((3, 2), 0.25, np.float32) if w2 is None else w2
    return w1, w2


def reference_model(
    w1: np.ndarray | None = None,
    w2: np.ndarray | None = None,
    dtype: int = TensorProto.FLOAT,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """x[1,4] → Gemm(W1 = 0.5) → Relu → Gemm(W2 = 0.25) → y[1,2].

    Worked by hand for ``--crash 1`` and input range [0, 1]: every hidden pre-activation
    lies in [0, 4·0.5] = [0, 2], so δ_1 = 2 (docs/method.md §2.1); the paper bound is
    Fep = K_2·w_m^(2)·f_1·δ_1 = 1·0.25·1·2 = 0.5 (docs/method.md §3.1), and the tight bound is
    max_k Σ_{failed i} |W2[i, k]|·δ_i = 0.25·2 = 0.5. With ε = 1 a single layer tolerates
    f ≤ 1/0.5 = 2 failures.
    """
    w1, w2 = _weights(w1, w2)
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [
        numpy_helper.from_array(w1.astype(np_type), "W1"),
        numpy_helper.from_array(np.zeros(3, np_type), "b1"),
        numpy_helper.from_array(w2.astype(np_type), "W2"),
        numpy_helper.from_array(np.zeros(2, np_type), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
    ]
    return _model(nodes, inits, dtype=dtype, opset=opset)


def _model(
    nodes: list,
    inits: list,
    dtype: int = TensorProto.FLOAT,
    opset: int = OPSET,
    inputs: list | None = None,
    outputs: list | None = None,
    extra_opsets: list | None = None,
) -> onnx.ModelProto:
    inputs = inputs if inputs is not None else [helper.make_tensor_value_info("x", dtype, [1, 4])]
    outputs = outputs if outputs is not None else [helper.make_tensor_value_info("y", dtype, [1, 2])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + (extra_opsets or [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="robaudit-hostile")
    model.ir_version = 8
    return model


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field: key varint + payload (length-prefixed for wire type 2)."""
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


# --------------------------------------------------------------------------- writers


class Corpus:
    """Collects cases while writing their files under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.cases: list[Case] = []
        (root / "cases").mkdir(parents=True, exist_ok=True)

    def canary(self, case: str, relative: str, payload: bytes) -> Path:
        """A file beside (outside) the model directory of ``case`` that must never be opened.

        Every case has its own canaries, so an open can be traced to the case that did it.
        """
        path = self.root / "cases" / case / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        return path

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def dir(self, name: str) -> Path:
        """The model directory of case ``name``: ``cases/<name>/model``."""
        path = self.root / "cases" / name / "model"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, case: Case, writer: Callable[[Path], None], filename: str = "model.onnx") -> None:
        """Create the case directory, let ``writer`` fill ``<dir>/<filename>``, record the case."""
        target = self.dir(case.name) / filename
        writer(target)
        case.path = case.path or self.rel(target)
        self.cases.append(case)

    def error(self, name: str, group: str, match: str, data: bytes | onnx.ModelProto, note: str = "") -> None:
        payload = _bytes(data) if isinstance(data, onnx.ModelProto) else data
        self.add(Case(name, "error", match=match, group=group, note=note), lambda p: p.write_bytes(payload))

    def ok(self, name: str, group: str, data: bytes | onnx.ModelProto, note: str = "", check=None) -> None:
        payload = _bytes(data) if isinstance(data, onnx.ModelProto) else data
        case = Case(name, "ok", check=dict(check or REFERENCE_CHECK), group=group, note=note)
        self.add(case, lambda p: p.write_bytes(payload))


# --------------------------------------------------------------------------- group 1: files


def file_cases(c: Corpus) -> None:
    """Not-a-model files and file-system oddities."""
    g = "1-file"
    valid = _bytes(reference_model())
    c.ok("valid_reference", g, valid, "the hand-worked reference model (positive control)")
    c.error("empty", g, r"empty", b"")
    c.error("one_byte", g, r"not a valid ONNX", b"\x08")
    rng = random.Random(7)
    for size in (16, 1000, 100_000):
        c.error(
            f"random_{size}", g, r"not a valid ONNX|not an ONNX|Git LFS|HTML|XML|zip|pickle|JSON", rng.randbytes(size)
        )
    for fraction in (0.01, 0.1, 0.5, 0.9):
        cut = max(1, int(len(valid) * fraction))
        c.error(f"truncated_{int(fraction * 100)}pct", g, r"not a valid ONNX", valid[:cut])
    c.error("truncated_last_byte", g, r"not a valid ONNX", valid[:-1])
    c.error("junk_appended_ff", g, r"not a valid ONNX", valid + b"\xff" * 16, "an over-long varint")
    c.error(
        "junk_appended_bad_wiretype",
        g,
        r"not a valid ONNX",
        valid + b"\x0f\x00\x00",
        "field 1 with wire type 7 (does not exist)",
    )
    c.error("junk_appended_field0", g, r"not a valid ONNX", valid + b"\x00\x01", "field number 0 is illegal")
    c.ok(
        "junk_appended_unknown_field",
        g,
        valid + _field(1000, 0, _varint(5)),
        "a well-formed unknown field is legal protobuf: the model is still the reference model",
    )
    c.error("html", g, r"HTML", b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    c.error(
        "git_lfs_pointer",
        g,
        r"Git LFS",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n",
    )
    c.error("json", g, r"JSON", b'{"graph": {"node": []}, "opset_import": [17]}\n')
    c.error("zip", g, r"zip", b"PK\x03\x04" + bytes(26) + b"model.onnx" + valid[:100])
    c.error("pickle", g, r"pickle|not a valid ONNX", b"\x80\x04\x95" + bytes(20))
    c.error("text_leading_spaces", g, r"not a valid ONNX|HTML", b"   \n\t<html>hello</html>")
    c.add(Case("directory", "error", match=r"directory", group=g), lambda p: p.mkdir())
    c.add(Case("fifo", "error", match=r"not a regular file", group=g, note="must not block"), lambda p: os.mkfifo(p))
    c.add(Case("missing", "error", match=r"does not exist", group=g), lambda p: None)
    c.add(
        Case("dev_zero_symlink", "error", match=r"symbolic link|not a regular file", group=g),
        lambda p: os.symlink("/dev/zero", p),
    )
    c.add(
        Case("dangling_symlink", "error", match=r"symbolic link|does not exist", group=g),
        lambda p: os.symlink("nowhere.onnx", p),
    )
    c.add(
        Case("symlink_loop", "error", match=r"symbolic link|cannot access|loop", group=g),
        lambda p: os.symlink(p.name, p),
    )
    real = c.canary("symlink_outside", "outside/real_model.onnx", valid)
    c.add(
        Case(
            "symlink_outside",
            "error",
            match=r"symbolic link.*outside",
            group=g,
            canaries=[c.rel(real)],
            note="model.onnx -> ../outside/real_model.onnx (a valid model)",
        ),
        lambda p: os.symlink(os.path.relpath(real, p.parent), p),
    )
    c.add(
        Case(
            "symlink_inside",
            "ok",
            check=dict(REFERENCE_CHECK),
            group=g,
            note="model.onnx -> real.onnx in the same directory is allowed",
        ),
        lambda p: ((p.parent / "real.onnx").write_bytes(valid), os.symlink("real.onnx", p)),
    )
    _unreadable(c, valid)


def _unreadable(c: Corpus, valid: bytes) -> None:
    """chmod 000: refused with a clear message, or (as root, who may read it) a correct result."""
    path = c.dir("unreadable") / "model.onnx"
    path.write_bytes(valid)
    path.chmod(0)
    readable = os.access(path, os.R_OK)
    if readable:
        case = Case(
            "unreadable",
            "ok",
            check=dict(REFERENCE_CHECK),
            group="1-file",
            note="chmod 000, but this user (root) can read it anyway",
        )
    else:
        case = Case("unreadable", "error", match=r"cannot (read|access)|permission", group="1-file", note="chmod 000")
    case.path = c.rel(path)
    c.cases.append(case)


# --------------------------------------------------------------------------- group 1: protobuf


def protobuf_cases(c: Corpus) -> None:
    """Malformed wire format."""
    g = "1-protobuf"
    valid = reference_model()
    graph = _bytes(valid.graph)
    head = _field(1, 0, _varint(8))
    opset = _field(8, 2, _field(2, 0, _varint(OPSET)))
    c.error(
        "graph_as_varint",
        g,
        r"not a valid ONNX",
        head + _field(7, 0, _varint(1)) + opset,
        "field 7 (graph) with wire type 0",
    )
    c.error(
        "ir_version_as_bytes",
        g,
        r"not a valid ONNX",
        _field(1, 2, b"abc") + _field(7, 2, graph) + opset,
        "field 1 (int64) with wire type 2",
    )
    c.error(
        "graph_length_past_end",
        g,
        r"not a valid ONNX",
        head + _varint(7 << 3 | 2) + _varint(10**6) + graph,
        "graph declares 1 MB, the file holds less",
    )
    c.error("graph_length_huge_varint", g, r"not a valid ONNX", head + _varint(7 << 3 | 2) + _varint(2**62) + graph)
    nested = _field(1, 2, _field(1, 2, b"x") + _varint(5 << 3 | 2) + _varint(4000))  # node.input past end
    c.error("nested_length_past_end", g, r"not a valid ONNX", head + _field(7, 2, nested) + opset)
    node_wrong = _field(1, 0, _varint(3)) + graph  # GraphProto.node (message) as varint
    c.ok(
        "node_as_varint",
        g,
        head + _field(7, 2, node_wrong) + opset,
        "a field with the wrong wire type is kept as an unknown field (protobuf rule): the reference model",
    )
    c.error("no_graph", g, r"no graph", head + opset)
    c.error("no_opset", g, r"opset", head + _field(7, 2, graph))
    c.error("ir_version_zero", g, r"IR version|not a valid", _field(7, 2, graph) + opset)
    c.error(
        "nesting_bomb",
        g,
        r"not a valid ONNX|too deep",
        _nesting_bomb(3000),
        "3000 nested If subgraphs in 30 kB (protobuf recursion limit)",
    )


def _nesting_bomb(depth: int) -> bytes:
    """GraphProto → NodeProto → AttributeProto(g) → GraphProto … ``depth`` times, as raw bytes."""
    inner = b""
    for _ in range(depth):
        attribute = _field(1, 2, b"then_branch") + _field(20, 0, _varint(5)) + _field(6, 2, inner)
        node = _field(4, 2, b"If") + _field(5, 2, attribute)
        inner = _field(1, 2, node)
    return _field(1, 0, _varint(8)) + _field(7, 2, inner) + _field(8, 2, _field(2, 0, _varint(OPSET)))


# --------------------------------------------------------------------------- group 1: graphs


def graph_cases(c: Corpus) -> None:
    """Structurally broken or resource-hungry graphs."""
    g = "1-graph"
    w1, w2 = _weights()
    base_inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b2"),
    ]

    def chain(first_input: str = "x", relu_in: str = "h", fc2_in: str = "a") -> list:
        return [
            helper.make_node("Gemm", [first_input, "W1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", [relu_in], ["a"], name="relu1"),
            helper.make_node("Gemm", [fc2_in, "W2", "b2"], ["y"], name="fc2"),
        ]

    c.error("undefined_input", g, r"nope.*defines", _model(chain(relu_in="nope"), base_inits))
    c.error(
        "output_not_produced",
        g,
        r"ghost.*produced by no node",
        _model(chain(), base_inits, outputs=[helper.make_tensor_value_info("ghost", TensorProto.FLOAT, [1, 2])]),
    )
    c.error("cycle", g, r"cycle", _model(chain(first_input="a"), base_inits))
    self_loop = [helper.make_node("Relu", ["z"], ["z"], name="loop")] + chain()
    c.error("self_loop", g, r"cycle|defined twice", _model(self_loop, base_inits))
    dup_out = chain() + [helper.make_node("Relu", ["x"], ["h"], name="dup")]
    c.error("duplicate_value", g, r"defined twice", _model(dup_out, base_inits))
    dup_init = base_inits + [numpy_helper.from_array(w1, "W1")]
    c.error("duplicate_initializer", g, r"defined twice", _model(chain(), dup_init))
    two_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])] * 2
    c.error("duplicate_graph_input", g, r"input", _model(chain(), base_inits, inputs=two_inputs))
    no_outputs = helper.make_graph(
        chain(), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [], base_inits
    )
    c.error("no_outputs", g, r"no outputs", helper.make_model(no_outputs, opset_imports=[helper.make_opsetid("", 17)]))
    c.error(
        "input_negative_dim",
        g,
        r"dimension|shape",
        _model(chain(), base_inits, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, -4])]),
    )
    c.error(
        "input_huge_dim",
        g,
        r"too large|shape|dimension",
        _model(chain(), base_inits, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**40])]),
    )
    c.error(
        "input_huge_dims_product",
        g,
        r"too large|shape|dimension",
        _model(
            chain(), base_inits, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**20, 2**20, 4])]
        ),
    )
    c.error(
        "input_zero_dim",
        g,
        r"shape|dimension|non-positive",
        _model(chain(), base_inits, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 0])]),
    )
    neg = helper.make_tensor("W1", TensorProto.FLOAT, [4, 3], w1.reshape(-1).tolist())
    neg.dims[:] = [-4, -3]
    c.error("weight_negative_dims", g, r"negative dimension", _model(chain(), [neg] + base_inits[1:]))
    huge = onnx.TensorProto(name="W1", data_type=TensorProto.FLOAT, dims=[2**31, 2**31], raw_data=w1.tobytes())
    c.error(
        "weight_huge_dims",
        g,
        r"size limit|holds|values",
        _model(chain(), [huge] + base_inits[1:]),
        "declares 2^62 floats, holds 12",
    )
    short = onnx.TensorProto(name="W1", data_type=TensorProto.FLOAT, dims=[4, 3], raw_data=w1.tobytes()[:40])
    c.error("raw_data_short", g, r"W1.*(holds|unreadable|values)", _model(chain(), [short] + base_inits[1:]))
    long = onnx.TensorProto(name="W1", data_type=TensorProto.FLOAT, dims=[4, 3], raw_data=w1.tobytes() + bytes(8))
    c.error("raw_data_long", g, r"W1.*(holds|unreadable|values)", _model(chain(), [long] + base_inits[1:]))
    odd = onnx.TensorProto(name="W1", data_type=TensorProto.FLOAT, dims=[4, 3], raw_data=w1.tobytes()[:-1])
    c.error("raw_data_not_multiple", g, r"W1.*(holds|unreadable|values)", _model(chain(), [odd] + base_inits[1:]))
    bad_type = onnx.TensorProto(name="W1", data_type=999, dims=[4, 3], raw_data=w1.tobytes())
    c.error("weight_unknown_dtype", g, r"W1", _model(chain(), [bad_type] + base_inits[1:]))
    strings = helper.make_tensor("W1", TensorProto.STRING, [4, 3], [b"a"] * 12)
    c.error("weight_string", g, r"W1|string|type|unsupported|numeric", _model(chain(), [strings] + base_inits[1:]))
    _weight_value_cases(c)
    _shape_cases(c)
    _hostile_names(c)
    _attribute_cases(c)
    _long_graphs(c)
    _dtype_cases(c)
    _opset_and_domain_cases(c, chain, base_inits)
    _allocation_cases(c, base_inits)
    _control_flow_cases(c, base_inits)


def _weight_value_cases(c: Corpus) -> None:
    g = "1-values"
    for label, value in (("nan", np.nan), ("inf", np.inf), ("neg_inf", -np.inf)):
        w1, _ = _weights()
        w1[1, 2] = value
        c.error(f"weight_{label}", g, r"NaN or Inf", reference_model(w1=w1))
    w2 = np.full((3, 2), 0.25, np.float32)
    w2[0, 1] = np.nan
    c.error("output_weight_nan", g, r"NaN or Inf", reference_model(w2=w2))
    w1, w2 = _weights()
    w1[0, 0] = w2[2, 1] = np.float32(1e-40)  # float32 subnormals
    c.ok("weights_denormal", g, reference_model(w1=w1, w2=w2), "subnormal weights change neither w_m nor δ")
    w1 = np.full((4, 3), 0.5, np.float32)
    w1[3, 0] = np.float32(1e-45)  # the smallest float32 subnormal
    c.ok("weights_min_subnormal", g, reference_model(w1=w1))


def _shape_cases(c: Corpus) -> None:
    """Tensors and attributes that do not fit together (refused, never a numpy traceback)."""
    g = "1-shapes"
    f32 = np.float32

    def dense(nodes: list, inits: dict, in_shape=(1, 4), out_shape=(1, 2)) -> onnx.ModelProto:
        tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))]
        return _model(nodes, tensors, inputs=ins, outputs=outs)

    gemm = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc")]
    c.error(
        "gemm_weight_rows_mismatch", g, r"fc|shape", dense(gemm, {"W": np.ones((5, 2), f32), "b": np.zeros(2, f32)})
    )
    c.error("gemm_bias_mismatch", g, r"fc|shape", dense(gemm, {"W": np.ones((4, 2), f32), "b": np.zeros(7, f32)}))
    c.error("gemm_weight_1d", g, r"fc|shape|2-D|rank", dense(gemm, {"W": np.ones(4, f32), "b": np.zeros(2, f32)}))
    c.error(
        "gemm_weight_3d", g, r"fc|shape|2-D|rank", dense(gemm, {"W": np.ones((4, 2, 1), f32), "b": np.zeros(2, f32)})
    )
    matmul = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    c.error("matmul_mismatch", g, r"mm|shape", dense(matmul, {"W": np.ones((3, 2), f32)}))
    c.error("matmul_scalar_weight", g, r"mm|shape|2-D", dense(matmul, {"W": np.array(2.0, f32)}))

    def conv(attrs: dict, w_shape=(2, 1, 2, 2), x_shape=(1, 1, 4, 4), bias=None) -> onnx.ModelProto:
        inits = {"W": np.ones(w_shape, f32)}
        inputs = ["x", "W"]
        if bias is not None:
            inits["B"] = np.zeros(bias, f32)
            inputs.append("B")
        nodes = [
            helper.make_node("Conv", inputs, ["c"], name="conv", **attrs),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Flatten", ["r"], ["f"], name="flat"),
            helper.make_node("ReduceSum", ["f"], ["y"], name="sum", keepdims=1),
        ]
        return dense(nodes, inits, in_shape=x_shape, out_shape=(1, 1))

    c.error("conv_channel_mismatch", g, r"conv|channel|shape", conv({}, w_shape=(2, 3, 2, 2)))
    c.error("conv_kernel_larger_than_input", g, r"conv|shape|kernel|empty", conv({}, w_shape=(2, 1, 9, 9)))
    c.error("conv_stride_zero", g, r"conv|stride", conv({"strides": [0, 0]}))
    c.error("conv_stride_negative", g, r"conv|stride", conv({"strides": [-1, 1]}))
    c.error("conv_dilation_zero", g, r"conv|dilation", conv({"dilations": [0, 1]}))
    c.error("conv_pads_negative_huge", g, r"conv|pad|shape|empty", conv({"pads": [-9, 0, 0, 0]}))
    c.error("conv_pads_wrong_length", g, r"conv|pad", conv({"pads": [1, 1, 1]}))
    c.error(
        "conv_group_not_dividing",
        g,
        r"conv|group|channel",
        conv({"group": 3}, w_shape=(2, 1, 2, 2), x_shape=(1, 2, 4, 4)),
    )
    c.error("conv_group_zero", g, r"conv|group", conv({"group": 0}))
    c.error("conv_bias_mismatch", g, r"conv|bias|shape", conv({}, bias=5))
    c.error("conv_weight_4d_input_2d", g, r"conv|rank|shape", conv({}, x_shape=(1, 16)))
    c.error("conv_3d", g, r"conv|3-D|supported", conv({}, w_shape=(2, 1, 2, 2, 2), x_shape=(1, 1, 4, 4, 4)))

    def tail(node: onnx.NodeProto, inits: dict | None = None, out_shape=(1, 2)) -> onnx.ModelProto:
        w1, w2 = _weights()
        base = {"W1": w1, "b1": np.zeros(3, f32), "W2": w2, "b2": np.zeros(2, f32)}
        base.update(inits or {})
        nodes = [
            helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu1"),
            helper.make_node("Gemm", ["a", "W2", "b2"], ["z"], name="fc2"),
            node,
        ]
        return dense(nodes, base, out_shape=out_shape)

    c.error(
        "reshape_impossible",
        g,
        r"reshape|shape",
        tail(helper.make_node("Reshape", ["z", "s"], ["y"], name="reshape"), {"s": np.array([3, 5], np.int64)}),
    )
    c.error(
        "reshape_two_minus_one",
        g,
        r"reshape|shape",
        tail(helper.make_node("Reshape", ["z", "s"], ["y"], name="reshape"), {"s": np.array([-1, -1], np.int64)}),
    )
    c.error(
        "transpose_bad_perm",
        g,
        r"transpose|perm|axes|axis",
        tail(helper.make_node("Transpose", ["z"], ["y"], name="tr", perm=[0, 0])),
    )
    c.error(
        "transpose_perm_out_of_range",
        g,
        r"transpose|perm|axes|axis",
        tail(helper.make_node("Transpose", ["z"], ["y"], name="tr", perm=[5, 0])),
    )
    c.error(
        "flatten_axis_out_of_range",
        g,
        r"flatten|axis",
        tail(helper.make_node("Flatten", ["z"], ["y"], name="fl", axis=9)),
    )
    c.error(
        "softmax_axis_out_of_range",
        g,
        r"softmax|axis",
        tail(helper.make_node("Softmax", ["z"], ["y"], name="sm", axis=7)),
    )
    c.error(
        "concat_axis_out_of_range",
        g,
        r"concat|axis|shape",
        tail(helper.make_node("Concat", ["z", "z"], ["y"], name="cat", axis=5)),
    )
    c.error(
        "add_broadcast_mismatch",
        g,
        r"add|shape|broadcast",
        tail(helper.make_node("Add", ["z", "k"], ["y"], name="add"), {"k": np.ones(7, f32)}),
    )
    c.error(
        "squeeze_non_one_axis",
        g,
        r"squeeze|axis|shape",
        tail(helper.make_node("Squeeze", ["z", "ax"], ["y"], name="sq"), {"ax": np.array([1], np.int64)}),
    )
    c.error(
        "gather_index_out_of_range",
        g,
        r"gather|index|bounds|range",
        tail(helper.make_node("Gather", ["z", "idx"], ["y"], name="ga", axis=1), {"idx": np.array([9], np.int64)}),
    )
    c.error(
        "slice_bad_steps",
        g,
        r"slice|step",
        tail(
            helper.make_node("Slice", ["z", "st", "en", "ax", "sp"], ["y"], name="sl"),
            {
                "st": np.array([0], np.int64),
                "en": np.array([2], np.int64),
                "ax": np.array([1], np.int64),
                "sp": np.array([0], np.int64),
            },
        ),
    )
    c.error(
        "maxpool_kernel_zero",
        g,
        r"pool|kernel",
        tail(helper.make_node("MaxPool", ["z"], ["y"], name="mp", kernel_shape=[0])),
    )
    c.error(
        "batchnorm_wrong_length",
        g,
        r"batch|bn|shape",
        tail(
            helper.make_node("BatchNormalization", ["z", "s", "bb", "m", "v"], ["y"], name="bn"),
            {"s": np.ones(5, f32), "bb": np.zeros(5, f32), "m": np.zeros(5, f32), "v": np.ones(5, f32)},
        ),
    )
    c.error(
        "batchnorm_negative_variance",
        g,
        r"batch|bn|varian|NaN",
        tail(
            helper.make_node("BatchNormalization", ["z", "s", "bb", "m", "v"], ["y"], name="bn", epsilon=0.0),
            {"s": np.ones(2, f32), "bb": np.zeros(2, f32), "m": np.zeros(2, f32), "v": -np.ones(2, f32)},
        ),
    )
    c.error("node_missing_inputs", g, r"fc2|input|Gemm", _missing_input_model())


def _hostile_names(c: Corpus) -> None:
    """Names with terminal escapes, NUL, newlines, or a megabyte long, echoed in an error message."""
    g = "1-names"
    for label, name in (
        ("control_chars", "evil\x1b]0;pwned\x07\x1b[2J\nnext line\x00end"),
        ("one_megabyte", "n" * 2**20),
    ):
        model = reference_model()
        model.graph.node[1].op_type = "ThresholdedRelu"
        model.graph.node[1].name = name
        c.error(f"node_name_{label}", g, r"ThresholdedRelu", model)


def _missing_input_model() -> onnx.ModelProto:
    """A Gemm node with only one input (B is required)."""
    model = reference_model()
    del model.graph.node[2].input[1:]
    return model


def _dtype_cases(c: Corpus) -> None:
    g = "1-dtypes"
    # float16 arithmetic: every op's result rounded (docs/method.md §1.2), the input too. By hand: x ∈ [0, 1]
    # rounds into [−t, 1 + u + t], fc1's result 2(1 + u + t) into δ = 2(1 + u + t)(1 + u) + t; one crash moves
    # fc2's rounded output by (1 + u)·0.25·δ plus the rounding radius 2u·|y|max + 2t, |y|max = 0.75·δ; two crashes
    # exceed ε = 1.
    u, t = 2.0**-11, 2.0**-25
    delta = 2 * (1 + u + t) * (1 + u) + t
    fep = (1 + u) * 0.25 * delta + 2 * u * 0.75 * delta + 2 * t
    c.ok("fp16_model", g, reference_model(dtype=TensorProto.FLOAT16), "float16 input, weights and arithmetic",
         check={"fep_paper": fep, "fep_tight": fep, "neurons": [3], "max_failures": [1]})
    c.ok("fp64_model", g, reference_model(dtype=TensorProto.DOUBLE), "float64 input and weights")
    c.ok("int8_dequantize", g, _quantized_model(np.int8, 0), "W = DequantizeLinear(int8, 1/128, 0)")
    c.ok("uint8_dequantize", g, _quantized_model(np.uint8, 128), "W = DequantizeLinear(uint8, 1/128, 128)")
    zero = numpy_helper.from_array(np.zeros((0, 4), np.float32), "unused_empty")
    ref = reference_model()
    ref.graph.initializer.append(zero)
    c.ok("zero_size_unused_initializer", g, ref, "an empty initializer nothing reads")
    w1 = np.zeros((4, 0), np.float32)
    w2 = np.zeros((0, 2), np.float32)
    c.error(
        "zero_size_layer",
        g,
        r"empty|zero|no neuron|size|shape|cannot",
        reference_model(w1=w1, w2=w2),
        "a hidden layer with 0 neurons",
    )


def _quantized_model(np_type, zero_point: int) -> onnx.ModelProto:
    """The reference model with both weights stored as 8-bit integers + DequantizeLinear."""
    scale = np.float32(1 / 128)
    q1 = np.full((4, 3), 64 + zero_point, np_type)  # (64 + zp − zp) / 128 = 0.5
    q2 = np.full((3, 2), 32 + zero_point, np_type)  # 0.25
    inits = [
        numpy_helper.from_array(q1, "W1q"),
        numpy_helper.from_array(q2, "W2q"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
        numpy_helper.from_array(np.array(zero_point, np_type), "zp"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b1"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["W1q", "scale", "zp"], ["W1"], name="dq1"),
        helper.make_node("DequantizeLinear", ["W2q", "scale", "zp"], ["W2"], name="dq2"),
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
    ]
    return _model(nodes, inits)


def _opset_and_domain_cases(c: Corpus, chain, inits) -> None:
    g = "1-opset"
    c.error("opset_too_new", g, r"opset 999", reference_model(opset=999))
    c.error("opset_zero", g, r"opset", reference_model(opset=0))
    custom = chain(relu_in="c") + [helper.make_node("Boom", ["h"], ["c"], name="evil", domain="com.evil")]
    c.error(
        "custom_domain_on_path",
        g,
        r"Boom.*com\.evil|com\.evil.*Boom",
        _model(custom, inits, extra_opsets=[helper.make_opsetid("com.evil", 1)]),
    )
    off_path = chain() + [helper.make_node("Boom", ["x"], ["unused"], name="evil", domain="com.evil")]
    c.ok(
        "custom_domain_off_path",
        g,
        _model(off_path, inits, extra_opsets=[helper.make_opsetid("com.evil", 1)]),
        "an unknown op that the audited output does not depend on",
    )
    undeclared = chain(relu_in="c") + [helper.make_node("Relu", ["h"], ["c"], name="r", domain="not.declared")]
    c.error("undeclared_domain", g, r"Relu|not\.declared|domain", _model(undeclared, inits))
    ml = chain(relu_in="c") + [helper.make_node("Normalizer", ["h"], ["c"], name="norm", domain="ai.onnx.ml")]
    c.error("onnx_ml_on_path", g, r"Normalizer", _model(ml, inits, extra_opsets=[helper.make_opsetid("ai.onnx.ml", 3)]))


def _allocation_cases(c: Corpus, inits) -> None:
    """Constant expressions that would allocate ~2^44 elements if evaluated naively."""
    g = "1-allocation"
    big = 2**22

    def with_bias(nodes: list, extra: list) -> onnx.ModelProto:
        graph_nodes = [
            helper.make_node("Gemm", ["x", "W1", "b1"], ["h0"], name="fc1"),
            helper.make_node("Add", ["h0", "big"], ["h"], name="add_big"),
            helper.make_node("Relu", ["h"], ["a"], name="relu1"),
            helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
        ]
        return _model(nodes + graph_nodes, inits + extra)

    shape = numpy_helper.from_array(np.array([big, big], np.int64), "shape")
    cos = helper.make_node(
        "ConstantOfShape", ["shape"], ["big"], name="cos", value=numpy_helper.from_array(np.array([1.0], np.float32))
    )
    c.error("constant_of_shape_2p44", g, r"size limit", with_bias([cos], [shape]))
    one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
    expand = helper.make_node("Expand", ["one", "shape"], ["big"], name="expand")
    c.error("expand_2p44", g, r"size limit", with_bias([expand], [shape, one]))
    reps = numpy_helper.from_array(np.array([big, big], np.int64), "reps")
    one2 = numpy_helper.from_array(np.ones((1, 1), np.float32), "one2")
    tile = helper.make_node("Tile", ["one2", "reps"], ["big"], name="tile")
    c.error("tile_2p44", g, r"size limit", with_bias([tile], [reps, one2]))
    limits = [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0, "r0"), (2.0**44, "r1"), (1, "r2"))]
    rng = helper.make_node("Range", ["r0", "r1", "r2"], ["big"], name="range")
    c.error("range_2p44", g, r"size limit", with_bias([rng], limits))
    shape_in = numpy_helper.from_array(np.array([big, big], np.int64), "shape")
    cos_runtime = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["big0"],
            name="cos_rt",
            value=numpy_helper.from_array(np.array([1.0], np.float32)),
        ),
        helper.make_node("Mul", ["big0", "x_sum"], ["big"], name="mul_rt"),
        helper.make_node("ReduceSum", ["x"], ["x_sum"], name="sum_rt", keepdims=1),
    ]
    c.error(
        "constant_of_shape_times_input",
        g,
        r"size limit|unsupported|too large",
        with_bias(cos_runtime, [shape_in]),
        "the big tensor meets the variable input",
    )
    _outer_product_cases(c, with_bias)
    _variable_growth_cases(c, inits)


def _outer_product_cases(c: Corpus, with_bias) -> None:
    """Two small constants (4 MB each) whose product has 2^40 elements."""
    g = "1-allocation"
    column = numpy_helper.from_array(np.ones((2**20, 1), np.float32), "col")
    row = numpy_helper.from_array(np.ones((1, 2**20), np.float32), "row")
    reduce = helper.make_node("ReduceSum", ["outer"], ["big"], name="reduce", keepdims=0)
    for op in ("Mul", "Add", "MatMul"):
        node = helper.make_node(op, ["col", "row"], ["outer"], name=f"outer_{op.lower()}")
        c.error(f"outer_product_{op.lower()}", g, r"size limit|too large", with_bias([node, reduce], [column, row]))
    data = numpy_helper.from_array(np.ones((1, 2**20), np.float32), "data")
    indices = numpy_helper.from_array(np.zeros(2**20, np.int64), "idx")
    gather = helper.make_node("Gather", ["data", "idx"], ["outer"], name="gather", axis=0)
    c.error("outer_product_gather", g, r"size limit|too large", with_bias([gather, reduce], [data, indices]))
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    pads = numpy_helper.from_array(np.array([0, 2**40], np.int64), "pads")
    pad = helper.make_node("Pad", ["one", "pads"], ["outer"], name="pad_const")
    c.error("pad_constant_2p40", g, r"size limit|too large", with_bias([pad, reduce], [one, pads]))
    scales = numpy_helper.from_array(np.array([2.0**20, 2.0**20], np.float32), "scales")
    square = numpy_helper.from_array(np.ones((4, 4), np.float32), "square")
    resize = helper.make_node("Resize", ["square", "", "scales"], ["outer"], name="resize_const")
    c.error("resize_constant_2p44", g, r"size limit|too large", with_bias([resize, reduce], [square, scales]))


def _variable_growth_cases(c: Corpus, inits) -> None:
    """The *input* itself expanded, tiled or padded to ~2^44 elements before fc1."""
    g = "1-allocation"
    big = 2**22

    def before_fc1(node: onnx.NodeProto, extra: list) -> onnx.ModelProto:
        graph_nodes = [
            node,
            helper.make_node("Gemm", ["xe", "W1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu1"),
            helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"),
        ]
        return _model(graph_nodes, inits + extra)

    shape = numpy_helper.from_array(np.array([big, big, 1, 4], np.int64), "shape")
    c.error(
        "expand_input_2p44",
        g,
        r"too large|size limit|Expand|unsupported",
        before_fc1(helper.make_node("Expand", ["x", "shape"], ["xe"], name="expand_x"), [shape]),
    )
    reps = numpy_helper.from_array(np.array([big, big], np.int64), "reps")
    c.error(
        "tile_input_2p44",
        g,
        r"too large|size limit|Tile|unsupported",
        before_fc1(helper.make_node("Tile", ["x", "reps"], ["xe"], name="tile_x"), [reps]),
    )
    pads = numpy_helper.from_array(np.array([0, 0, 0, 2**44], np.int64), "pads")
    c.error(
        "pad_input_2p44",
        g,
        r"too large|size limit|Pad|unsupported",
        before_fc1(helper.make_node("Pad", ["x", "pads"], ["xe"], name="pad_x"), [pads]),
    )


def _long_graphs(c: Corpus) -> None:
    """Many nodes: robaudit must stay linear in their number (no quadratic passes)."""
    g = "1-size"
    n = 5000
    ids = [helper.make_node("Identity", [f"v{i}"], [f"v{i + 1}"], name=f"id{i}") for i in range(n)]
    ids[0].input[0] = "x"
    model = reference_model()
    model.graph.node[0].input[0] = f"v{n}"
    nodes = ids + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    c.ok("identity_chain_5000", g, model, "5000 Identity nodes before fc1")
    model = reference_model()
    unused = [helper.make_node("Relu", ["x"], [f"u{i}"], name=f"unused{i}") for i in range(20000)]
    model.graph.node.extend(unused)
    c.ok("unused_nodes_20000", g, model, "20000 nodes the output does not depend on")


def _attribute_cases(c: Corpus) -> None:
    """Attributes of the wrong type, or with no type."""
    g = "1-attributes"
    model = reference_model()
    alpha = helper.make_attribute("alpha", "two")
    model.graph.node[0].attribute.append(alpha)
    c.error("attr_string_for_float", g, r"alpha.*FLOAT", model)
    model = reference_model()
    model.graph.node[0].attribute.append(helper.make_attribute("transB", [1, 1]))
    c.error("attr_ints_for_int", g, r"transB.*INT", model)
    model = reference_model()
    untyped = onnx.AttributeProto(name="alpha", f=2.0)
    model.graph.node[0].attribute.append(untyped)
    c.error("attr_no_type", g, r"alpha.*no type", model)


def _control_flow_cases(c: Corpus, inits) -> None:
    g = "1-control-flow"
    for op in ("If", "Loop"):
        for depth in (1, 30, 60):
            c.error(
                f"{op.lower()}_nested_{depth}",
                g,
                rf"{op}|control flow|not a valid",
                _nested_control_model(op, depth, inits),
            )


def _nested_control_model(op: str, depth: int, inits) -> bytes:
    """fc1 → ``depth`` nested If/Loop nodes (innermost: Relu) → fc2, serialized by hand.

    Built as bytes because the protobuf library refuses to *build* messages nested
    deeper than its parse limit (100), and a hostile file is exactly that.
    """
    a_info = _bytes(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3]))
    leaf = _bytes(
        helper.make_graph(
            [helper.make_node("Relu", ["h"], ["a"], name="inner_relu")],
            "leaf",
            [],
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3])],
        )
    )
    body = leaf
    for level in range(depth):
        if op == "If":
            attrs = _graph_attr("then_branch", body) + _graph_attr("else_branch", leaf)
            node = _field(1, 2, b"cond") + _field(2, 2, b"a") + _field(3, 2, f"if{level}".encode())
        else:
            attrs = _graph_attr("body", body)
            node = (
                _field(1, 2, b"") + _field(1, 2, b"cond") + _field(2, 2, b"a") + _field(3, 2, f"loop{level}".encode())
            )
        node += _field(4, 2, op.encode()) + attrs
        body = _field(1, 2, node) + _field(2, 2, f"level{level}".encode()) + _field(12, 2, a_info)
    top = reference_model()
    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1")],
        "g",
        list(top.graph.input),
        list(top.graph.output),
        list(inits) + [cond],
    )
    fc2 = _bytes(helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2"))
    # Repeated fields may be appended: the outermost control-flow node and fc2 join graph.node.
    graph_bytes = _bytes(graph) + _field(1, 2, node) + _field(1, 2, fc2)
    return (
        _field(1, 0, _varint(8))
        + _field(2, 2, b"robaudit-hostile")
        + _field(7, 2, graph_bytes)
        + _field(8, 2, _field(2, 0, _varint(OPSET)))
    )


def _graph_attr(name: str, graph: bytes) -> bytes:
    """AttributeProto {name, type = GRAPH, g} inside a NodeProto (field 5)."""
    return _field(5, 2, _field(1, 2, name.encode()) + _field(20, 0, _varint(5)) + _field(6, 2, graph))


# --------------------------------------------------------------------------- group 2: external data


def _external_model(location: str, extra: dict | None = None, drop: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The reference model with W1 (48 bytes) stored externally at ``location``."""
    model = reference_model()
    tensor = next(t for t in model.graph.initializer if t.name == "W1")
    entries = {"location": location, "offset": "0", "length": "48"}
    entries.update(extra or {})
    for key in drop:
        entries.pop(key, None)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


def external_cases(c: Corpus) -> None:
    """External data that points anywhere but a plain file inside the model directory."""
    g = "2-external"
    w1_bytes = np.full((4, 3), 0.5, np.float32).tobytes()

    def case(name: str, expect: str, model, match: str = "", canaries=(), setup=None, note=""):
        """``model`` and ``setup`` may take the case's canary paths (x, secret) to point at them."""
        # cases/<name>/x is where '../x' and 'a/../../x' lead from the model directory;
        # cases/<name>/outside/secret.bin is the target of absolute paths, symlinks and hard links.
        x = c.canary(name, "x", w1_bytes)
        secret = c.canary(name, "outside/secret.bin", w1_bytes)
        directory = c.dir(name)
        if setup is not None:
            setup(directory, secret) if setup.__code__.co_argcount == 2 else setup(directory)
        model = model(secret) if callable(model) else model
        (directory / "model.onnx").write_bytes(_bytes(model))
        watched = {"x": c.rel(x), "secret": c.rel(secret)}
        kept = Case(
            name,
            expect,
            path=c.rel(directory / "model.onnx"),
            match=match,
            group=g,
            canaries=[watched[k] for k in canaries],
            note=note,
            check=dict(REFERENCE_CHECK) if expect == "ok" else {},
        )
        c.cases.append(kept)

    def data_file(directory: Path, name: str = "weights.bin", payload: bytes = w1_bytes) -> None:
        (directory / name).write_bytes(payload)

    case("ext_valid", "ok", _external_model("weights.bin"), setup=data_file, note="positive control")
    case("ext_valid_dot_slash", "ok", _external_model("./weights.bin"), setup=data_file)
    case(
        "ext_valid_offset",
        "ok",
        _external_model("weights.bin", {"offset": "16"}),
        setup=lambda d: data_file(d, payload=bytes(16) + w1_bytes),
    )
    case(
        "ext_valid_subdir",
        "ok",
        _external_model("data/weights.bin"),
        setup=lambda d: ((d / "data").mkdir(), data_file(d / "data")),
    )
    case("ext_dotdot", "error", _external_model("../x"), r"'\.\.'", ["x"])
    case("ext_a_dotdot", "error", _external_model("a/../../x"), r"'\.\.'", ["x"], setup=lambda d: (d / "a").mkdir())
    case("ext_backslash_dotdot", "error", _external_model("..\\x"), r"'\.\.'", ["x"])
    case("ext_absolute", "error", lambda secret: _external_model(str(secret)), r"absolute", ["secret"])
    case(
        "ext_absolute_dotdot",
        "error",
        lambda secret: _external_model("/../" + str(secret)),
        r"absolute|'\.\.'",
        ["secret"],
    )
    case("ext_drive_letter", "error", _external_model("C:\\weights.bin"), r"absolute")
    case(
        "ext_symlink_file",
        "error",
        _external_model("weights.bin"),
        r"symbolic link",
        ["secret"],
        setup=lambda d, secret: os.symlink(os.path.relpath(secret, d), d / "weights.bin"),
    )
    case(
        "ext_symlink_parent_dir",
        "error",
        _external_model("sub/secret.bin"),
        r"symbolic link",
        ["secret"],
        setup=lambda d, secret: os.symlink(os.path.relpath(secret.parent, d), d / "sub"),
    )
    _hardlink_case(case)
    case(
        "ext_fifo",
        "error",
        _external_model("weights.bin"),
        r"not a regular file",
        setup=lambda d: os.mkfifo(d / "weights.bin"),
        note="must not block",
    )
    case(
        "ext_directory",
        "error",
        _external_model("weights.bin"),
        r"not a regular file",
        setup=lambda d: (d / "weights.bin").mkdir(),
    )
    case("ext_missing", "error", _external_model("weights.bin"), r"does not exist")
    case("ext_empty_location", "error", _external_model(""), r"empty|malformed")
    case("ext_nul_in_location", "error", _external_model("weights.bin\x00../../x"), r"malformed|empty")
    case(
        "ext_no_location", "error", _external_model("weights.bin", drop=("location",)), r"no location", setup=data_file
    )
    for key, value in (
        ("offset", "-4"),
        ("offset", "abc"),
        ("offset", "99999999999999999999999"),
        ("offset", "1e3"),
        ("offset", " 4"),
        ("length", "-48"),
        ("length", "forty"),
        ("length", "184467440737095516160"),
    ):
        label = {
            "-4": "negative",
            "-48": "negative",
            "abc": "nonnumeric",
            "forty": "nonnumeric",
            "1e3": "float",
            " 4": "space",
        }.get(value, "huge")
        case(
            f"ext_{label}_{key}",
            "error",
            _external_model("weights.bin", {key: value}),
            rf"{key} must be a non-negative integer",
            setup=data_file,
        )
    case(
        "ext_huge_offset_in_range",
        "error",
        _external_model("weights.bin", {"offset": str(2**62)}),
        r"shorter than|exceeds",
        setup=data_file,
    )
    case(
        "ext_length_mismatch",
        "error",
        _external_model("weights.bin", {"length": "40"}),
        r"does not match",
        setup=data_file,
    )
    case(
        "ext_unknown_key",
        "error",
        _external_model("weights.bin", {"evil": "1"}),
        r"unknown external data key",
        setup=data_file,
    )
    case(
        "ext_repeated_location",
        "error",
        _repeated_location(),
        r"given twice",
        ["x"],
        setup=data_file,
        note="location given twice: which one a reader takes must not matter",
    )
    case(
        "ext_short_file",
        "error",
        _external_model("weights.bin"),
        r"shorter than",
        setup=lambda d: data_file(d, payload=w1_bytes[:20]),
    )
    case(
        "ext_short_file_offset",
        "error",
        _external_model("weights.bin", {"offset": "8"}),
        r"shorter than",
        setup=data_file,
    )
    case("ext_huge_dims", "error", _external_huge_dims(), r"limit|exceeds|does not match", setup=data_file)
    case("ext_in_subgraph_dotdot", "error", _external_in_subgraph("../x"), r"'\.\.'", ["x"])
    case("ext_in_function_dotdot", "error", _external_in_function("../x"), r"'\.\.'", ["x"])


def _hardlink_case(case) -> None:
    def setup(d: Path, secret: Path) -> None:
        os.link(secret, d / "weights.bin")

    try:
        case("ext_hardlink", "error", _external_model("weights.bin"), r"hard link", ["secret"], setup=setup)
    except OSError:  # a file system without hard links: nothing to test
        pass


def _repeated_location() -> onnx.ModelProto:
    model = _external_model("weights.bin")
    tensor = next(t for t in model.graph.initializer if t.name == "W1")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../x"
    return model


def _external_huge_dims() -> onnx.ModelProto:
    model = _external_model("weights.bin", drop=("length",))
    tensor = next(t for t in model.graph.initializer if t.name == "W1")
    tensor.dims[:] = [2**31, 2**31]
    return model


def _external_in_subgraph(location: str) -> onnx.ModelProto:
    """An If whose then-branch holds a Constant with external data (refused at load time)."""
    model = reference_model()
    value = onnx.TensorProto(name="ext", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, val in (("location", location), ("length", "16")):
        entry = value.external_data.add()
        entry.key, entry.value = key, val
    out = helper.make_tensor_value_info("k", TensorProto.FLOAT, [4])
    branch = helper.make_graph([helper.make_node("Constant", [], ["k"], value=value)], "b", [], [out])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch))
    return model


def _external_in_function(location: str) -> onnx.ModelProto:
    """A model-local function whose Constant node has external data."""
    model = reference_model()
    value = onnx.TensorProto(name="ext", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, val in (("location", location), ("length", "16")):
        entry = value.external_data.add()
        entry.key, entry.value = key, val
    function = helper.make_function(
        "local",
        "Evil",
        [],
        ["k"],
        [helper.make_node("Constant", [], ["k"], value=value)],
        [helper.make_opsetid("", OPSET)],
    )
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("Evil", [], ["unused"], domain="local"))
    return model


# --------------------------------------------------------------------------- entry point


def build(root: Path) -> list[Case]:
    """Write every case under ``root`` and ``root/manifest.json``; return the cases."""
    corpus = Corpus(Path(root))
    for maker in (file_cases, protobuf_cases, graph_cases, external_cases):
        maker(corpus)
    manifest = {
        "reference_check": REFERENCE_CHECK,
        "cases": [asdict(case) for case in corpus.cases],
    }
    (corpus.root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return corpus.cases


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cases = build(Path(argv[1]))
    errors = sum(1 for case in cases if case.expect == "error")
    print(f"{len(cases)} cases ({errors} error, {len(cases) - errors} ok) written to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
