"""Build digits_cnn.onnx (a small CNN trained on sklearn's 8×8 digits) and its int8 copy
digits_cnn_int8.onnx, quantized by onnxruntime's ``quantize_static`` (QDQ format, uint8
activations, int8 weights, calibrated on 100 training images).

Also writes digits_cnn_inputs.npz with x (200 held-out samples, float32 [200, 1, 8, 8] in
[0, 1]) and labels (int64). Deterministic: seed 0, single-threaded CPU.
Run from the repo root:  .venv/bin/python sample_models/make_digits_int8.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from _torch_common import check_against_ort, describe, export, seed_everything
from sklearn.datasets import load_digits

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
from quantized import quantize  # noqa: E402

FLOAT = HERE / "digits_cnn.onnx"
INT8 = HERE / "digits_cnn_int8.onnx"
NPZ = HERE / "digits_cnn_inputs.npz"
N_HELD_OUT = 200
EPOCHS = 30


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == y).mean())


def main() -> None:
    seed_everything(0)
    d = load_digits()
    x = torch.from_numpy((d.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    x_test, y_test, x_train, y_train = x[:N_HELD_OUT], y[:N_HELD_OUT], x[N_HELD_OUT:], y[N_HELD_OUT:]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"training took {time.time() - t0:.1f}s")
    model.eval()
    m = export(model, torch.zeros(1, 1, 8, 8), FLOAT)
    check_against_ort(model, FLOAT, (7, 1, 8, 8))
    quantize(FLOAT, INT8, x_train[:100].numpy())
    xs, ys = x_test.numpy().astype(np.float32), y_test.numpy().astype(np.int64)
    np.savez_compressed(NPZ, x=xs, labels=ys)
    print(f"held-out accuracy: float {accuracy(FLOAT, xs, ys):.4f}, int8 {accuracy(INT8, xs, ys):.4f}")
    describe(m, FLOAT)
    print(f"wrote {INT8} ({INT8.stat().st_size} bytes), {NPZ} ({NPZ.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
