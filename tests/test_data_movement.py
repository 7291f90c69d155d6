"""The adjoint of the data-movement ops (Slice, Pad, Transpose, Gather, …) against an independent Jacobian.

Their backward rule runs the op on an index map of its input (docs/method.md §4.4, "Ops that only move
elements") and remembers the map per op content (type, attributes, input shape, constant operands): a
worst search back-propagates through one node a thousand times. Checked here: the backward equals
cot @ J where J is built column by column from numpy's own ops on unit inputs (np.pad, basic slicing,
np.transpose, np.take), and a remembered map keyed without the constant operands is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import robaudit.graph.ops.shape_ops as shape_ops
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops.base import Interval, PropagationContext
from robaudit.graph.ops.shape_ops import DataMovement

NUMPY_PAD = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _node(op: str, operands: dict[str, np.ndarray], **attrs) -> tuple[Node, dict[str, np.ndarray]]:
    names = ["x", *operands]
    return Node("n", op, "", names, ["y"], dict(attrs), opset=18), dict(operands)


def _context(shape: tuple[int, ...], constants: dict[str, np.ndarray]) -> PropagationContext:
    box = Interval(np.zeros(shape), np.ones(shape))
    return PropagationContext({"x": box}, {}, constants)


def _jacobian(forward, shape: tuple[int, ...]) -> np.ndarray:
    """[outputs, inputs] of a linear numpy ``forward``, one unit input at a time."""
    size = int(np.prod(shape))
    columns = []
    for i in range(size):
        unit = np.zeros(size)
        unit[i] = 1.0
        columns.append(np.asarray(forward(unit.reshape(shape)), np.float64).reshape(-1))
    return np.stack(columns, axis=1)


def _backward(node: Node, constants: dict[str, np.ndarray], shape: tuple[int, ...], cot: np.ndarray) -> np.ndarray:
    ctx = _context(shape, constants)
    return DataMovement().backward(node, [cot], ctx)[0].reshape(len(cot), -1)


@st.composite
def cases(draw):
    """(node, constants, input shape, numpy forward) of a random Slice, Pad, Transpose or Gather."""
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=2, max_size=3)))
    rank = len(shape)
    op = draw(st.sampled_from(["Slice", "Pad", "Transpose", "Gather"]))
    if op == "Slice":
        axis = draw(st.integers(0, rank - 1))
        start = draw(st.integers(0, shape[axis] - 1))
        end = draw(st.integers(start + 1, shape[axis]))
        step = draw(st.sampled_from([1, 2]))
        operands = {"s": np.array([start]), "e": np.array([end]), "a": np.array([axis]), "t": np.array([step])}
        node, constants = _node("Slice", operands)
        index = [slice(None)] * rank
        index[axis] = slice(start, end, step)
        return node, constants, shape, lambda x: x[tuple(index)]
    if op == "Pad":
        mode = draw(st.sampled_from(sorted(NUMPY_PAD)))
        limit = {"constant": 3, "reflect": 1, "edge": 3, "wrap": 2}[mode]
        pads = [draw(st.integers(0, limit)) for _ in range(2 * rank)]
        node, constants = _node("Pad", {"p": np.array(pads, np.int64)}, mode=mode)
        width = [(pads[i], pads[i + rank]) for i in range(rank)]
        return node, constants, shape, lambda x: np.pad(x, width, mode=NUMPY_PAD[mode])
    if op == "Transpose":
        perm = draw(st.permutations(list(range(rank))))
        node, constants = _node("Transpose", {}, perm=list(perm))
        return node, constants, shape, lambda x: np.transpose(x, perm)
    axis = draw(st.integers(0, rank - 1))
    ids = np.array(draw(st.lists(st.integers(0, shape[axis] - 1), min_size=1, max_size=5)), np.int64)
    node, constants = _node("Gather", {"i": ids}, axis=axis)
    return node, constants, shape, lambda x: np.take(x, ids, axis=axis)


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(0, 2**31))
def test_backward_is_the_transposed_jacobian(case, seed):
    node, constants, shape, forward = case
    jacobian = _jacobian(forward, shape)
    cot = np.random.default_rng(seed).normal(size=(3, jacobian.shape[0]))
    for _ in range(2):  # the second time from the remembered map
        assert np.allclose(_backward(node, constants, shape, cot), cot @ jacobian, rtol=0, atol=1e-12)


def test_the_remembered_map_follows_the_constant_operands():
    """Two slices of one name, type and input shape that differ only in their starts: each its own map."""
    shape = (1, 6)
    cot = np.arange(1.0, 4.0)[None, :]
    for start in (0, 3):
        operands = {"s": np.array([start]), "e": np.array([start + 3]), "a": np.array([1])}
        node, constants = _node("Slice", operands)
        expected = cot @ _jacobian(lambda x, s=start: x[:, s : s + 3], shape)
        assert np.array_equal(_backward(node, constants, shape, cot), expected)


def test_a_map_remembered_without_its_operands_is_caught(monkeypatch):
    remembered: dict[tuple, shape_ops._Sources] = {}

    def keyed_without_operands(node, in_shape, consts):
        key = (node.op_type, in_shape)
        if key not in remembered:
            remembered[key] = shape_ops._computed_sources(node, in_shape, consts)
        return remembered[key]

    monkeypatch.setattr(shape_ops, "_sources", keyed_without_operands)
    with pytest.raises(AssertionError):
        test_the_remembered_map_follows_the_constant_operands()


def test_a_point_interval_moves_once_and_stays_a_point():
    """The worst search's forward runs every op on a point (lo is hi): the op runs once and gives a point."""
    node, constants = _node("Pad", {"p": np.array([0, 1, 0, 2], np.int64)}, mode="reflect")
    x = np.arange(12.0).reshape(3, 4)
    out = DataMovement().interval(node, [Interval.point(x), constants["p"]])[0]
    assert out.lo is out.hi
    assert np.array_equal(out.lo, np.pad(x, [(0, 0), (1, 2)], mode="reflect"))


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_a_pad_with_its_pads_as_an_attribute_has_its_adjoint(mode):
    """Opset ≤ 10 gives Pad's pads as an attribute (one input): the index map's padding marker must not take the
    pads' place (it was read as negative pads and the model refused)."""
    shape = (1, 2, 3)
    node = Node("n", "Pad", "", ["x"], ["y"], {"mode": mode, "pads": [0, 1, 1, 0, 0, 1]}, opset=10)
    cot = np.random.default_rng(0).normal(size=(2, 15))
    expected = cot @ _jacobian(lambda x: np.pad(x, [(0, 0), (1, 0), (1, 1)], mode=NUMPY_PAD[mode]), shape)
    assert np.allclose(_backward(node, {}, shape, cot), expected, rtol=0, atol=1e-12)
