"""The tight (sensitivity) method: |ΔF_k| ≤ Σ_l Σ_{i failed in l} P[k, i]·δ_i (docs/method.md §4.1).

P is obtained by back-propagating unit vectors from the output elements through |W|
(affine layers), each activation's largest slope over its neuron's clean-and-faulty
interval (docs/method.md §4.3) and the absolute adjoints of the other ops. It is
computed a chunk of outputs at a time (docs/method.md §4.4): per output only what the
inverse problems need is kept — the largest P·δ of each layer, sorted, up to the
searched budget, their total, and the largest P·slope for synapse failures — so that
image outputs and 1000-class heads fit in ``ROBAUDIT_TIGHT_MEMORY_MB``.

Cuts (docs/method.md §4.1): every element of a hidden layer's output moves by at most the
width W of its clean-and-faulty hull, so Σ_j P[k, j]·W_j at that layer bounds what every
failure behind it can do; each output keeps the smaller of the two bounds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np

from robaudit.bounds.dominated import (
    MIN_CHUNKS,
    DominatedPlan,
    chunk_indices,
    dominates,
    other_chunks,
    probe_chunks,
    saturated_prefix,
)
from robaudit.bounds.fep import MAX_TOTAL_BUDGET, UNBOUNDED, Analysis, rounding_sources, site_values, tied_index
from robaudit.bounds.progress import SENSITIVITIES, counted_from, report
from robaudit.bounds.ranges import SiteLines, counted_faulty_ranges, crown_applies, failure_site_lines, through_cost
from robaudit.graph.conv import ConvGeometry, conv2d_adjoint_window, conv2d_window, nonzero_block, scaled_by
from robaudit.graph.layers import Layer
from robaudit.graph.ops import PropagationContext, lookup
from robaudit.graph.ops.activations import Activation, PRelu
from robaudit.graph.ops.affine import (
    conv_abs_adjoint,
    conv_abs_adjoint_scaled,
    conv_transpose_abs_adjoint,
    weight_products,
)
from robaudit.graph.ops.normalization import Normalization
from robaudit.graph.ops.pooling import context_candidates, max_candidates_block_adjoint
from robaudit.limits import bound_threads, tight_memory_bytes

#: The memory budget is ``ROBAUDIT_TIGHT_MEMORY_MB`` (default 2 GiB, :func:`robaudit.limits.tight_memory_bytes`,
#: read when used): a quarter for the kept statistics, a quarter for the back-propagation of the chunks in
#: flight (one per thread, ``ROBAUDIT_THREADS``), the rest for the model and its intervals.

#: visit(hidden index, output rows, P rows [k, N_l], slope of the layer's activation [N_l]) (and, for a
#: pass with ``windows``, ``columns=``: the flat neuron indices of P's columns, see :class:`SensitivityPass`).
Visitor = Callable[..., None]
ValueVisitor = Callable[[str, slice | np.ndarray, np.ndarray], None]


def _outputs(analysis: Analysis) -> int:
    net = analysis.network
    return int(np.prod(net.clean[net.tail_start].shape))


def chunk_rows(analysis: Analysis, memory_bytes: int) -> int:
    """Outputs back-propagated together: a few cotangents of the widest value and one layer's P per row."""
    net = analysis.network
    widest = max((int(np.prod(box.shape)) for box in net.clean.values()), default=1)
    neurons = max((la.neurons for la in analysis.hidden), default=1)
    per_row = 8 * (6 * widest + 3 * neurons)
    return int(max(1, min(_outputs(analysis), (memory_bytes // 4) // per_row)))


def kept_prefix(analysis: Analysis, memory_bytes: int) -> int:
    """How many of the largest P·δ per output and layer are kept (at most the searched budget)."""
    layers = max(1, len(analysis.hidden))
    fits = (memory_bytes // 4) // (16 * _outputs(analysis) * layers)
    return int(max(1, min(MAX_TOTAL_BUDGET, fits)))


def layer_slopes(layer: Layer, ctx: PropagationContext, nodes: dict) -> np.ndarray | float:
    """The slope the backward pass applies at ``layer``'s activation: per neuron with ranges, else K.

    ``nodes`` maps each value to the node producing it.
    """
    if not ctx.use_ranges or layer.activation is None:
        return layer.lipschitz
    node = nodes[layer.output_value]
    return ctx.slope(node, lookup(node)).reshape(layer.out_shape)


def ranges_matter(analysis: Analysis) -> bool:
    """Whether per-neuron slopes could beat the global constants: some activation's slope over its
    *clean* interval is below K somewhere, or a max-pool may prune candidates. The faulty
    intervals only widen the hulls (slopes can only grow), so otherwise they need not be
    computed: the pass with the global K gives the same P, without a second IBP pass."""
    net = analysis.network
    if not analysis.ranges_known:
        return False
    for node in net.nodes:
        rule = lookup(node)
        if node.op_type in ("MaxPool", "GlobalMaxPool", "ReduceMax"):
            return True
        if not isinstance(rule, Activation) or not node.inputs or node.inputs[0] not in net.clean:
            continue
        box = net.clean[node.inputs[0]]
        slope = rule.max_slope(node, box.lo, box.hi, net.constants)
        if isinstance(rule, PRelu):
            limit = rule.slopes_lipschitz(np.asarray(net.constants[node.inputs[1]]))
        else:
            limit = rule.lipschitz(node)
        if np.any(slope < limit * (1 - 1e-9)):
            return True
    return False


class SensitivityPass:
    """The sensitivity pass: back-propagates output elements, a chunk at a time, calling ``visit`` at each hidden
    layer; its chunks of outputs are :attr:`chunks`, and :meth:`run` back-propagates all or some of them (the same
    numbers for a row whichever chunks run with it: each chunk's rows depend only on that chunk).

    P rows include the ∞-norm tail's factor; ``visit`` gets the layer's activation slope per
    neuron (K everywhere without ranges) for synapse terms (docs/method.md §4.1, §4.4).
    ``visit_value(value, rows, cot)`` sees the sensitivities [rows, elements] of every value
    the pass reaches (rounding radii enter there: docs/method.md §1.2).

    ``windows``: ``visit`` accepts ``columns=`` (docs/method.md §4.4). The outputs of an image are
    then taken a square tile at a time (``rows`` an index array), the sensitivities of a
    2-D convolution's planes are carried as the rectangle where they may be non-zero, and
    ``visit`` may get only that rectangle's columns: ``sens`` [rows, len(columns)], the
    layer's other columns being 0. Not with ``visit_value`` or recurrent (tied) layers.

    ``fused``: ``visit`` accepts ``scaled=``, an array [rows, N_l] it fills with P·slope (the layer's
    rows times its slopes, elementwise), which the pass then hands to the layer's adjoint instead of
    forming the same product again (docs/method.md §4.4).

    ``threads`` (None: ``ROBAUDIT_THREADS``, :func:`~robaudit.limits.bound_threads`): chunks back-propagated
    at once, each in its own thread with its share of the memory budget; ``visit`` and ``visit_value`` are
    then called from several threads at once, for disjoint rows. Every row's numbers depend only on its
    chunk, not on which thread ran it or when (docs/method.md §4.4).
    """

    def __init__(
        self,
        analysis: Analysis,
        visit: Visitor,
        use_ranges: bool = True,
        memory_bytes: int | None = None,
        visit_value: ValueVisitor | None = None,
        windows: bool = False,
        fused: bool = False,
        threads: int | None = None,
    ) -> None:
        net = analysis.network
        self.analysis, self.visit, self.visit_value, self.fused = analysis, visit, visit_value, fused
        self.ctx = analysis.context(use_ranges and ranges_matter(analysis))
        self.hidden_index = {id(la): i for i, la in enumerate(analysis.hidden)}
        self.tied = tied_index(analysis.hidden)
        self.needed = _after_hidden_layers(net.steps, self.hidden_index)
        nodes = {n.outputs[0]: n for n in net.nodes if n.outputs}
        self.slopes = {id(la): _one_if_all_ones(layer_slopes(la, self.ctx, nodes)) for la in net.layers}
        self.threads = bound_threads() if threads is None else max(1, threads)
        memory = tight_memory_bytes() if memory_bytes is None else memory_bytes
        step_rows = chunk_rows(analysis, memory // self.threads)
        self.windows = windows and visit_value is None and not self.tied
        #: the chunks of output elements (:func:`output_chunks`)
        shape = net.clean[net.tail_start].shape
        self.chunks = output_chunks(shape, step_rows, tiles=self.windows, threads=self.threads)
        #: chunks reported done so far (:meth:`run`)
        self.reported = 0

    def run(self, which: Sequence[int] | None = None, stop_after: int | None = None) -> None:
        """Back-propagate the chunks numbered ``which`` (None: every chunk). ``stop_after``: a hidden layer's index;
        each row's pass then ends once that layer is visited (the layers after it in the steps' order are visited
        before it; the ones before it not at all). Progress counts the chunks run by this object so far
        (:attr:`reported`) among all its chunks."""
        chosen = self.chunks if which is None else [self.chunks[j] for j in which]
        before = self.reported
        self.reported += len(chosen)

        def one_chunk(rows: slice | np.ndarray) -> None:
            _backward_rows(
                self.analysis, self.ctx, rows, self.needed, self.hidden_index, self.slopes, self.visit,
                self.visit_value, self.tied, self.windows, self.fused, stop_after,
            )

        with counted_from(before, len(self.chunks)):
            each_chunk(one_chunk, chosen, self.threads)


def each_chunk(work: Callable[[slice | np.ndarray], None], chunks: Sequence[slice | np.ndarray], threads: int) -> None:
    """``work(rows)`` for every chunk: in this thread when ``threads`` is 1 or there is one chunk, else in a
    pool of ``min(threads, chunks)`` threads (numpy releases the interpreter lock in its loops, so the
    chunks' products run on as many cores). The first error is raised once the running chunks end; the
    chunks not started are dropped. Progress goes to :func:`robaudit.bounds.progress.report`, from this
    thread, in the chunks' order."""
    total = len(chunks)
    if threads <= 1 or total <= 1:
        for done, rows in enumerate(chunks, 1):
            work(rows)
            report(SENSITIVITIES, done, total)
        return
    with ThreadPoolExecutor(max_workers=min(threads, total)) as pool:
        futures = [pool.submit(work, rows) for rows in chunks]
        try:
            for done, future in enumerate(futures, 1):
                future.result()
                report(SENSITIVITIES, done, total)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _scales(slope: np.ndarray | float) -> bool:
    """Whether the pass multiplies a layer's sensitivities by ``slope`` (every slope but the number 1:
    :func:`scaled_by`)."""
    return bool(np.ndim(slope)) or float(slope) != 1.0


def _one_if_all_ones(slope: np.ndarray | float) -> np.ndarray | float:
    """The number 1 for a slope array that is 1 for every neuron (a ReLU layer every neuron of which may be
    on): the same products, and the sensitivities are then passed on without a copy (:func:`scaled_by`)."""
    if np.ndim(slope) and np.all(np.asarray(slope) == 1.0):
        return 1.0
    return slope


def output_chunks(
    shape: Sequence[int], step_rows: int, tiles: bool = False, threads: int = 1
) -> list[slice | np.ndarray]:
    """The chunks of output elements (flat indices of a value of ``shape``, batch 1) back-propagated
    together: consecutive runs of at most ``step_rows``, of sizes that differ by at most one, as many as
    needed rounded up to a multiple of ``threads`` (so that every thread has as much to do: no run of a
    few rows last, no thread idle in the last round); or, with ``tiles`` on an image output
    [1, C, H, W] (H·W ≥ 64), every channel of a square tile of positions at a time (at most
    ``step_rows`` elements; their receptive fields overlap most: docs/method.md §4.4).
    Every element is in exactly one chunk."""
    outputs = int(np.prod(shape))
    if not tiles or len(shape) != 4 or shape[2] * shape[3] < _EDGE_AREA or shape[1] > step_rows:
        count = -(-outputs // max(1, step_rows))
        if count > 1 and threads > 1:
            count = min(outputs, -(-count // threads) * threads)
        return [slice(i * outputs // count, (i + 1) * outputs // count) for i in range(count)] if outputs else []
    channels, height, width = shape[1:]
    side = max(1, min(_TILE_SIDE, int(np.sqrt(step_rows // channels))))
    flat = np.arange(outputs).reshape(channels, height, width)
    return [
        flat[:, top : top + side, left : left + side].reshape(-1)
        for top in range(0, height, side)
        for left in range(0, width, side)
    ]


#: Largest side of a tile of image outputs: smaller tiles reach smaller rectangles (less of each plane
#: computed for nothing), at more Python steps per output (measured on a 64×64 U-Net: 6 about 12 % faster
#: than 11, 3 and 4 slower again).
_TILE_SIDE = 6
#: Planes on which the rectangle of non-zero sensitivities is looked for (smaller ones are taken whole).
_EDGE_AREA = 64


class _Window:
    """Sensitivities [rows, 1, C, H, W] of a value that are zero outside ``block`` [rows, C, h, w],
    whose first position is ``origin`` (docs/method.md §4.4)."""

    def __init__(self, block: np.ndarray, origin: tuple[int, int], shape: tuple[int, ...]) -> None:
        self.block, self.origin, self.shape = block, origin, tuple(shape)

    def spans(self) -> tuple[slice, slice]:
        """The block's rows and columns in the plane."""
        (r0, c0), (h, w) = self.origin, self.block.shape[2:]
        return slice(r0, r0 + h), slice(c0, c0 + w)

    def dense(self) -> np.ndarray:
        """The whole [rows, 1, C, H, W] array."""
        out = np.zeros((self.block.shape[0],) + self.shape, dtype=self.block.dtype)
        rows, cols = self.spans()
        out[:, 0, :, rows, cols] = self.block
        return out

    def plus(self, other: _Window) -> _Window:
        """self + other on the union of the two rectangles (each element the same sum as the whole
        arrays' ``self + other``: outside a block its value is 0, and x + 0 = x)."""
        (a_rows, a_cols), (b_rows, b_cols) = self.spans(), other.spans()
        top, left = min(a_rows.start, b_rows.start), min(a_cols.start, b_cols.start)
        bottom, right = max(a_rows.stop, b_rows.stop), max(a_cols.stop, b_cols.stop)
        out = np.zeros(self.block.shape[:2] + (bottom - top, right - left), dtype=self.block.dtype)
        out[:, :, a_rows.start - top : a_rows.stop - top, a_cols.start - left : a_cols.stop - left] = self.block
        out[:, :, b_rows.start - top : b_rows.stop - top, b_cols.start - left : b_cols.stop - left] += other.block
        return _Window(out, (top, left), self.shape)

    def columns(self) -> np.ndarray:
        """Flat indices of the block's elements in the value's [C·H·W] (in the block's C-order)."""
        channels, height, width = self.shape[1:]
        rows, cols = self.spans()
        plane = (np.arange(rows.start, rows.stop)[:, None] * width + np.arange(cols.start, cols.stop)[None, :]).ravel()
        return (np.arange(channels)[:, None] * (height * width) + plane[None, :]).ravel()

    def rectangle(self) -> Rectangle:
        """The block's columns as a :class:`Rectangle` (the same columns as :meth:`columns`, in the same order)."""
        rows, cols = self.spans()
        channels, height, width = self.shape[1:]
        return Rectangle((channels, height, width), rows, cols)


class Rectangle:
    """Columns of a value [C, H, W] (flattened C-order) that a sensitivity rectangle covers: every channel
    of the positions ``rows`` × ``cols``, in C-order, as :meth:`_Window.columns` lists them
    (docs/method.md §4.4). Per-neuron vectors are read and updated through slices of their [C, H, W]
    view instead of index arrays: the same elements in the same order."""

    def __init__(self, shape: tuple[int, int, int], rows: slice, cols: slice) -> None:
        self.shape, self.rows, self.cols = shape, rows, cols

    def view(self, vector: np.ndarray) -> np.ndarray:
        """The rectangle of the flat per-neuron ``vector`` [C·H·W], as a [C, h, w] view (writes go to ``vector``)."""
        return vector.reshape(self.shape)[:, self.rows, self.cols]

    def take(self, vector: np.ndarray) -> np.ndarray:
        """``vector[indices]``: the rectangle's entries of ``vector`` [C·H·W], flat, in the columns' order, C-contiguous
        (a strided view would take another BLAS kernel in the products that read it, which may group the sums
        differently)."""
        return np.ascontiguousarray(self.view(vector)).reshape(-1)

    def indices(self) -> np.ndarray:
        """The flat indices of the columns (what :meth:`_Window.columns` gives)."""
        return self.take(np.arange(int(np.prod(self.shape))))


def picked(vector: np.ndarray, columns: np.ndarray | Rectangle | None) -> np.ndarray:
    """The entries of the per-neuron ``vector`` at ``columns`` (flat indices, a :class:`Rectangle`, or every
    one for None), in the columns' order."""
    if columns is None:
        return vector
    if isinstance(columns, Rectangle):
        return columns.take(vector)
    return vector[columns]


def _dense(grad: np.ndarray | _Window) -> np.ndarray:
    return grad.dense() if isinstance(grad, _Window) else grad


def _windowable(layer: Layer) -> bool:
    """A 2-D convolution or ConvTranspose with groups of one: its adjoint can take and give rectangles."""
    geom = layer.geometry
    return (
        layer.kind in ("conv", "conv_transpose")
        and isinstance(geom, ConvGeometry)
        and geom.groups == 1
        and len(layer.in_shape) == 4
        and len(layer.out_shape) == 4
        and layer.out_shape[2] * layer.out_shape[3] >= _EDGE_AREA
    )


def _window_of(layer: Layer, grad: np.ndarray) -> np.ndarray | _Window:
    """``grad`` [rows, 1, C, Ho, Wo] at a windowable layer's output as a :class:`_Window` when its
    non-zeros fill a small part of the plane (else as it is)."""
    count = grad.shape[0]
    plane = grad.reshape((count,) + tuple(layer.out_shape[1:]))
    r0, c0, block = nonzero_block(plane)
    if block.shape[2:] == plane.shape[2:]:
        return grad
    return _Window(block, (r0, c0), tuple(layer.out_shape))


def _window_layer_adjoint(layer: Layer, win: _Window, slope: np.ndarray | float) -> np.ndarray | _Window:
    """``_scaled_layer_adjoint`` of the sensitivities ``win``, as a window of the layer's input: the
    slope product on the block only, cut again to its non-zeros (the slope is finite, so it is
    0 outside), then the adjoint of that block (:func:`conv2d_adjoint_window`)."""
    if not np.all(np.isfinite(slope)):
        return _scaled_layer_adjoint(layer, win.dense(), slope)
    rows, cols = win.spans()
    scale = slope if np.ndim(slope) == 0 else np.broadcast_to(slope, layer.out_shape)[0, :, rows, cols]
    height, width = layer.out_shape[2:]
    r1, c1, scaled = nonzero_block(scaled_by(win.block, scale), whole=height * width)
    geom = layer.geometry
    assert isinstance(geom, ConvGeometry)  # _windowable
    origin = (rows.start + r1, cols.start + c1)
    in_hw = (int(layer.in_shape[2]), int(layer.in_shape[3]))
    if layer.kind == "conv_transpose":  # its adjoint is a convolution, cropped to the input plane
        found = conv2d_window(scaled, origin, np.abs(layer.weight), geom, in_hw)
        if found is None:
            return _scaled_layer_adjoint(layer, win.dense(), slope)
        return _Window(found[0], found[1], tuple(layer.in_shape))
    block, start = conv2d_adjoint_window(scaled, origin, np.abs(layer.weight), geom, in_hw)
    return _Window(block, start, tuple(layer.in_shape))


def _window_step(step, win: _Window, ctx) -> list[_Window | None] | None:
    """The absolute adjoint of ``step`` applied to the rectangle ``win``, as rectangles of its inputs,
    for the steps where it keeps the rectangle: ``Add``/``Sub`` of two variable values of the
    output's shape (the sensitivity passes to both unchanged) and a ``Concat`` of channels
    (each input gets its channels of the block). None for any other step (the caller takes
    the whole plane)."""
    shape = tuple(ctx.shape(step.outputs[0]))
    variable = [bool(v) and ctx.is_variable(v) for v in step.inputs]
    if step.op_type in ("Add", "Sub") and len(step.inputs) == 2 and all(variable):
        if all(tuple(ctx.shape(v)) == shape for v in step.inputs):
            return [win, win]
        return None
    if step.op_type == "MaxPool" and ctx.use_ranges and len(shape) == 4:
        box = ctx.memo(("hull", step.inputs[0]), lambda: ctx.hull(step.inputs[0]))
        found = context_candidates(step, ctx)
        block, origin = max_candidates_block_adjoint(step, win.block, win.origin, box, found)
        return [_Window(block, origin, tuple(ctx.shape(step.inputs[0])))]
    if step.op_type == "Concat" and len(shape) == 4 and step.attr("axis") % 4 == 1:
        pieces, first = [], 0
        for value, is_variable in zip(step.inputs, variable, strict=True):
            channels = ctx.shape(value)[1]
            block = win.block[:, first : first + channels]
            pieces.append(_Window(block, win.origin, tuple(ctx.shape(value))) if is_variable else None)
            first += channels
        return pieces
    return None


def _backward_rows(
    analysis,
    ctx,
    rows: slice | np.ndarray,
    needed,
    hidden_index,
    slopes,
    visit: Visitor,
    visit_value: ValueVisitor | None,
    tied: dict[int, int] | None = None,
    windows: bool = False,
    fused: bool = False,
    stop_after: int | None = None,
) -> None:
    net = analysis.network
    start_shape = net.clean[net.tail_start].shape
    index = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
    count = len(index)
    seed = np.zeros((count, _outputs(analysis)))
    seed[np.arange(count), index] = net.tail_factor
    cot: dict[str, np.ndarray | _Window] = {net.tail_start: seed.reshape((count,) + start_shape)}

    def add(value: str, grad: np.ndarray | _Window) -> None:
        if value not in cot:
            cot[value] = grad
            return
        old = cot[value]
        if isinstance(old, _Window) and isinstance(grad, _Window):
            cot[value] = old.plus(grad)
        else:
            cot[value] = _dense(old) + _dense(grad)

    # Sensitivities of a recurrent layer's later time steps, summed per unit until its first step
    # (its failure site, visited last) is reached: P[k, i] = Σ_t P_t[k, i] (docs/method.md §14.2).
    later: dict[int, np.ndarray] = {}
    tied = tied or {}

    for step in reversed(net.steps):
        if isinstance(step, Layer):
            grad = cot.pop(step.output_value, None)
            if grad is None:
                continue
            windowed = windows and _windowable(step)
            if windowed and not isinstance(grad, _Window):
                grad = _window_of(step, grad)
            if isinstance(grad, _Window) and not windowed:
                grad = grad.dense()
            if visit_value is not None:
                visit_value(step.output_value, rows, _dense(grad).reshape(count, -1))
            slope = slopes[id(step)]
            if isinstance(grad, _Window):
                if id(step) in hidden_index:
                    flat = np.broadcast_to(slope, step.out_shape).reshape(-1)
                    visit(hidden_index[id(step)], rows, grad.block.reshape(count, -1), flat, columns=grad.rectangle())
                    if hidden_index[id(step)] == stop_after:
                        return
                if step.input_value in needed:
                    add(step.input_value, _window_layer_adjoint(step, grad, slope))
                continue
            if id(step) in tied:
                site = tied[id(step)]
                later[site] = later[site] + grad.reshape(count, -1) if site in later else grad.reshape(count, -1)
            if id(step) in hidden_index:
                flat = np.broadcast_to(slope, step.out_shape).reshape(-1)
                sens = grad.reshape(count, -1)
                if hidden_index[id(step)] in later:
                    sens = sens + later.pop(hidden_index[id(step)])
                elif fused and step.input_value in needed and _scales(slope):
                    # P·slope formed by the visit while its rows are in cache: the same products as
                    # grad · slope, and the adjoint of that product is _scaled_layer_adjoint's
                    scaled = np.empty(sens.shape, dtype=np.result_type(sens, flat))
                    visit(hidden_index[id(step)], rows, sens, flat, scaled=scaled)
                    if hidden_index[id(step)] == stop_after:
                        return
                    add(step.input_value, _layer_adjoint(step, scaled.reshape(grad.shape)))
                    continue
                visit(hidden_index[id(step)], rows, sens, flat)
                if hidden_index[id(step)] == stop_after:
                    return
            if step.input_value in needed:
                add(step.input_value, _scaled_layer_adjoint(step, grad, slope))
            continue
        popped = [cot.pop(o, None) if o else None for o in step.outputs]
        if all(g is None for g in popped) or not any(v in needed for v in step.inputs):
            continue
        passed = _window_step(step, popped[0], ctx) if len(popped) == 1 and isinstance(popped[0], _Window) else None
        if passed is not None:
            for value, part in zip(step.inputs, passed, strict=True):
                if part is not None:
                    add(value, part)
            continue
        grads: list[np.ndarray | None] = [
            _dense(g) if g is not None else np.zeros((count,) + ctx.shape(o))
            for g, o in zip(popped, step.outputs, strict=True)
        ]
        if visit_value is not None:
            for value, filled in zip(step.outputs, grads, strict=True):
                if filled is not None:
                    visit_value(value, rows, filled.reshape(count, -1))
        rule = lookup(step)
        assert rule is not None  # every op on the audited path has a rule (checked by IBP)
        for value, grad in zip(step.inputs, rule.backward(step, grads, ctx), strict=False):
            if grad is not None and value and ctx.is_variable(value):
                add(value, grad)


def dense_sensitivities(analysis: Analysis, use_ranges: bool = True) -> list[np.ndarray]:
    """P per hidden layer, [outputs, N_l], all at once (small networks and tests only)."""
    result = [np.zeros((_outputs(analysis), la.neurons)) for la in analysis.hidden]

    def keep(i: int, rows: slice, sens: np.ndarray, slope: np.ndarray) -> None:
        result[i][rows] = sens

    SensitivityPass(analysis, keep, use_ranges).run()
    return result


def sensitivity_gains(analysis: Analysis, memory_bytes: int | None = None) -> np.ndarray:
    """[outputs, L]: Σ_i P[k, i] per hidden layer, with the global constants K (no ranges).

    For perturbations that are not failures (rounding, ignored signals): the faulty
    intervals do not hold those values, so slopes over them would not be sound.
    """
    gains = np.zeros((_outputs(analysis), len(analysis.hidden)))

    def add(i: int, rows: slice, sens: np.ndarray, slope: np.ndarray) -> None:
        gains[rows, i] = sens.sum(axis=1)

    SensitivityPass(analysis, add, use_ranges=False, memory_bytes=memory_bytes).run()
    return gains


class TightBound:
    """Sensitivity bound: |ΔF_k| ≤ Σ_l Σ_{i failed in l} P[k, i]·δ_i (docs/method.md §4.1).

    A failed neuron's deviation is at most δ_i whatever happened upstream; every other
    neuron's deviation is at most its slope over its clean-and-faulty interval times the
    deviation of its pre-activation; so the sum over failed neurons of P·δ bounds every
    output deviation, and the worst failure set takes, per output and per layer, the
    f_l largest P·δ. Only those largest values (``kept`` per layer and output), their
    total and the per-output synapse terms are stored (docs/method.md §4.4). Per output the
    bound is also at most each cut's Σ_j P[k, j]·W_j plus the failures outside what that
    layer covers (docs/method.md §4.1).
    """

    name = "tight"

    def __init__(
        self,
        analysis: Analysis,
        memory_bytes: int | None = None,
        use_ranges: bool = True,
        first_kept: int | None = None,
        skip_dominated: bool = False,
    ):
        """``first_kept``: how many values per output and layer the first pass keeps (None: every value
        that fits, or ``FIRST_KEPT`` on a network whose P has more than ``LAZY_KEPT_ENTRIES`` entries); a
        search that asks for more runs the pass again keeping every value that fits (:meth:`_widen`).

        ``skip_dominated``: the outputs that cannot raise a maximum are left unfinished where the output cut allows
        (:mod:`robaudit.bounds.dominated`); the figures over all outputs (:meth:`fep`, :meth:`refined`,
        :meth:`total_curve`) finish the pass first where they could differ, and :meth:`per_output` and
        :meth:`refined_per_output` always do."""
        self.analysis = analysis
        self.network = analysis.network
        self.use_ranges = use_ranges
        memory = tight_memory_bytes() if memory_bytes is None else memory_bytes
        outputs, limit = _outputs(analysis), kept_prefix(analysis, memory)
        self._memory, self._limit = memory, limit
        if first_kept is None:
            entries = outputs * sum(la.neurons for la in analysis.hidden)
            first_kept = limit if entries <= LAZY_KEPT_ENTRIES else FIRST_KEPT
        first = max(1, min(limit, first_kept))
        self.deltas = [analysis.neuron_deltas(la, *analysis.neuron_ranges(la)) for la in analysis.hidden]
        #: per hidden layer: the largest P·δ per output, sorted down, [outputs, min(N_l, kept)] (:attr:`top`).
        self._top = [np.zeros((outputs, min(la.neurons, first))) for la in analysis.hidden]
        #: per hidden layer: Σ_i P[k, i]·δ_i, [outputs].
        self.total = [np.zeros(outputs) for _ in analysis.hidden]
        #: per hidden layer: s·d·max_i P[k, i]·slope_i for s failed synapses of reach d, [outputs].
        self.synapse_terms = [np.zeros(outputs) for _ in analysis.hidden]
        self._neuron_max = [np.zeros(la.neurons) for la in analysis.hidden]  # :attr:`neuron_max`
        #: Σ_i P[k, i]·ρ_i per rounding value, [outputs] (docs/method.md §1.2).
        self.rounding_terms = {value: np.zeros(outputs) for value in self.network.rounding}
        #: cuts (docs/method.md §4.1): per hidden layer c, the widths W_j of its output's clean-and-faulty
        #: hull, the layers U_c whose every path to the output crosses c, and Σ_j P[k, j]·W_j.
        # recurrent layers (tied steps, internal gates) have no cut or signed argument yet (§14)
        recurrent = any(la.internal or la.tied for la in self.network.layers)
        self.cut_widths = cut_widths(analysis) if use_ranges and not recurrent else None
        #: cuts at normalizations' outputs, after the hidden layers' in the lists of cuts (docs/method.md §4.1)
        self.normalization_cuts = normalization_cuts(analysis) if self.cut_widths is not None else []
        cut_values = [la.output_value for la in analysis.hidden] + [c.value for c in self.normalization_cuts]
        cutting = self.cut_widths is not None
        self.cut_cover = covered_layers(self.network, analysis.hidden, cut_values) if cutting else []
        self.cut_rounding = covered_rounding(self.network, cut_values) if cutting else []
        self.cut_cost = [np.zeros(outputs) for _ in analysis.hidden] if self.cut_widths is not None else []
        # a normalization cut's cost stays +inf (no cut) for the outputs the pass does not reach it from
        self.cut_cost += [np.full(outputs, np.inf) for _ in self.normalization_cuts]
        first = len(analysis.hidden)
        self._normalization_cut_index = {c.value: first + m for m, c in enumerate(self.normalization_cuts)}
        self._scratch = threading.local()  # −P·δ of the layer being reduced (:meth:`_keep`), one buffer per thread
        self._merge = threading.Lock()  # held while a chunk's per-neuron maxima are merged
        self._feps: dict[tuple[int, ...], float] = {}  # :meth:`fep` per vector asked
        self.signed = _signed_terms(analysis, limit) if use_ranges and not recurrent else None
        #: the output cut (docs/method.md §4.1, "The output cut"); the boxes' alone where its lines are not built;
        #: None where neither applies
        self.output_cut: OutputCut | BoxCut | None = None
        if use_ranges:
            self.output_cut = (None if recurrent else OutputCut.build(analysis)) or BoxCut.build(analysis)
        #: per hidden layer: the prefix sums of ``top``, [outputs, T_l + 1], computed as far as asked (§4.4).
        self._prefix = LazyPrefix(self._top)
        #: the outputs left unfinished (:mod:`robaudit.bounds.dominated`), None once every output is complete
        self._plan: DominatedPlan | None = None
        self._planned = not (skip_dominated and self._may_leave_outputs(recurrent))  # decided on the first pass
        self._run_pass()

    def __getstate__(self) -> dict:
        """Picklable and deep-copyable: the per-thread buffers and the lock are made again on load."""
        state = dict(self.__dict__)
        del state["_scratch"], state["_merge"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._scratch, self._merge = threading.local(), threading.Lock()

    @property
    def neuron_max(self) -> list[np.ndarray]:
        """Per hidden layer, max_k P[k, i]·δ_i, [N_l] (how much neuron i may move some output), over every output
        (an unfinished pass is finished first: docs/method.md §4.4, "Dominated outputs")."""
        self._finish()
        return self._neuron_max

    @property
    def top(self) -> list[np.ndarray]:
        """Per hidden layer, the min(N_l, kept) largest P·δ per output, sorted down, [outputs, min(N_l, kept)]
        (the pass is run again first if the first one kept fewer: :meth:`_widen`; an unfinished one is finished)."""
        self._finish()
        self._widen()
        return self._top

    @property
    def prefix(self) -> LazyPrefix:
        """Per hidden layer, the prefix sums of :attr:`top`, [outputs, min(N_l, kept) + 1], computed as far as
        asked (docs/method.md §4.4)."""
        self._finish()
        self._widen()
        return self._prefix

    def _kept(self, i: int, f: int) -> int:
        """The kept values of layer ``i`` once a search asks for the sum of its ``f`` largest: the first
        pass's, unless ``f`` is past them and the pass could keep more (then it is run again)."""
        kept = self._top[i].shape[1]
        if f > kept and kept < min(self.analysis.hidden[i].neurons, self._limit):
            self._widen()
            kept = self._top[i].shape[1]
        return kept

    def _widen(self) -> None:
        """Run the pass again keeping every value that fits (``kept_prefix``), when the first one kept fewer.

        The pass is deterministic (the same chunks, products and selections), so every P·δ is the same
        number, and the first kept values of each row are those kept before, in the same order; the
        totals, maxima and cut costs it writes again are the same numbers (docs/method.md §4.4)."""
        outputs = self._top[0].shape[0] if self._top else 0
        widths = [min(la.neurons, self._limit) for la in self.analysis.hidden]
        if all(t.shape[1] >= w for t, w in zip(self._top, widths, strict=True)):
            return
        self._top = [np.zeros((outputs, w)) for w in widths]
        self._run_pass()
        self._prefix = LazyPrefix(self._top)

    def _run_pass(self) -> None:
        """The sensitivity pass reduced by :meth:`_keep` (and, on a model with rounding or a normalization cut,
        :meth:`_keep_values`: every run of the pass has it, so that every run cuts the outputs into the same
        chunks — a pass with a value visitor takes no tiles), whose chunks may run in several threads at once
        (:class:`SensitivityPass`): each thread reduces in its own scratch buffer, and the per-neuron
        maxima, the one thing two chunks write to the same place, are merged under a lock. The first run decides
        which outputs it leaves unfinished (:meth:`_plan_after_probe`); later runs (:meth:`_widen`) repeat that."""
        sweep = self._sweep()
        if not self._planned:
            self._planned = True
            probe = probe_chunks(sweep.chunks, self._envelope, sweep.threads)
            sweep.run(probe)
            self._plan = self._plan_after_probe(sweep, probe)
            if self._plan is None:
                sweep.run(other_chunks(len(sweep.chunks), probe))
        elif self._plan is None:
            sweep.run()
        else:
            sweep.run(self._plan.probe)
        if self._plan is not None:
            self._leave_unfinished(sweep, self._plan)
        self._scratch = threading.local()  # the buffers released
        self._refresh()

    def _sweep(self) -> SensitivityPass:
        """The pass of :meth:`_run_pass`, configured (its chunks are the same on every run)."""
        visit_value = self._keep_values if self.rounding_terms or self.normalization_cuts else None
        _ = self._negated_deltas  # computed before the threads read it
        return SensitivityPass(
            self.analysis, self._keep, self.use_ranges, self._memory, visit_value, windows=True, fused=True
        )

    def _refresh(self) -> None:
        """Forget what was derived from the kept values (they changed): prefix sums, figures, stacked cut costs."""
        self._prefix = LazyPrefix(self._top)
        self._feps.clear()
        self.__dict__.pop("_cut_costs", None)

    def _may_leave_outputs(self, recurrent: bool) -> bool:
        """Whether outputs may be left unfinished (docs/method.md §4.4, "Dominated outputs"): an output cut whatever
        fails, failed neurons whose figures carry no bit-flip factor, no synapse or rounding terms and no signed terms
        (the figures that read every output's own P)."""
        analysis = self.analysis
        if recurrent or self.output_cut is None or self.signed is not None or self.rounding_terms:
            return False
        return not (analysis.failure.stored or any(analysis.synapses))

    @cached_property
    def _envelope(self) -> np.ndarray:
        """[outputs]: the output cut with every hidden neuron failing, at least each output's figure for any counts."""
        assert self.output_cut is not None  # only asked where :meth:`_may_leave_outputs`
        return self.output_cut.bound([la.neurons for la in self.analysis.hidden])

    def _plan_after_probe(self, sweep: SensitivityPass, probe: tuple[int, ...]) -> DominatedPlan | None:
        """After the probe's chunks: the layers saturated by them (one failure gives some probed output a figure at
        least every other output's envelope), and the plan that skips them for the other outputs; None if none."""
        probe_rows = chunk_indices(sweep.chunks, probe)
        rest_rows = np.setdiff1d(np.arange(self._envelope.shape[0]), probe_rows)
        if len(sweep.chunks) < MIN_CHUNKS or rest_rows.size == 0:  # the probe was every chunk (as many as threads)
            return None
        self._refresh()  # the probe's rows were written
        count = len(self.analysis.hidden)

        def reach(i: int) -> float:
            one = [0] * count
            one[i] = 1
            return float(self._cut_sums(one)[probe_rows].max())

        order = sorted(range(count), key=self._step_position)
        skipped = saturated_prefix(order, reach, float(self._envelope[rest_rows].max()))
        if not skipped:
            return None
        stop = order[len(skipped)] if len(skipped) < count else None
        return DominatedPlan(probe, probe_rows, rest_rows, tuple(skipped), stop)

    def _step_position(self, i: int) -> int:
        """Where hidden layer ``i`` is in the network's steps."""
        layer = self.analysis.hidden[i]
        return next(p for p, step in enumerate(self.network.steps) if step is layer)

    def _leave_unfinished(self, sweep: SensitivityPass, plan: DominatedPlan) -> None:
        """Back-propagate the other outputs as far as ``plan`` says, and read their skipped layers' P as +∞."""
        if plan.stop_after is not None:
            sweep.run(other_chunks(len(sweep.chunks), plan.probe), stop_after=plan.stop_after)
        rows = plan.rest_rows
        for i in plan.skipped:
            self._top[i][rows] = np.inf
            self.total[i][rows] = np.inf
            if self.cut_widths is not None:
                self.cut_cost[i][rows] = np.inf

    def _finish(self) -> None:
        """Back-propagate the unfinished outputs in full (the same numbers as a pass that never left them)."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        sweep = self._sweep()
        sweep.reported = len(plan.probe)
        sweep.run(other_chunks(len(sweep.chunks), plan.probe))
        self._scratch = threading.local()
        self._refresh()

    def _checked(
        self, found: np.ndarray, again: Callable[[], np.ndarray], failures: Sequence[int] | None = None
    ) -> np.ndarray:
        """``found`` [outputs, ...], or ``again()`` after :meth:`_finish` where an unfinished output could raise its
        maximum over the outputs (:func:`~robaudit.bounds.dominated.dominates`). ``failures``: the vector the values
        are of (None: failures anywhere); one that fails no skipped layer reads every output's own figure (the
        skipped layers' terms are 0, and their cuts cover skipped layers only: docs/method.md §4.4)."""
        plan = self._plan
        if plan is None or (failures is not None and not any(failures[i] > 0 for i in plan.skipped)):
            return found
        if dominates(found, plan):
            return found
        self._finish()
        return again()

    def _buffer(self, size: int) -> np.ndarray:
        """This thread's scratch buffer of at least ``size`` elements (one for every layer and chunk the
        thread reduces: no fresh pages each time)."""
        held = getattr(self._scratch, "buffer", None)
        if held is None or held.size < size:
            held = self._scratch.buffer = np.empty(size)
        return held

    @np.errstate(over="ignore")  # P·δ past float64's range is +inf: a bound reported as unbounded
    def _keep(
        self,
        i: int,
        rows: slice | np.ndarray,
        sens: np.ndarray,
        slope: np.ndarray,
        columns: np.ndarray | Rectangle | None = None,
        scaled: np.ndarray | None = None,
    ) -> None:
        """Reduce the P rows of hidden layer i to what the inverse problems need; ``columns``: the flat
        neuron indices of ``sens``'s columns, or their :class:`Rectangle` (every other P entry of these rows is 0);
        ``scaled`` [rows, N_l]: filled with P·slope, a block of rows at a time while the block is in cache
        (:class:`SensitivityPass` with ``fused``; the same products as ``sens * slope``).

        A cache-sized block of rows at a time (docs/method.md §4.4): −P·δ of the block is formed in a
        small buffer, then summed, compared and selected while it is in cache; every row's numbers
        are those of the whole chunk at once (each is reduced on its own), and the per-neuron maximum
        is the maximum over the blocks' maxima."""
        if self.cut_widths is not None:
            self.cut_cost[i][rows] = sens @ picked(self.cut_widths[i], columns)
        synapses = self.analysis.synapses[i]
        if synapses:  # P·slope ≥ 0: the other columns' 0 changes no maximum
            terms = (sens * picked(slope, columns)[None, :]).max(axis=1)
            self.synapse_terms[i][rows] = synapses * self.analysis.synapse_ds[i] * terms
        count, size = sens.shape
        step = max(1, min(count, _KEEP_BLOCK_ELEMENTS // max(1, size)))
        scratch = self._buffer(step * size)
        deltas = picked(self._negated_deltas[i], columns)[None, :]
        factors = None if scaled is None else picked(slope, columns)[None, :]
        totals = np.empty(count)
        least: np.ndarray | None = None  # per column, the least −P·δ over the blocks so far
        for b0 in range(0, count, step):
            b1 = min(count, b0 + step)
            # −P·δ: negation is exact, so the sums, maxima and the selection below are those of P·δ, without
            # the pass that negates P·δ in place for the selection (docs/method.md §4.4)
            negated = scratch[: (b1 - b0) * size].reshape(b1 - b0, size)
            np.multiply(sens[b0:b1], deltas, out=negated)
            if scaled is not None and factors is not None:
                np.multiply(sens[b0:b1], factors, out=scaled[b0:b1])
            totals[b0:b1] = negated.sum(axis=1)
            # a block of one row (a layer of more than half a block's elements) is its own column minimum:
            # the row itself, read before the selection below reorders it (the same numbers as min(axis=0))
            block_least = negated[0] if b1 - b0 == 1 else negated.min(axis=0)
            if least is None:
                least = block_least.copy()
            else:
                np.minimum(least, block_least, out=least)
            self._keep_tops(i, _row_block(rows, b0, b1), negated, block_least)
        self.total[i][rows] = np.negative(totals)
        assert least is not None  # a chunk has at least one row
        with self._merge:  # another thread's chunk may reach the same neurons
            self._merge_neuron_max(i, columns, np.negative(least))

    def _merge_neuron_max(self, i: int, columns: np.ndarray | Rectangle | None, largest: np.ndarray) -> None:
        """Fold a chunk's largest P·δ per column of layer ``i`` into :attr:`neuron_max` (under the lock)."""
        if isinstance(columns, Rectangle):  # in place on the rectangle's view: the same maxima
            view = columns.view(self._neuron_max[i])
            np.maximum(view, largest.reshape(view.shape), out=view)
        else:
            pick = slice(None) if columns is None else columns
            self._neuron_max[i][pick] = np.maximum(self._neuron_max[i][pick], largest)

    def _keep_tops(self, i: int, rows: slice | np.ndarray, negated: np.ndarray, column_max: np.ndarray) -> None:
        """The kept values of ``rows`` of layer i from their −P·δ ``negated`` (overwritten), ``column_max``
        its largest P·δ per column or its negation, −P·δ's least (0: a column the selection may leave out;
        it may be a view of ``negated``, read before the selection)."""
        width = self._top[i].shape[1]
        if width > negated.shape[1]:  # fewer columns than kept values: the others are zeros
            top = np.zeros((negated.shape[0], width))
            top[:, : negated.shape[1]] = _row_tops(negated, column_max, negated.shape[1], negated=True)
            self._top[i][rows] = top
        elif isinstance(rows, slice):  # written straight into the kept rows: no copy of the sorted values
            _row_tops(negated, column_max, width, negated=True, out=self._top[i][rows])
        else:
            self._top[i][rows] = _row_tops(negated, column_max, width, negated=True)

    @cached_property
    def _negated_deltas(self) -> list[np.ndarray]:
        """−δ per hidden layer (:meth:`_keep` works on −P·δ)."""
        return [np.negative(d) for d in self.deltas]

    @np.errstate(over="ignore")
    def _keep_values(self, value: str, rows: slice | np.ndarray, cot: np.ndarray) -> None:
        """What the bound needs of a value's sensitivities ``cot`` [rows, elements]: its rounding terms
        (docs/method.md §1.2) and, at a normalization's output, that cut's cost (§4.1)."""
        radius = self.network.rounding.get(value)
        if radius is not None:
            self.rounding_terms[value][rows] = cot @ radius
        c = self._normalization_cut_index.get(value)
        if c is not None:
            self.cut_cost[c][rows] = self.normalization_cuts[c - len(self.analysis.hidden)].cost(cot)

    def rounding_per_output(self, failures: Sequence[int]) -> np.ndarray | float:
        """What rounding adds to |ΔF_k| when ``failures`` (and the synapse failures) may occur: a
        rounding value's radii count once some failure upstream makes its input deviate."""
        moving = self._deviating_rounding(failures)
        if moving is None:
            return 0.0
        total: np.ndarray | float = self.network.tail_rounding
        for value in moving:
            total = total + self.rounding_terms[value]
        return total

    def _deviating_rounding(self, failures: Sequence[int]) -> list[str] | None:
        """The rounding values whose input ``failures`` (and the synapse failures) may make deviate; None when
        nothing fails."""
        synapses = {i for i, s in enumerate(self.analysis.synapses) if s > 0}
        active = {i for i, f in enumerate(failures) if f > 0} | synapses
        if not active:
            return None
        return [value for value, (upstream, own) in self._rounding_sources.items()
                if (upstream & active or own in synapses) and value in self.rounding_terms]

    def _covered_rounding_sums(self, failures: Sequence[int], cuts: np.ndarray) -> np.ndarray | float:
        """[len(cuts), outputs]: per cut c, the rounding terms of :meth:`rounding_per_output` that c's width
        already holds (:func:`covered_rounding`), to be taken off that cut (docs/method.md §4.1)."""
        moving = self._deviating_rounding(failures)
        if not moving or not self.network.rounding:
            return 0.0
        outputs = self._top[0].shape[0] if self._top else 1
        sums = np.zeros((len(cuts), outputs))
        for row, c in enumerate(cuts):
            for value in set(self.cut_rounding[c]).intersection(moving):
                sums[row] += self.rounding_terms[value]
        return sums

    @cached_property
    def _rounding_sources(self) -> dict[str, tuple[set[int], int | None]]:
        """:func:`~robaudit.bounds.fep.rounding_sources` of the network, computed once (the inverse
        problems ask for it at every step of their searches)."""
        return rounding_sources(self.network)

    @cached_property
    def weighted(self) -> list[np.ndarray]:
        """P·δ per hidden layer, [outputs, N_l], computed again in full (small networks and tests only)."""
        return [p * d[None, :] for p, d in zip(self.sensitivities(), self.deltas, strict=True)]

    def sensitivities(self) -> list[np.ndarray]:
        """P per hidden layer, [outputs, N_l], computed again in full (small networks and tests only)."""
        return dense_sensitivities(self.analysis, self.use_ranges)

    def layer_sum(self, i: int, f: int) -> np.ndarray:
        """Per output, a bound on the sum of the f largest P·δ of hidden layer i.

        Exact up to the kept count; past it, each further value is at most the smallest
        kept one, and the whole sum at most the total (exact at f = N_l).
        """
        kept = self._kept(i, f)
        if f <= kept:
            return self._prefix.column(i, f)
        extended = self._prefix.column(i, kept) + (f - kept) * self._top[i][:, kept - 1]
        return np.minimum(extended, self.total[i])

    def layer_terms(self, failures: Sequence[int]) -> np.ndarray:
        """[L, outputs]: per hidden layer the sum of the f_l largest P·δ plus its synapse terms, capped at
        the finite UNBOUNDED (so that 0·term stays 0 in the cuts)."""
        outputs = self._top[0].shape[0] if self._top else 1
        terms = [
            np.zeros(outputs)  # adds exactly 0: the sum of no P·δ and no synapse term
            if f <= 0 and not self.synapse_terms[i].any()
            else self.layer_sum(i, min(f, self.analysis.hidden[i].neurons)) + self.synapse_terms[i]
            for i, f in enumerate(failures)
        ]
        return np.minimum(np.stack(terms), UNBOUNDED) if terms else np.zeros((0, 1))

    def sums(self, failures: Sequence[int]) -> np.ndarray:
        """§4.1's sum per output element, Σ_l (sum of the f_l largest P[k, i]·δ_i) + synapse terms, without
        cuts or rounding (docs/method.md §4.1)."""
        return self.layer_terms(failures).sum(axis=0)

    def per_output(self, failures: Sequence[int]) -> np.ndarray:
        """Bound on |ΔF_k| for every output element k: the smaller of the sensitivity sum and every
        cut bound, plus rounding (docs/method.md §4.1, §1.2). Every output's own figure: an unfinished pass is
        finished first (docs/method.md §4.4, "Dominated outputs")."""
        self._finish()
        return self._per_output_rows(failures)

    def _per_output_rows(self, failures: Sequence[int]) -> np.ndarray:
        """:meth:`per_output` as the kept values stand (an unfinished output's figure is its output cut)."""
        return self._cut_sums(failures) + self.rounding_per_output(failures)

    def refined(self, failures: Sequence[int]) -> float:
        """:meth:`fep` of this one vector, with the output cut also taken on the faulty boxes of exactly
        these counts (docs/method.md §4.1, "The output cut"; one more range pass, so only for a vector
        asked for, not inside the inverse problems)."""
        rows = self._refined_rows(failures)
        if rows is None:
            return self.fep(failures)
        return float(self._checked(rows, lambda: self._refined_present(failures), failures).max())

    def _refined_present(self, failures: Sequence[int]) -> np.ndarray:
        """:meth:`_refined_rows` of a vector it is known to refine."""
        rows = self._refined_rows(failures)
        assert rows is not None  # the same vector, the same cuts
        return rows

    def refined_per_output(self, failures: Sequence[int]) -> np.ndarray | None:
        """:meth:`refined` per output element k (carry factor included), [outputs]; None where the refinement
        adds nothing to :meth:`per_output` (no failure, or no output cut and no signed terms). Every output's own
        figure: an unfinished pass is finished first."""
        self._finish()
        return self._refined_rows(failures)

    def _refined_rows(self, failures: Sequence[int]) -> np.ndarray | None:
        """:meth:`refined_per_output` as the kept values stand (an unfinished output's figure is its output cut)."""
        if not any(f > 0 for f in failures) or (self.output_cut is None and self.signed is None):
            return None
        per = self._cut_sums(failures)
        design = self.output_cut.design(failures) if self.output_cut is not None else None
        if design is not None:
            per = np.minimum(per, design)
        counted = self._counted_signed(failures, design)
        if self.output_cut is None and counted is None:
            return None
        if counted is not None:  # the signed terms with the later failed neurons counted (docs/method.md §5.5)
            per = np.minimum(per, counted)
        return (per + self.rounding_per_output(failures)) * self.analysis.carry_factor(failures)

    def _counted_signed(self, failures: Sequence[int], design: np.ndarray | None) -> np.ndarray | None:
        """The signed terms of exactly ``failures`` with the later failed neurons counted, per output, or
        None (docs/method.md §5.5); with the pre-gate boxes of the origins that decide them tightened where
        the other bounds per output (§4.1's sum and cuts, the output cut of these counts ``design``) are
        larger (docs/method.md §5.6)."""
        if self.signed is None or not any(f > 0 for f in failures):
            return None
        ceiling = self._cut_sums(failures, signed=False)
        if design is not None:
            ceiling = np.minimum(ceiling, design)
        from robaudit.bounds.tightened import tightened_signed_bound  # imported here: certify uses these modules
        from robaudit.bounds.zeroed import vector_signed_bound

        caps = self.layer_terms(failures)
        found = tightened_signed_bound(self.signed, failures, caps, ceiling)
        return found if found is not None else vector_signed_bound(self.signed, failures, caps)

    def _cut_sums(self, failures: Sequence[int], signed: bool = True) -> np.ndarray:
        """:meth:`per_output` without rounding (and without the signed terms of §4.1 if not ``signed``)."""
        stacked = self.layer_terms(failures)
        total = stacked.sum(axis=0)
        if signed and self.signed is not None and any(f > 0 for f in failures):
            total = np.minimum(total, self.signed.bound(failures, stacked))
        if self.cut_cover:
            covered = self._covered
            failing = (np.asarray(failures) > 0) | (np.asarray(self.analysis.synapses) > 0)
            active = np.flatnonzero((covered[:, failing] > 0).any(axis=1))
            if active.size:
                # a cut behind which every failing layer lies holds every flip set as it is (§2.3): no carry factor
                alone = (covered[active][:, failing] > 0).all(axis=1)
                cost = self._cut_costs[active] / np.where(alone, self._uncarried(failures), 1.0)[:, None]
                cut = cost + (1.0 - covered[active]) @ stacked
                cut = cut - self._covered_rounding_sums(failures, active)  # added back by per_output (§4.1)
                total = np.minimum(total, cut.min(axis=0))
        if self.output_cut is not None and any(f > 0 for f in failures):
            total = np.minimum(total, self.output_cut.bound(failures))
        return total

    def _uncarried(self, failures: Sequence[int]) -> float:
        """The carry factor of stored-value faults (docs/method.md §2.3) that every per-output figure is multiplied
        by, for ``failures`` (1 for other failures)."""
        return self.analysis.carry_factor([max(int(f), 0) for f in failures])

    @cached_property
    def _covered(self) -> np.ndarray:
        """[cuts, L]: 1 where hidden layer l is in U_c."""
        size = len(self.analysis.hidden)
        return np.array([[1.0 if i in cover else 0.0 for i in range(size)] for cover in self.cut_cover])

    @cached_property
    def _cut_costs(self) -> np.ndarray:
        """[cuts, outputs]: Σ_j P_c[k, j]·W_j."""
        return np.stack(self.cut_cost)

    def fep(self, failures: Sequence[int]) -> float:
        """max_k Σ_l (sum of the f_l largest P[k, i]·δ_i) (+ synapse and rounding terms), times the
        float bit-flip carry factor (docs/method.md §2.3). Computed once per vector: the searches of
        §6 ask for the same vectors again (no failure for every layer, one failure then its
        extension; docs/method.md §4.4)."""
        key = tuple(int(f) for f in failures)
        found = self._feps.get(key)
        if found is None:
            per = self._per_output_rows(failures)
            per = self._checked(per, lambda: self._per_output_rows(failures), failures)
            found = float(per.max()) * self.analysis.carry_factor(failures)
            self._feps[key] = found
        return found

    fep_upto = fep  # already monotone in every f_l

    def total_curve(self, budget: int) -> np.ndarray:
        """C[F] ≥ the worst F failures anywhere: per output, the F largest P·δ over all layers.

        A layer whose kept values run out before F contributes, past them, copies of its
        smallest kept value (each remaining value is at most that).
        """
        rows = self._checked(self._curve_rows(budget), lambda: self._curve_rows(budget))
        curve = rows.max(axis=0) * self.analysis.carry_factor([budget] * len(self._top))
        if curve.shape[0] < budget + 1:
            curve = np.concatenate([curve, np.full(budget + 1 - curve.shape[0], curve[-1])])
        return curve

    def _curve_rows(self, budget: int) -> np.ndarray:
        """:meth:`total_curve` per output, F = 0 … min(budget, neurons), without the carry factor, [outputs, F + 1]."""
        for i in range(len(self._top)):
            self._kept(i, budget)  # the pass again if a layer kept fewer than ``budget`` of more values
        pieces = []
        for i, top in enumerate(self._top):
            pieces.append(top[:, :budget])  # sorted: only a layer's first ``budget`` can be among the largest
            missing = min(budget, self.analysis.hidden[i].neurons) - top.shape[1]
            if missing > 0:
                pieces.append(np.repeat(top[:, -1:], missing, axis=1))
        width = min(budget, sum(p.shape[1] for p in pieces))
        prefix = _merged_prefix(pieces, width)
        prefix = np.minimum(prefix, self._cut_curves(budget, width, prefix[:, -1]))
        if self.output_cut is not None:
            prefix = np.minimum(prefix, self.output_cut.curve(width))
        syn = np.sum(self.synapse_terms, axis=0) if self.synapse_terms else np.zeros(prefix.shape[0])
        rounding = np.asarray(self.rounding_per_output([1] * len(self._top)), np.float64).reshape(-1, 1)
        if not any(self.analysis.synapses):
            rounding = rounding * (np.arange(width + 1) >= 1)  # no failure, no deviation
        return prefix + syn[:, None] + rounding

    def _cut_curves(self, budget: int, width: int, largest: np.ndarray) -> np.ndarray | float:
        """Per output, min over the most useful cuts c of Σ_j P[k, j]·W_j plus the F largest P·δ of
        the layers outside U_c (docs/method.md §4.1); at most ``MAX_CUT_CURVES`` cuts, the ones with
        the smallest largest cost. A cut whose cost is at least ``largest`` (the sensitivity curve at
        its end, per output) for every output cannot lower the curve and is skipped."""
        if not self.cut_cost:
            return np.inf
        useful = [c for c, cost in enumerate(self.cut_cost) if np.any(cost < largest)]
        order = sorted(useful, key=lambda c: float(self.cut_cost[c].max()))
        best: np.ndarray | float = np.inf
        for c in order[:MAX_CUT_CURVES]:
            pieces = []
            for i, top in enumerate(self._top):  # widened as far as ``budget`` by total_curve
                if i in self.cut_cover[c]:
                    continue
                pieces.append(top[:, :budget])  # sorted: only the first ``budget`` can be among the largest
                missing = min(budget, self.analysis.hidden[i].neurons) - top.shape[1]
                if missing > 0:
                    pieces.append(np.repeat(top[:, -1:], missing, axis=1))
            available = sum(p.shape[1] for p in pieces)
            rest = _merged_prefix(pieces, min(width, available)) if pieces else np.zeros((len(self.cut_cost[c]), 1))
            if rest.shape[1] < width + 1:  # fewer neurons outside U_c than F: the extra failures fall inside
                rest = np.concatenate([rest, np.repeat(rest[:, -1:], width + 1 - rest.shape[1], axis=1)], axis=1)
            covered = self._covered_rounding_sums([1] * len(self._top), np.array([c]))  # total_curve adds them back
            # a cut behind which every layer lies holds every flip set as it is (§2.3): no carry factor
            carry = self._uncarried([budget] * len(self._top)) if not pieces else 1.0
            curve = self.cut_cost[c][:, None] / carry + rest - np.reshape(covered, (-1, 1))
            curve[:, 0] = np.inf  # no failure: nothing deviates (the sensitivity curve gives 0)
            best = np.minimum(best, curve)
        return best


class OutputCut:
    """The output cut (docs/method.md §4.1, "The output cut"): for output element k and at most f_l failed
    neurons in hidden layer l, |F̃_k(x) − F_k(x)| is at most

    * max(h̃i_k(f) − lo_k, hi_k − l̃o_k(f)): [lo_k, hi_k] the clean box of k, [l̃o_k(f), h̃i_k(f)] its faulty
      box, both ends carried through the failure sites (:func:`~robaudit.bounds.ranges.failure_site_lines`:
      the sum of the f_l largest failure terms per site), intersected with the faulty box that holds for
      every failure set;
    * the same lines taken jointly: F̃_k(x) ≤ A·x + c + (failure terms) and −F_k(x) ≤ B·x + d (the clean
      network's lines to the same input x), so F̃_k(x) − F_k(x) ≤ max over the input box of (A + B)·x
      + c + d + (failure terms); likewise for F_k − F̃_k;

    times the ∞-norm tail factor, like P. Both are non-decreasing in every f_l.
    """

    def __init__(self, analysis: Analysis, lines: SiteLines, clean: SiteLines) -> None:
        net = analysis.network
        clean_box, faulty = net.clean[net.tail_start], analysis.faulty()[net.tail_start]
        self.analysis = analysis
        self.clean_lo, self.clean_hi = clean_box.lo.reshape(-1), clean_box.hi.reshape(-1)
        self.faulty_lo, self.faulty_hi = faulty.lo.reshape(-1), faulty.hi.reshape(-1)
        self.factor = net.tail_factor
        self.clean = clean
        self.upper, self.joint = lines.upper(), self._joint(lines)
        #: per hidden layer: [2n, N_l + 1], the sums of the f largest failure terms (f = 0..N_l) per row
        self.prefix = [_failure_prefix(lines, la.output_value) for la in analysis.hidden]

    @classmethod
    def build(cls, analysis: Analysis) -> OutputCut | None:
        """The output cut when it applies and fits (else None): faulty boxes trusted, failed neurons
        (crash, byzantine) without synapse failures or rounding inside the model (range restrictions: §4.1),
        a CROWN model, and the pass within ``OUTPUT_CUT_BUDGET`` multiply-adds and ``OUTPUT_CUT_ELEMENTS``
        kept terms (docs/method.md §4.1)."""
        net = analysis.network
        if not boxes_trusted(analysis):
            return None
        if getattr(net, "ranges", "ibp") != "crown" or not crown_applies(net):
            return None
        outputs = _outputs(analysis)
        if 2 * outputs * sum(la.neurons for la in analysis.hidden) > OUTPUT_CUT_ELEMENTS:
            return None
        if through_cost(net, net.tail_start) > OUTPUT_CUT_BUDGET:
            return None
        widen = {la.output_value: analysis.failure.failure_range for la in analysis.hidden}
        radius = analysis.flip_radius if analysis.failure.stored else None
        lines = failure_site_lines(net, analysis.faulty(), widen, net.tail_start, radius)
        return cls(analysis, lines, failure_site_lines(net, net.clean, {}, net.tail_start))

    def _joint(self, lines: SiteLines) -> np.ndarray:
        """[2n]: upper bounds of F̃_k − F_k (rows < n) and F_k − F̃_k, no failure term: the faulty lines of
        ±F̃_k plus the clean lines of ∓F_k, concretized together over the input box."""
        n = self.clean_lo.shape[0]
        swap = np.r_[n : 2 * n, 0:n]
        both = lines.inputs + self.clean.inputs[swap]
        return lines.constant + self.clean.constant[swap] + _concretize_rows(both, lines.box)

    def _bound(self, upper: np.ndarray, joint: np.ndarray, terms: np.ndarray) -> np.ndarray:
        """[n, ...] from the no-failure bounds ``upper`` (of ±F̃) and ``joint`` [2n] and the failure terms
        ``terms`` [2n, ...]."""
        n = self.clean_lo.shape[0]
        extra = (slice(None),) + (None,) * (terms.ndim - 1)
        carried = upper[extra] + terms
        hi = np.minimum(carried[:n], self.faulty_hi[extra])
        lo = np.maximum(-carried[n:], self.faulty_lo[extra])
        boxes = np.maximum(hi - self.clean_lo[extra], self.clean_hi[extra] - lo)
        joint = joint[extra] + terms
        return _no_nan(self.factor * np.minimum(boxes, np.maximum(joint[:n], joint[n:])))

    def terms(self, failures: Sequence[int]) -> np.ndarray:
        """[2n]: per row, Σ_l the sum of the f_l largest failure terms of hidden layer l."""
        total = np.zeros(self.upper.shape[0])
        for prefix, f in zip(self.prefix, failures, strict=True):
            total += prefix[:, min(max(int(f), 0), prefix.shape[1] - 1)]
        return total

    def bound(self, failures: Sequence[int]) -> np.ndarray:
        """Per output element, the cut for at most ``failures[l]`` failed neurons in hidden layer l (divided by the
        bit-flip carry factor: :meth:`_uncarried`)."""
        return self._bound(self.upper, self.joint, self.terms(failures)) / self._uncarried(failures)

    def _uncarried(self, failures: Sequence[int]) -> float:
        """The carry factor of stored-value faults (docs/method.md §2.3) that :class:`TightBound` multiplies every
        per-output figure by: this cut's boxes and lines already hold every flip of a deviated value, so it is
        handed over divided by it (1 for other failures)."""
        return self.analysis.carry_factor([max(int(f), 0) for f in failures])

    def curve(self, width: int) -> np.ndarray:
        """[n, width + 1]: the cut for F failures in every layer at once, F = 0..width (∞ at F = 0: no
        failure, no deviation), an upper bound of the cut of every distribution of F failures."""
        counts = np.arange(width + 1)
        terms = sum((p[:, np.minimum(counts, p.shape[1] - 1)] for p in self.prefix), np.zeros((1, width + 1)))
        result = self._bound(self.upper, self.joint, terms) / self._uncarried([max(width, 1)] * len(self.prefix))
        result[:, 0] = np.inf
        return result

    def design(self, failures: Sequence[int]) -> np.ndarray:
        """The cut for ``failures`` with the faulty boxes of exactly these counts (docs/method.md §5.3,
        "Through the failure sites": sound for every vector ≤ ``failures``), [n]."""
        analysis, net = self.analysis, self.analysis.network
        if analysis.failure.stored:  # the counted boxes read one failure range (docs/method.md §5.3)
            return self.bound(failures)
        counts = {la.output_value: int(f) for la, f in zip(analysis.hidden, failures, strict=True)}
        boxes = counted_faulty_ranges(net, counts, analysis.failure.failure_range, analysis.faulty())
        widen = {v: analysis.failure.failure_range for v, c in counts.items() if c > 0}
        lines = failure_site_lines(net, boxes, widen, net.tail_start)
        terms = np.zeros(self.upper.shape[0])
        for la, f in zip(analysis.hidden, failures, strict=True):
            prefix = _failure_prefix(lines, la.output_value)
            terms += prefix[:, min(max(int(f), 0), prefix.shape[1] - 1)]
        box = boxes[net.tail_start]
        n = self.clean_lo.shape[0]
        hi = np.minimum(np.minimum(lines.upper()[:n] + terms[:n], box.hi.reshape(-1)), self.faulty_hi)
        lo = np.maximum(np.maximum(-lines.upper()[n:] - terms[n:], box.lo.reshape(-1)), self.faulty_lo)
        boxes_cut = np.maximum(hi - self.clean_lo, self.clean_hi - lo)
        joint = self._joint(lines) + terms
        return _no_nan(self.factor * np.minimum(boxes_cut, np.maximum(joint[:n], joint[n:])))


class BoxCut:
    """The output cut of the boxes alone (docs/method.md §4.1, "The output cut", §14.2): for every input x and
    failure set, F_k(x) lies in the clean box [lo_k, hi_k] and F̃_k(x) in the faulty box [l̃o_k, h̃i_k] that holds
    for every failure set (§5.3), so |F̃_k(x) − F_k(x)| ≤ max(h̃i_k − lo_k, hi_k − l̃o_k), times the ∞-norm tail
    factor like P — whatever the counts. Used where :class:`OutputCut`'s lines are not built: networks with
    recurrent layers, whose faulty boxes widen every time step's state (a GRU's state stays in its convex
    hull, §14.3, where the sum over steps of §14.2 compounds)."""

    def __init__(self, analysis: Analysis) -> None:
        net = analysis.network
        self.analysis = analysis
        clean, faulty = net.clean[net.tail_start], analysis.faulty()[net.tail_start]
        lo, hi = clean.lo.reshape(-1), clean.hi.reshape(-1)
        faulty_lo, faulty_hi = faulty.lo.reshape(-1), faulty.hi.reshape(-1)
        #: per output element, the cut [n] (+inf where a box is unbounded)
        self.value = _no_nan(net.tail_factor * np.maximum(faulty_hi - lo, hi - faulty_lo))

    @classmethod
    def build(cls, analysis: Analysis) -> BoxCut | None:
        """The cut when the boxes are trusted (:func:`boxes_trusted`), else None."""
        return cls(analysis) if boxes_trusted(analysis) else None

    def bound(self, failures: Sequence[int]) -> np.ndarray:
        """Per output element, the cut (the same for every vector with a failure), [n], divided by the bit-flip
        carry factor that :class:`TightBound` multiplies every per-output figure by: the faulty boxes already hold
        every flip of a deviated value at every time step (docs/method.md §2.3, §14.2), as :class:`OutputCut`'s."""
        return self.value / self._uncarried(failures)

    def curve(self, width: int) -> np.ndarray:
        """[n, width + 1]: the cut for F = 0..width failures in every layer (∞ at F = 0: no failure, no deviation),
        divided by the carry factor as :meth:`bound`."""
        result = np.repeat(self.value[:, None], width + 1, axis=1) / self._uncarried([max(width, 1)] * self._layers)
        result[:, 0] = np.inf
        return result

    @property
    def _layers(self) -> int:
        return len(self.analysis.hidden)

    def _uncarried(self, failures: Sequence[int]) -> float:
        """The carry factor of stored-value faults for ``failures`` (1 for other failures, and without them)."""
        return self.analysis.carry_factor([max(int(f), 0) for f in failures])

    def design(self, failures: Sequence[int]) -> np.ndarray:
        """The cut for exactly ``failures`` (the boxes of every failure set: :meth:`bound`), [n]."""
        return self.bound(failures)


def boxes_trusted(analysis: Analysis) -> bool:
    """Whether the output cuts may read the network's clean and faulty boxes (docs/method.md §4.1): failed
    neurons (crash, byzantine, or a flipped bit whose value stays in the faulty box: §4.1 "Stored-value faults")
    without synapse failures or rounding inside the model (a range-restricted layer's
    guard is an op behind its failure site, §4.1 "Range-restricted layers"), and
    boxes that are this network's own (not design's "weights scaled, ranges kept", whose boxes are the
    unscaled network's)."""
    net = analysis.network
    if not analysis.ranges_known or any(analysis.synapses) or not analysis.hidden:
        return False
    if analysis.failure.stored and not analysis.stored_values_bounded():  # an exponent bit: ±Inf, NaN (§2.3)
        return False
    return not (net.rounding or getattr(net, "ranges_kept", False))


def _no_nan(bound: np.ndarray) -> np.ndarray:
    """``bound`` with NaN (∞ − ∞ of unbounded boxes) read as +∞: a cut that says nothing."""
    return np.where(np.isnan(bound), np.inf, bound)


def _failure_prefix(lines: SiteLines, value: str) -> np.ndarray:
    """[2n, N + 1]: per row the sums of the f largest failure terms of the site ``value`` (f = 0..N); one
    zero column when the back-substitution did not reach the site."""
    if value not in lines.gains:
        return np.zeros((lines.constant.shape[0], 1))
    return _prefix_sums(-np.sort(-lines.gains[value], axis=1))


def _concretize_rows(coefs: np.ndarray, box) -> np.ndarray:
    """max over the box of coefs·x per row [rows, elements]."""
    return np.maximum(coefs, 0.0) @ box.hi.reshape(-1) + np.minimum(coefs, 0.0) @ box.lo.reshape(-1)


#: Multiply-adds the output cut's pass may take (2 × outputs rows through the whole network).
OUTPUT_CUT_BUDGET = 2e8
#: Largest number of failure terms the output cut keeps (2 × outputs × hidden neurons).
OUTPUT_CUT_ELEMENTS = 2**23


def _signed_terms(analysis: Analysis, kept: int):
    """The signed terms of docs/method.md §4.1 when they apply (imported here: certify uses this module)."""
    from robaudit.bounds.signed import SignedTerms, signed_applies

    return SignedTerms(analysis, kept) if signed_applies(analysis) else None


#: Cuts tried by the total-budget curve (each needs its own merge of the kept values).
MAX_CUT_CURVES = 4
#: Kept values per output and layer of the first pass on a large network (docs/method.md §4.4): the searches
#: of §6 ask for one or two failures per layer there, and the total budget for 64 first.
FIRST_KEPT = 64
#: Entries of P (outputs × hidden neurons) up to which the first pass keeps every value that fits.
LAZY_KEPT_ENTRIES = 2**24


#: Elements of −P·δ reduced at a time by :meth:`TightBound._keep` (512 KiB of float64: stays in cache while it
#: is summed, compared and selected).
_KEEP_BLOCK_ELEMENTS = 2**16


def _row_block(rows: slice | np.ndarray, first: int, stop: int) -> slice | np.ndarray:
    """Rows ``first`` … ``stop`` − 1 of a chunk's ``rows`` (a slice of output elements, or their indices)."""
    if isinstance(rows, slice):
        return slice(rows.start + first, rows.start + stop)
    return rows[first:stop]


def _prefix_sums(ordered: np.ndarray) -> np.ndarray:
    """[rows, n + 1]: per row 0 and the running sums of ``ordered`` [rows, n] (``np.cumsum``, written
    straight into the result: no second copy)."""
    prefix = np.empty((ordered.shape[0], ordered.shape[1] + 1))
    prefix[:, 0] = 0.0
    np.cumsum(ordered, axis=1, out=prefix[:, 1:])
    return prefix


class LazyPrefix:
    """Per hidden layer, the prefix sums of the kept values ``tops[i]`` [rows, T_l] (sorted down per row),
    [rows, T_l + 1], computed only as far as the inverse problems ask (docs/method.md §4.4).

    ``np.cumsum`` adds each value to the previous running sum, so continuing it from the last
    column computed (seeded with that column) gives the same numbers as one call over the
    whole row: ``self[i]`` is bit for bit :func:`_prefix_sums` of ``tops[i]``. On deep networks
    the searches stop after one or two counts, and the sums past them are never formed.
    """

    #: Columns computed at least at a time (then twice as many as before: few calls in a search).
    FIRST = 64

    def __init__(self, tops: list[np.ndarray]) -> None:
        self.tops = tops
        self._sums: list[np.ndarray | None] = [None] * len(tops)
        self._done = [0] * len(tops)  # columns 0 … done − 1 hold their prefix sums

    def __len__(self) -> int:
        return len(self.tops)

    def __getitem__(self, i: int) -> np.ndarray:
        """All the prefix sums of layer ``i``, [rows, T_i + 1]."""
        self._extend(i, self.tops[i].shape[1])
        sums = self._sums[i]
        assert sums is not None
        return sums

    def column(self, i: int, f: int) -> np.ndarray:
        """The sums of the f largest kept values of layer ``i``, per row (0 ≤ f ≤ T_i)."""
        self._extend(i, f)
        sums = self._sums[i]
        assert sums is not None
        return sums[:, f]

    def _extend(self, i: int, f: int) -> None:
        done = self._done[i]
        if f < done:
            return
        top = self.tops[i]
        stop = min(top.shape[1] + 1, max(f + 1, 2 * done, self.FIRST))
        # a new array of the columns asked (the ones formed copied in): a wider one left empty would be
        # touched on every page by its first column already
        sums = np.empty((top.shape[0], stop))
        if done == 0:
            sums[:, 0] = 0.0
            done = 1
        else:
            previous = self._sums[i]
            assert previous is not None
            sums[:, :done] = previous[:, :done]
        if stop > done:
            # running sums of the columns done − 1 … stop − 1: seeded with the last sum already formed,
            # each next sum is (previous sum) + value, as in one cumsum over the whole row
            part = np.empty((top.shape[0], stop - done + 1))
            part[:, 0] = sums[:, done - 1]
            part[:, 1:] = top[:, done - 1 : stop - 1]
            np.cumsum(part, axis=1, out=part)
            sums[:, done:stop] = part[:, 1:]
        self._sums[i] = sums
        self._done[i] = stop


def _merged_prefix(pieces: list[np.ndarray], width: int) -> np.ndarray:
    """Per row, the sums of the F largest values of the concatenated ``pieces``, F = 0..width.

    Every piece is sorted down per row (kept values); each is first cut to the columns
    that may hold one of the ``width`` largest of some row (:func:`_trimmed_pieces`): the
    same values are selected, in the same order (docs/method.md §4.4).
    """
    merged = np.concatenate(_trimmed_pieces(pieces, width), axis=1)
    return _prefix_sums(_largest_sorted(merged, width))


def _trimmed_pieces(pieces: list[np.ndarray], width: int) -> list[np.ndarray]:
    """``pieces`` (each [rows, n_p], sorted down per row) cut to the columns that can hold one of the
    ``width`` largest values of the row over all pieces.

    A piece with at least ``width`` columns has ``width`` values ≥ its column ``width − 1``, so
    the row's ``width``-th largest over all pieces is at least that value; call the largest such
    value the row's floor. A value below its row's floor is never among the ``width`` largest,
    so a piece keeps only the columns up to its last one holding, in some row, a value that is
    not below that row's floor (NaN counts as kept). Every value that may be selected stays,
    so the selection, and its sort, are the same.
    """
    if width <= 0 or not pieces:
        return pieces
    floor = np.full(pieces[0].shape[0], -np.inf)
    for piece in pieces:
        if piece.shape[1] >= width:
            np.fmax(floor, piece[:, width - 1], out=floor)
    if not np.any(floor > -np.inf):
        return pieces
    trimmed = []
    for piece in pieces:
        reaches = np.flatnonzero(np.any(~(piece < floor[:, None]), axis=0))
        trimmed.append(piece[:, : int(reaches[-1]) + 1] if reaches.size else piece[:, :0])
    return trimmed


def cut_widths(analysis: Analysis) -> list[np.ndarray] | None:
    """Per hidden layer, the width W_j of each output element's clean-and-faulty hull: |ỹ_j − y_j| ≤ W_j
    for every failure set, every value sent and every input (docs/method.md §4.1).

    None when the faulty intervals are not trusted (``--activation-bound``, stored-value faults): no
    cut is used then.
    """
    if not analysis.ranges_known or (analysis.failure.stored and not analysis.stored_values_bounded()):
        return None
    net = analysis.network
    # a chain whose slopes do not need them gets its faulty boxes by IBP alone (the same boxes there, §5.3)
    faulty = analysis.faulty_ibp() if net.is_chain() and not ranges_matter(analysis) else analysis.faulty()
    widths = []
    for layer in analysis.hidden:
        clean, bad = net.clean[layer.output_value], faulty.get(layer.output_value)
        if bad is None:
            return None
        a, b = analysis.failure.failure_range if not analysis.failure.stored else (np.inf, -np.inf)  # in the box
        hi = np.maximum(np.maximum(clean.hi, bad.hi), b).reshape(-1)
        lo = np.minimum(np.minimum(clean.lo, bad.lo), a).reshape(-1)
        widths.append(np.asarray(hi - lo, np.float64))
    return widths


class NormalizationCut:
    """A cut at a normalization's output v (docs/method.md §4.1, "Cuts at a normalization's output"): v lies in
    the hull of its clean and faulty boxes whatever fails, and each of its G groups of n elements changes by
    |γ|⊙|z̃ − z| with ‖z̃ − z‖₂ ≤ 2√n, so Σ_j P[k, j]·|Δv_j| ≤ Σ_g min(Σ_{j∈g} P[k, j]·W_j, 2√n·‖P[k, g]⊙|γ|‖₂)."""

    def __init__(self, value: str, widths: np.ndarray, groups: int, gamma_abs: np.ndarray | None) -> None:
        """``widths`` [G·n] of the hull; ``gamma_abs`` broadcast against [G, n] ([n] for a LayerNorm, [G, 1] for an
        InstanceNorm), or None where only the widths hold (a rounded value)."""
        self.value, self.groups = value, groups
        self.widths = np.asarray(widths, np.float64).reshape(groups, -1)
        self.gamma_abs = gamma_abs
        #: 2√n, and 10⁻⁶ of it for float32 arithmetic (onnxruntime's ‖z‖₂ may pass √n by a few ulps)
        self.radius = 2.0 * np.sqrt(self.widths.shape[1]) * (1 + 1e-6)

    def cost(self, sens: np.ndarray) -> np.ndarray:
        """Σ_j P[k, j]·|Δv_j| bounded per row of ``sens`` [rows, G·n] (the sensitivities at v), [rows]."""
        p = sens.reshape(sens.shape[0], self.groups, -1)
        moving = (p > 0) & (self.widths > 0)  # 0 · ∞ is no term
        by_width = np.where(moving, p * self.widths, 0.0).sum(axis=2)
        if self.gamma_abs is None:
            return by_width.sum(axis=1)
        by_norm = self.radius * np.sqrt(np.square(p * self.gamma_abs).sum(axis=2))
        return np.minimum(by_width, by_norm).sum(axis=1)


def normalization_cuts(analysis: Analysis) -> list[NormalizationCut]:
    """A :class:`NormalizationCut` at the output of every LayerNormalization / RMSNormalization (or the
    written-out forms) / InstanceNormalization whose clean and faulty boxes are known and that is no failure site;
    the norm radius only on a model without rounding (docs/method.md §1.2: a rounded value may leave the sphere)."""
    net = analysis.network
    sites = {v for la in analysis.hidden for v in site_values(la)}
    found = [(node, rule) for node in net.nodes if isinstance(rule := lookup(node), Normalization) and node.outputs]
    if not found:  # no faulty pass for it: a chain whose slopes need none gets its cuts' boxes by IBP alone
        return []
    faulty = analysis.faulty()
    cuts = []
    for node, rule in found:
        value = node.outputs[0]
        if value in sites or value not in net.clean or value not in faulty:
            continue
        clean, bad = net.clean[value], faulty[value]
        widths = (np.maximum(clean.hi, bad.hi) - np.minimum(clean.lo, bad.lo)).reshape(-1)
        groups, gamma_abs = rule.output_groups(node, clean.shape, net.constants)
        cuts.append(NormalizationCut(value, widths, groups, None if net.rounding else gamma_abs))
    return cuts


def covered_layers(net, hidden: Sequence[Layer], cuts: Sequence[str] | None = None) -> list[set[int]]:
    """U_c per cut value c (default: each hidden layer's output): the hidden layers every path of which to the
    audited output goes through c (a hidden layer whose output is c included)."""
    values = [la.output_value for la in hidden] if cuts is None else cuts
    return [{i for i, la in enumerate(hidden) if la.output_value not in alive} for alive in _uncut(net, values)]


def covered_rounding(net, cuts: Sequence[str]) -> list[list[str]]:
    """Per cut value c, the rounding values (docs/method.md §1.2) every path of which to the audited output goes
    through c (c's own included): what they add is inside the width of c's box, so a cut at c needs no
    rounding term of theirs (docs/method.md §4.1, "Cuts and rounding")."""
    return [[v for v in net.rounding if v not in alive] for alive in _uncut(net, cuts)]


def _uncut(net, cuts: Sequence[str]) -> list[set[str]]:
    """Per cut value c, the values with a path to the audited output that avoids c, found by sweeping the
    steps backwards from the output without crossing c."""
    found = []
    for cut in cuts:
        alive = {net.tail_start} - {cut}
        for step in reversed(net.steps):
            outs = [step.output_value] if isinstance(step, Layer) else [o for o in step.outputs if o]
            if any(o in alive for o in outs):
                ins = [step.input_value] if isinstance(step, Layer) else [v for v in step.inputs if v]
                alive.update(v for v in ins if v != cut)
        found.append(alive)
    return found


def _row_tops(
    weighted: np.ndarray, column_max: np.ndarray, width: int, negated: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Per row of the non-negative ``weighted`` [rows, n] (overwritten), its ``width`` largest
    entries sorted down (``negated``: ``weighted`` holds the negated values, −P·δ), written into
    ``out`` [rows, width] when given (and returned).

    A chunk of outputs of an image model reaches only part of a layer (the union of its
    receptive fields): columns that are zero in every row (``column_max`` = 0; only whether an entry is
    0 is read, so −``column_max`` will do) are left out of the selection, and rows with fewer remaining
    columns than ``width`` are padded with those zeros. The values are the same as selecting over the
    whole rows. ``column_max`` may be a view of ``weighted``: it is read before ``weighted`` is.
    """
    # more than half of the columns not zero: every column (counted first, without the index array)
    if 2 * np.count_nonzero(column_max) > weighted.shape[1]:  # NaN counts as non-zero
        return _largest_sorted(weighted, width, negated, out)
    active = np.flatnonzero(column_max)
    top = np.zeros((weighted.shape[0], width)) if out is None else out
    kept = min(width, active.size)
    _largest_sorted(weighted[:, active], kept, negated, top[:, :kept])
    top[:, kept:] = 0.0
    return top


def _largest_sorted(values: np.ndarray, width: int, negated: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``values`` [rows, n], its ``width`` largest entries sorted down, [rows, width] (written
    into ``out`` when given).

    ``values`` is overwritten (negated and partitioned in place: no copy of the whole
    array); the result is bit for bit ``-np.sort(-np.partition(-values, width - 1)[:, :width])``.
    ``negated``: ``values`` already holds −values (then it is only partitioned in place).
    """
    if width <= 0:
        return np.negative(values[:, :0], out=out) if negated else values[:, :0].copy()
    if not negated:
        np.negative(values, out=values)
    if width < values.shape[1]:
        values = _candidates(values, width)
        values.partition(width - 1, axis=1)
    part = np.sort(values[:, :width], axis=1)
    return np.negative(part, out=part if out is None else out)


def _candidates(values: np.ndarray, width: int) -> np.ndarray:
    """Per row of ``values`` [rows, n], entries whose ``width`` smallest are the row's ``width`` smallest (the same
    numbers), [rows, m]: the ``width`` groups of ``_SELECT_BLOCK`` columns with the smallest minima, and the columns
    after the last whole group. With G = n // ``_SELECT_BLOCK`` groups, group g holds the columns g, g + G, g + 2G, …
    (a minimum over ``_SELECT_BLOCK`` contiguous slices of the row: about 14× quicker in numpy than one over short
    runs of consecutive columns). An entry among the row's width smallest that lies in a group not chosen is at
    least the width-th smallest group minimum, itself at least the row's width-th smallest value: equal to it, and
    the chosen groups' minima hold as many copies (docs/method.md §4.4). The whole row where that saves little, or
    with a NaN."""
    rows, n = values.shape
    groups = n // _SELECT_BLOCK
    if width * _SELECT_BLOCK * 4 > n:
        return values
    whole = groups * _SELECT_BLOCK
    tiled = values[:, :whole].reshape(rows, _SELECT_BLOCK, groups)
    minima = tiled.min(axis=1)
    rest = values[:, whole:]
    if np.isnan(minima).any() or np.isnan(rest).any():
        return values
    chosen = np.argpartition(minima, width - 1, axis=1)[:, None, :width]
    picked = np.take_along_axis(tiled, chosen, axis=2).reshape(rows, _SELECT_BLOCK * width)
    return np.concatenate([picked, rest], axis=1) if rest.size else picked


#: Columns per group whose minimum stands for them in :func:`_candidates`.
_SELECT_BLOCK = 16


def _after_hidden_layers(steps: Sequence, hidden_index: dict[int, int]) -> set[str]:
    """Values computed from some hidden layer's output: the only ones whose sensitivities P uses.

    Back-propagating into the others (the network input, ops before the first layer)
    would cost a product with the first weight and change nothing.
    """
    reached: set[str] = set()
    for step in steps:
        if isinstance(step, Layer):
            if id(step) in hidden_index or step.input_value in reached:
                reached.add(step.output_value)
        elif any(v in reached for v in step.inputs):
            reached.update(v for v in step.outputs if v)
    return reached


def _layer_adjoint(layer: Layer, grad: np.ndarray) -> np.ndarray:
    """|W|ᵀ applied to sensitivities of a layer's pre-activation ([K, *out_shape]).

    Dense: one 2-D product [K·…, out] @ |W| in float64, W read block by block
    (:func:`~robaudit.graph.ops.affine.weight_products`), never copied whole.
    """
    if layer.geometry is None:
        rows = grad.reshape(-1, grad.shape[-1])
        (product,) = weight_products(layer.weight, [(rows, True)])
        return product.reshape((grad.shape[0],) + tuple(layer.in_shape))  # Gemm transA: A is [features, 1]
    if layer.kind == "conv_transpose":
        return conv_transpose_abs_adjoint(grad, layer.weight, layer.geometry, layer.in_shape)
    return conv_abs_adjoint(grad, layer.weight, layer.geometry, layer.in_shape)


def _scaled_layer_adjoint(layer: Layer, grad: np.ndarray, slope: np.ndarray | float) -> np.ndarray:
    """``_layer_adjoint(layer, grad · slope)``. For 2-D convolutions with finite slopes the product
    is taken only on the rectangle where ``grad`` is not zero (a chunk of an image output
    reaches a small part of the plane): the same numbers (docs/method.md §4.4)."""
    plain = (
        layer.geometry is None
        or layer.kind == "conv_transpose"
        or not isinstance(layer.geometry, ConvGeometry)
        or len(layer.in_shape) != 4
        or grad.ndim != 5
        or not np.all(np.isfinite(slope))
    )
    if plain:
        return _layer_adjoint(layer, scaled_by(grad, slope))
    return conv_abs_adjoint_scaled(grad, slope, layer.weight, layer.geometry, layer.in_shape)
