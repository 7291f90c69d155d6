"""An exact search for the worst fault error of a trained ReLU network: a mixed-integer linear
program (MILP) of the clean and the faulty network at the same input, solved by HiGHS
(``scipy.optimize.milp``), every answer checked by a plain torch float64 forward pass.

Independent of robaudit (benchmarks and tests only; scipy and torch are not runtime
dependencies). The networks are those of ``benchmarks/trained_nets.py`` whose only
nonlinearity is ReLU (the MLPs with ReLU and ``SmallResNet``), read as a DAG of nodes
(:func:`extract`): each node is an affine map of earlier nodes, optionally a ReLU, optionally a
failure site (the site acts on the node's output, as :class:`trained_nets.Site` does).

The program, for one target output t and a sign σ (maximised: σ·(F̃_t(x) − F_t(x))):

* x ∈ input box; clean values v and faulty values v' of every node at that x;
* ReLU y = max(0, z) with pre-activation bounds l ≤ z ≤ u: exact when stable, else the
  big-M form y ≥ 0, y ≥ z, y ≤ u·δ, y ≤ z − l·(1 − δ), δ ∈ {0, 1};
* failure site, neuron j: s'_j = a'_j when f_j = 0, s'_j ∈ [−C, C] when f_j = 1 (crash: C = 0),
  with a'_j ∈ [L, U]: s' − a' ≤ (C − L)·f, s' − a' ≥ (−C − U)·f, s' ≤ C·f + U·(1 − f),
  s' ≥ −C·f + L·(1 − f) — exact for binary f;
* failure set fixed (f constants) or free (f binary, Σ_j f_j = count per site);
* the differences v' − v bounded by their own intervals (valid cuts that tighten the LP);
  a node with no failure upstream shares the clean node's variables.

Bounds (:func:`bounds`) come from interval arithmetic on the DAG (sound: each node's range
from its inputs' ranges), for the clean values, the faulty values and their differences;
with a free failure set a site's difference takes at most ``count`` failure jumps into each
consumer (the ``count`` largest of |A_ij|·jump_j per row), intersected with a linear-relaxation
pass (:func:`linear_bounds`: back-substitution of the triangle ReLU bounds to the input box,
CROWN/DeepPoly style, written here independently of robaudit). With sound bounds the MILP's
dual bound is an upper bound on the true worst error (up to the solver's tolerances); the
incumbent is only ever reported through :func:`verify`, the forward pass.

On the trained small ResNet (5 sites of 512 neurons, 3,000–7,700 binaries) HiGHS finds no
incumbent within minutes and its dual bound stays above robaudit's own bound, so the benchmark
uses the exact machinery locally instead (:func:`polish`): the attack's failure set and
activation region kept, one linear program gives the exact maximum over that region, then
steps to neighbouring regions while they gain (a large-neighbourhood search; :func:`phases_at`
can leave the phases nearest 0 open to the MILP).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from torch import nn
from trained_nets import MLP, Block, SmallResNet, _forward, sites


@dataclass
class Node:
    """``inputs``: (earlier node index, dense matrix [n, n_in]); -1 is the network input."""

    inputs: list[tuple[int, np.ndarray]]
    bias: np.ndarray
    relu: bool
    site: int | None = None

    @property
    def size(self) -> int:
        return len(self.bias)


@dataclass
class Graph:
    input_size: int
    nodes: list[Node]  # the last one is the output

    @property
    def sites(self) -> list[int]:
        """Node index of each failure site, in site order."""
        by_site = {n.site: i for i, n in enumerate(self.nodes) if n.site is not None}
        return [by_site[s] for s in range(len(by_site))]


# --------------------------------------------------------------------------- extraction


def _affine(fn, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [n_out, n_in], b [n_out]) of an affine torch map of flat float64 vectors, by basis vectors."""
    with torch.no_grad():
        zero = fn(torch.zeros(1, n_in, dtype=torch.float64))
        cols = fn(torch.eye(n_in, dtype=torch.float64)) - zero
    return cols.T.numpy().copy(), zero[0].numpy().copy()


def supported(model: nn.Module) -> bool:
    """Whether :func:`extract` reads this model (ReLU MLPs and ``SmallResNet``)."""
    if isinstance(model, SmallResNet):
        return True
    return isinstance(model, MLP) and all(not isinstance(m, (nn.Tanh, nn.Sigmoid)) for m in model.modules())


def extract(model: nn.Module) -> Graph:
    """The DAG of a supported model, in float64 (module doc)."""
    model = model.double().eval()
    if isinstance(model, SmallResNet):
        return _resnet(model)
    if not supported(model) or not isinstance(model, MLP):
        raise ValueError(f"exact search: unsupported model {type(model).__name__}")
    return _mlp(model)


def _mlp(model: MLP) -> Graph:
    layers = list(model.body)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    nodes: list[Node] = []
    prev, n_in = -1, linears[0].in_features
    first = n_in
    for index, linear in enumerate(linears):
        a, b = _affine(linear, n_in)
        last = index == len(linears) - 1
        nodes.append(Node([(prev, a)], b, relu=not last, site=None if last else index))
        prev, n_in = len(nodes) - 1, len(b)
    return Graph(first, nodes)


def _resnet(model: SmallResNet) -> Graph:
    c = model.stem.out_channels
    image = (c, 8, 8)
    n = c * 64

    def conv(seq):
        return lambda v: seq(v.reshape(-1, *image)).flatten(1)

    a, b = _affine(lambda v: model.bn(model.stem(v.reshape(-1, 1, 8, 8))).flatten(1), 64)
    nodes = [Node([(-1, a)], b, relu=True, site=0)]
    eye = np.eye(n)
    site = 1
    for block in (model.block1, model.block2):
        assert isinstance(block, Block)
        x_node = len(nodes) - 1
        a, b = _affine(conv(nn.Sequential(block.c1, block.b1)), n)
        nodes.append(Node([(x_node, a)], b, relu=True, site=site))
        a, b = _affine(conv(nn.Sequential(block.c2, block.b2)), n)
        nodes.append(Node([(len(nodes) - 1, a)], b, relu=False, site=site + 1))
        nodes.append(Node([(x_node, eye), (len(nodes) - 1, eye)], np.zeros(n), relu=True))
        site += 2
    a, b = _affine(lambda v: model.out(v.reshape(-1, *image).mean(dim=(2, 3))), n)
    nodes.append(Node([(len(nodes) - 1, a)], b, relu=False))
    return Graph(64, nodes)


# --------------------------------------------------------------------------- bounds


@dataclass
class Ranges:
    """Per node: clean pre-activation [zl, zu], clean output [yl, yu] (after ReLU, before the
    site), faulty pre [fzl, fzu], faulty output after the site [fsl, fsu], faulty output
    before the site [fyl, fyu], and the difference v' − v after the site [dl, du]."""

    zl: list[np.ndarray] = field(default_factory=list)
    zu: list[np.ndarray] = field(default_factory=list)
    yl: list[np.ndarray] = field(default_factory=list)
    yu: list[np.ndarray] = field(default_factory=list)
    fzl: list[np.ndarray] = field(default_factory=list)
    fzu: list[np.ndarray] = field(default_factory=list)
    fyl: list[np.ndarray] = field(default_factory=list)
    fyu: list[np.ndarray] = field(default_factory=list)
    fsl: list[np.ndarray] = field(default_factory=list)
    fsu: list[np.ndarray] = field(default_factory=list)
    dzl: list[np.ndarray] = field(default_factory=list)
    dzu: list[np.ndarray] = field(default_factory=list)
    dl: list[np.ndarray] = field(default_factory=list)
    du: list[np.ndarray] = field(default_factory=list)
    dl_pre: list[np.ndarray] = field(default_factory=list)
    du_pre: list[np.ndarray] = field(default_factory=list)


def _interval(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.maximum(a, 0), np.minimum(a, 0)
    return pos @ lo + neg @ hi, pos @ hi + neg @ lo


def _jumps(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, jl: np.ndarray, ju: np.ndarray, count: int,
           failed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Interval of A·d where d_j ∈ [lo_j, hi_j] for healthy j and ∈ [jl_j, ju_j] for failed j:
    ``failed`` a boolean mask (fixed set) or None (any ``count`` of them: the ``count`` largest
    extra amounts per row are added)."""
    base_lo, base_hi = _interval(a, lo, hi)
    pos, neg = np.maximum(a, 0), np.minimum(a, 0)
    up = pos * ju + neg * jl - (pos * hi + neg * lo)  # [n_out, n_in] extra when j fails (≥ 0 or not)
    down = pos * jl + neg * ju - (pos * lo + neg * hi)
    if failed is not None:
        return base_lo + down[:, failed].sum(axis=1), base_hi + up[:, failed].sum(axis=1)
    if count == 0:
        return base_lo, base_hi
    k = min(count, a.shape[1])
    top_up = -np.partition(-np.maximum(up, 0), k - 1, axis=1)[:, :k].sum(axis=1)
    top_down = np.partition(np.minimum(down, 0), k - 1, axis=1)[:, :k].sum(axis=1)
    return base_lo + top_down, base_hi + top_up


def bounds(graph: Graph, box: tuple[float, float], counts: list[int], c: float,
           failed: list[np.ndarray] | None = None, linear: bool = True) -> Ranges:
    """Sound intervals of every node (clean, faulty, difference) over x ∈ box^n, for ``counts[s]``
    failures at site s sending values in [−c, c] (crash: c = 0); ``failed``: fixed failure
    sets (boolean masks per site) or None (any set of those sizes). ``linear``: the pre-activation
    ranges intersected with :func:`linear_bounds` of both networks."""
    r = Ranges()
    if linear:
        clean_lin = linear_bounds(graph, box, counts, c, failed)
        faulty_lin = linear_bounds(graph, box, counts, c, failed, faulty=True)
    lo0, hi0 = np.full(graph.input_size, box[0]), np.full(graph.input_size, box[1])
    zero = np.zeros(graph.input_size)

    def clean(i: int) -> tuple[np.ndarray, np.ndarray]:
        return (lo0, hi0) if i < 0 else (r.yl[i], r.yu[i])

    def faulty(i: int) -> tuple[np.ndarray, np.ndarray]:
        return (lo0, hi0) if i < 0 else (r.fsl[i], r.fsu[i])

    def diff(i: int) -> tuple[np.ndarray, np.ndarray]:
        return (zero, zero) if i < 0 else (r.dl[i], r.du[i])

    for node in graph.nodes:
        zl, zu = node.bias.copy(), node.bias.copy()
        fzl, fzu = node.bias.copy(), node.bias.copy()
        dzl, dzu = np.zeros(node.size), np.zeros(node.size)
        for i, a in node.inputs:
            lo, hi = _interval(a, *clean(i))
            zl, zu = zl + lo, zu + hi
            site = graph.nodes[i].site if i >= 0 else None
            if site is None or counts[site] == 0:
                lo, hi = _interval(a, *faulty(i))
                dlo, dhi = _interval(a, *diff(i))
            else:
                mask = None if failed is None else failed[site]
                # faulty value: healthy j in [fyl, fyu], failed j in [-c, c]
                lo, hi = _jumps(a, r.fyl[i], r.fyu[i], np.full_like(r.fyl[i], -c), np.full_like(r.fyl[i], c),
                                counts[site], mask)
                # difference: healthy j as the unsited difference, failed j: [-c - yu, c - yl]
                dlo, dhi = _jumps(a, r.dl_pre[i], r.du_pre[i], -c - r.yu[i], c - r.yl[i], counts[site], mask)
            fzl, fzu = fzl + lo, fzu + hi
            dzl, dzu = dzl + dlo, dzu + dhi
        if linear:
            t = len(r.zl)
            zl, zu = np.maximum(zl, clean_lin[0][t]), np.minimum(zu, clean_lin[1][t])
            fzl, fzu = np.maximum(fzl, faulty_lin[0][t]), np.minimum(fzu, faulty_lin[1][t])
        # the faulty pre-activation lies in both its own interval and clean + difference
        fzl, fzu = np.maximum(fzl, zl + dzl), np.minimum(fzu, zu + dzu)
        dzl, dzu = np.maximum(dzl, fzl - zu), np.minimum(dzu, fzu - zl)
        if node.relu:
            yl, yu = np.maximum(zl, 0), np.maximum(zu, 0)
            fyl, fyu = np.maximum(fzl, 0), np.maximum(fzu, 0)
            # relu(z + d) − relu(z) lies between min(0, d) and max(0, d), and in [fyl − yu, fyu − yl]
            dl = np.maximum(np.minimum(dzl, 0), fyl - yu)
            du = np.minimum(np.maximum(dzu, 0), fyu - yl)
        else:
            yl, yu, fyl, fyu, dl, du = zl, zu, fzl, fzu, dzl, dzu
        for kept, value in ((r.zl, zl), (r.zu, zu), (r.yl, yl), (r.yu, yu), (r.fzl, fzl), (r.fzu, fzu),
                            (r.fyl, fyl), (r.fyu, fyu), (r.dzl, dzl), (r.dzu, dzu), (r.dl_pre, dl), (r.du_pre, du)):
            kept.append(value)
        if node.site is not None and counts[node.site]:
            mask = None if failed is None else failed[node.site]
            if mask is None:
                # any neuron may be among the failed: hull of healthy and failed
                fsl, fsu = np.minimum(fyl, -c), np.maximum(fyu, c)
                sdl, sdu = np.minimum(dl, -c - yu), np.maximum(du, c - yl)
            else:
                fsl, fsu = np.where(mask, -c, fyl), np.where(mask, c, fyu)
                sdl, sdu = np.where(mask, -c - yu, dl), np.where(mask, c - yl, du)
        else:
            fsl, fsu, sdl, sdu = fyl, fyu, dl, du
        for kept, value in ((r.fsl, fsl), (r.fsu, fsu), (r.dl, sdl), (r.du, sdu)):
            kept.append(value)
    return r


# --------------------------------------------------------------------------- program


class _Program:
    """Variables (continuous or binary, with bounds) and sparse constraint rows lb ≤ A·v ≤ ub."""

    def __init__(self) -> None:
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.size = 0
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []

    def add(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        n = len(lo)
        self.lo.append(np.asarray(lo, dtype=float))
        self.hi.append(np.asarray(hi, dtype=float))
        self.integer.append(np.full(n, int(integer)))
        index = np.arange(self.size, self.size + n)
        self.size += n
        return index

    def row(self, terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.row_lo)
        for col, val in terms:
            if val != 0.0:
                self.rows.append(r)
                self.cols.append(int(col))
                self.vals.append(float(val))
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def block(self, matrix: sp.coo_matrix, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows lo ≤ matrix·v ≤ hi (matrix [m, size] in COO)."""
        r = len(self.row_lo)
        self.rows.extend((matrix.row + r).tolist())
        self.cols.extend(matrix.col.tolist())
        self.vals.extend(matrix.data.tolist())
        self.row_lo.extend(np.broadcast_to(lo, matrix.shape[0]).tolist())
        self.row_hi.extend(np.broadcast_to(hi, matrix.shape[0]).tolist())

    def linear(self, pairs: list[tuple[np.ndarray, np.ndarray | float]], lo, hi) -> None:
        """Rows Σ coef·v[idx] (elementwise over n) in [lo, hi]: ``pairs`` of (indices [n], coefficient)."""
        n = len(pairs[0][0])
        rows, cols, vals = [], [], []
        for idx, coef in pairs:
            rows.append(np.arange(n))
            cols.append(idx)
            vals.append(np.broadcast_to(np.asarray(coef, dtype=float), n))
        matrix = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(n, self.size))
        self.block(matrix, np.broadcast_to(lo, n), np.broadcast_to(hi, n))


@dataclass
class Layout:
    """Variable indices: input, per node clean pre/post, faulty pre/post/after-site, failure binaries."""

    x: np.ndarray
    z: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    fz: list[np.ndarray] = field(default_factory=list)
    fy: list[np.ndarray] = field(default_factory=list)
    fs: list[np.ndarray] = field(default_factory=list)
    f: dict[int, np.ndarray] = field(default_factory=dict)


def _relu(p: _Program, z: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, big_m: float) -> None:
    """y = max(0, z) for z ∈ [lo, hi] (exact when stable; big-M with a binary where not)."""
    active, inactive = lo >= 0, hi <= 0
    if active.any():
        p.linear([(y[active], 1.0), (z[active], -1.0)], 0.0, 0.0)
    if inactive.any():
        p.linear([(y[inactive], 1.0)], 0.0, 0.0)
    open_ = ~(active | inactive)
    if not open_.any():
        return
    low, up = lo[open_] * big_m, hi[open_] * big_m
    zo, yo = z[open_], y[open_]
    delta = p.add(np.zeros(len(zo)), np.ones(len(zo)), integer=True)
    p.linear([(yo, 1.0)], 0.0, np.inf)
    p.linear([(yo, 1.0), (zo, -1.0)], 0.0, np.inf)
    p.linear([(yo, 1.0), (delta, -up)], -np.inf, 0.0)  # y ≤ u δ
    p.linear([(yo, 1.0), (zo, -1.0), (delta, -low)], -np.inf, -low)  # y ≤ z − l (1 − δ)


def _site(p: _Program, a: np.ndarray, s: np.ndarray, f: np.ndarray | None, fixed: np.ndarray | None,
          lo: np.ndarray, hi: np.ndarray, c: float) -> None:
    """s = a where not failed, s ∈ [−c, c] where failed (f binary, or ``fixed`` a boolean mask)."""
    if f is None:
        assert fixed is not None
        ok = ~fixed
        if ok.any():
            p.linear([(s[ok], 1.0), (a[ok], -1.0)], 0.0, 0.0)
        return
    p.linear([(s, 1.0), (a, -1.0), (f, -(c - lo))], -np.inf, 0.0)
    p.linear([(s, 1.0), (a, -1.0), (f, c + hi)], 0.0, np.inf)
    p.linear([(s, 1.0), (f, hi - c)], -np.inf, hi)  # s ≤ c f + hi (1 − f)
    p.linear([(s, 1.0), (f, lo + c)], lo, np.inf)  # s ≥ −c f + lo (1 − f)


def build(graph: Graph, r: Ranges, box: tuple[float, float], counts: list[int], c: float,
          failed: list[np.ndarray] | None, big_m: float = 1.0) -> tuple[_Program, Layout]:
    """The MILP's variables and constraints (module doc); ``big_m`` scales the bounds used as big-M
    constants (1: the sound ones; tests weaken it to check that :func:`verify` catches it)."""
    p = _Program()
    lay = Layout(p.add(np.full(graph.input_size, box[0]), np.full(graph.input_size, box[1])))
    wide = big_m == 1.0  # variable bounds only when they are the sound ones

    def var(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return p.add(lo, hi) if wide else p.add(np.full(len(lo), -np.inf), np.full(len(lo), np.inf))

    failing = [n.site is not None and counts[n.site] > 0 for n in graph.nodes]
    same: list[bool] = []  # no failure upstream: the faulty node is the clean one (shared variables)
    for i, node in enumerate(graph.nodes):
        same.append(all(j < 0 or (same[j] and not failing[j]) for j, _ in node.inputs))
        lay.z.append(var(r.zl[i], r.zu[i]))
        lay.fz.append(lay.z[i] if same[i] else var(r.fzl[i], r.fzu[i]))
        for pre, source in ((lay.z[i], lay.y), (lay.fz[i], lay.fs))[: 1 if same[i] else 2]:
            terms: list[sp.coo_matrix] = []
            for j, a in node.inputs:
                cols = lay.x if j < 0 else source[j]
                m = sp.coo_matrix(a)
                terms.append(sp.coo_matrix((-m.data, (m.row, cols[m.col])), shape=(node.size, p.size)))
            eye = sp.coo_matrix((np.ones(node.size), (np.arange(node.size), pre)), shape=(node.size, p.size))
            total = sp.coo_matrix(sum(terms, eye))
            p.block(total, node.bias, node.bias)
        if node.relu and same[i]:
            lay.y.append(var(r.yl[i], r.yu[i]))
            lay.fy.append(lay.y[i])
            _relu(p, lay.z[i], lay.y[i], r.zl[i], r.zu[i], big_m)
        elif node.relu:
            lay.y.append(var(r.yl[i], r.yu[i]))
            lay.fy.append(var(r.fyl[i], r.fyu[i]))
            _relu(p, lay.z[i], lay.y[i], r.zl[i], r.zu[i], big_m)
            keep = np.ones(node.size, dtype=bool)
            if failed is not None and node.site is not None and counts[node.site]:
                keep = ~failed[node.site]  # a fixed failed neuron's ReLU feeds nothing: left out
            _relu(p, lay.fz[i][keep], lay.fy[i][keep], r.fzl[i][keep], r.fzu[i][keep], big_m)
        else:
            lay.y.append(lay.z[i])
            lay.fy.append(lay.fz[i])
        if not same[i]:  # the difference cuts
            p.linear([(lay.fz[i], 1.0), (lay.z[i], -1.0)], r.dzl[i], r.dzu[i])
            p.linear([(lay.fy[i], 1.0), (lay.y[i], -1.0)], r.dl_pre[i], r.du_pre[i])
        site = node.site
        if site is not None and counts[site]:
            lay.fs.append(var(r.fsl[i], r.fsu[i]))
            fixed = None if failed is None else failed[site]
            f = None
            if fixed is None:
                f = p.add(np.zeros(node.size), np.ones(node.size), integer=True)
                lay.f[site] = f
                p.row([(j, 1.0) for j in f], counts[site], counts[site])
            _site(p, lay.fy[i], lay.fs[i], f, fixed, r.fyl[i] * big_m, r.fyu[i] * big_m, c)
            p.linear([(lay.fs[i], 1.0), (lay.y[i], -1.0)], r.dl[i], r.du[i])
        else:
            lay.fs.append(lay.fy[i])
    return p, lay


@dataclass
class Found:
    """One exact-search answer: ``verified`` = sign·(F̃_t − F_t) of the torch float64 forward pass
    at the MILP's incumbent (None: no incumbent), ``error`` = max_k |F̃_k − F_k| there, ``claimed`` the
    MILP's objective, ``dual`` its dual bound on the maximum (an upper bound when the bounds are
    sound), ``status`` HiGHS's message, ``seconds`` the solve time, ``binaries`` the program's
    binary variables, ``x``/``masks``/``values`` the incumbent."""

    verified: float | None
    error: float | None
    claimed: float | None
    dual: float
    status: str
    seconds: float
    binaries: int
    x: np.ndarray | None = None
    masks: list[np.ndarray] | None = None
    values: list[np.ndarray] | None = None


def forward(graph: Graph, x: np.ndarray, masks: list[np.ndarray] | None = None,
            values: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per node, its pre-activation at the flat input x (numpy float64), the sites' neurons with
    mask 1 replaced by ``values`` (flat per site) where given."""
    post: list[np.ndarray] = []
    pre: list[np.ndarray] = []
    for node in graph.nodes:
        z = node.bias + sum(a @ (x if j < 0 else post[j]) for j, a in node.inputs)
        y = np.maximum(z, 0) if node.relu else z
        if masks is not None and values is not None and node.site is not None:
            y = np.where(masks[node.site] > 0, values[node.site], y)
        pre.append(z)
        post.append(y)
    return pre


Phases = tuple[list[np.ndarray], list[np.ndarray]]


def phases_at(graph: Graph, x: np.ndarray, masks: list[np.ndarray], values: list[np.ndarray], free: int) -> Phases:
    """Per node, the ReLU phases (+1 on, −1 off, 0 left open) of the clean and the faulty network at
    (x, masks, values): all fixed except the ``free`` whose pre-activation is nearest 0, and the
    failed neurons of the faulty network (their own phase feeds nothing)."""
    clean, faulty = forward(graph, x), forward(graph, x, masks, values)
    relus = [i for i, n in enumerate(graph.nodes) if n.relu]
    distance = np.sort(np.concatenate([np.abs(z[i]) for z in (clean, faulty) for i in relus]))
    tau = distance[free] if free < len(distance) else np.inf
    out: Phases = ([], [])
    for z, phases in ((clean, out[0]), (faulty, out[1])):
        for i, node in enumerate(graph.nodes):
            phase = np.where(np.abs(z[i]) < tau, 0, np.where(z[i] >= 0, 1, -1)) if node.relu else np.zeros(node.size)
            if z is faulty and node.site is not None:
                phase = np.where(masks[node.site] > 0.5, 0, phase)
            phases.append(phase.astype(int))
    return out


def restrict(r: Ranges, phases: Phases) -> None:
    """A neighbourhood of one point (a large-neighbourhood search): the ReLU phases fixed where
    ``phases`` says (+1: z ≥ 0, −1: z ≤ 0); ``r`` narrowed in place. Its points stay real network
    points, so the answers stay real errors; the dual bound then only covers the neighbourhood."""
    for phase_list, lo, hi, ylo, yhi in ((phases[0], r.zl, r.zu, r.yl, r.yu), (phases[1], r.fzl, r.fzu, r.fyl, r.fyu)):
        for i, phase in enumerate(phase_list):
            if not phase.any():
                continue
            lo[i] = np.where(phase > 0, np.maximum(lo[i], 0.0), lo[i])
            hi[i] = np.where(phase < 0, np.minimum(hi[i], 0.0), hi[i])
            ylo[i], yhi[i] = np.maximum(lo[i], 0.0), np.maximum(hi[i], 0.0)


@contextlib.contextmanager
def _solver_log() -> Iterator[io.StringIO]:
    """HiGHS's log (it writes to file descriptor 1) captured into the yielded buffer, filled on exit."""
    buffer = io.StringIO()
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield buffer
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            buffer.write(sink.read().decode(errors="replace"))
            buffer.seek(0)


def _logged_dual(log: str) -> float | None:
    """The 'Dual bound' of HiGHS's solving report (minimisation), None when absent."""
    for line in log.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[:2] == ["Dual", "bound"]:
            try:
                return float(parts[2])
            except ValueError:
                return None
    return None


def solve(model: nn.Module, graph: Graph, counts: list[int], c: float, target: int, sign: float,
          box: tuple[float, float] = (0.0, 1.0), failed: list[np.ndarray] | None = None,
          time_limit: float = 60.0, floor: float | None = None, big_m: float = 1.0,
          phases: Phases | None = None) -> Found:
    """Maximise sign·(F̃_target − F_target) over the input box and the failure sets (``failed``: fixed
    boolean masks per site, else free with ``counts``), ``time_limit`` seconds; ``floor``: only
    solutions above it are sought (an attack's value: the dual bound then bounds the rest);
    ``phases``: only :func:`restrict`'s neighbourhood searched.
    The incumbent is checked by :func:`verify`."""
    # with the phases fixed the ranges mostly bound variables: intervals do
    ranges = bounds(graph, box, counts, c, failed, linear=phases is None)
    if phases is not None:
        restrict(ranges, phases)
    p, lay = build(graph, ranges, box, counts, c, failed, big_m)
    out = len(graph.nodes) - 1
    objective = [(lay.fz[out][target], sign), (lay.z[out][target], -sign)]
    if floor is not None:
        p.row(objective, floor, np.inf)
    cost = np.zeros(p.size)
    for col, val in objective:
        cost[col] -= val
    a = sp.csr_matrix((p.vals, (p.rows, p.cols)), shape=(len(p.row_lo), p.size))
    integrality = np.concatenate(p.integer)
    start = time.perf_counter()
    with _solver_log() as log:
        res = milp(cost, integrality=integrality, bounds=Bounds(np.concatenate(p.lo), np.concatenate(p.hi)),
                   constraints=LinearConstraint(a, np.array(p.row_lo), np.array(p.row_hi)),
                   options={"time_limit": time_limit, "disp": True, "mip_rel_gap": 1e-6})
    seconds = time.perf_counter() - start
    dual = getattr(res, "mip_dual_bound", None)
    if dual is None:  # scipy leaves it out when no solution was found; HiGHS's log has it
        dual = _logged_dual(log.read())
    dual = float("inf") if dual is None or not np.isfinite(dual) else -float(dual)
    if res.status == 0 and res.fun is not None:  # solved: the optimum is the bound
        dual = -float(res.fun)
    if res.status == 2:  # infeasible: nothing above the floor
        dual = floor if floor is not None else -float("inf")
    binaries = int(integrality.sum())
    if res.x is None:
        return Found(None, None, None, dual, str(res.message), seconds, binaries)
    v = res.x
    x = v[lay.x]
    masks, values = [], []
    for s, i in enumerate(graph.sites):
        n = graph.nodes[i].size
        if failed is not None:
            mask = failed[s].astype(float)
        elif s in lay.f:
            mask = (v[lay.f[s]] > 0.5).astype(float)
        else:
            mask = np.zeros(n)
        masks.append(mask)
        values.append(np.where(mask > 0, np.clip(v[lay.fs[i]], -c, c), 0.0) if counts[s] else np.zeros(n))
    verified, error = verify(model, x, masks, values, target, sign)
    return Found(verified, error, -float(res.fun), dual, str(res.message), seconds, binaries, x, masks, values)


def verify(model: nn.Module, x: np.ndarray, masks: list[np.ndarray], values: list[np.ndarray], target: int,
           sign: float) -> tuple[float, float]:
    """(sign·(F̃_target − F_target), max_k |F̃_k − F_k|) of a plain torch float64 forward pass with the
    sites' values replaced (``masks``/``values`` flat per site, x flat)."""
    model = model.double().eval()
    with torch.no_grad():
        shape = (1, 1, 8, 8) if isinstance(model, SmallResNet) else (1, -1)
        xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).reshape(shape)
        clean = model(xt)
        shapes = [tuple(s.seen.shape[1:]) for s in sites(model) if s.seen is not None]
        m = [torch.from_numpy(k).reshape(1, *shape) for k, shape in zip(masks, shapes, strict=True)]
        w = [torch.from_numpy(k).reshape(1, *shape) for k, shape in zip(values, shapes, strict=True)]
        faulty = _forward(model, xt, m, w)
    change = (faulty - clean)[0]
    return float(sign * change[target]), float(change.abs().max())


# --------------------------------------------------------------------------- linear-relaxation bounds


def _relaxation(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ReLU over [lo, hi]: (upper slope, upper intercept, lower slope) with
    lower·z ≤ relu(z) ≤ upper·z + intercept on the interval (the triangle's upper side; lower
    slope 1 or 0, whichever of the two is the closer)."""
    active, inactive = lo >= 0, hi <= 0
    open_ = ~(active | inactive)
    width = np.where(open_, hi - lo, 1.0)
    su = np.where(active, 1.0, np.where(open_, hi / width, 0.0))
    tu = np.where(open_, -lo * hi / width, 0.0)
    sl = np.where(active, 1.0, np.where(open_, (hi > -lo).astype(float), 0.0))
    return su, tu, sl


def _topk_rows(m: np.ndarray, k: int) -> np.ndarray:
    """Per row, the sum of the k largest positive entries of m."""
    k = min(k, m.shape[1])
    if k <= 0:
        return np.zeros(m.shape[0])
    return -np.partition(-np.maximum(m, 0), k - 1, axis=1)[:, :k].sum(axis=1)


_Errors = dict[int, tuple[np.ndarray, np.ndarray, int | None, np.ndarray | None]]


def _backward(graph: Graph, t: int, zl: list, zu: list, yl: list, yu: list, box: tuple[float, float],
              errors: _Errors, upper: bool) -> np.ndarray:
    """An upper (or lower) bound of node t's pre-activation by back-substitution of linear ReLU bounds
    (earlier nodes' bounds zl..yu), each site s' = y + e with e_j ∈ [elo_j, ehi_j]: ``errors[node]`` =
    (elo, ehi, count (at most that many nonzero) or None, fixed mask (failed j: s'_j free in
    [elo, ehi] as a value, its y_j dropped) or None)."""
    sign = 1.0 if upper else -1.0
    node = graph.nodes[t]
    lam: dict[int, np.ndarray] = {}
    const = sign * node.bias.copy()
    for j, a in node.inputs:
        lam[j] = lam.get(j, 0) + sign * a
    for j in range(t - 1, -1, -1):
        if j not in lam:
            continue
        coef = lam.pop(j)  # [n_t, n_j] on node j's output after its site; maximise coef·s
        if j in errors:
            elo, ehi, count, fixed = errors[j]
            if fixed is not None:
                const = const + np.maximum(coef[:, fixed] * ehi[fixed], coef[:, fixed] * elo[fixed]).sum(axis=1)
                coef = np.where(fixed, 0.0, coef)
            elif count:
                const = const + _topk_rows(np.maximum(coef * ehi, coef * elo), count)
        n = graph.nodes[j]
        if n.relu:
            su, tu, sl = _relaxation(zl[j], zu[j])
            pos, neg = np.maximum(coef, 0), np.minimum(coef, 0)
            const = const + pos @ tu
            coef = pos * su + neg * sl
        const = const + coef @ n.bias
        for i, a in n.inputs:
            lam[i] = lam.get(i, 0) + coef @ a
    coef = lam.pop(-1, np.zeros((node.size, graph.input_size)))
    const = const + np.maximum(coef, 0).sum(axis=1) * box[1] + np.minimum(coef, 0).sum(axis=1) * box[0]
    return sign * const


def linear_bounds(graph: Graph, box: tuple[float, float], counts: list[int], c: float,
                  failed: list[np.ndarray] | None = None, faulty: bool = False) -> tuple[list, list]:
    """Per node, sound [lo, hi] of the pre-activation of the clean (or, ``faulty``, the faulty)
    network by back-substitution (:func:`_backward`), intersected with interval arithmetic."""
    zl: list[np.ndarray] = []
    zu: list[np.ndarray] = []
    yl: list[np.ndarray] = []
    yu: list[np.ndarray] = []
    errors: _Errors = {}
    for t, node in enumerate(graph.nodes):
        lo, hi = node.bias.copy(), node.bias.copy()
        for j, a in node.inputs:
            if j < 0:
                plo, phi = np.full(graph.input_size, box[0]), np.full(graph.input_size, box[1])
            else:
                plo, phi = yl[j], yu[j]
                if j in errors:
                    plo, phi = np.minimum(plo, -c), np.maximum(phi, c)
                    fixed = errors[j][3]
                    if fixed is not None:
                        plo, phi = np.where(fixed, -c, yl[j]), np.where(fixed, c, yu[j])
            ilo, ihi = _interval(a, plo, phi)
            lo, hi = lo + ilo, hi + ihi
        if t > 0:
            lo = np.maximum(lo, _backward(graph, t, zl, zu, yl, yu, box, errors, upper=False))
            hi = np.minimum(hi, _backward(graph, t, zl, zu, yl, yu, box, errors, upper=True))
        zl.append(lo)
        zu.append(hi)
        yl.append(np.maximum(lo, 0) if node.relu else lo)
        yu.append(np.maximum(hi, 0) if node.relu else hi)
        s = node.site
        if faulty and s is not None and counts[s]:
            if failed is None:
                errors[t] = (np.minimum(-c - yu[t], 0), np.maximum(c - yl[t], 0), counts[s], None)
            else:
                errors[t] = (np.full(node.size, -c), np.full(node.size, c), None, failed[s].astype(bool))
    return zl, zu


def _affine_maps(graph: Graph, phases: list[np.ndarray], masks: list[np.ndarray] | None,
                 failed_at: list[np.ndarray] | None, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per node, its pre-activation as an affine map (J [n, width], b [n]) of u = (x, sent values)
    on the region where each ReLU has the given phase (+1: identity, −1: zero); the failed neurons
    (``masks``) send the variable ``failed_at[site][j]`` (an index into u)."""
    n_in = graph.input_size
    post: list[tuple[np.ndarray, np.ndarray]] = []
    pre: list[tuple[np.ndarray, np.ndarray]] = []
    start = (np.eye(n_in, width), np.zeros(n_in))
    for i, node in enumerate(graph.nodes):
        jac, b = np.zeros((node.size, width)), node.bias.copy()
        for j, a in node.inputs:
            pj, pb = start if j < 0 else post[j]
            jac, b = jac + a @ pj, b + a @ pb
        pre.append((jac, b))
        if node.relu:
            on = (phases[i] > 0)[:, None]
            jac, b = np.where(on, jac, 0.0), np.where(on[:, 0], b, 0.0)
        if masks is not None and failed_at is not None and node.site is not None:
            hit = masks[node.site] > 0.5
            jac, b = jac.copy(), b.copy()
            jac[hit], b[hit] = 0.0, 0.0
            jac[np.flatnonzero(hit), failed_at[node.site][hit]] = 1.0
        post.append((jac, b))
    return pre


def region_lp(model: nn.Module, graph: Graph, phases: Phases, masks: list[np.ndarray], c: float, target: int,
              sign: float, box: tuple[float, float] = (0.0, 1.0)) -> Found:
    """The exact maximum of sign·(F̃_target − F_target) over one activation region (every ReLU's
    phase fixed in both networks, the failed neurons' own phases free) and the sent values in
    [−c, c]: the networks are affine in u = (x, sent values) there, so it is one linear program in
    u (64 + failed variables, one row per fixed phase), by HiGHS; the answer is :func:`verify`'s."""
    n_in = graph.input_size
    failed_at, width = [], n_in
    for m in masks:
        index = np.full(len(m), -1)
        hit = m > 0.5
        index[hit] = np.arange(width, width + int(hit.sum()))
        width += int(hit.sum())
        failed_at.append(index)
    clean = _affine_maps(graph, phases[0], None, None, width)
    faulty = _affine_maps(graph, phases[1], masks, failed_at, width)
    rows, rhs = [], []
    for maps, phase_list in ((clean, phases[0]), (faulty, phases[1])):
        for (jac, b), phase in zip(maps, phase_list, strict=True):
            for side in (1, -1):  # side·z ≥ 0  ⇔  −side·J u ≤ side·b
                pick = phase == side
                if pick.any():
                    rows.append(-side * jac[pick])
                    rhs.append(side * b[pick])
    (jf, bf), (jc, bc) = faulty[-1], clean[-1]
    cost = -sign * (jf[target] - jc[target])
    offset = sign * (bf[target] - bc[target])
    start = time.perf_counter()
    res = linprog(cost, A_ub=np.concatenate(rows) if rows else None, b_ub=np.concatenate(rhs) if rhs else None,
                  bounds=[box] * n_in + [(-c, c)] * (width - n_in), method="highs")
    seconds = time.perf_counter() - start
    if res.status != 0:
        return Found(None, None, None, float("nan"), str(res.message), seconds, 0)
    x = res.x[:n_in]
    values = [np.where(index >= 0, res.x[np.maximum(index, 0)], 0.0) for index in failed_at]
    masks = [(m > 0.5).astype(float) for m in masks]
    verified, error = verify(model, x, masks, values, target, sign)
    claimed = -float(res.fun) + offset
    return Found(verified, error, claimed, claimed, str(res.message), seconds, 0, x, masks, values)


def polish(model: nn.Module, graph: Graph, counts: list[int], c: float, target: int, sign: float,
           x: np.ndarray, masks: list[np.ndarray], values: list[np.ndarray], free: int = 0,
           time_limit: float = 30.0, rounds: int = 0, box: tuple[float, float] = (0.0, 1.0)) -> Found:
    """An attack's best point made exact: the failure set kept, the input and the sent values
    searched over the point's activation region (``free`` = 0: one linear program in the input
    and sent values, :func:`region_lp`, the exact maximum over that region) or its
    :func:`phases_at` neighbourhood (``free`` phases left to the MILP); then up to ``rounds``
    steps to the next region: the phases of the neurons the optimum lies on (|z| < 1e-7)
    flipped, where that optimum is still feasible, so no step loses (stopping after two steps
    without gain). Flat x, masks and values per site; the answer is :func:`verify`'s, the best
    of the steps; ``seconds`` their total; ``time_limit`` bounds each solve and the steps together."""
    failed = [m > 0.5 for m in masks]
    start = time.perf_counter()
    phases = phases_at(graph, np.asarray(x, dtype=np.float64).reshape(-1), masks, values, free)

    def search(limit: float) -> Found:
        if free == 0:
            return region_lp(model, graph, phases, masks, c, target, sign, box)
        return solve(model, graph, counts, c, target, sign, box=box, failed=failed, time_limit=limit, phases=phases)

    best = search(time_limit)
    current, idle = best, 0
    for _ in range(rounds):
        left = time_limit - (time.perf_counter() - start)
        if current.x is None or current.masks is None or current.values is None or left <= 1.0:
            break
        at = (forward(graph, current.x), forward(graph, current.x, current.masks, current.values))
        flipped = 0
        for phase_list, z in zip(phases, at, strict=True):
            for i, phase in enumerate(phase_list):
                edge = (phase != 0) & (np.abs(z[i]) < 1e-7)
                phase[edge] = -phase[edge]
                flipped += int(edge.sum())
        if not flipped:
            break
        current = search(left)
        if current.verified is not None and (best.verified is None or current.verified > best.verified + 1e-9):
            best, idle = current, 0
        else:
            idle += 1  # a degenerate vertex: a second flip may still lead on, a third gives up
            if idle == 2:
                break
    best.seconds = time.perf_counter() - start
    return best


# --------------------------------------------------------------------------- command line


def main() -> None:
    """``python benchmarks/exact_search.py [--network resnet_small] [--vector "crash 3 each"]
    [--stages lp,walk,fixed:120,free:120]``: trains the network (``trained_nets.trained``), runs the
    benchmark's attack with its targets (``bench_trained.py``), then each stage on the attack's
    (output, sign): ``lp`` the region LP at the attack's point, ``walk`` the walk from it (20 steps),
    ``nearN`` the MILP with the N phases nearest 0 open, ``fixed`` the MILP with the attack's failure
    set, ``free`` the MILP with free failure sets; ``:S`` a stage's time limit in seconds."""
    import argparse
    import pathlib

    from bench_trained import vectors
    from trained_nets import AttackOptions, attack_witness, digits, trained

    from robaudit.bounds.audit import load_network
    from robaudit.bounds.fep import Analysis
    from robaudit.bounds.tight import TightBound
    from robaudit.graph.network import NetworkOptions

    parser = argparse.ArgumentParser()
    parser.add_argument("--network", default="resnet_small")
    parser.add_argument("--vector", default="crash 3 each")
    parser.add_argument("--stages", default="lp,walk,fixed:120,free:120")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, path, accuracy = trained(args.network, pathlib.Path(tmp))
        _, network = load_network(path, NetworkOptions())
    model = model.double().eval()
    graph = extract(model)
    label_counts = {label: (counts, failure) for label, counts, failure in vectors(len(graph.sites))}
    counts, failure = label_counts[args.vector]
    c = failure.failure_range[1]
    per_output = TightBound(Analysis(network, failure)).per_output(counts)
    targets = [int(k) for k in np.argsort(-per_output)[:3]]
    images, _ = digits()
    start = time.perf_counter()
    w = attack_witness(model, counts, failure.failure_range, (0.0, 1.0), images[:1500].astype(np.float64), targets,
                       AttackOptions())
    x = w.x.numpy().reshape(-1)
    masks = [m.numpy().reshape(-1) for m in w.masks]
    values = [v.numpy().reshape(-1) for v in w.values]
    change = forward(graph, x, masks, values)[-1] - forward(graph, x)[-1]
    target = int(np.abs(change).argmax())
    sign = float(np.sign(change[target]) or 1.0)
    print(f"{args.network} (held-out accuracy {accuracy:.3f}) {args.vector}: attack {w.error:.4f} "
          f"({time.perf_counter() - start:.1f} s), output {target} sign {sign:+.0f}", flush=True)
    for stage in args.stages.split(","):
        name, _, limit_text = stage.partition(":")
        limit = float(limit_text or 60)
        if name in ("lp", "walk"):
            found = polish(model, graph, counts, c, target, sign, x, masks, values, time_limit=limit,
                           rounds=20 if name == "walk" else 0)
        elif name.startswith("near"):
            found = solve(model, graph, counts, c, target, sign, failed=[m > 0.5 for m in masks], time_limit=limit,
                          phases=phases_at(graph, x, masks, values, int(name[4:])))
        else:
            found = solve(model, graph, counts, c, target, sign, time_limit=limit,
                          failed=[m > 0.5 for m in masks] if name == "fixed" else None)
        verified = "none" if found.verified is None else f"{found.verified:.4f} (max over outputs {found.error:.4f})"
        print(f"  {stage:<12} verified {verified}, dual bound {found.dual:.4g}, {found.binaries} binaries, "
              f"{found.seconds:.1f} s, {found.status.split('(')[0].strip()}", flush=True)


if __name__ == "__main__":
    main()
