"""Small networks trained in seconds on scikit-learn's ``load_digits``, their ONNX export, and a
strong fault attack written with torch autograd (independent of robaudit).

Used by ``benchmarks/bench_trained.py`` and by the trained-network soundness tests. torch is
a test/benchmark dependency only.

Every model marks its failure sites with :class:`Site` modules, placed where robaudit
puts them (docs/method.md §1.1): after each hidden layer's activation (affine op + folded BatchNorm
+ activation); a BatchNorm *after* an activation is not part of the layer. The attack
(:func:`attack`) searches, for a failure vector (failures per site), the failure set,
the values byzantine neurons send and the input together:

* targets: the outputs the bound is largest for, both signs;
* starts: data points, uniform random points and random corners of the input box;
* crash/byzantine set chosen greedily by gradient × (value sent − clean value) per site,
  then projected gradient ascent on the input and on the sent values (sign steps,
  shrinking), then swap refinement (the weakest chosen neuron against the best
  unchosen one by the same score, kept when the error grows), then ascent again.

It computes in float64 from the float32 weights, so its errors are those of the
exported model up to float32 constant folding by the exporter (~1e-7 relative).
"""

from __future__ import annotations

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
    """How hard :func:`attack` searches."""

    starts: int = 24
    steps: int = 40
    swap_rounds: int = 3
    targets: int = 3
    seed: int = 0


def _forward(model: nn.Module, x: torch.Tensor, masks, values) -> torch.Tensor:
    for site, mask, value in zip(sites(model), masks, values, strict=True):
        site.mask, site.value = mask, value
    try:
        return model(x)
    finally:
        for site in sites(model):
            site.mask = site.value = None


def _clean_sites(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(x)
    return out, [s.seen.reshape(len(x), -1) for s in sites(model)]


def _starts(lo: float, hi: float, data: np.ndarray, count: int, rng) -> torch.Tensor:
    shape = data.shape[1:]
    third = max(1, count // 3)
    points = [data[rng.choice(len(data), third)]]
    points.append(rng.uniform(lo, hi, (third,) + shape))
    points.append(np.where(rng.integers(0, 2, (count - 2 * third,) + shape) == 1, hi, lo))
    return torch.from_numpy(np.concatenate(points).astype(np.float64))


def attack(
    model: nn.Module,
    counts: list[int],
    failure_range: tuple[float, float],
    input_range: tuple[float, float],
    data: np.ndarray,
    targets: list[int],
    options: AttackOptions = AttackOptions(),
) -> float:
    """The largest max_k |F̃_k(x) − F_k(x)| found for ``counts[l]`` failures at site l (module doc)."""
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(options.seed)
    best = 0.0
    for target in targets:
        for sign in (1.0, -1.0):
            x = _starts(*input_range, data, options.starts, rng)
            best = max(best, _attack_target(model, counts, failure_range, input_range, x, target, sign, options))
    return best


def _objective(model, x, masks, values, target, sign):
    faulty = _forward(model, x, masks, values)
    clean = model(x)
    return faulty, clean, sign * (faulty[:, target] - clean[:, target])


def _errors(model, x, masks, values) -> torch.Tensor:
    with torch.no_grad():
        return (_forward(model, x, masks, values) - model(x)).abs().amax(dim=1)


def _scores(model, x, masks, values, target, sign, failure_range) -> list[torch.Tensor]:
    """Per site [B, N]: first-order gain of failing each neuron (best end of the range)."""
    x = x.detach().requires_grad_(True)
    faulty = _forward(model, x, masks, values)
    (sign * faulty[:, target]).sum().backward()
    a, b = failure_range
    scores = []
    for site in sites(model):
        grad = site.seen.grad.reshape(len(x), -1)
        y = site.seen.detach().reshape(len(x), -1)
        scores.append(torch.maximum(grad * (a - y), grad * (b - y)))
    return scores


def _best_values(model, x, masks, target, sign, failure_range) -> list[torch.Tensor]:
    """Sent values at the better end of [a, b] per neuron, by the gradient sign."""
    a, b = failure_range
    shapes = [s.reshape(len(x), -1).shape for s in _clean_sites(model, x)[1]]
    values = [torch.full(shape, (a + b) / 2, dtype=torch.float64) for shape in shapes]
    zeros = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    x = x.detach().requires_grad_(True)
    faulty = _forward(model, x, _shaped(zeros, model), _shaped(values, model))
    (sign * faulty[:, target]).sum().backward()
    return [torch.where(s.seen.grad.reshape(len(x), -1) >= 0, b, a) for s in sites(model)]


def _shaped(flat: list[torch.Tensor], model) -> list[torch.Tensor]:
    return [f.reshape(s.seen.shape) for f, s in zip(flat, sites(model), strict=True)]


def _attack_target(model, counts, failure_range, input_range, x, target, sign, options) -> float:
    lo, hi = input_range
    a, b = failure_range
    _clean_sites(model, x)  # fills site shapes
    values = _best_values(model, x, None, target, sign, failure_range) if a != b else None
    shapes = [s.seen.reshape(len(x), -1).shape for s in sites(model)]
    if values is None:
        values = [torch.full(shape, a, dtype=torch.float64) for shape in shapes]
    masks = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    zero = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    scores = _scores(model, x, _shaped(zero, model), _shaped(values, model), target, sign, failure_range)
    for mask, score, count in zip(masks, scores, counts, strict=True):
        if count:
            mask.scatter_(1, score.topk(min(count, score.shape[1]), dim=1).indices, 1.0)
    x, values = _ascent(model, x, masks, values, target, sign, input_range, failure_range, options.steps)
    for _ in range(options.swap_rounds):
        _swap(model, x, masks, values, target, sign, failure_range, counts)
        x, values = _ascent(model, x, masks, values, target, sign, input_range, failure_range, options.steps // 2)
    return float(_errors(model, x, _shaped(masks, model), _shaped(values, model)).max())


def _ascent(model, x, masks, values, target, sign, input_range, failure_range, steps):
    lo, hi = input_range
    a, b = failure_range
    x = x.detach().clone()
    values = [v.detach().clone() for v in values]
    for step in range(steps):
        size = 0.25 * (1 - step / max(steps, 1)) + 0.01
        x.requires_grad_(True)
        for v in values:
            v.requires_grad_(a != b)
        _, _, objective = _objective(model, x, _shaped(masks, model), _shaped(values, model), target, sign)
        objective.sum().backward()
        with torch.no_grad():
            x = (x + size * (hi - lo) * x.grad.sign()).clamp(lo, hi)
            if a != b:
                values = [(v + size * (b - a) * v.grad.sign()).clamp(a, b) for v in values]
            else:
                values = [v.detach() for v in values]
    return x.detach(), [v.detach() for v in values]


def _swap(model, x, masks, values, target, sign, failure_range, counts) -> None:
    """Per sample and site: swap the weakest failed neuron for the best healthy one where that helps."""
    before = _errors(model, x, _shaped(masks, model), _shaped(values, model))
    scores = _scores(model, x, _shaped(masks, model), _shaped(values, model), target, sign, failure_range)
    for index, (mask, score, count) in enumerate(zip(masks, scores, counts, strict=True)):
        if not count or count >= mask.shape[1]:
            continue
        trial = mask.clone()
        weakest = torch.where(mask > 0, score, torch.inf).argmin(dim=1)
        strongest = torch.where(mask > 0, -torch.inf, score).argmax(dim=1)
        rows = torch.arange(len(x))
        trial[rows, weakest], trial[rows, strongest] = 0.0, 1.0
        candidate = [m if i != index else trial for i, m in enumerate(masks)]
        after = _errors(model, x, _shaped(candidate, model), _shaped(values, model))
        better = (after > before)[:, None]
        masks[index] = torch.where(better, trial, mask)
        before = torch.maximum(before, after)
