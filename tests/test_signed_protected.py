"""The signed terms of docs/method.md §4.1 on range-restricted networks (what ``harden`` writes, §1.3): the guard's
ops carry chord slopes (§7.3 "A range restriction's guard"); the gated deviation network of §4.5 does not model
them, so its narrower enclosure is not taken there (``relational_applies``) and the signed pass's own is.

* the signed terms on their own (not through the minimum with the other bounds) against every failure set
  onnxruntime measures on random restricted chains — ranges narrower than the clean layers reach, per layer and
  per neuron, crash and byzantine values at the ends — and the guarded linear layers an independent attack
  built (two readers of one guarded value: bound 7 against a real 10 while the gated network replaced a gate);
* a chain whose two paths cancel unless the clip saturates one of them: the clip read as slope 1 (the weakened
  rule) gives signed terms of 0 where onnxruntime measures 0.5.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from onnx import TensorProto, helper
from test_certify_protected import _cancelling_chain
from test_output_cut_protected import RESTRICTED_CASES, _restricted_chain
from test_tight_cuts import _errors, _rows

import robaudit.bounds.certify as certify
from robaudit.applications.harden import insert_restrictions
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.relational import relational_applies
from robaudit.bounds.signed import SignedTerms, signed_applies
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions

COUNTS = ([1, 0], [0, 1], [1, 1], [2, 1])


def _signed_alone(analysis: Analysis, counts) -> float:
    """The signed terms of ``counts`` without the absolute caps (so not through a minimum with another bound)."""
    terms = SignedTerms(analysis, kept=4)
    caps = np.full((len(counts), terms.inc[0][0].shape[0]), np.inf)
    return float(terms.bound(counts, caps).max())


@pytest.mark.parametrize("per_channel", [False, True])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(*RESTRICTED_CASES)
def test_signed_terms_hold_on_restricted_chains(tmp_path_factory, per_channel, hidden, last, mode, scale, margin,
                                                seed):
    chain = _restricted_chain(hidden, last, scale, seed % 1000, per_channel, margin)
    path = tmp_path_factory.mktemp("signed") / "restricted.onnx"
    path.write_bytes(chain.model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    assert set(net.protections) == set(chain.hidden_outputs)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=(-0.5, 2.5))
    analysis = Analysis(net, failure)
    assert signed_applies(analysis) and not relational_applies(net)
    rng = np.random.default_rng(seed)
    inputs = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=3)]
    inputs += list(rng.uniform(0, 1, (12, 3)))
    tight = TightBound(analysis)
    for counts in COUNTS:
        counts = [min(c, n) for c, n in zip(counts, hidden, strict=True)]
        worst = float(_errors(chain, hidden, _rows(hidden, counts, failure.failure_range, inputs, rng)).max())
        assert worst <= _signed_alone(analysis, counts) * (1 + 1e-5) + 1e-6, (counts, worst)
        assert worst <= tight.refined(counts) * (1 + 1e-5) + 1e-6, (counts, worst)


def _guarded_linear(tmp_path):
    """x ∈ [1, 2] → p = x (no activation) → guard → q = [p, p] (no activation) → guard → y = q₁ − q₂ (the attack's
    model): byzantine values in [−5, 5], p := 5 and q₂ := −5 give y = 10 against a clean 0."""
    nodes, inits = [], []

    def const(name, value):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, np.shape(value), np.ravel(value).tolist()))
        return name

    nodes.append(helper.make_node("Gemm", ["x", const("w1", [[1.0]]), const("b1", [0.0])], ["p"], name="fc1"))
    nodes.append(helper.make_node("Gemm", ["p", const("w2", [[1.0, 1.0]]), const("b2", [0.0, 0.0])], ["q"],
                                  name="fc2"))
    nodes.append(helper.make_node("Gemm", ["q", const("w3", [[1.0], [-1.0]]), const("b3", [0.0])], ["y"],
                                  name="fc3"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = insert_restrictions(model, {"p": (-100.0, 100.0), "q": (-100.0, 100.0)})
    path = tmp_path / "guarded_linear.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_the_attacks_guarded_linear_layers_are_bounded(tmp_path):
    _, net = load_network(_guarded_linear(tmp_path), NetworkOptions(input_range=(1.0, 2.0)))
    assert net.protections
    analysis = Analysis(net, FailureModel.byzantine(failure_range=(-5.0, 5.0)))
    assert signed_applies(analysis)
    assert _signed_alone(analysis, [1, 1]) >= 10 * (1 - 1e-9)
    assert TightBound(analysis).fep([1, 1]) >= 10 * (1 - 1e-9)


def test_a_clip_read_as_slope_one_is_caught_by_the_signed_terms(tmp_path, monkeypatch) -> None:
    net, measured = _cancelling_chain(tmp_path)
    assert measured == pytest.approx(0.5)
    analysis = Analysis(net, FailureModel.crash())
    assert signed_applies(analysis)
    assert _signed_alone(analysis, [1, 0]) >= measured * (1 - 1e-6)
    original = certify.node_chord_slopes

    def slope_one(node, lo, hi, *constants):
        found = original(node, lo, hi, *constants)
        return (np.ones_like(lo), np.ones_like(lo)) if node.op_type == "ChannelClip" else found

    monkeypatch.setattr(certify, "node_chord_slopes", slope_one)
    assert _signed_alone(Analysis(net, FailureModel.crash()), [1, 0]) < measured * 0.5
