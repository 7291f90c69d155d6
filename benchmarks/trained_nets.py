"""Small networks trained in seconds on scikit-learn's ``load_digits``, their ONNX export, and a
strong fault attack written with torch autograd (independent of robaudit).

Used by ``benchmarks/bench_trained.py`` and by the trained-network soundness tests. torch is
a test/benchmark dependency only.

Every model marks its failure sites with :class:`Site` modules, placed where robaudit
puts them (docs/method.md §1.1): after each hidden layer's activation (affine op + folded BatchNorm
+ activation); a BatchNorm *after* an activation is not part of the layer. The attack
(:func:`attack`) searches, for a failure vector (failures per site), the failure set,
the values byzantine neurons send and the input together:

* targets: the outputs the bound is largest for, both signs; the best inputs of the targets
  already searched are carried as starts into the next;
* starts: data points, uniform random points and random corners of the input box;
* the failure set, two ways, each on half of the starts:

  - relaxed: the masks made continuous, m ∈ [0, 1] with Σ m = count per site, ascended
    together with the input and the sent values (projected on that capped simplex), then
    rounded to each site's ``count`` largest;
  - greedy: one neuron at a time, the one whose failure raises the objective most, evaluated
    exactly among the ``candidates`` best by first-order score (gradient × (value sent −
    clean value)) at every site with budget left (byzantine: both ends of the range), a
    short ascent after each addition;

* then sign ascent on the input (momentum on the L1-normalised gradient, cosine step
  schedule, best iterate kept) and on the sent values, and swap rounds: every (failed
  neuron, one of the ``swap_candidates`` best healthy ones of its site) pair evaluated
  exactly, the best kept where it gains, ascent again, until a round gains nowhere.

The error is a lower bound on the real worst error; ``fep_tight`` (a sound upper bound)
must never be below it. :func:`attack_witness` returns the best point itself (failure set,
sent values, input), which ``benchmarks/exact_search.py`` can make exact.

:func:`refine_witness` searches further from such a point, for the output and sign of its
largest change: a population of fresh relaxed starts, then, on the point itself and the best
few of them, a local search over *every* exchange of a failed neuron for a healthy neuron of
the same site (all of them screened by a float32 copy of the model, the best few evaluated
in float64, the best kept where it gains, then ascent on the input and the sent values),
and an iterated local search on the best (one site's failure set redrawn at random and the
input jittered, local search again, kept where it gains). It returns the point it started
from unless it finds a larger error, so it never reports less.

It computes in float64 from the float32 weights, so its errors are those of the
exported model up to float32 constant folding by the exporter (~1e-7 relative).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def digits() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits`` as float32 images in [0, 1], [N, 1, 8, 8], and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)


class Site(nn.Module):
    """A failure site: identity, unless the attack set ``mask`` and ``value`` (y·(1−m) + m·v)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            y = y * (1 - self.mask) + self.mask * self.value
        if y.requires_grad:
            y.retain_grad()
        self.seen = y
        return y


def sites(model: nn.Module) -> list[Site]:
    """The model's failure sites in forward order (module registration order = call order here)."""
    return [m for m in model.modules() if isinstance(m, Site)]


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, widths: list[int], act: type[nn.Module] = nn.ReLU, out_act: nn.Module | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = 64
        for width in widths:
            layers += [nn.Linear(prev, width), act(), Site()]
            prev = width
        layers.append(nn.Linear(prev, 10))
        if out_act is not None:
            layers.append(out_act)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SmallCNN(nn.Module):
    """conv-BN-ReLU, overlapping max-pool (3, stride 2), conv-ReLU then BatchNorm (after the
    activation), a Tanh dense layer, output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.s1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), Site()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2, self.s2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), Site(), nn.BatchNorm2d(16)
        self.fc1, self.s3 = nn.Linear(16 * 4 * 4, 32), Site()
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.s1(torch.relu(self.bn1(self.conv1(x)))))
        x = self.bn2(self.s2(torch.relu(self.conv2(x))))
        x = self.s3(torch.tanh(self.fc1(x.flatten(1))))
        return self.out(x)


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1, self.b1, self.s1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), Site()
        self.c2, self.b2, self.s2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), Site()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.s1(torch.relu(self.b1(self.c1(x))))
        return torch.relu(x + self.s2(self.b2(self.c2(y))))


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem, self.bn, self.s0 = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), Site()
        self.block1, self.block2 = Block(channels), Block(channels)
        self.out = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s0(torch.relu(self.bn(self.stem(x))))
        x = self.block2(self.block1(x))
        return self.out(x.mean(dim=(2, 3)))


class SENet(nn.Module):
    """conv-ReLU, a squeeze-and-excitation gate (GAP, fc-ReLU, fc-Sigmoid, channel product), output."""

    def __init__(self, channels: int = 12) -> None:
        super().__init__()
        self.conv, self.s0 = nn.Conv2d(1, channels, 3, padding=1), Site()
        self.fc1, self.s1 = nn.Linear(channels, channels // 2), Site()
        self.fc2, self.s2 = nn.Linear(channels // 2, channels), Site()
        self.conv2, self.s3 = nn.Conv2d(channels, channels, 3, stride=2, padding=1), Site()
        self.out = nn.Linear(channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s0(torch.relu(self.conv(x)))
        gate = self.s1(torch.relu(self.fc1(x.mean(dim=(2, 3)))))
        gate = self.s2(torch.sigmoid(self.fc2(gate)))
        x = x * gate[:, :, None, None]
        x = self.s3(torch.relu(self.conv2(x)))
        return self.out(x.flatten(1))


#: name → (builder, kind) of the trained benchmark networks.
NETWORKS = {
    "mlp_32": (lambda: MLP([32]), "mlp"),
    "mlp_64_32": (lambda: MLP([64, 32]), "mlp"),
    "mlp_128_64_32": (lambda: MLP([128, 64, 32]), "mlp"),
    "mlp_tanh_64_32": (lambda: MLP([64, 32], nn.Tanh), "mlp"),
    "cnn_bn_pool": (SmallCNN, "cnn"),
    "resnet_small": (SmallResNet, "cnn"),
    "se_block": (SENet, "cnn"),
}


def train(model: nn.Module, epochs: int = 40, seed: int = 0) -> float:
    """Adam on 1,500 digits, cross-entropy; returns the accuracy on the 297 held out."""
    torch.manual_seed(seed)
    images, labels = digits()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(1500)
        for start in range(0, 1500, 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(x[1500:]).argmax(1) == y[1500:]).float().mean())  # held-out accuracy


def export(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 1, 8, 8)) -> Path:
    """Legacy exporter, opset 17, float32."""
    model.eval()
    torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    return path


def trained(name: str, directory: Path, seed: int = 0) -> tuple[nn.Module, Path, float]:
    """Build, train and export one of :data:`NETWORKS`; (model, ONNX path, held-out accuracy)."""
    torch.manual_seed(seed)
    model = NETWORKS[name][0]()
    accuracy = train(model, seed=seed)
    return model, export(model, Path(directory) / f"{name}.onnx"), accuracy


# --------------------------------------------------------------------------- attack


@dataclass
class AttackOptions:
    """How hard :func:`attack` searches.

    ``starts`` inputs per (target, sign); ``steps`` sign-gradient ascent steps on the input and
    the sent values after the failure set is chosen; ``swap_rounds`` rounds of swaps evaluated
    exactly (stopping early when no start gains); ``targets`` outputs searched, largest bound
    first (the caller's list, cut to this length); ``candidates`` neurons per site evaluated
    exactly at each greedy addition and each swap; ``settle`` ascent steps after each greedy
    addition.
    """

    starts: int = 24
    steps: int = 40
    swap_rounds: int = 3
    targets: int = 3
    seed: int = 0
    candidates: int = 8
    swap_candidates: int = 4
    settle: int = 2


def _forward(model: nn.Module, x: torch.Tensor, masks, values) -> torch.Tensor:
    for site, mask, value in zip(sites(model), masks, values, strict=True):
        site.mask, site.value = mask, value
    try:
        return model(x)
    finally:
        for site in sites(model):
            site.mask = site.value = None


def _site_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Per site, the shape of one sample's activation."""
    with torch.no_grad():
        model(x[:1])
    return [tuple(s.seen.shape[1:]) for s in sites(model)]


def _shaped(flat: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    return [f.reshape(len(f), *shape) for f, shape in zip(flat, shapes, strict=True)]


def _starts(lo: float, hi: float, data: np.ndarray, count: int, rng) -> torch.Tensor:
    shape = data.shape[1:]
    third = max(1, count // 3)
    points = [data[rng.choice(len(data), third)]]
    points.append(rng.uniform(lo, hi, (third,) + shape))
    points.append(np.where(rng.integers(0, 2, (count - 2 * third,) + shape) == 1, hi, lo))
    return torch.from_numpy(np.concatenate(points).astype(np.float64))


@dataclass
class Witness:
    """The attack's best: ``error`` = max_k |F̃_k − F_k| at input ``x`` [1, ...] with ``masks``/``values``
    (flat [1, N] per site), found pushing output ``target`` with ``sign``."""

    error: float
    target: int
    sign: float
    x: torch.Tensor
    masks: list[torch.Tensor]
    values: list[torch.Tensor]


def attack(
    model: nn.Module,
    counts: list[int],
    failure_range: tuple[float, float],
    input_range: tuple[float, float],
    data: np.ndarray,
    targets: list[int],
    options: AttackOptions = AttackOptions(),
) -> float:
    """The largest max_k |F̃_k(x) − F_k(x)| found for ``counts[l]`` failures at site l (module doc).

    ``data``: [N, ...] points of the input box (starts); ``targets``: outputs to push, best first.
    Deterministic for a given ``options.seed``.
    """
    return attack_witness(model, counts, failure_range, input_range, data, targets, options).error


def attack_witness(
    model: nn.Module,
    counts: list[int],
    failure_range: tuple[float, float],
    input_range: tuple[float, float],
    data: np.ndarray,
    targets: list[int],
    options: AttackOptions = AttackOptions(),
) -> Witness:
    """:func:`attack`, returning the best failure set, sent values and input with their error."""
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(options.seed)
    shapes = _site_shapes(model, torch.from_numpy(np.asarray(data[:1], dtype=np.float64)))
    best: Witness | None = None
    carried = None
    for target in targets[: options.targets]:
        for sign in (1.0, -1.0):
            x = _starts(*input_range, data, options.starts, rng)
            if carried is not None:
                x[: len(carried)] = carried
            found, x, masks, values = _attack_target(
                model, shapes, counts, failure_range, input_range, x, target, sign, options)
            if best is None or found > best.error:
                best = Witness(found, target, sign, x[:1], masks, values)
            carried = x[:1] if carried is None else torch.cat([carried, x[:1]])[-4:]
    assert best is not None
    return best


class _Problem:
    """One (target, sign) search: the model, its site shapes, the failure range, the objective."""

    def __init__(self, model, shapes, counts, failure_range, input_range, target, sign) -> None:
        self.model, self.shapes, self.counts = model, shapes, counts
        self.failure_range, self.input_range = failure_range, input_range
        self.target, self.sign = target, sign
        self.byzantine = failure_range[0] != failure_range[1]
        self.screen_model: nn.Module = model  # a float32 copy where candidates are screened

    def gain(self, x, masks, values) -> torch.Tensor:
        """[B] sign · (F̃_target − F_target), no gradient."""
        with torch.no_grad():
            faulty = _forward(self.model, x, _shaped(masks, self.shapes), _shaped(values, self.shapes))
            return self.sign * (faulty[:, self.target] - self.model(x)[:, self.target])

    def errors(self, x, masks, values) -> torch.Tensor:
        """[B] max_k |F̃_k − F_k|."""
        with torch.no_grad():
            faulty = _forward(self.model, x, _shaped(masks, self.shapes), _shaped(values, self.shapes))
            return (faulty - self.model(x)).abs().amax(dim=1)

    def gain_many(self, x, masks, values, clean) -> torch.Tensor:
        """[C·B] gains of C variants of B samples stacked (x repeated C times; ``clean``: [B] F_target)."""
        reps = len(masks[0]) // len(x)
        with torch.no_grad():
            xs = x.repeat(reps, *([1] * (x.dim() - 1)))
            faulty = _forward(self.model, xs, _shaped(masks, self.shapes), _shaped(values, self.shapes))
            return self.sign * (faulty[:, self.target] - clean.repeat(reps))

    def clean(self, x) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)[:, self.target]


def _scores(problem: _Problem, x, masks, values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per site [B, N]: first-order gain of failing each neuron (best end of the range), and
    the end that gives it."""
    x = x.detach().requires_grad_(True)
    faulty = _forward(problem.model, x, _shaped(masks, problem.shapes), _shaped(values, problem.shapes))
    (problem.sign * faulty[:, problem.target]).sum().backward()
    a, b = problem.failure_range
    scores, ends = [], []
    for site in sites(problem.model):
        grad = site.seen.grad.reshape(len(x), -1)
        y = site.seen.detach().reshape(len(x), -1)
        low, high = grad * (a - y), grad * (b - y)
        scores.append(torch.maximum(low, high))
        ends.append(torch.where(high >= low, b, a).to(torch.float64))
    return list(zip(scores, ends, strict=True))


def _attack_target(model, shapes, counts, failure_range, input_range, x, target, sign, options):
    """(largest error found, the inputs sorted by error, best first, the best one's masks and sent
    values, flat [1, N] per site) for one (target, sign)."""
    problem = _Problem(model, shapes, counts, failure_range, input_range, target, sign)
    sizes = [int(np.prod(shape)) for shape in shapes]
    masks = [torch.zeros(len(x), n, dtype=torch.float64) for n in sizes]
    values = [torch.full((len(x), n), failure_range[0], dtype=torch.float64) for n in sizes]
    # even starts: sets chosen by the relaxation, odd ones: greedily
    relaxed = _relaxed(problem, x[0::2], [m[0::2] for m in masks], [v[0::2] for v in values], options.steps)
    greedy = _greedy(problem, x[1::2], [m[1::2] for m in masks], [v[1::2] for v in values], options)
    x = torch.cat([relaxed[0], greedy[0]])
    masks = [torch.cat(pair) for pair in zip(relaxed[1], greedy[1], strict=True)]
    values = [torch.cat(pair) for pair in zip(relaxed[2], greedy[2], strict=True)]
    x, values = _ascent(problem, x, masks, values, options.steps)
    for _ in range(options.swap_rounds):
        if not _swap(problem, x, masks, values, options.swap_candidates):
            break
        x, values = _ascent(problem, x, masks, values, options.steps // 2)
    errors = problem.errors(x, masks, values)
    top = int(errors.argmax())
    return (float(errors.max()), x[errors.argsort(descending=True)], [m[top : top + 1] for m in masks],
            [v[top : top + 1] for v in values])


def _greedy(problem: _Problem, x, masks, values, options: AttackOptions):
    """Failure sets grown one neuron at a time by exact gain (:func:`_greedy_add`), the input and
    sent values settled by a short ascent after each addition; (x, masks, values)."""
    x = x.clone()
    masks = [m.clone() for m in masks]
    values = [v.clone() for v in values]
    total = sum(min(c, m.shape[1]) for c, m in zip(problem.counts, masks, strict=True))
    for _ in range(total):
        _greedy_add(problem, x, masks, values, options.candidates)
        if options.settle:
            x, values = _ascent(problem, x, masks, values, options.settle, start=0.05)
    return x, masks, values


def _cosine(start: float, step: int, steps: int) -> float:
    """Step size: ``start`` on a cosine schedule down to 0.002 over ``steps``."""
    return start * 0.5 * (1 + np.cos(np.pi * step / max(steps, 1))) + 0.002


def _normalised(grad: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient divided by its L1 norm."""
    norms = grad.reshape(len(grad), -1).abs().sum(dim=1).clamp_min(1e-30)
    return grad / norms.reshape(-1, *([1] * (grad.dim() - 1)))


def _greedy_add(problem: _Problem, x, masks, values, candidates: int) -> None:
    """Add to each sample's failure set the neuron (among the ``candidates`` best by first-order
    score at every site with budget left) whose failure raises the objective most, evaluated
    exactly; byzantine neurons try both ends of the range."""
    scored = _scores(problem, x, masks, values)
    clean = problem.clean(x)
    rows = torch.arange(len(x))
    trial_masks, trial_values, picks = [], [], []
    for site, ((score, end), mask, count) in enumerate(zip(scored, masks, problem.counts, strict=True)):
        free = mask.shape[1] - int(mask.sum(dim=1).max())
        if not count or free == 0:
            continue
        left = count - mask.sum(dim=1)  # [B]
        top = torch.where(mask > 0, -torch.inf, score).topk(min(candidates, free), dim=1).indices
        ends = [None] if not problem.byzantine else [problem.failure_range[0], problem.failure_range[1]]
        for column in range(top.shape[1]):
            neuron = top[:, column]
            for fixed in ends:
                sent = end[rows, neuron] if fixed is None else torch.full((len(x),), fixed, dtype=torch.float64)
                picks.append((site, neuron, sent, left > 0))
    if not picks:
        return
    for site in range(len(masks)):
        trial_masks.append(masks[site].repeat(len(picks), 1))
        trial_values.append(values[site].repeat(len(picks), 1))
    for c, (site, neuron, sent, _) in enumerate(picks):
        block = slice(c * len(x), (c + 1) * len(x))
        trial_masks[site][block][rows, neuron] = 1.0
        trial_values[site][block][rows, neuron] = sent
    gains = problem.gain_many(x, trial_masks, trial_values, clean).reshape(len(picks), len(x))
    allowed = torch.stack([ok for *_, ok in picks])
    gains = torch.where(allowed, gains, -torch.inf)
    choice = gains.argmax(dim=0)
    for b in range(len(x)):
        site, neuron, sent, _ = picks[int(choice[b])]
        masks[site][b, neuron[b]] = 1.0
        values[site][b, neuron[b]] = sent[b]


def _swap(problem: _Problem, x, masks, values, candidates: int) -> bool:
    """Per sample: the best exchange of one failed neuron for one of the ``candidates`` best
    healthy ones of the same site (first-order score), every pair evaluated exactly; kept where
    the objective grows. True when some sample gained."""
    before = problem.gain(x, masks, values)
    scored = _scores(problem, x, masks, values)
    clean = problem.clean(x)
    rows = torch.arange(len(x))
    pairs = []
    for site, ((score, end), mask, count) in enumerate(zip(scored, masks, problem.counts, strict=True)):
        if not count or count >= mask.shape[1]:
            continue
        failed = mask.argsort(dim=1, descending=True, stable=True)[:, :count]
        top = torch.where(mask > 0, -torch.inf, score).topk(min(candidates, mask.shape[1] - count), dim=1).indices
        for i in range(failed.shape[1]):
            for j in range(top.shape[1]):
                pairs.append((site, failed[:, i], top[:, j], end[rows, top[:, j]]))
    if not pairs:
        return False
    trial_masks = [m.repeat(len(pairs), 1) for m in masks]
    trial_values = [v.repeat(len(pairs), 1) for v in values]
    for c, (site, out, into, sent) in enumerate(pairs):
        block = slice(c * len(x), (c + 1) * len(x))
        trial_masks[site][block][rows, out] = 0.0
        trial_masks[site][block][rows, into] = 1.0
        trial_values[site][block][rows, into] = sent
    gains = problem.gain_many(x, trial_masks, trial_values, clean).reshape(len(pairs), len(x))
    best, choice = gains.max(dim=0)
    improved = best > before * (1 + 1e-9) + 1e-12
    for b in torch.nonzero(improved).flatten().tolist():
        site, out, into, sent = pairs[int(choice[b])]
        masks[site][b, out[b]] = 0.0
        masks[site][b, into[b]] = 1.0
        values[site][b, into[b]] = sent[b]
    return bool(improved.any())


def _ascent(problem: _Problem, x, masks, values, steps: int, start: float = 0.25):
    """Sign ascent of the objective on the input (momentum 0.75 on the L1-normalised gradient,
    kept in the box) and on the sent values (sign of the gradient, kept in the failure range),
    step ``start`` of the width on a cosine schedule down to 0.002; returns the best iterate of
    each sample."""
    lo, hi = problem.input_range
    a, b = problem.failure_range
    x = x.detach().clone()
    values = [v.detach().clone() for v in values]
    best_x, best_values = x.clone(), [v.clone() for v in values]
    best = torch.full((len(x),), -torch.inf, dtype=torch.float64)
    momentum = torch.zeros_like(x)
    shaped_masks = _shaped(masks, problem.shapes)
    for step in range(steps + 1):
        x.requires_grad_(True)
        for v in values:
            v.requires_grad_(problem.byzantine)
        faulty = _forward(problem.model, x, shaped_masks, _shaped(values, problem.shapes))
        objective = problem.sign * (faulty[:, problem.target] - problem.model(x)[:, problem.target])
        with torch.no_grad():
            better = objective > best
            best = torch.where(better, objective, best)
            best_x[better] = x[better]
            for kept, v in zip(best_values, values, strict=True):
                kept[better] = v[better]
        if step == steps:
            break
        objective.sum().backward()
        size = _cosine(start, step, steps)
        with torch.no_grad():
            momentum = _normalised(x.grad) + (0.75 * momentum if step else 0.0)
            x = (x + size * (hi - lo) * momentum.sign()).clamp(lo, hi)
            if problem.byzantine:
                values = [(v + size * (b - a) * v.grad.sign()).clamp(a, b) for v in values]
            else:
                values = [v.detach() for v in values]
    return best_x.detach(), [v.detach() for v in best_values]


def _project(z: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] rows projected on {0 ≤ m ≤ 1, Σ m = k} (bisection on the shift)."""
    low, high = z.min(dim=1, keepdim=True).values - 1, z.max(dim=1, keepdim=True).values
    for _ in range(40):
        mid = (low + high) / 2
        over = (z - mid).clamp(0, 1).sum(dim=1, keepdim=True) > k
        low, high = torch.where(over, mid, low), torch.where(over, high, mid)
    return (z - high).clamp(0, 1)


def _relaxed(problem: _Problem, x, masks, values, steps: int):
    """Failure sets chosen jointly with the input: masks relaxed to [0, 1] with Σ = count per site,
    ascended with the input and sent values, then rounded to each site's top ``count``."""
    lo, hi = problem.input_range
    a, b = problem.failure_range
    sizes = [m.shape[1] for m in masks]
    soft = [torch.full_like(m, min(c, n) / n) for m, c, n in zip(masks, problem.counts, sizes, strict=True)]
    x = x.detach().clone()
    values = [v.detach().clone() for v in values]
    if problem.byzantine:
        scored = _scores(problem, x, soft, values)
        values = [end for _, end in scored]
    momentum = torch.zeros_like(x)
    for step in range(steps):
        size = _cosine(0.25, step, steps)
        x.requires_grad_(True)
        for m in soft:
            m.requires_grad_(True)
        for v in values:
            v.requires_grad_(problem.byzantine)
        faulty = _forward(problem.model, x, _shaped(soft, problem.shapes), _shaped(values, problem.shapes))
        objective = problem.sign * (faulty[:, problem.target] - problem.model(x)[:, problem.target])
        objective.sum().backward()
        with torch.no_grad():
            momentum = _normalised(x.grad) + (0.75 * momentum if step else 0.0)
            x = (x + size * (hi - lo) * momentum.sign()).clamp(lo, hi)
            new_soft = []
            for m, c in zip(soft, problem.counts, strict=True):
                if not c:
                    new_soft.append(m.detach())
                    continue
                assert m.grad is not None
                g = m.grad / m.grad.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
                new_soft.append(_project(m + 2 * size * g, min(c, m.shape[1])))
            soft = new_soft
            if problem.byzantine:
                values = [(v + size * (b - a) * v.grad.sign()).clamp(a, b) for v in values]
            else:
                values = [v.detach() for v in values]
    masks = [torch.zeros_like(m) for m in soft]
    for mask, m, c in zip(masks, soft, problem.counts, strict=True):
        if c:
            mask.scatter_(1, m.topk(min(c, m.shape[1]), dim=1).indices, 1.0)
    return x.detach(), masks, values


# --------------------------------------------------------------------------- refinement


@dataclass
class RefineOptions:
    """How hard :func:`refine_witness` searches from a witness.

    ``starts`` fresh relaxed starts for the witness's (output, sign) (half data points / random
    points / corners, as :func:`attack`), of which the ``keep`` best (and the witness itself) are
    local-searched; ``rounds`` perturbation rounds of the iterated local search on the best;
    ``steps`` ascent steps after each accepted swap; ``screened`` swaps re-evaluated in float64
    per round; ``seconds`` a wall-time cap on everything (the rounds stop early past it).
    """

    starts: int = 32
    keep: int = 3
    rounds: int = 12
    steps: int = 30
    screened: int = 8
    seconds: float = 30.0
    seed: int = 0


def refine_witness(
    model: nn.Module,
    counts: list[int],
    failure_range: tuple[float, float],
    input_range: tuple[float, float],
    data: np.ndarray,
    witness: Witness,
    options: RefineOptions = RefineOptions(),
) -> Witness:
    """A larger error than ``witness``'s where the search finds one, else ``witness`` itself.

    For the output and sign of the witness's largest change: a population of relaxed starts
    (:func:`_relaxed`, then ascent), the witness and the ``keep`` best of them improved by local
    search (:func:`_local_search`: every exchange of a failed neuron for a healthy one of its
    site, all of them screened in float32 and the best ``screened`` evaluated in float64, the
    best kept where it gains, then ascent on the input and sent values, until no exchange
    gains), then an iterated local search on the best (a site's failure set redrawn at random
    and the input jittered, local search again, kept where it gains). Every error it returns is
    that of a float64 forward pass (:func:`_Problem.errors`); it is never below ``witness.error``.
    ``data``: [N, ...] points of the input box; deterministic for a given ``options.seed`` unless
    the ``seconds`` cap cuts it short.
    """
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    rng = np.random.default_rng(options.seed)
    shapes = _site_shapes(model, witness.x)
    masks, values = [m.clone() for m in witness.masks], [v.clone() for v in witness.values]
    with torch.no_grad():
        change = (_forward(model, witness.x, _shaped(masks, shapes), _shaped(values, shapes))
                  - model(witness.x))[0]
    target = int(change.abs().argmax())
    sign = 1.0 if float(change[target]) >= 0 else -1.0
    problem = _Problem(model, shapes, counts, failure_range, input_range, target, sign)
    problem.screen_model = _float32_copy(model)
    pool = [(witness.x.clone(), masks, values)] + _population(problem, data, options, rng)
    best: tuple[float, torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None
    for x, m, v in pool:
        found = _local_search(problem, x, m, v, options)
        if best is None or found[0] > best[0]:
            best = found
    assert best is not None
    for _ in range(options.rounds):
        if time.perf_counter() - start > options.seconds:
            break
        _, x, masks, values = best
        x, masks, values = _perturb(problem, x, masks, values, rng)
        found = _local_search(problem, x, masks, values, options)
        if found[0] > best[0] * (1 + 1e-12):
            best = found
    _, x, masks, values = best
    error = float(problem.errors(x, masks, values)[0])
    if error <= witness.error:
        return witness
    return Witness(error, target, sign, x, masks, values)


def _float32_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` (for screening many candidates; never for a reported error)."""
    for site in sites(model):
        site.seen = None
    screen = copy.deepcopy(model).float()
    for p in screen.parameters():
        p.requires_grad_(False)
    return screen


def _population(problem: _Problem, data: np.ndarray, options: RefineOptions, rng) -> list:
    """The ``keep`` best of ``starts`` relaxed starts (:func:`_relaxed`, then :func:`_ascent`), each as
    (x [1, ...], masks, values flat [1, N] per site)."""
    if options.starts <= 0 or options.keep <= 0:
        return []
    lo, hi = problem.input_range
    x = _starts(lo, hi, data, options.starts, rng)
    sizes = [int(np.prod(shape)) for shape in problem.shapes]
    masks = [torch.zeros(len(x), n, dtype=torch.float64) for n in sizes]
    values = [torch.full((len(x), n), problem.failure_range[0], dtype=torch.float64) for n in sizes]
    x, masks, values = _relaxed(problem, x, masks, values, options.steps)
    x, values = _ascent(problem, x, masks, values, options.steps)
    order = problem.gain(x, masks, values).argsort(descending=True)[: options.keep].tolist()
    return [(x[i : i + 1], [m[i : i + 1] for m in masks], [v[i : i + 1] for v in values]) for i in order]


def _exchanges(problem: _Problem, masks) -> list[tuple[int, int, int, float]]:
    """Every (site, failed neuron, healthy neuron of that site, value it sends) of one sample
    (byzantine: both ends of the failure range)."""
    a, b = problem.failure_range
    ends = [a, b] if problem.byzantine else [a]
    moves = []
    for site, (mask, count) in enumerate(zip(masks, problem.counts, strict=True)):
        if not count:
            continue
        failed = torch.nonzero(mask[0] > 0.5).flatten().tolist()
        healthy = torch.nonzero(mask[0] < 0.5).flatten().tolist()
        moves += [(site, out, into, end) for out in failed for into in healthy for end in ends]
    return moves


def _applied(masks, values, moves, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One sample's masks and values repeated once per move, each row with its move applied."""
    n = len(moves)
    table = torch.tensor([move[:3] for move in moves]).reshape(n, 3)
    sent = torch.tensor([move[3] for move in moves], dtype=dtype)
    out_masks = [m.to(dtype).repeat(n, 1) for m in masks]
    out_values = [v.to(dtype).repeat(n, 1) for v in values]
    for site in range(len(masks)):
        rows = torch.nonzero(table[:, 0] == site).flatten()
        if len(rows):
            out_masks[site][rows, table[rows, 1]] = 0.0
            out_masks[site][rows, table[rows, 2]] = 1.0
            out_values[site][rows, table[rows, 2]] = sent[rows]
    return out_masks, out_values


def _best_exchange(problem: _Problem, x, masks, values, screened: int):
    """The exchange (:func:`_exchanges`) that raises sign·(F̃_target − F_target) most at ``x``: all
    screened with the float32 copy in chunks, the ``screened`` best evaluated in float64; the new
    (masks, values), or None when none gains (in float64)."""
    moves = _exchanges(problem, masks)
    if not moves:
        return None
    scores = []
    for first in range(0, len(moves), 4096):
        chunk = moves[first : first + 4096]
        m32, v32 = _applied(masks, values, chunk, torch.float32)
        with torch.no_grad():
            out = _forward(problem.screen_model, x.float().repeat(len(chunk), *([1] * (x.dim() - 1))),
                           _shaped(m32, problem.shapes), _shaped(v32, problem.shapes))
        scores.append(problem.sign * out[:, problem.target].double())
    picked = [moves[i] for i in torch.cat(scores).topk(min(screened, len(moves))).indices.tolist()]
    trial_masks, trial_values = _applied(masks, values, picked, torch.float64)
    gains = problem.gain_many(x, trial_masks, trial_values, problem.clean(x))
    before = float(problem.gain(x, masks, values)[0])
    top = int(gains.argmax())
    if float(gains[top]) <= before * (1 + 1e-9) + 1e-12:
        return None
    return [m[top : top + 1].clone() for m in trial_masks], [v[top : top + 1].clone() for v in trial_values]


def _local_search(problem: _Problem, x, masks, values, options: RefineOptions, limit: int = 60):
    """Ascent, then the best exchange and ascent again while an exchange gains (at most ``limit``);
    (gain, x, masks, values) of the last point, its gain from a float64 forward pass."""
    x, values = _ascent(problem, x, masks, values, options.steps)
    for _ in range(limit):
        exchanged = _best_exchange(problem, x, masks, values, options.screened)
        if exchanged is None:
            break
        masks, values = exchanged
        x, values = _ascent(problem, x, masks, values, options.steps, start=0.1)
    return float(problem.gain(x, masks, values)[0]), x, masks, values


def _perturb(problem: _Problem, x, masks, values, rng):
    """A neighbour for the iterated local search: one site's failure set redrawn uniformly (byzantine
    values at random ends) and the input jittered (normal, 0.15 of the box width)."""
    lo, hi = problem.input_range
    a, b = problem.failure_range
    masks, values = [m.clone() for m in masks], [v.clone() for v in values]
    site = int(rng.choice([s for s, c in enumerate(problem.counts) if c]))
    n = masks[site].shape[1]
    masks[site].zero_()
    chosen = rng.choice(n, min(problem.counts[site], n), replace=False)
    masks[site][0, chosen] = 1.0
    values[site][0, chosen] = torch.from_numpy(rng.choice([a, b], len(chosen))).to(torch.float64)
    jitter = torch.from_numpy(rng.normal(0.0, 0.15 * (hi - lo), tuple(x.shape)))
    return (x + jitter).clamp(lo, hi), masks, values
