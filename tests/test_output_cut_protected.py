"""The output cut and the signed terms on range-restricted networks (docs/method.md §4.1 "The output cut",
"Signed terms", §1.3): what ``harden`` writes — Clip(Where(IsNaN(y), low, y)) after every hidden layer, or
Min/Max per neuron — checked on its own (not through the minimum with the other bounds) against onnxruntime
with the failed values injected at the failure site (the layer's output, before the guard), every failure
set, values at the ends of the range; the restrictions are narrower than what the clean layers reach
(``harden --margin`` below 0), so that they clip clean values too. ``refined`` (the bound of one vector:
sums, cuts and the signed terms: tests/test_signed_protected.py checks those on their own) is checked the same
way. A cut shrunk by 10 % is exceeded on the same networks.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import dense_chain
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tight_cuts import _errors, _rows

from robaudit.applications.harden import channel_ranges, insert_restrictions
from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import OutputCut, TightBound
from robaudit.graph.network import NetworkOptions

COUNTS = ([1, 0], [0, 1], [1, 1], [2, 1])
#: (hidden sizes, last activation, failure mode, weight scale, range margin, seed) of a drawn restricted chain.
RESTRICTED_CASES = (
    st.lists(st.integers(2, 4), min_size=2, max_size=2),
    st.sampled_from(["relu", "tanh"]),
    st.sampled_from(["crash", "byzantine"]),
    st.floats(0.5, 3.0),
    st.floats(-0.4, 0.1),
    st.integers(0, 2**31),
)


def _restricted_chain(hidden, last, scale, seed, per_channel, margin):
    """A ReLU → ``last`` chain with every hidden layer restricted to its range on 64 inputs (per neuron with
    ``per_channel``: harden's Max/Min form), each end moved out by ``margin`` times the range's width (in
    where ``margin`` < 0)."""
    chain = dense_chain([3, *hidden, 2], ["relu", last], seed=seed, weight_scale=scale, bias_scale=1.0)
    x = np.random.default_rng(seed).uniform(0, 1, (64, 3)).astype(np.float32)
    ranges = {}
    for value in chain.hidden_outputs:
        ort = onnxruntime.InferenceSession(_with_output(chain.model, value).SerializeToString())
        (seen,) = ort.run([value], {"x": x})
        if per_channel:
            low, high = channel_ranges(seen.astype(np.float64), "dense")
        else:
            low, high = float(seen.min()), float(seen.max())
        width = np.subtract(high, low)
        ranges[value] = (low - margin * width, high + margin * width)
    return dataclasses.replace(chain, model=insert_restrictions(chain.model, ranges))


def _with_output(model, value):
    """``model`` with ``value`` as its one output."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    del copy.graph.output[:]
    copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
    return copy


def _worst_and_cut(chain, hidden, mode, seed, directory):
    """Per vector of ``COUNTS``: (worst error onnxruntime measures, the general cut, the per-vector cut, fep, the
    largest sensitivity sum, the refined bound of the vector)."""
    path = directory / "restricted.onnx"
    path.write_bytes(chain.model.SerializeToString())
    _, net = load_network(path, NetworkOptions())
    assert set(net.protections) == set(chain.hidden_outputs)
    failure = FailureModel.crash() if mode == "crash" else FailureModel.byzantine(failure_range=(-0.5, 2.5))
    analysis = Analysis(net, failure)
    cut = OutputCut.build(analysis)
    assert cut is not None
    tight = TightBound(analysis)
    rng = np.random.default_rng(seed)
    inputs = [np.array(c, np.float64) for c in itertools.product([0.0, 1.0], repeat=3)]
    inputs += list(rng.uniform(0, 1, (12, 3)))
    found = []
    for counts in COUNTS:
        counts = [min(c, n) for c, n in zip(counts, hidden, strict=True)]
        worst = float(_errors(chain, hidden, _rows(hidden, counts, failure.failure_range, inputs, rng)).max())
        found.append((worst, cut.bound(counts).max(), cut.design(counts).max(), tight.fep(counts),
                      tight.sums(counts).max(), tight.refined(counts)))
    return found


@pytest.mark.parametrize("per_channel", [False, True])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(*RESTRICTED_CASES)
def test_output_cut_is_sound_on_restricted_chains(tmp_path_factory, per_channel, hidden, last, mode, scale, margin,
                                                  seed):
    chain = _restricted_chain(hidden, last, scale, seed % 1000, per_channel, margin)
    found = _worst_and_cut(chain, hidden, mode, seed, tmp_path_factory.mktemp("cut"))
    for worst, general, design, fep, _, refined in found:
        assert worst <= general * (1 + 1e-5) + 1e-6, (worst, general)
        assert worst <= design * (1 + 1e-5) + 1e-6, (worst, design)
        assert worst <= fep * (1 + 1e-5) + 1e-6, (worst, fep)
        assert worst <= refined * (1 + 1e-5) + 1e-6, (worst, refined)


def test_the_cut_binds_on_restricted_chains_and_shrunk_is_caught(tmp_path_factory, monkeypatch):
    """On these chains the cut decides the bound (below the sensitivity sums) and reaches the worst error
    onnxruntime measures: the cut × 0.9 is exceeded."""
    original, per_vector = OutputCut._bound, OutputCut.design
    for seed, last in ((2, "relu"), (4, "tanh")):
        chain = _restricted_chain([3, 3], last, 3.0, seed, False, -0.2)
        directory = tmp_path_factory.mktemp("b")
        worst, general, design, _, sums, _ = _worst_and_cut(chain, [3, 3], "crash", seed, directory)[0]
        assert min(general, design) < sums * (1 - 1e-9) and worst > 0.99 * min(general, design), (worst, general, sums)
        with monkeypatch.context() as patch:
            patch.setattr(OutputCut, "_bound", lambda self, *args: 0.9 * original(self, *args))
            patch.setattr(OutputCut, "design", lambda self, *args: 0.9 * per_vector(self, *args))
            shrunk = _worst_and_cut(chain, [3, 3], "crash", seed, tmp_path_factory.mktemp("shrunk"))[0]
        assert shrunk[0] > min(shrunk[1], shrunk[2]) * (1 + 1e-5), shrunk
