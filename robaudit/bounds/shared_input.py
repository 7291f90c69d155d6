"""The first layer's signed term over one shared input (docs/method.md §5.9).

A telescoped term l of the signed bound (docs/method.md §4.1) is Σ_{i∈S} κ_i·d_i over the failed set S of
layer l, with d_i = v_i − y_i(x) and y_i(x) the clean value of origin i at the *same* input x for every i
(the layers before l are healthy in both states of the term). The bound takes for each origin its own
largest corner — the largest of κ·(v − y) over κ ∈ [κlo_i, κhi_i], v ∈ [a, b] and y in its clean range — and
sums the f_l largest: each origin may take its range's end at a different input. Where layer l is the first
layer (its pre-activation z = A·x + c is affine in the input, its activation a ReLU or none), the corner of
origin i as a function of the input is at most h_i(x), a maximum of at most three affine functions of x
(:func:`origin_pieces`), and

    term_l ≤ max over |S| ≤ f_l of  max over x in the input box of  Σ_{i∈S} h_i(x),

which :func:`shared_top_sum` computes exactly (a maximum over the choice of one piece per origin of a
linear function over a box, in closed form), over the sets of a pool of the origins with the largest
corners, every origin outside the pool charged the largest corner left out.
"""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from robaudit.graph.conv import conv2d
from robaudit.graph.layers import Layer, activation_chain
from robaudit.graph.network import Network
from robaudit.graph.ops.affine import as_2d

#: Origins with the largest corners whose sets are searched (docs/method.md §5.9); the others are charged
#: the largest corner among them.
POOL = 64
#: Largest A (neurons × inputs) built as one dense matrix.
DENSE_ENTRIES = 1 << 22
#: Relative widening of each bound for float64 rounding (docs/method.md §4.5).
ROUNDING = 1e-9


def first_layer_map(network: Network, layer: Layer) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(A [N, inputs], c [N], relu) with the layer's flattened pre-activation z = A·x + c for the flattened
    network input x, and whether its activation is a ReLU (else none); None where the rule does not apply:
    the layer does not read the network's one float input, its activation is another op or is followed by a
    rounding op, it rounds or stores codes, or A is over :data:`DENSE_ENTRIES` (docs/method.md §5.9)."""
    if len(network.input_boxes) != 1 or network.input_name not in network.clean:
        return None
    if layer.input_value != network.input_name or layer.rounding is not None or layer.codes is not None:
        return None
    if layer.kind not in ("dense", "conv"):
        return None
    relu = layer.output_value != layer.preact_value
    if relu:
        chain = activation_chain(layer, {n.name: n for n in network.nodes})
        if len(chain) != 1 or chain[0].op_type != "Relu":
            return None
    inputs = math.prod(layer.in_shape[1:])
    if layer.neurons * inputs > DENSE_ENTRIES:
        return None
    weight = np.asarray(layer.weight, np.float64)
    bias = np.asarray(layer.bias, np.float64)
    if layer.geometry is None:
        matrix = weight.reshape(layer.neurons, inputs)
        offset = np.broadcast_to(bias, (layer.neurons,)).astype(np.float64)
    else:
        unit = np.concatenate([np.zeros((1, inputs)), np.eye(inputs)])
        unit = unit.reshape((inputs + 1,) + tuple(layer.in_shape[1:]))
        out = conv2d(unit, as_2d(weight), layer.geometry).reshape(inputs + 1, -1)
        channels = np.broadcast_to(bias.reshape(-1, *([1] * (len(layer.out_shape) - 2))), layer.out_shape[1:])
        offset = out[0] + channels.reshape(-1)
        matrix = (out[1:] - out[0]).T
    # a safety net: the interval of A·x + c over the input box is the layer's stored pre-activation box (an affine
    # map of the input box is exact under §5.1); where they disagree the map is not the layer's, so no rule
    box = network.clean[network.input_name]
    lo, hi = box.lo.reshape(-1), box.hi.reshape(-1)
    stored = network.clean[layer.preact_value]
    z_lo = offset + np.minimum(matrix * lo, matrix * hi).sum(axis=1)
    z_hi = offset + np.maximum(matrix * lo, matrix * hi).sum(axis=1)
    scale = 1e-6 * (1.0 + np.abs(z_lo) + np.abs(z_hi))
    if np.any(np.abs(z_lo - stored.lo.reshape(-1)) > scale) or np.any(np.abs(z_hi - stored.hi.reshape(-1)) > scale):
        return None
    return np.ascontiguousarray(matrix), offset, relu


def origin_pieces(
    lower: float, upper: float, ylo: float, a: float, b: float, relu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(slopes, intercepts), each [P] with P ≤ 3: affine functions of z whose largest value is at least
    max(0, max over κ ∈ {lower, upper}, v ∈ {a, b} of κ·(v − φ(z))) for every z, with φ the ReLU (``relu``)
    or the identity, and ``ylo`` ≤ φ(z) over the domain (docs/method.md §5.9)."""
    slopes: list[float] = [0.0]
    intercepts: list[float] = [0.0]
    for kappa in (lower, upper):
        value = max(kappa * a, kappa * b)  # κ·v largest over v
        if not relu:
            slopes.append(-kappa)
            intercepts.append(value)
        elif kappa <= 0.0:  # κv + |κ|·max(0, z): two affine pieces
            intercepts[0] = max(intercepts[0], value)
            slopes.append(-kappa)
            intercepts.append(value)
        else:  # κv − κ·relu(z) ≤ κ·(v − ylo): a constant
            intercepts[0] = max(intercepts[0], value - kappa * ylo)
    return np.asarray(slopes), np.asarray(intercepts)


def _piece_maxima(slopes: np.ndarray, intercepts: np.ndarray, zlo: float, zhi: float) -> float:
    return float(np.max(np.maximum(slopes * zlo, slopes * zhi) + intercepts))


def shared_top_sum(
    matrix: np.ndarray,
    offset: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    pieces: dict[int, tuple[np.ndarray, np.ndarray]],
    corners: np.ndarray,
    count: int,
    budget: float,
) -> tuple[float, float, list[int]]:
    """(bound, multiply-adds spent, the origins of the best set evaluated): an upper bound of the largest, over sets
    S of at most ``count`` origins and x in the box [lo, hi], of Σ_{i∈S} of origin i's contribution, where
    ``corners`` [N] (≥ 0) bounds each origin's contribution over the box and, for the origins of ``pieces`` (those
    with the largest corners), so does h_i(x), the largest piece of ``pieces[i]`` at z_i = matrix[i]·x + offset[i]
    (docs/method.md §5.9). Sets of the pool and of stand-ins for the origins outside it are visited in decreasing
    order of their summed maxima; the search stops when that sum is at most the best set found (then it is
    exact) or when the next set would pass ``budget`` multiply-adds (then that sum is the bound)."""
    pool = sorted(pieces)
    rest = _left_out(corners, pool)
    zlo = offset + np.minimum(matrix * lo, matrix * hi).sum(axis=1)
    zhi = offset + np.maximum(matrix * lo, matrix * hi).sum(axis=1)
    tops = {i: min(float(corners[i]), _piece_maxima(*pieces[i], zlo[i], zhi[i])) for i in pool}
    # members: the pool's origins and `count` stand-ins for origins outside it (value `rest`, no input), in
    # decreasing order of value — the best-first walk below visits sets in decreasing summed value only then
    # (a pool origin's top may be below `rest` where its corner is looser than its pieces)
    members = sorted(pool + [-1] * count, key=lambda i: -(tops[i] if i >= 0 else rest))
    values = np.asarray([tops[i] if i >= 0 else rest for i in members])
    count = min(count, len(members))
    start = tuple(range(count))
    heap = [(-float(values[list(start)].sum()), start)]
    seen = {start}
    best = 0.0
    best_set: list[int] = []
    spent = 0.0
    stopped = False
    while heap:
        neg, chosen = heap[0]
        if -neg <= best:
            break
        picked = [members[p] for p in chosen]
        cost = _set_cost(pieces, picked, matrix.shape[1])
        if spent + cost > budget:
            stopped = True
            break
        heapq.heappop(heap)
        value = min(-neg, _set_value(matrix, offset, lo, hi, pieces, picked, rest))
        if value > best or not best_set:
            best, best_set = max(best, value), [i for i in picked if i >= 0]
        spent += cost
        for p in range(count):
            limit = chosen[p + 1] if p + 1 < count else len(members)
            if chosen[p] + 1 < limit:
                nxt = chosen[:p] + (chosen[p] + 1,) + chosen[p + 1 :]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-float(values[list(nxt)].sum()), nxt))
    bound = max(best, -heap[0][0]) if stopped else best
    return bound + ROUNDING * (1.0 + abs(bound)), spent, best_set


def _left_out(corners: np.ndarray, pool: list[int]) -> float:
    """The largest corner of an origin outside ``pool`` (0 where there is none): what each stand-in adds."""
    outside = np.delete(corners, pool)
    return float(outside.max()) if outside.size else 0.0


def _set_cost(pieces: dict[int, tuple[np.ndarray, np.ndarray]], chosen: list[int], inputs: int) -> float:
    """Multiply-adds of :func:`_set_value` for one set: one row of ``inputs`` per origin and piece choice."""
    real = [i for i in chosen if i >= 0]
    return float(math.prod(len(pieces[i][0]) for i in real) * (len(real) + 2) * inputs)


def _set_value(
    matrix: np.ndarray,
    offset: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    pieces: dict[int, tuple[np.ndarray, np.ndarray]],
    chosen: list[int],
    rest: float,
) -> float:
    """max over x in [lo, hi] of Σ_{i∈chosen} h_i(x) (stand-ins −1 add ``rest``): the largest, over one piece
    per origin, of a linear function of x maximized over the box in closed form."""
    real = [i for i in chosen if i >= 0]
    constant = rest * (len(chosen) - len(real))
    if not real:
        return constant
    slopes = np.asarray(list(itertools.product(*[pieces[i][0] for i in real])))  # [combos, |S|]
    intercepts = np.asarray(list(itertools.product(*[pieces[i][1] for i in real]))).sum(axis=1)
    gradient = slopes @ matrix[real]  # [combos, inputs]
    values = np.maximum(gradient * lo, gradient * hi).sum(axis=1) + slopes @ offset[real] + intercepts
    return constant + float(values.max())



def shared_input_terms(
    network: Network,
    mapped: tuple[np.ndarray, np.ndarray, bool] | None,
    bounds: tuple[np.ndarray, np.ndarray],
    ylo: np.ndarray,
    failure_range: tuple[float, float],
    corners: tuple[np.ndarray, np.ndarray],
    count: int,
    budget: float,
) -> tuple[np.ndarray, np.ndarray, float, list[list[list[int]]]] | None:
    """(increase, decrease, multiply-adds spent, the best set per side and output): per output, bounds of the first
    layer's signed term over one shared input (module doc, docs/method.md §5.9), or None where the rule does not
    apply (``mapped``, the layer's :func:`first_layer_map`, is None) or ``count`` < 2 (one origin has no other to
    share its input with).

    ``bounds``: the enclosure [κlo, κhi] of the coefficients, [outputs, N] each; ``ylo`` [N]: lower ends of the
    clean outputs over the input box; ``failure_range``: [a, b] of the failed values; ``corners``: the largest
    increase and decrease of each origin ([outputs, N] each, ≥ 0, times the network's tail factor: what the term
    sums, docs/method.md §4.1); ``count``: f_l; ``budget``: multiply-adds for all outputs and both sides."""
    if mapped is None or count < 2:
        return None
    matrix, offset, relu = mapped
    box = network.clean[network.input_name]
    lo, hi = box.lo.reshape(-1).astype(np.float64), box.hi.reshape(-1).astype(np.float64)
    a, b = failure_range
    factor = network.tail_factor
    lower, upper = bounds
    outputs = lower.shape[0]
    found = [np.full(outputs, np.inf), np.full(outputs, np.inf)]
    spent = 0.0
    sets: list[list[list[int]]] = [[], []]
    for side, sign in ((0, 1.0), (1, -1.0)):
        # the decrease is the increase of −κ·d: the enclosure [−κhi, −κlo]
        k_lo, k_hi = (lower, upper) if sign > 0 else (-upper, -lower)
        for k in range(outputs):
            values = corners[side][k]
            pool = np.argsort(-values, kind="stable")[:POOL]
            pieces = {}
            for i in (int(n) for n in pool):
                slopes, intercepts = origin_pieces(float(k_lo[k, i]), float(k_hi[k, i]), float(ylo[i]), a, b, relu)
                pieces[i] = (slopes * factor, intercepts * factor)
            value, cost, chosen = shared_top_sum(matrix, offset, lo, hi, pieces, values, count, budget - spent)
            found[side][k] = value
            sets[side].append(chosen)
            spent += cost
    return found[0], found[1], spent, sets
