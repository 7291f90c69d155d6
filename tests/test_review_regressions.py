"""Regressions found by the end-to-end review of robaudit on fresh PyTorch / scikit-learn exports.

Every test runs the real ``robaudit`` command as a subprocess and compares with numbers
computed by hand from the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from conftest import cli_json, dense_chain, describe, make_model, run_in_process
from onnx import TensorProto, helper, numpy_helper

# x [1, 2] → MatMul W1 → Mul by a *Constant node* vector c → Relu → Reshape (shape from a
# *Constant node*) → MatMul W2 → y.  PyTorch's legacy exporter writes exactly such
# multi-element ``Constant`` nodes (e.g. ``view`` shapes, ``nn.Upsample`` scales).
W1 = np.array([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0]], np.float32)  # [in, out]
C = np.array([3.0, 0.5, 2.0], np.float32)
W2 = np.array([[1.0, 0.5], [2.0, -1.0], [0.25, 4.0]], np.float32)  # [in, out]


def _constant_node_model(directory: Path) -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Constant", [], ["scale"], name="scale_const", value=numpy_helper.from_array(C, "scale")),
        helper.make_node("Mul", ["h0", "scale"], ["h1"], name="scale_mul"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node(
            "Constant", [], ["shape"], name="shape_const", value=numpy_helper.from_array(np.array([1, 3], np.int64))
        ),
        helper.make_node("Reshape", ["h2", "shape"], ["h3"], name="reshape"),
        helper.make_node("MatMul", ["h3", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_nodes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")],
    )
    path = directory / "constant_nodes.onnx"
    onnx.save(make_model(graph), path)
    return path


def test_multi_element_constant_nodes_are_folded_not_an_internal_error(tmp_path):
    """Multi-element ``Constant`` nodes used to crash folding (``array == "<subgraph>"``)."""
    model = _constant_node_model(tmp_path)
    proc = run_in_process("inspect", model)
    assert "internal error" not in proc.stderr, describe(proc)

    report = cli_json("bound", model, "--crash", "1", "--epsilon", "100")
    layer = report["layers"][0]
    effective = W1 * C  # the constant Mul folds into the layer: column j scaled by c_j
    assert np.isclose(layer["max_weight"], np.abs(effective).max()), report
    # ReLU crash: δ_j = upper end of neuron j's pre-activation over x ∈ [0, 1]^2.
    delta = np.clip(effective, 0, None).sum(axis=0)
    assert np.isclose(layer["delta"], delta.max()), report
    # Tight bound for one crash: max over outputs k and neurons i of |W2[i, k]|·δ_i.
    assert np.isclose(report["fep_tight"], (np.abs(W2) * delta[:, None]).max()), report


def test_bound_table_names_the_failed_synapses(tmp_path):
    """``bound --synapse N`` used to print ``Fep for failures [0]: …`` with no word of the synapses."""
    model = dense_chain([3, 4, 2], ["relu"], const_weight=0.5).save(tmp_path)
    proc = run_in_process("bound", model, "--crash", "0", "--synapse", "1", "--epsilon", "100")
    fep_lines = [line for line in proc.stdout.splitlines() if line.startswith("Fep for failures")]
    assert len(fep_lines) == 1 and "synapses [1]" in fep_lines[0], describe(proc)
    report = cli_json("bound", model, "--crash", "0", "--synapse", "1", "--epsilon", "100")
    assert report["failures"] == [0] and report["layers"][0]["synapses"] == 1, report
    assert report["fep"] > 0, report  # the synapses alone move the output: "[0]" alone would read as "no failure"

    proc = run_in_process("bound", model, "--synapse", "1", "--epsilon", "100")
    assert "failed synapses per hidden layer: [1]" in proc.stdout, describe(proc)


SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "paper_mlp_sigmoid.onnx"


def test_capacity_and_failure_range_together_are_refused():
    proc = run_in_process("bound", SAMPLE, "--byzantine", "1", "--capacity", "1", "--failure-range", "0,1", expect=2)
    assert "either --capacity" in proc.stderr and proc.stderr.count("\n") == 1, describe(proc)


def test_design_write_refuses_to_overwrite_the_model(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(SAMPLE.read_bytes())
    proc = run_in_process("design", model, "-e", "0.5", "--tolerate", "1", "--write", model, expect=2)
    assert "model being read" in proc.stderr, describe(proc)
    assert model.read_bytes() == SAMPLE.read_bytes()


def test_plot_and_write_into_a_missing_folder_fail_before_the_work(tmp_path):
    proc = run_in_process("bound", SAMPLE, "--plot", tmp_path / "nodir" / "x.png", expect=2)
    assert proc.stdout == "" and "does not exist" in proc.stderr, describe(proc)
    proc = run_in_process("design", SAMPLE, "-e", "0.5", "--tolerate", "1", "--write", tmp_path / "nodir" / "x.onnx",
                          expect=2)
    assert proc.stdout == "" and "does not exist" in proc.stderr, describe(proc)


def test_inspect_reports_delta_and_max_failures_like_bound():
    """README "Reports": every report's layers carry delta and max_failures; inspect's agree with bound's."""
    inspected = cli_json("inspect", SAMPLE, "--epsilon", "0.5")
    bounded = cli_json("bound", SAMPLE, "--epsilon", "0.5")
    hidden = [la for la in inspected["layers"] if not la["is_output"]]
    assert inspected["settings"]["epsilon"] == 0.5
    assert [(la["name"], la["delta"], la["max_failures"]) for la in hidden] == [
        (la["name"], la["delta"], la["max_failures"]) for la in bounded["layers"]
    ]


def test_sklearn_binary_classifier_output_layer_is_the_last_dense_layer(tmp_path):
    """skl2onnx writes a binary classifier's probabilities as Concat([1 − p, p]): that is the
    ∞-norm tail (factor 1), so the sigmoid layer producing p is the output layer, not a
    hidden layer whose single neuron could 'fail'."""
    sklearn = __import__("pytest").importorskip("sklearn.neural_network")
    skl2onnx = __import__("pytest").importorskip("skl2onnx")
    rng = np.random.default_rng(0)
    x = rng.random((200, 4)).astype(np.float32)
    labels = (x.sum(axis=1) > 2).astype(int)
    clf = sklearn.MLPClassifier((6,), activation="logistic", max_iter=300, random_state=0).fit(x, labels)
    path = tmp_path / "binary.onnx"
    path.write_bytes(skl2onnx.to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17).SerializeToString())
    report = cli_json("bound", path, "--crash", "1", "--epsilon", "0.5", "--method", "paper")
    assert [la["neurons"] for la in report["layers"]] == [6], report["layers"]
    # Paper bound by hand: sigmoid hidden layer (δ = 1, K = ¼), output sigmoid (K = ¼).
    w_out = np.abs(clf.coefs_[1]).max()
    assert np.isclose(report["fep"], 0.25 * w_out * 1.0)
    measured = cli_json("inject", path, "--crash", "1", "--search", "worst", "--method", "paper", "-q")
    assert measured["measured"]["max"] <= report["fep"] * (1 + 1e-5) + 1e-6


def test_an_error_above_max_error_but_within_epsilon_is_not_called_not_robust() -> None:
    """check's empirical verdict: 27.97 above max_error 20 fails the policy, but with ε = 120 the model is not
    shown to be non-ε-robust (a new-user trial read "not ε-robust" there)."""
    from robaudit.gate.empirical import EmpiricalOutcome
    from robaudit.gate.gate import empirical_verdicts

    def detail(measured: float, allowed: float, epsilon: float) -> str:
        outcome = EmpiricalOutcome(
            (1, 1), measured, allowed, epsilon, 200.0, False, None, None, "x.npz", "worst", 10
        )
        verdict = empirical_verdicts(outcome, "crash")[0]
        assert verdict.status == "fail"
        return verdict.detail

    assert "exceeds max_error = 20" in detail(27.97, 20.0, 120.0)
    assert "not ε-robust" not in detail(27.97, 20.0, 120.0)
    assert "exceeds ε = 5: not ε-robust" in detail(7.0, 5.0, 5.0)
    assert "exceeds max_error = 3: not ε-robust" in detail(7.0, 3.0, 5.0)


def test_an_overflowing_paper_recursion_is_inf_without_a_numpy_warning() -> None:
    """A LayerNorm model's paper recursion passed float64's range and printed numpy's RuntimeWarning on stderr
    (new-user trial, harden --per-channel): the bound is +inf, reported as unbounded, silently."""
    import warnings

    import numpy as np

    from robaudit.bounds.fep import paper_layer_error

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert paper_layer_error(np.float64(1e300), 1, np.float64(1.0), 10, 10, 1.0, 1e300) == float("inf")


def test_help_names_what_each_output_flag_takes_and_every_command_takes_q(tmp_path) -> None:
    """harden's -o is the .onnx copy and merge writes YAML/JSON only (their help said FILE.yaml|FILE.json|TENSOR
    and table|yaml|json); check, precision, wait and design refused -q (new-user trial)."""
    from conftest import SAMPLES, run_in_process

    assert "--output FILE.onnx" in run_in_process("harden", "--help").stdout
    merge = run_in_process("merge", "--help").stdout
    assert "--format yaml|json" in merge and "TENSOR" not in merge
    model = SAMPLES / "digits_mlp.onnx"
    for command in (["precision", model], ["wait", model], ["design", model, "--tolerate", "1"]):
        run_in_process(*command, "-e", "5", "-q", "--format", "json")
    policy = f"models:\n  - path: {model}\n    epsilon: 5.0\n    require: {{crash: 0}}\n"
    (tmp_path / "robaudit.yaml").write_text(policy)
    proc = run_in_process("check", "-q", cwd=tmp_path)
    assert proc.stderr == ""


def test_too_many_shards_says_how_many_fault_sets_there_are() -> None:
    """30 sets asked for were reported as "1 onnxruntime runs of 256 fault sets" (new-user trial)."""
    from conftest import SAMPLES, run_in_process

    proc = run_in_process(
        "inject", SAMPLES / "digits_mlp.onnx", "--crash", "1", "--trials", "30", "--samples", "4", "--shard", "1/3",
        "-q", expect=2,
    )
    line = proc.stderr.strip()
    assert "30 fault sets" in line and "at most 1 shard" in line and len(line.splitlines()) == 1, line


def test_an_empirical_failure_vector_of_the_wrong_length_names_the_policy_key(tmp_path) -> None:
    """The message named --crash/--byzantine, flags a policy user never typed (new-user trial)."""
    import shutil

    from conftest import SAMPLES, run_in_process

    shutil.copy(SAMPLES / "digits_mlp.onnx", tmp_path / "m.onnx")
    shutil.copy(SAMPLES / "digits_inputs.npz", tmp_path / "val.npz")
    (tmp_path / "robaudit.yaml").write_text(
        "models:\n  - path: m.onnx\n    epsilon: 5.0\n    output: add_result2\n"
        "    empirical: {inputs: val.npz, failures: [1, 1, 1], max_error: 5.0}\n"
    )
    proc = run_in_process("check", cwd=tmp_path, expect=2)
    line = proc.stderr.strip()
    assert "'empirical.failures'" in line and "--crash" not in line and "2 hidden layers" in line, line


def test_an_input_shape_with_a_batch_other_than_one_is_refused() -> None:
    """--input-shape 4,1,8,8 was read as 1×1×8×8 without a word (new-user trial); 1,1,8,8 and 1,8,8 stay as they
    were."""
    from conftest import SAMPLES, run_in_process

    model = SAMPLES / "digits_cnn.onnx"
    proc = run_in_process("inspect", model, "--input-shape", "4,1,8,8", expect=2)
    line = proc.stderr.strip()
    assert "gives 4 for axis 0" in line and "(1,8,8)" in line and len(line.splitlines()) == 1, line
    for shape in ("1,1,8,8", "1,8,8"):
        assert "input shape [1, 1, 8, 8]" in run_in_process("inspect", model, "--input-shape", shape).stdout
