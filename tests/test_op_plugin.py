"""Adding an op is adding one file: a toy activation written into a directory of its own is
discovered by the op registry (no import list to edit), its attribute types are checked by
the graph decoder, and a model using it is audited like any other (docs/method.md §3.3).

The toy op is ScaledRelu(x) = α·max(x, 0) (K = α) in a custom domain. A network with it
computes the same function as the one with Relu whose next weights are multiplied by α,
and the paper and tight bounds of the two are equal in closed form (δ scales by α, w_m of
the next layer by 1/α, the Lipschitz constant by α), so the audit of the toy model must
give exactly the reference model's figures; a copy of the rule with K halved must not.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import robaudit.graph.ops as ops
from robaudit.bounds import tight
from robaudit.bounds.audit import BoundOptions, compute_bound
from robaudit.errors import ModelStructureError
from robaudit.graph.ops.base import Role, lookup, unregister

ALPHA = 2.5
DOMAIN = "toy.ops"

RULE = '''
"""A toy activation for the op-registry test: {op}(x) = α·max(x, 0)."""

import numpy as np

from robaudit.graph.ops.activations import Activation
from robaudit.graph.ops.base import FLOAT, register


@register
class {op}Rule(Activation):
    op_types = ("{op}",)
    domain = "{domain}"
    attributes = {{"{op}": {{"alpha": FLOAT}}}}

    def lipschitz(self, node):
        return {lipschitz}

    def function(self, node, x):
        return float(node.attr("alpha")) * np.maximum(x, 0.0)
'''


@pytest.fixture
def toy_ops(tmp_path):
    """Write two rule modules (sound, and K halved) into a directory on the ops package path."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    rules = {"ScaledRelu": 'float(node.attr("alpha"))', "HalfKRelu": 'float(node.attr("alpha")) / 2'}
    for op, lipschitz in rules.items():
        text = RULE.format(op=op, domain=DOMAIN, lipschitz=lipschitz)
        (folder / f"toy_{op.lower()}.py").write_text(textwrap.dedent(text))
    ops.__path__.append(str(folder))
    try:
        found = ops.discover()
        yield found
    finally:
        ops.__path__.remove(str(folder))
        for op in rules:
            name = f"{ops.__name__}.toy_{op.lower()}"
            module = sys.modules.pop(name, None)
            if module is not None:
                unregister(getattr(module, f"{op}Rule"))


def _dense(name: str, rng: np.random.Generator, n_in: int, n_out: int, scale: float = 1.0) -> list:
    weight = (rng.standard_normal((n_out, n_in)) * 0.5 * scale).astype(np.float32)
    bias = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return [numpy_helper.from_array(weight, f"{name}.weight"), numpy_helper.from_array(bias, f"{name}.bias")]


def _model(path: Path, activation: str, alpha: float | str = ALPHA) -> Path:
    """x[1,4] → Gemm → Relu → Gemm → <activation> → Gemm → y[1,3].

    ``activation`` is a toy op (with attribute ``alpha``) or ``Relu``, in which case
    the last weights are multiplied by α (the same function).
    """
    rng = np.random.default_rng(7)
    last_scale = ALPHA if activation == "Relu" else 1.0
    inits = _dense("fc1", rng, 4, 6) + _dense("fc2", rng, 6, 5) + _dense("fc3", rng, 5, 3, last_scale)
    act_attrs = {} if activation == "Relu" else {"alpha": alpha}
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["z1"], name="fc1", transB=1),
        helper.make_node("Relu", ["z1"], ["h1"], name="act1"),
        helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["z2"], name="fc2", transB=1),
        helper.make_node(activation, ["z2"], ["h2"], name="act2", domain=DOMAIN if act_attrs else "", **act_attrs),
        helper.make_node("Gemm", ["h2", "fc3.weight", "fc3.bias"], ["y"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    imports = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


def _figures(path: Path, method: str) -> tuple:
    options = BoundOptions(epsilon=0.5, method=method, failures=(2, 1))
    result = compute_bound(path, options)
    return result.fep, [la.max_failures for la in result.layers], result.uniform, result.total


def test_discovery_registers_the_new_file(toy_ops):
    assert f"{ops.__name__}.toy_scaledrelu" in toy_ops
    node = type("N", (), {"domain": DOMAIN, "op_type": "ScaledRelu"})()
    rule = lookup(node)
    assert rule is not None and rule.role is Role.ACTIVATION


@pytest.mark.parametrize("method", ["paper", "tight"])
def test_a_model_with_the_toy_op_is_audited_like_its_relu_twin(toy_ops, tmp_path, method, monkeypatch):
    # The output cut (docs/method.md §4.1) needs an op's linear relaxation, which the toy rule does not
    # give (one file, the rule's minimum: role, Lipschitz constant, interval); the ReLU twin has one. Nor the
    # boxes' cut, which stands in where the lines are not built: the twin's boxes are CROWN's, the toy's IBP's.
    monkeypatch.setattr(tight, "OUTPUT_CUT_BUDGET", 0.0)
    monkeypatch.setattr(tight.BoxCut, "build", classmethod(lambda cls, analysis: None))
    toy = _figures(_model(tmp_path / "toy.onnx", "ScaledRelu"), method)
    twin = _figures(_model(tmp_path / "twin.onnx", "Relu"), method)
    assert toy[0] == pytest.approx(twin[0], rel=1e-6)  # the twin's α·W is rounded to float32
    assert toy[1:] == twin[1:]


def test_a_weakened_toy_rule_is_caught(toy_ops, tmp_path):
    """K halved: the bound drops below the reference's, which the comparison above would catch."""
    weak = _figures(_model(tmp_path / "weak.onnx", "HalfKRelu"), "paper")
    twin = _figures(_model(tmp_path / "twin.onnx", "Relu"), "paper")
    assert weak[0] < twin[0] * (1 - 1e-3)


def test_the_toy_rule_declares_its_attribute_types(toy_ops, tmp_path):
    """A string where the rule declares a FLOAT is refused when the graph is decoded."""
    path = _model(tmp_path / "bad.onnx", "ScaledRelu", alpha="two")
    with pytest.raises(ModelStructureError, match="attribute 'alpha' must be FLOAT"):
        compute_bound(path, BoundOptions(epsilon=0.5))


def test_removing_the_file_makes_the_op_unsupported_again(tmp_path):
    from robaudit.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="ScaledRelu"):
        compute_bound(_model(tmp_path / "toy.onnx", "ScaledRelu"), replace(BoundOptions(epsilon=0.5)))


def test_two_rules_for_one_op_are_refused():
    from robaudit.graph.ops.activations import Activation
    from robaudit.graph.ops.base import register

    class SecondRelu(Activation):
        op_types = ("Relu",)

    with pytest.raises(ValueError, match="op 'Relu' has two rules"):
        register(SecondRelu)


def test_rules_keep_no_state_across_nodes(tmp_path):
    """Every rule instance is shared by all nodes of its op: auditing must not write into it
    (Gelu's minimum depends on the node's ``approximate``; it once was stored on the rule)."""
    from robaudit.graph.ops.base import _REGISTRY

    rng = np.random.default_rng(3)
    inits = _dense("fc1", rng, 4, 6) + _dense("fc2", rng, 6, 3)
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["z1"], name="fc1", transB=1),
        helper.make_node("Gelu", ["z1"], ["h1"], name="act1", approximate="tanh"),
        helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "gelu.onnx"))
    compute_bound(tmp_path / "gelu.onnx", BoundOptions(epsilon=0.5))
    assert {name: vars(rule) for name, rule in _REGISTRY.items() if vars(rule)} == {}
