"""Small networks trained in seconds on scikit-learn's digits (8×8 images in [0, 1]), exported to ONNX.

Used by the benchmarks (and reusable by tests) to measure tightness on trained weights
rather than random ones. Needs torch and scikit-learn (test/benchmark dependencies
only); nothing is downloaded.

    from benchmarks.trained_nets import train_and_export
    path, (x, y) = train_and_export("digits_cnn_bn", directory)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x [1797, 1, 8, 8] float32 in [0, 1], labels [1797] int64), shuffled with ``seed``."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.images[order] / 16.0).astype(np.float32)[:, None]
    return x, data.target[order].astype(np.int64)


def digits_mlp() -> nn.Module:
    """64 → 64 → 32 → 10, ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits_cnn_bn() -> nn.Module:
    """Conv-BN-ReLU, Conv-ReLU-BN (a BatchNorm after an activation), then a dense head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.BatchNorm2d(16),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


MODELS = {"digits_mlp": digits_mlp, "digits_cnn_bn": digits_cnn_bn}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0) -> float:
    """Adam on cross-entropy, batches of 64; returns the training accuracy."""
    torch.manual_seed(seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(inputs).argmax(1) == labels).float().mean())


def train_and_export(name: str, directory: Path, epochs: int = 30, seed: int = 0) -> tuple[Path, float]:
    """Train ``MODELS[name]`` on digits and export it (opset 17, batch 1); (path, training accuracy)."""
    x, y = digits(seed)
    torch.manual_seed(seed)  # the initial weights too: the same network every run
    model = MODELS[name]()
    accuracy = train(model, x, y, epochs, seed)
    path = Path(directory) / f"{name}.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(x[:1]),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    return path, accuracy
