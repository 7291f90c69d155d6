"""The columns of a sensitivity rectangle read through slices (``Rectangle``, docs/method.md §4.4).

* ``Rectangle.take`` and ``Rectangle.indices`` give, for random planes and rectangles, the entries
  and indices of a flat index array built here with explicit loops (channel, row, column in C-order),
  C-contiguous (a strided vector would take another BLAS kernel in the cut-cost product),
  and writes through ``Rectangle.view`` land on exactly those indices;
* the reduction of a layer's rows (``TightBound._keep``: kept values, totals, per-neuron maxima, cut
  costs) with a ``Rectangle`` gives, bit for bit, what it gives with the flat indices, for random
  chunks of rows of a small CNN's layers; a rectangle that loses its last column is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from robaudit.bounds.audit import load_network
from robaudit.bounds.fep import Analysis, FailureModel
from robaudit.bounds.tight import Rectangle, TightBound, picked
from robaudit.graph.network import NetworkOptions


def loop_indices(shape: tuple[int, int, int], rows: slice, cols: slice) -> np.ndarray:
    """Flat indices c·H·W + r·W + q of every channel c, row r in ``rows`` and column q in ``cols``."""
    channels, height, width = shape
    found = []
    for c in range(channels):
        for r in range(rows.start, rows.stop):
            for q in range(cols.start, cols.stop):
                found.append(c * height * width + r * width + q)
    return np.array(found, dtype=np.intp)


@st.composite
def rectangles(draw):
    channels, height, width = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    top = draw(st.integers(0, height - 1))
    left = draw(st.integers(0, width - 1))
    bottom = draw(st.integers(top + 1, height))
    right = draw(st.integers(left + 1, width))
    return Rectangle((channels, height, width), slice(top, bottom), slice(left, right))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(rectangles(), st.integers(0, 2**31))
def test_rectangle_reads_and_writes_the_flat_indices(rect, seed):
    expected = loop_indices(rect.shape, rect.rows, rect.cols)
    vector = np.random.default_rng(seed).normal(size=int(np.prod(rect.shape)))
    assert np.array_equal(rect.indices(), expected)
    assert np.array_equal(rect.take(vector), vector[expected]) and rect.take(vector).flags.c_contiguous
    assert np.array_equal(picked(vector, rect), picked(vector, expected))
    written = vector.copy()
    rect.view(written)[...] = -1.0
    touched = np.flatnonzero(written != vector)
    assert np.array_equal(touched, np.sort(expected))


def _cnn(path) -> str:
    """conv(1→3, 3×3, pad 1)-ReLU, conv(3→2, 3×3, pad 1)-ReLU, flatten, dense(→4) on a 1×9×9 input."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.normal(0, 0.5, (3, 1, 3, 3)), rng.normal(0, 0.2, 3)
    w2, b2 = rng.normal(0, 0.5, (2, 3, 3, 3)), rng.normal(0, 0.2, 2)
    w3, b3 = rng.normal(0, 0.3, (4, 2 * 81)), rng.normal(0, 0.2, 4)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3.T.copy(), "w3"), (b3, "b3"))
    ]
    inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flat"))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Reshape", ["r2", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "w3"], ["m"]),
        helper.make_node("Add", ["m", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    model = make_model(graph)
    file = path / "cnn.onnx"
    file.write_bytes(model.SerializeToString())
    return str(file)


@pytest.fixture(scope="module")
def bound(tmp_path_factory) -> TightBound:
    _, network = load_network(_cnn(tmp_path_factory.mktemp("rect")), NetworkOptions())
    return TightBound(Analysis(network, FailureModel.crash()))


def _state(bound: TightBound, i: int) -> list[np.ndarray]:
    return [bound._top[i].copy(), bound.total[i].copy(), bound.neuron_max[i].copy(), bound.cut_cost[i].copy()]


def _reduce(bound: TightBound, i: int, sens: np.ndarray, columns) -> list[np.ndarray]:
    """Run ``_keep`` on fresh copies of the layer's fields; return them."""
    outputs = bound._top[i].shape[0]
    bound._top[i] = np.zeros_like(bound._top[i])
    bound.total[i], bound.neuron_max[i] = np.zeros(outputs), np.full(bound.neuron_max[i].shape, 0.125)
    bound.cut_cost[i] = np.zeros(outputs)
    slope = np.ones(bound.neuron_max[i].shape)
    bound._keep(i, slice(0, sens.shape[0]), sens, slope, columns=columns)
    return _state(bound, i)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.data())
def test_keep_with_a_rectangle_equals_keep_with_indices(bound, data):
    i = data.draw(st.integers(0, 1))
    shape = (3, 9, 9) if i == 0 else (2, 9, 9)
    top, left = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
    rect = Rectangle(
        shape, slice(top, data.draw(st.integers(top + 1, 9))), slice(left, data.draw(st.integers(left + 1, 9)))
    )
    rows = data.draw(st.integers(1, 4))
    sens = np.abs(
        np.random.default_rng(data.draw(st.integers(0, 2**31))).normal(
            size=(rows, rect.take(np.zeros(int(np.prod(shape)))).size)
        )
    )
    saved = _state(bound, i)
    try:
        expected = _reduce(bound, i, sens, rect.indices())
        found = _reduce(bound, i, sens, rect)
    finally:
        bound._top[i], bound.total[i], bound.neuron_max[i], bound.cut_cost[i] = saved
    for a, b in zip(expected, found, strict=True):
        assert np.array_equal(a, b)


def test_a_rectangle_losing_its_last_column_is_caught(bound):
    shape = (3, 9, 9)
    rect = Rectangle(shape, slice(2, 6), slice(1, 5))
    short = Rectangle(shape, slice(2, 6), slice(1, 4))
    sens = np.abs(np.random.default_rng(0).normal(size=(2, rect.indices().size)))
    saved = _state(bound, 0)
    try:
        expected = _reduce(bound, 0, sens, rect.indices())
        # the short rectangle's columns, read with the full rectangle's values: the last column is lost
        found = _reduce(bound, 0, sens.reshape(2, 3, 4, 4)[:, :, :, :3].reshape(2, -1), short)
    finally:
        bound._top[0], bound.total[0], bound.neuron_max[0], bound.cut_cost[0] = saved
    assert not all(np.array_equal(a, b) for a, b in zip(expected, found, strict=True))
