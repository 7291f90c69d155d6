"""Bad input gives exit 2 and exactly one line on stderr, never a traceback (README "Exit codes").

Every test runs the real ``robaudit`` command as a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, cli_json, dense_chain, make_model, run_cli, run_in_process
from onnx import TensorProto, helper, numpy_helper

import robaudit

pytestmark = pytest.mark.cli


def assert_one_line_error(proc, *fragments: str) -> str:
    """Exit 2, one ``robaudit: ...`` line on stderr naming the problem, nothing on stdout."""
    shown = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 2, shown
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, shown
    line = proc.stderr.strip()
    assert line.startswith("robaudit: "), shown
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, shown
    assert proc.stdout == "", shown
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in the message\n{shown}"
    return line


def bad(*args, fragments=()):
    """Run a command that must fail with exit 2 and a one-line message (in this process: the error
    line and exit code are ``robaudit.cli.main``'s; test_version_and_help runs the real command)."""
    return assert_one_line_error(run_in_process(*args, expect=None), *fragments)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    """A 4-3-3-2 ReLU chain (two hidden layers of 3 neurons)."""
    return dense_chain([4, 3, 3, 2], ["relu", "relu"]).save(tmp_path_factory.mktemp("mlp"))


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("command", ["inspect", "bound"])
def test_missing_file(command, tmp_path):
    bad(command, tmp_path / "nope.onnx", fragments=("nope.onnx", "does not exist"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    bad("bound", path, fragments=("empty",))


def test_directory(tmp_path):
    bad("bound", tmp_path, fragments=("directory",))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(seed, tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(1000 + 997 * seed))
    bad("bound", path, fragments=("random.onnx",))


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("sample", ["paper_mlp_sigmoid.onnx", "lenet.onnx"])
def test_truncated_model(sample, fraction, tmp_path):
    data = (SAMPLES / sample).read_bytes()
    path = tmp_path / sample
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    bad("bound", path, fragments=(sample,))


def test_truncated_by_one_byte(tmp_path):
    data = (SAMPLES / "paper_mlp_sigmoid.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:-1])
    bad("bound", path, fragments=("cut.onnx",))


@pytest.mark.parametrize(
    "text",
    [
        "<!DOCTYPE html><html><head><title>model.onnx</title></head><body>Not found</body></html>",
        "\n  <html lang='en'><body><a href='model.onnx'>download</a></body></html>\n",
    ],
)
def test_html_renamed_to_onnx(text, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text(text)
    bad("bound", path, fragments=("model.onnx", "html"))


# --------------------------------------------------------------------------- external data


def external_model(directory: Path, location: str) -> Path:
    """A dense chain whose tensors all point to external data at ``location``."""
    chain = dense_chain([4, 3, 3, 2], ["relu", "relu"])
    model = chain.model
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    return path


def test_external_data_inside_the_directory_loads(tmp_path):
    path = external_model(tmp_path, "w.data")
    report = cli_json("bound", path, "--crash", "1")
    assert [la["neurons"] for la in report["layers"]] == [3, 3]


def test_external_data_dotdot(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    path = external_model(inner, "w.data")
    os.replace(inner / "w.data", tmp_path / "x")  # the data really is at ../x
    external_model(inner, "../x")
    bad("bound", path, fragments=("../x", ".."))


def test_external_data_absolute_path(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    path = external_model(inner, "w.data")
    target = (tmp_path / "abs.data").resolve()
    os.replace(inner / "w.data", target)
    external_model(inner, str(target))
    bad("bound", path, fragments=("absolute",))


def test_external_data_symlink_leaving_the_directory(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    path = external_model(inner, "w.data")
    outside = tmp_path / "outside.data"
    os.replace(inner / "w.data", outside)
    os.symlink(outside, inner / "w.data")  # same name, but a link to a file outside
    bad("bound", path, fragments=("w.data", "symbolic link"))


def test_external_data_missing(tmp_path):
    path = external_model(tmp_path, "w.data")
    (tmp_path / "w.data").unlink()
    bad("bound", path, fragments=("w.data", "does not exist"))


def test_external_data_too_short(tmp_path):
    path = external_model(tmp_path, "w.data")
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:10])
    bad("bound", path, fragments=("w.data",))


# --------------------------------------------------------------------------- graphs


def chain_with(middle: list[onnx.NodeProto], extra_inits=(), name: str = "g") -> onnx.ModelProto:
    """x[N,4] → Gemm fc1 → Relu → (middle: reads 'h1', writes 'm') → Gemm fc2 → y[N,2]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(-1, 1, (3, 4)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.uniform(-1, 1, (2, 3)).astype(np.float32), "W2"),
        *extra_inits,
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["p1"], name="fc1", transB=1),
        helper.make_node("Relu", ["p1"], ["h1"], name="relu1"),
        *middle,
        helper.make_node("Gemm", ["m", "W2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return make_model(graph)


def test_unsupported_op_sign(tmp_path):
    model = chain_with([helper.make_node("Sign", ["h1"], ["m"], name="the_sign")])
    onnx.save(model, str(tmp_path / "sign.onnx"))
    bad("bound", tmp_path / "sign.onnx", fragments=("'Sign'", "'the_sign'"))


def test_layernorm_without_a_positive_deviation_bound_is_refused(tmp_path):
    # after a ReLU every element may be 0 at once: with ε = 0 nothing bounds σ away from 0
    scale = numpy_helper.from_array(np.ones(3, np.float32), "ln_scale")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "ln_bias")
    node = helper.make_node(
        "LayerNormalization", ["h1", "ln_scale", "ln_bias"], ["m"], name="ln1", axis=-1, epsilon=0.0
    )
    onnx.save(chain_with([node], [scale, bias]), str(tmp_path / "ln.onnx"))
    for command in ("inspect", "bound"):
        bad(command, tmp_path / "ln.onnx", fragments=("'LayerNormalization'", "'ln1'", "standard deviation"))


def test_unsupported_op_thresholded_relu(tmp_path):
    model = chain_with([helper.make_node("ThresholdedRelu", ["h1"], ["m"], name="thr", alpha=0.5)])
    onnx.save(model, str(tmp_path / "thr.onnx"))
    bad("bound", tmp_path / "thr.onnx", fragments=("'ThresholdedRelu'", "'thr'"))


def _const(array, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def mismatched_model(kind: str) -> onnx.ModelProto:
    """Models whose tensor shapes do not fit together (onnx.checker does not look at shapes)."""
    relu_fc2 = [
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
    ]
    if kind == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="bad_node"), *relu_fc2]
        inits, shape = [_const(np.ones((3, 2)), "W"), _const(np.ones((2, 2)), "W2")], ["N", 4]
    elif kind == "bias":
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["h0"], name="fc1"),
            helper.make_node("Add", ["h0", "b"], ["h"], name="bad_node"),
            *relu_fc2,
        ]
        inits = [_const(np.ones((4, 3)), "W"), _const(np.ones(5), "b"), _const(np.ones((3, 2)), "W2")]
        shape = ["N", 4]
    else:  # conv: 3 input channels expected, 1 given
        nodes = [
            helper.make_node("Conv", ["x", "K"], ["h"], name="bad_node"),
            helper.make_node("Relu", ["h"], ["r0"], name="relu"),
            helper.make_node("Flatten", ["r0"], ["r"], name="flatten"),
            helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
        ]
        inits, shape = [_const(np.ones((2, 3, 3, 3)), "K"), _const(np.ones((72, 2)), "W2")], ["N", 1, 8, 8]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return make_model(graph)


@pytest.mark.parametrize("kind", ["gemm", "bias", "conv"])
def test_incompatible_shapes(kind, tmp_path):
    onnx.save(mismatched_model(kind), str(tmp_path / "bad.onnx"))
    bad("bound", tmp_path / "bad.onnx", fragments=("'bad_node'", "shape"))


def test_residual_graph_is_supported(tmp_path):
    """Residual graphs are supported (docs/method.md §3.2): h1 + relu(fc1b(h1)) feeds the output layer."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.uniform(-1, 1, (3, 3)).astype(np.float32), "W1b")
    middle = [
        helper.make_node("Gemm", ["h1", "W1b"], ["p1b"], name="fc1b", transB=1),
        helper.make_node("Relu", ["p1b"], ["h1b"], name="relu1b"),
        helper.make_node("Add", ["h1", "h1b"], ["m"], name="residual"),
    ]
    onnx.save(chain_with(middle, [w]), str(tmp_path / "res.onnx"))
    report = cli_json("bound", tmp_path / "res.onnx", "--crash", "1")
    assert [la["name"] for la in report["layers"]] == ["fc1", "fc1b"]
    assert 0 < report["fep_tight"] <= report["fep_paper"]
    inspect = cli_json("inspect", tmp_path / "res.onnx")
    assert inspect["is_chain"] is False and [b["op_type"] for b in inspect["branches"]] == ["Add"]


def symbolic_models(directory: Path) -> tuple[Path, Path]:
    """A dense model with input [N, 'features'] and a CNN with input [N, 1, 'H', 'W']."""
    dense = dense_chain([4, 3, 2], ["relu"]).model
    dense.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    dense_path = directory / "sym_dense.onnx"
    onnx.save(dense, str(dense_path))
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.uniform(-1, 1, (2, 1, 3, 3)).astype(np.float32), "K"),
        numpy_helper.from_array(rng.uniform(-1, 1, (2, 3)).astype(np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "K"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "sym_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    cnn_path = directory / "sym_cnn.onnx"
    onnx.save(make_model(graph), str(cnn_path))
    return dense_path, cnn_path


def test_symbolic_dims_need_input_shape(tmp_path):
    dense, cnn = symbolic_models(tmp_path)
    bad("bound", dense, fragments=("features", "--input-shape"))
    bad("inspect", cnn, fragments=("--input-shape",))
    report = cli_json("bound", dense, "--input-shape", "4", "--crash", "1")
    assert report["settings"]["input_shape"] == [1, 4] and report["layers"][0]["neurons"] == 3
    report = cli_json("bound", cnn, "--input-shape", "1,8,8", "--crash", "1")
    assert report["settings"]["input_shape"] == [1, 1, 8, 8] and report["layers"][0]["neurons"] == 2 * 8 * 8
    report = cli_json("bound", cnn, "--input-shape", "1,1,5,7", "--crash", "1")
    assert report["layers"][0]["neurons"] == 2 * 5 * 7


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [("0,8,8", "positive"), ("a,b", "--input-shape"), ("1,8", "rank"), ("2,8,8", "axis 1")],
)
def test_bad_input_shape(shape, fragment, tmp_path):
    _, cnn = symbolic_models(tmp_path)
    bad("bound", cnn, "--input-shape", shape, fragments=(fragment,))


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--epsilon", "0"], ("--epsilon",)),
        (["--epsilon=-1"], ("--epsilon",)),
        (["--epsilon", "nan"], ("--epsilon",)),
        (["--epsilon", "inf"], ("--epsilon",)),
        (["--crash=-1"], ("--crash",)),
        (["--crash", "1,-2"], ("--crash",)),
        (["--crash", "x"], ("--crash",)),
        (["--crash", "4"], ("4", "3 neurons")),
        (["--crash", "1,5"], ("5", "fc2")),
        (["--crash", "1,1,1"], ("3 counts", "2 hidden layers")),
        (["--byzantine", "1"], ("--capacity",)),
        (["--byzantine", "1", "--capacity", "0"], ("--capacity",)),
        (["--byzantine", "1", "--capacity=-2"], ("--capacity",)),
        (["--byzantine", "1", "--failure-range", "2,1"], ("--failure-range",)),
        (["--byzantine", "1", "--failure-range", "1"], ("--failure-range",)),
        (["--crash", "1", "--capacity", "1"], ("byzantine",)),
        (["--crash", "1", "--byzantine", "1"], ("--crash", "--byzantine")),
        (["--input-range", "1,0"], ("--input-range",)),
        (["--input-range", "a,b"], ("--input-range",)),
        (["--input-range", "0"], ("--input-range",)),
        (["--input-range", "0,1,2"], ("--input-range",)),
        (["--input-range", "nan,1"], ("--input-range",)),
        (["--input-range", "0,inf"], ("--input-range",)),
        (["--activation-bound", "0"], ("--activation-bound",)),
        (["--activation-bound=-1"], ("--activation-bound",)),
        (["--method", "magic"], ("--method",)),
        (["--mode", "sleepy"], ("--mode",)),
        (["--synapse=-1"], ("--synapse",)),
        (["--synapse", "13"], ("--synapse", "12 synapses")),
        (["--output", "no_such_tensor"], ("no_such_tensor",)),
        (["--output", "report.txt.yaml", "--report", "r.json"], ("once",)),
        (["--no-such-flag"], ("--no-such-flag",)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_nonsense_flags(mlp, flags, fragments):
    bad("bound", mlp, *flags, fragments=fragments)


def test_unknown_command_and_missing_argument():
    bad("frobnicate", fragments=("frobnicate",))
    bad("bound", fragments=("model",))


def test_report_file_with_unknown_suffix(mlp, tmp_path):
    bad("bound", mlp, "--report", tmp_path / "r.txt", fragments=(".txt",))


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.stdout.strip() == f"robaudit {robaudit.__version__}", proc.stdout
    for args in (["--help"], ["bound", "--help"], ["inspect", "--help"]):
        proc = run_cli(*args)
        assert "Usage" in proc.stdout and proc.stderr == "", proc.stdout
    assert "--epsilon" in run_cli("bound", "--help").stdout
    proc = run_cli(expect=None)  # no arguments: the help, not a traceback
    assert "Usage" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_version_matches_the_distribution():
    """The literal ``__version__`` (no importlib.metadata at start-up) is pyproject's and the installed one."""
    import importlib.metadata
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert robaudit.__version__ == project["version"] == importlib.metadata.version("robaudit")


def test_help_lists_every_command():
    listed = run_cli("--help").stdout
    for command in ("inspect", "bound", "inject", "check", "precision", "wait", "design"):
        assert command in listed, listed


def test_bound_imports_neither_injection_gate_applications_nor_yaml():
    """``bound`` loads only what it needs (start-up time counts against the speed target of README "Speed")."""
    code = (
        "import sys; from robaudit.cli import main; "
        f"code = main(['bound', {str(SAMPLES / 'paper_mlp_sigmoid.onnx')!r}, '--format', 'json']); "
        "print('MODULES', *sorted(sys.modules), code)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = proc.stdout.splitlines()[-1]
    assert line.startswith("MODULES") and line.endswith(" 0"), proc.stdout + proc.stderr
    modules = set(line.split()[1:-1])
    assert "robaudit.bounds.audit" in modules and "robaudit.formats.bound" in modules
    for heavy in ("robaudit.injection", "robaudit.gate", "robaudit.applications", "yaml", "pydantic"):
        assert heavy not in modules, heavy


@pytest.mark.parametrize(
    "args",
    [
        ["inject", "-q"],
        ["bound", "--empirical"],
        ["wait", "--check"],
        ["precision", "--check"],
    ],
)
def test_negative_seed_is_a_usage_error(mlp, args):
    bad(args[0], mlp, *args[1:], "--seed", "-1", fragments=("--seed", "-1"))


def test_layer_names_that_look_like_indices_win(tmp_path):
    """nn.Sequential names its layers "0", "1", ...: --layer 1 and --require-layer 1=N mean the layer named 1."""
    model = dense_chain([4, 3, 3, 2], ["relu", "relu"]).model
    gemms = [node for node in model.graph.node if node.op_type == "Gemm"]
    for position, node in enumerate(gemms):
        node.name = f"/{position}/Gemm"
    path = tmp_path / "sequential.onnx"
    path.write_bytes(model.SerializeToString())
    names = [la["name"] for la in cli_json("bound", path, "--crash", "1")["layers"]]
    assert names == ["0", "1"], names
    report = cli_json("inject", path, "--layer", "1", "--crash", "1", "--samples", "4", "-q")
    assert report["failures"] == [0, 1], report["failures"]
    check = cli_json("check", path, "--epsilon", "100", "--require-layer", "1=1")
    (requirement,) = check["models"][0]["requirements"]
    assert requirement["key"] == "require.layers.1" and "layer '1'" in requirement["detail"], requirement


# --------------------------------------------------------------------------- Ctrl-C

_INTERRUPT_WHILE_IMPORTING = """
import os, signal, sys, time

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            if {signal!r}:  # a terminal's Ctrl-C: a real SIGINT, then a while for it to land
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.3)
            else:
                raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["robaudit", "bound", {model!r}]
import robaudit.console as console
release = console.release_interrupts

def announced():
    print("released", flush=True)
    release()

console.release_interrupts = announced
console.run()
"""


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before Python starts: SIGINT's default action (a test run in the background — CI steps,
    ``make test &`` — inherits it ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("real_signal", [True, False], ids=["SIGINT", "KeyboardInterrupt"])
@pytest.mark.parametrize("module", ["robaudit.cli", "typer", "robaudit.cli.commands", "numpy"])
def test_ctrl_c_while_the_command_line_loads_is_one_line_exit_130(module, real_signal):
    """A Ctrl-C in the first second (Typer, numpy, the command's module being imported) printed a
    KeyboardInterrupt traceback, or was lost in an import callback: the console script loads the command line
    with SIGINT blocked, inside its handler, and the waiting Ctrl-C stops the command before it runs."""
    code = _INTERRUPT_WHILE_IMPORTING.format(module=module, model=str(SAMPLES / "lenet.onnx"), signal=real_signal)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=_ctrl_c_as_in_a_terminal)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "robaudit: interrupted\n"
    # the signal waited until the command line was loaded; a KeyboardInterrupt raised by the import itself cannot
    assert proc.stdout == ("released\n" if real_signal else "")


def test_ctrl_c_in_a_command_says_so(monkeypatch):
    """Typer turns a Ctrl-C in a command into exit code 130 without a word; robaudit says 'interrupted'."""
    import robaudit.cli.commands as commands  # the module of `bound` (it holds its own name for bound_network)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "bound_network", interrupted)
    proc = run_in_process("bound", SAMPLES / "lenet.onnx", expect=130)
    assert proc.stderr == "robaudit: interrupted\n"


def test_an_overflowing_input_range_is_one_line_without_numpy_warnings():
    """--input-range 0,1e308 overflows the first layer's interval: the error line came after four numpy
    RuntimeWarnings with robaudit's source lines."""
    proc = run_cli("bound", SAMPLES / "digits_mlp.onnx", "--input-range", "0,1e308", expect=2)
    assert_one_line_error(proc, "NaN or infinite values", "--input-range")


# --------------------------------------------------------------------------- options that would be ignored


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("inject", "{mlp}", "--inputs", "{x}", "--samples", "5"), "drop one of them"),
        (("bound", "{mlp}", "--inputs", "{x}", "--samples", "5"), "drop one of them"),
        (("bound", "{mlp}", "--samples", "5"), "add --empirical"),
        (("precision", "{mlp}", "--samples", "5"), "add --check"),
        (("wait", "{mlp}", "--samples", "5", "--inputs", "{x}"), "drop one of them"),
        (("inject", "{mlp}", "--replay", "{x}", "--samples", "5"), "drop --samples"),
    ],
)
def test_samples_that_would_be_ignored(args, fragment, mlp, tmp_path):
    """--samples draws inputs only without --inputs and only when something is measured: it used to be dropped
    without a word beside --inputs (a new-user trial), and beside a bound that measures nothing."""
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((3, 4), dtype=np.float32))
    bad(*(arg.format(mlp=mlp, x=x) for arg in args), fragments=("--samples", fragment))


def test_samples_at_their_default_are_not_refused(mlp, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.full((3, 4), 0.5, dtype=np.float32))
    report = cli_json("inject", mlp, "--inputs", x, "--crash", "1", "--trials", "5", "-q")
    assert report["inputs"]["count"] == 3  # the file's inputs, not --samples' default 64


def test_a_fixed_batch_above_one_is_named_with_the_export_that_fixes_it(tmp_path):
    """torch's dynamo exporter given an example batch of 2 and no dynamic shapes writes x [2, 4] and a Reshape to
    [2, 4]; robaudit reads one sample, the Reshape fails, and the line now says why and how to export instead (a
    new-user trial following the README's "example batch ≥ 2" got only the Reshape's shapes)."""
    shape = numpy_helper.from_array(np.array([2, 4], np.int64), "shape")
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="node_view"),
             helper.make_node("Gemm", ["r", "w"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [shape, w])
    path = tmp_path / "fixed.onnx"
    path.write_bytes(make_model(graph).SerializeToString())
    bad("inspect", path, fragments=("'node_view' (Reshape)", "input 'x' is declared with a fixed batch of 2",
                                    "dynamic_axes={'x': {0: 'batch'}}"))


def test_samples_beyond_the_inputs_limit_are_refused_by_name(mlp):
    """--samples 10⁹ of 4 values would take 45 GiB: refused naming the count and the limit, before anything is drawn
    (a trial saw "the model is too large or too deep to analyse (MemoryError)" for it)."""
    bad("inject", mlp, "--samples", "1000000000", fragments=("--samples 1000000000", "ROBAUDIT_MAX_INPUTS_BYTES"))


def test_an_option_without_its_value_points_to_the_commands_help(mlp):
    """Click raises an option's missing value without the subcommand's context: the line named 'robaudit
    --help' (a new-user trial's finding), not the command whose option it is."""
    bad("bound", mlp, "--crash", fragments=("'--crash' requires an argument", "see 'robaudit bound --help'"))


def test_replay_of_a_binary_file_says_it_is_not_a_report(mlp, tmp_path):
    """An .npz given to --replay (the inputs instead of the report) gave Python's "'utf-8' codec can't decode"."""
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((2, 4), np.float32))
    bad("inject", mlp, "--replay", inputs, fragments=("--replay", "is not a YAML or JSON report"))


def test_one_input_is_counted_in_the_singular(mlp, tmp_path):
    inputs = tmp_path / "one.npy"
    np.save(inputs, np.zeros((1, 4), np.float32))
    shown = run_cli("inject", mlp, "--crash", "1", "--inputs", inputs).stdout
    assert "(1 input)" in shown and "(1 inputs)" not in shown, shown


def test_check_output_given_a_tensor_name_points_to_output_tensor():
    """check's --output is its report file; a suffix-less name (a tensor, as bound --output takes it) gets the flag
    that names a tensor (a new-user trial's finding)."""
    from conftest import SAMPLES, run_in_process

    proc = run_in_process("check", SAMPLES / "lenet.onnx", "-e", "300", "--require-crash", "1", "--output", "logits",
                          expect=2)
    assert_one_line_error(proc, "cannot tell the format", "--output-tensor logits")
