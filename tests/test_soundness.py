"""Soundness of the Fep bounds under test (README "Reliability", docs/reliability.md).

Property: for every network, failure vector and input in the domain, the measured
error max_k |F̃_k(x) − F_k(x)| never exceeds ``fep_paper`` nor ``fep_tight``
(``robaudit.bounds.audit.compute_bound``), and the tolerated counts (``max_failures`` per
layer, ``uniform``, ``total``) keep the worst error within ε.

Networks (``soundness_nets``, hypothesis-drawn): dense chains, conv chains, residual
pairs with an ``Add``; activations relu, sigmoid, tanh, hardswish; crash, byzantine
(symmetric capacity or an asymmetric range) and synapse failures. The faulty network
is evaluated by an independent numpy forward pass (``soundness_nets.forward``), never
by robaudit's code.

(a) **Tiny networks, exhaustive**: every failure set with the given counts (and every
synapse set), byzantine values at every vertex of [a, b]^F plus two interior draws, on
every corner of the input box (or 16 of them) plus 8 random points. Why vertices are
not enough on their own: when all failed neurons are in the *last* hidden layer the
output is affine in each failed value, so |ΔF_k| (convex) peaks at a vertex; a value
failing in an earlier layer passes through later activations, where the peak can be
interior — hence the interior draws. Likewise the worst input of a ReLU network is
a vertex of one of its linear regions, not necessarily a corner of the box: random
points are added. A search can only find violations, never prove their absence; the
bound is the proof, the search tries to break it.

(b) **Larger networks, worst-case search**: a greedy search (add the failure that
raises the error most on a batch of corner/random inputs, both extremes tried for
byzantine values), then swap refinement and a coordinate search over input corners;
every intermediate configuration is checked against the bound of its own failure
vector (``PaperBound``/``TightBound`` of ``robaudit.bounds.fep``). The worst
configuration found is replayed in onnxruntime (float32).

**Floating point margin.** robaudit computes the bound in float64 from the float32
weights stored in the file; the numpy search computes in float64 from the same float32
values, so both are the same real numbers up to float64 rounding: about
(depth + 1)·(fan-in + 2)·u₆₄ ≈ 6·66·1.1e-16 < 1e-13 relative to the magnitudes involved.
The check allows ``measured ≤ bound + 1e-9·(bound + max|F|)``, four orders of magnitude
above that. onnxruntime infers in float32 (u₃₂ = 2⁻²⁴ ≈ 6e-8): its outputs carry the
rounding of every dot product, |fl(w·y + b) − (w·y + b)| ≤ γ_{n+1}(|w|·|y| + |b|) with
γ_n = n·u₃₂/(1 − n·u₃₂) whatever the summation order, propagated through K_l·|W_l|, plus a
few ulps per activation kernel. ``soundness_nets.forward`` computes exactly this running
bound E(x) for the clean and the faulty pass, and the float32 replay must satisfy
``measured₃₂ ≤ bound + E_clean(x) + E_faulty(x)`` (and the float32 and float64 errors
of the same configuration must differ by less than that). Relative to the bound this
margin is of the order (L + 1)·(n_max + 16)·u₃₂·(output magnitude / bound): at most
about 3e-4 on these networks, while the observed float32/float64 difference is far
smaller (the slow campaign prints both).

The default run draws a modest number of networks; ``-m slow`` runs more than 10,000
(network, failure set, input) trials and prints their number, the violations (must be
0) and the smallest relative margin (bound − measured)/bound. ``test_weakened_bound_is_caught``
halves δ (``robaudit.bounds.fep.neuron_delta``) and asserts the same search finds violations.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from soundness_nets import (
    ACTIVATIONS,
    Config,
    Faults,
    Spec,
    all_neuron_sets,
    all_synapse_sets,
    configs_for,
    domain_inputs,
    errors,
    forward,
    random_chain,
    random_conv,
    random_residual,
    random_summed,
    to_onnx,
)

import robaudit.bounds.fep
import robaudit.bounds.tight
from robaudit.bounds.audit import BoundOptions, bound_network, compute_bound, load_network, model_info
from robaudit.bounds.fep import Analysis, FailureModel, PaperBound
from robaudit.bounds.tight import TightBound
from robaudit.graph.network import NetworkOptions
from robaudit.graph.onnx_graph import Node
from robaudit.graph.ops import lookup

#: Float64 tolerance (module docstring): measured ≤ bound + REL64·(bound + max|F|).
REL64 = 1e-9
#: Most rows (configuration × input) one exhaustive check evaluates.
MAX_ROWS = 200_000
ACT_NAMES = sorted(ACTIVATIONS)


@dataclass
class Stats:
    """Totals over a run of the suite."""

    trials: int = 0
    violations: list[str] = field(default_factory=list)
    min_margin: float = math.inf
    min_margin_case: str = ""
    checks: int = 0
    networks: int = 0
    ort_replays: int = 0
    max_f32_slack: float = 0.0
    #: Largest |float32 error − float64 error| / bound seen in the replays.
    max_f32_drift: float = 0.0
    #: Checks whose worst measured error reached half / 99 % of the bound (is the search biting?).
    over_half: int = 0
    over_99: int = 0

    def record(self, measured: np.ndarray, bound: float, scale: float, what: str) -> None:
        """Count ``measured.size`` trials against ``bound``; keep violations and the smallest margin."""
        self.trials += int(np.size(measured))
        self.checks += 1
        worst = float(np.max(measured)) if np.size(measured) else 0.0
        if worst > bound + REL64 * (bound + scale):
            self.violations.append(f"{what}: measured {worst:.9g} > bound {bound:.9g}")
        if bound > 0 and np.size(measured):
            margin = (bound - worst) / bound
            self.over_half += margin <= 0.5
            self.over_99 += margin <= 0.01
            if margin < self.min_margin:
                self.min_margin, self.min_margin_case = margin, what


SLOW_STATS = Stats()


# --------------------------------------------------------------------------- failure models


@dataclass(frozen=True)
class Mode:
    """A failure model as robaudit takes it and as the search applies it."""

    name: str
    frange: tuple[float, float]
    model: FailureModel


def make_mode(kind: str, rng: np.random.Generator) -> Mode:
    if kind == "crash":
        return Mode("crash", (0.0, 0.0), FailureModel.crash())
    if kind == "byzantine":
        capacity = float(np.float32(rng.choice([0.5, 1.0, 2.0])))
        return Mode(f"byzantine C={capacity}", (-capacity, capacity), FailureModel.byzantine(capacity))
    a = float(np.float32(rng.uniform(-1.0, 0.5)))
    b = float(np.float32(a + rng.uniform(0.1, 2.0)))
    return Mode(f"byzantine [{a:.3g},{b:.3g}]", (a, b), FailureModel.byzantine(None, (a, b)))


# --------------------------------------------------------------------------- helpers


def save(spec: Spec, directory: Path) -> Path:
    path = directory / "net.onnx"
    onnx.save(to_onnx(spec), str(path))
    return path


def describe(spec: Spec, mode: Mode, extra: str = "") -> str:
    layers = ", ".join(f"{type(la).__name__.lower()}{la.weight.shape}:{la.act}" for la in spec.hidden)
    merge = f" merge {spec.merge_act}" if spec.topology == "residual" else ""
    return f"{spec.topology}[{layers}{merge}] {mode.name} {extra}".strip()


def worst_over(spec: Spec, neuron_sets, synapse_sets, mode: Mode, inputs, rng, interior: int = 2) -> np.ndarray:
    """Errors of every configuration × input (rows capped at MAX_ROWS by sampling configurations)."""
    configs = configs_for(neuron_sets, synapse_sets, mode.frange, rng, interior)
    limit = max(1, MAX_ROWS // len(inputs))
    if len(configs) > limit:
        configs = [configs[i] for i in rng.choice(len(configs), limit, replace=False)]
    return errors(spec, configs, inputs)


# --------------------------------------------------------------------------- (a) exhaustive


def check_exhaustive(
    spec: Spec, counts: list[int], synapses: list[int], mode: Mode, input_range, rng, stats: Stats, inverse: bool = True
) -> None:
    """fep_paper and fep_tight of compute_bound against every failure set (see module docstring)."""
    lo, hi = input_range
    inputs = domain_inputs(spec.in_shape, lo, hi, rng)
    scale = float(np.abs(forward(spec, inputs)[0]).max())
    label = describe(spec, mode, f"f={counts} s={synapses} x∈[{lo},{hi}]")
    with tempfile.TemporaryDirectory() as tmp:
        path = save(spec, Path(tmp))
        options = BoundOptions(
            epsilon=1.0,
            failure=mode.model,
            network=NetworkOptions(input_range=(lo, hi)),
            failures=tuple(counts),
            synapses=tuple(synapses),
        )
        result = compute_bound(path, options)
        assert [la.neurons for la in result.layers] == spec.sizes, label
        measured = worst_over(
            spec, all_neuron_sets(spec.sizes, counts), all_synapse_sets(spec, synapses), mode, inputs, rng
        )
        stats.record(measured, result.fep_tight, scale, f"{label} fep_tight")
        stats.record(measured, result.fep_paper, scale, f"{label} fep_paper")
        if inverse and not any(synapses):
            check_inverse(spec, path, mode, (lo, hi), result.fep_tight, inputs, scale, rng, stats, label)
    stats.networks += 1


def check_inverse(
    spec: Spec, path: Path, mode: Mode, input_range, fep: float, inputs, scale, rng, stats: Stats, label: str
) -> None:
    """max_failures (per layer), uniform and total budgets keep the worst error ≤ ε."""
    epsilon = max(fep, 1e-3) * float(rng.uniform(0.3, 2.0))
    loaded, network = load_network(path, NetworkOptions(input_range=input_range))
    result = bound_network(
        network,
        BoundOptions(epsilon=epsilon, failure=mode.model, network=NetworkOptions(input_range=input_range)),
        model_info(loaded),
    )
    no_synapse = [()] * len(spec.sizes)
    for method in ("paper", "tight"):
        for index, layer in enumerate(result.layers):
            allowed = getattr(layer, f"max_failures_{method}")
            if allowed <= 0:
                continue
            counts = [0] * len(spec.sizes)
            counts[index] = allowed
            measured = worst_over(spec, all_neuron_sets(spec.sizes, counts), [no_synapse], mode, inputs, rng)
            stats.record(measured, epsilon, scale, f"{label} max_failures_{method}[{index}]={allowed} ε={epsilon:.4g}")
        uniform = getattr(result, f"uniform_{method}")
        if uniform > 0:
            counts = [min(uniform, n) for n in spec.sizes]
            measured = worst_over(spec, all_neuron_sets(spec.sizes, counts), [no_synapse], mode, inputs, rng)
            stats.record(measured, epsilon, scale, f"{label} uniform_{method}={uniform} ε={epsilon:.4g}")
        total = getattr(result, f"total_{method}")
        if 0 < total and math.comb(sum(spec.sizes), total) <= 500:
            sets = distributions(spec.sizes, total)
            measured = worst_over(spec, sets, [no_synapse], mode, inputs, rng, interior=1)
            stats.record(measured, epsilon, scale, f"{label} total_{method}={total} ε={epsilon:.4g}")


def distributions(sizes: list[int], total: int) -> list[tuple[tuple[int, ...], ...]]:
    """Every set of ``total`` failed neurons anywhere, as per-layer index tuples."""
    flat = [(layer, i) for layer, n in enumerate(sizes) for i in range(n)]
    sets = []
    for chosen in itertools.combinations(flat, min(total, len(flat))):
        sets.append(tuple(tuple(i for la, i in chosen if la == layer) for layer in range(len(sizes))))
    return sets


# --------------------------------------------------------------------------- (b) greedy search


class VectorBounds:
    """fep_paper / fep_tight (min with paper, as compute_bound reports it) for any failure vector."""

    def __init__(self, path: Path, mode: Mode, input_range):
        _, network = load_network(path, NetworkOptions(input_range=input_range))
        analysis = Analysis(network, mode.model)
        self.paper, self.tight = PaperBound(analysis), TightBound(analysis)
        self.cache: dict[tuple[int, ...], tuple[float, float]] = {}

    def __call__(self, counts: list[int]) -> tuple[float, float]:
        key = tuple(counts)
        if key not in self.cache:
            paper = self.paper.fep(list(key))
            self.cache[key] = (paper, min(paper, self.tight.fep(list(key))))
        return self.cache[key]


def check_greedy(spec: Spec, counts: list[int], mode: Mode, input_range, rng, stats: Stats, ort_replay: bool) -> None:
    """Greedy worst-case search for ``counts`` failures; every evaluated configuration is checked."""
    lo, hi = input_range
    inputs = domain_inputs(spec.in_shape, lo, hi, rng, corners=24, interior=8)
    scale = float(np.abs(forward(spec, inputs)[0]).max())
    label = describe(spec, mode, f"greedy f={counts} x∈[{lo},{hi}]")
    values = sorted(set(mode.frange))
    with tempfile.TemporaryDirectory() as tmp:
        bounds = VectorBounds(save(spec, Path(tmp)), mode, (lo, hi))
    chosen: list[list[tuple[int, float]]] = [[] for _ in spec.sizes]

    def evaluate(candidates: list[list[list[tuple[int, float]]]], x) -> np.ndarray:
        configs = [
            Config([tuple(i for i, _ in la) for la in c], [tuple(v for _, v in la) for la in c]) for c in candidates
        ]
        errs = errors(spec, configs, x)
        for config, row in zip(configs, errs, strict=True):
            paper, tight = bounds(config.counts())
            stats.record(row, tight, scale, f"{label} fep_tight{config.counts()}")
            stats.record(row, paper, scale, f"{label} fep_paper{config.counts()}")
        return errs

    def extensions(state):
        for layer, want in enumerate(counts):
            if len(state[layer]) >= want:
                continue
            used = {i for i, _ in state[layer]}
            for neuron in range(spec.sizes[layer]):
                if neuron not in used:
                    for v in values:
                        yield [list(la) + ([(neuron, v)] if k == layer else []) for k, la in enumerate(state)]

    for _ in range(sum(counts)):  # greedy
        candidates = list(extensions(chosen))
        errs = evaluate(candidates, inputs)
        chosen = candidates[int(errs.max(axis=1).argmax())]
    for _ in range(2):  # swap refinement: replace one failure by the best other choice in its layer
        swaps = []
        for layer, failed in enumerate(chosen):
            for position in range(len(failed)):
                rest = [
                    list(la) if k != layer else [p for q, p in enumerate(la) if q != position]
                    for k, la in enumerate(chosen)
                ]
                swaps.extend(extensions([la if k == layer else la for k, la in enumerate(rest)]))
        swaps = [s for s in swaps if [len(la) for la in s] == counts]
        if not swaps:
            break
        errs = evaluate(swaps, inputs)
        chosen = swaps[int(errs.max(axis=1).argmax())]
    best_x = inputs[int(evaluate([chosen], inputs)[0].argmax())]
    best_x = coordinate_search(best_x, lambda x: evaluate([chosen], x)[0], lo, hi)
    if ort_replay and counts and sum(counts):
        replay_in_onnxruntime(spec, chosen, best_x, bounds(counts)[1], stats, label)
    stats.networks += 1


def coordinate_search(x: np.ndarray, score, lo: float, hi: float, rounds: int = 2) -> np.ndarray:
    """Flip input coordinates between lo and hi while the error grows (batched per round)."""
    best = x.copy()
    best_score = float(score(best[None])[0])
    flat_size = best.size
    for _ in range(rounds):
        candidates = np.repeat(best.reshape(1, -1), 2 * flat_size, axis=0)
        for k in range(flat_size):
            candidates[2 * k, k], candidates[2 * k + 1, k] = lo, hi
        scores = score(candidates.reshape((-1,) + best.shape))
        top = int(scores.argmax())
        if scores[top] <= best_score:
            break
        best, best_score = candidates[top].reshape(best.shape), float(scores[top])
    return best


def replay_in_onnxruntime(spec: Spec, chosen, x: np.ndarray, bound: float, stats: Stats, label: str) -> None:
    """The worst configuration in float32 with onnxruntime, against bound + float32 rounding bound."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        to_onnx(spec, fault_inputs=True).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds_clean, feeds_faulty = {"x": x[None].astype(np.float32)}, {"x": x[None].astype(np.float32)}
    keeps, vals = [], []
    for index, (failed, shape) in enumerate(zip(chosen, spec.out_shapes, strict=True)):
        keep, value = np.ones(int(np.prod(shape))), np.zeros(int(np.prod(shape)))
        for neuron, v in failed:
            keep[neuron], value[neuron] = 0.0, v
        keeps.append(keep[None])
        vals.append(value[None])
        feeds_clean[f"keep{index}"] = np.ones((1, *shape), np.float32)
        feeds_clean[f"value{index}"] = np.zeros((1, *shape), np.float32)
        feeds_faulty[f"keep{index}"] = keep.reshape((1, *shape)).astype(np.float32)
        feeds_faulty[f"value{index}"] = value.reshape((1, *shape)).astype(np.float32)
    clean32 = session.run(None, feeds_clean)[0].astype(np.float64)
    faulty32 = session.run(None, feeds_faulty)[0].astype(np.float64)
    measured = float(np.abs(faulty32 - clean32).max())
    clean64, e_clean = forward(spec, x[None])
    faulty64, e_faulty = forward(spec, x[None], Faults(keeps, vals, [None] * len(spec.sizes)))
    slack = float((e_clean + e_faulty).max())
    drift = abs(measured - float(np.abs(faulty64 - clean64).max()))
    assert drift <= slack, f"{label}: float32 and float64 errors differ by {drift:.3g}, above the bound {slack:.3g}"
    stats.ort_replays += 1
    stats.trials += 1
    if measured > bound + slack:
        stats.violations.append(f"{label} onnxruntime float32: {measured:.9g} > {bound:.9g} + {slack:.3g}")
    if bound > 0:
        stats.max_f32_slack = max(stats.max_f32_slack, slack / bound)
        stats.max_f32_drift = max(stats.max_f32_drift, drift / bound)


# --------------------------------------------------------------------------- strategies


MODES = st.sampled_from(["crash", "byzantine", "range"])
SEEDS = st.integers(0, 2**32 - 1)
RANGES = st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (-0.5, 2.0)])


@st.composite
def tiny_dense(draw):
    """A tiny dense chain or residual pair and a failure vector (exhaustive search stays small)."""
    rng = np.random.default_rng(draw(SEEDS))
    residual = draw(st.booleans())
    n_in, n_out = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    if residual:
        width = draw(st.integers(2, 3))
        acts = [draw(st.sampled_from(ACT_NAMES)) for _ in range(2)]
        spec = random_residual(rng, n_in, width, n_out, acts, draw(st.sampled_from([None, "relu", "tanh"])), scale)
    else:
        widths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
        acts = [draw(st.sampled_from(ACT_NAMES)) for _ in widths]
        spec = random_chain(rng, n_in, widths, n_out, acts, scale)
    counts = [draw(st.integers(0, n)) for n in spec.sizes]
    synapse = draw(st.booleans())
    synapses = [draw(st.integers(0, 1)) if synapse else 0 for _ in spec.sizes]
    return spec, counts, synapses, draw(MODES), draw(RANGES), rng


@st.composite
def tiny_summed(draw):
    """``act(A·h + B·x)`` after one dense layer h (docs/method.md §1.4), tiny enough to search exhaustively."""
    rng = np.random.default_rng(draw(SEEDS))
    n_in, width, width2 = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    acts = [draw(st.sampled_from(ACT_NAMES)) for _ in range(2)]
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    spec = random_summed(rng, n_in, width, width2, draw(st.integers(1, 2)), acts, scale)
    counts = [draw(st.integers(0, n)) for n in spec.sizes]
    synapses = [0, draw(st.integers(0, 1))] if draw(st.booleans()) else [0, 0]
    return spec, counts, synapses, draw(MODES), draw(RANGES), rng


@st.composite
def tiny_conv(draw):
    rng = np.random.default_rng(draw(SEEDS))
    channels, side = draw(st.integers(1, 2)), draw(st.integers(3, 4))
    layers = draw(st.integers(1, 2))
    convs = [
        (draw(st.integers(1, 2)), 2, draw(st.integers(1, 2)) if layers == 1 else 1, draw(st.integers(0, 1)))
        for _ in range(layers)
    ]
    acts = [draw(st.sampled_from(ACT_NAMES)) for _ in convs]
    spec = random_conv(rng, (channels, side, side), convs, acts, draw(st.integers(1, 2)), 1.0)
    counts = [
        draw(st.integers(0, min(2, n))) if index == len(spec.sizes) - 1 else draw(st.integers(0, 1))
        for index, n in enumerate(spec.sizes)
    ]
    return spec, counts, [0] * len(counts), draw(MODES), draw(RANGES), rng


@st.composite
def larger_net(draw):
    """Networks too large for exhaustive search: dense (8–16 wide), conv (6×6 input), residual."""
    rng = np.random.default_rng(draw(SEEDS))
    kind = draw(st.sampled_from(["dense", "conv", "residual", "summed"]))
    acts = [draw(st.sampled_from(ACT_NAMES)) for _ in range(3)]
    if kind == "dense":
        depth = draw(st.integers(2, 3))
        widths = [draw(st.integers(6, 16)) for _ in range(depth)]
        spec = random_chain(rng, draw(st.integers(4, 8)), widths, draw(st.integers(2, 4)), acts[:depth], 1.0)
    elif kind == "summed":
        widths = [draw(st.integers(6, 12)) for _ in range(2)]
        spec = random_summed(rng, draw(st.integers(4, 8)), *widths, draw(st.integers(2, 4)), acts[:2], 1.0)
    elif kind == "residual":
        spec = random_residual(
            rng,
            draw(st.integers(4, 8)),
            draw(st.integers(6, 12)),
            draw(st.integers(2, 4)),
            acts[:2],
            draw(st.sampled_from([None, "relu"])),
            1.0,
        )
    else:
        convs = [(draw(st.integers(2, 3)), 3, draw(st.integers(1, 2)), draw(st.integers(0, 1)))]
        if draw(st.booleans()):
            convs.append((2, 2, 1, 0))
        spec = random_conv(rng, (draw(st.integers(1, 2)), 6, 6), convs, acts[: len(convs)], 3, 0.7)
    counts = [draw(st.integers(1, 3)) for _ in spec.sizes]
    return spec, counts, draw(MODES), draw(RANGES), rng


# --------------------------------------------------------------------------- default suite


def _run(stats: Stats) -> None:
    assert not stats.violations, "\n".join(stats.violations[:20])


FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FAST
@given(tiny_dense())
def test_tiny_dense_and_residual_exhaustive(case) -> None:
    spec, counts, synapses, kind, input_range, rng = case
    stats = Stats()
    check_exhaustive(spec, counts, synapses, make_mode(kind, rng), input_range, rng, stats)
    _run(stats)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(tiny_summed())
def test_tiny_summed_exhaustive(case) -> None:
    spec, counts, synapses, kind, input_range, rng = case
    stats = Stats()
    check_exhaustive(spec, counts, synapses, make_mode(kind, rng), input_range, rng, stats)
    _run(stats)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(tiny_conv())
def test_tiny_conv_exhaustive(case) -> None:
    spec, counts, synapses, kind, input_range, rng = case
    stats = Stats()
    check_exhaustive(spec, counts, synapses, make_mode(kind, rng), input_range, rng, stats, inverse=False)
    _run(stats)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(larger_net())
def test_larger_networks_greedy(case) -> None:
    spec, counts, kind, input_range, rng = case
    stats = Stats()
    check_greedy(spec, counts, make_mode(kind, rng), input_range, rng, stats, ort_replay=True)
    _run(stats)


def test_equal_weights_relu_is_tight() -> None:
    """The search reaches the bound where docs/method.md §3.1 says it is exact (margin 0), so it is not blind."""
    rng = np.random.default_rng(0)
    spec = random_chain(rng, 3, [4, 3], 2, ["relu", "relu"], 1.0)
    for layer in [*spec.hidden, spec.output]:
        layer.weight[:] = 0.25
        layer.bias[:] = 0.0
    stats = Stats()
    check_exhaustive(spec, [1, 1], [0, 0], make_mode("crash", rng), (0.0, 1.0), rng, stats, inverse=False)
    _run(stats)
    assert stats.min_margin == pytest.approx(0.0, abs=1e-9), stats.min_margin_case


# --------------------------------------------------------------------------- weakened bound


def weakened_suite(monkeypatch, seeds: range, weaken: str = "delta") -> Stats:
    """Run the exhaustive check on fixed random networks with δ halved (``delta``) or every
    activation's per-neuron slope halved (``slope``, docs/method.md §4.3)."""
    if weaken == "delta":
        original = robaudit.bounds.fep.neuron_delta
        halved = lambda *args: original(*args) / 2  # noqa: E731
        monkeypatch.setattr(robaudit.bounds.fep, "neuron_delta", halved)
    else:
        for rule in {
            type(lookup(Node("a", op, "", ["z"], ["y"], {}, None, {})))
            for op in ("Relu", "Sigmoid", "Tanh", "HardSwish")
        }:
            original_slope = rule.max_slope
            monkeypatch.setattr(rule, "max_slope", lambda self, *a, _o=original_slope, **k: _o(self, *a, **k) / 2)
    stats = Stats()
    for seed in seeds:
        rng = np.random.default_rng(seed)
        acts = [ACT_NAMES[seed % len(ACT_NAMES)], ACT_NAMES[(seed // 4) % len(ACT_NAMES)]]
        spec = random_chain(rng, 2, [3, 2], 2, acts, 1.0)
        mode = make_mode(["crash", "byzantine", "range"][seed % 3], rng)
        counts = [1, 1] if weaken == "delta" else [1, 0]  # slopes act on what crosses a later layer
        check_exhaustive(spec, counts, [0, 0], mode, (0.0, 1.0), rng, stats, inverse=False)
    return stats


def test_weakened_bound_is_caught(monkeypatch) -> None:
    """With δ/2 the suite must report violations: it can fail."""
    stats = weakened_suite(monkeypatch, range(12))
    assert stats.violations, "halving δ went unnoticed: the soundness search is too weak"
    assert stats.min_margin < 0


def test_weakened_slopes_are_caught(monkeypatch) -> None:
    """With every activation's slope over its interval halved the same search finds violations
    (of fep_tight: the paper bound, which uses K, is not weakened)."""
    stats = weakened_suite(monkeypatch, range(12), weaken="slope")
    assert stats.violations, "halving the slopes went unnoticed: the soundness search is too weak"


def test_weakened_sum_layer_synapses_are_caught(monkeypatch) -> None:
    """A sum layer's synapses are its two summands' (docs/method.md §1.4): d is the larger of their two reaches.
    Taking the smaller one (a weakened copy) must be caught by the exhaustive synapse search."""
    original = robaudit.bounds.fep.Analysis._synapse_d

    def smaller(self, layer):
        if layer.summands:
            return min(original(self, part) for part in layer.summands)
        return original(self, layer)

    def run() -> Stats:
        stats = Stats()
        for seed in range(8):
            rng = np.random.default_rng(seed)
            spec = random_summed(rng, 3, 2, 2, 2, ["relu", ACT_NAMES[seed % len(ACT_NAMES)]], 1.0)
            spec.hidden[1].second.weight *= 4.0  # the summands' reaches differ: B's weights are larger
            mode = make_mode(["byzantine", "range"][seed % 2], rng)
            check_exhaustive(spec, [0, 0], [0, 1], mode, (0.0, 1.0), rng, stats, inverse=False)
        return stats

    assert not run().violations
    monkeypatch.setattr(robaudit.bounds.fep.Analysis, "_synapse_d", smaller)
    assert run().violations, "the smaller summand's synapse reach went unnoticed"


# --------------------------------------------------------------------------- slow campaign


@pytest.mark.slow
@SLOW
@given(tiny_dense())
def test_slow_tiny_dense_and_residual(case) -> None:
    spec, counts, synapses, kind, input_range, rng = case
    check_exhaustive(spec, counts, synapses, make_mode(kind, rng), input_range, rng, SLOW_STATS)
    _run(SLOW_STATS)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(tiny_summed())
def test_slow_tiny_summed(case) -> None:
    spec, counts, synapses, kind, input_range, rng = case
    check_exhaustive(spec, counts, synapses, make_mode(kind, rng), input_range, rng, SLOW_STATS)
    _run(SLOW_STATS)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(tiny_conv())
def test_slow_tiny_conv(case) -> None:
    spec, counts, synapses, kind, input_range, rng = case
    check_exhaustive(spec, counts, synapses, make_mode(kind, rng), input_range, rng, SLOW_STATS, inverse=False)
    _run(SLOW_STATS)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(larger_net())
def test_slow_larger_greedy(case) -> None:
    spec, counts, kind, input_range, rng = case
    check_greedy(spec, counts, make_mode(kind, rng), input_range, rng, SLOW_STATS, ort_replay=True)
    _run(SLOW_STATS)


@pytest.mark.slow
def test_slow_summary(capsys) -> None:
    """Print the campaign's figures (run after the slow tests above, in file order)."""
    s = SLOW_STATS
    with capsys.disabled():
        print(
            f"\nsoundness campaign: {s.networks} networks, {s.checks} bound checks, {s.trials} trials "
            f"(network, failure set, input), {len(s.violations)} violations, smallest margin "
            f"(bound − measured)/bound = {s.min_margin:.3g} ({s.min_margin_case}); "
            f"{s.over_half} checks reached ≥ 50 % of their bound, {s.over_99} ≥ 99 %; "
            f"{s.ort_replays} onnxruntime float32 replays, largest float32 rounding bound / bound = "
            f"{s.max_f32_slack:.3g}, largest observed |float32 − float64 error| / bound = {s.max_f32_drift:.3g}"
        )
    assert s.trials >= 10_000, s.trials
    assert not s.violations
