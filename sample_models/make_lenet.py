"""Build lenet.onnx: LeNet-5-style CNN trained briefly on sklearn digits upsampled to 28x28.

Also writes lenet_inputs.npz with x (200 held-out samples, float32 [200,1,28,28]
in [0,1]) and labels (int64). The first 200 digits are held out; training uses
the remaining 1597. Deterministic: seed 0, single-threaded CPU.
Run from the repo root:  .venv/bin/python sample_models/make_lenet.py
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from _torch_common import check_against_ort, describe, export, seed_everything
from sklearn.datasets import load_digits

HERE = Path(__file__).parent
OUT = HERE / "lenet.onnx"
NPZ = HERE / "lenet_inputs.npz"
N_HELD_OUT = 200
EPOCHS = 15


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_data():
    d = load_digits()
    x = torch.from_numpy((d.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def main() -> None:
    seed_everything(0)
    x, y = load_data()
    x_test, y_test = x[:N_HELD_OUT], y[:N_HELD_OUT]
    x_train, y_train = x[N_HELD_OUT:], y[N_HELD_OUT:]

    model = LeNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    print(f"training took {time.time() - t0:.1f}s")

    model.eval()
    m = export(model, torch.zeros(1, 1, 28, 28), OUT)
    check_against_ort(model, OUT, (7, 1, 28, 28))
    np.savez_compressed(NPZ, x=x_test.numpy().astype(np.float32), labels=y_test.numpy().astype(np.int64))
    describe(m, OUT)
    print(f"wrote {NPZ} ({NPZ.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
