"""Build mobilenet_se.onnx: a MobileNetV3-style net with one inverted-residual block
with squeeze-and-excitation, input [N,3,32,32].

stem Conv3x3/2 (3->16)+BN+Hardswish -> [expand 1x1 (16->32)+BN+Hardswish ->
depthwise 3x3 (groups=32)+BN+Hardswish -> SE (GAP -> 1x1 32->8 -> ReLU -> 1x1 8->32 ->
Hardsigmoid, times features) -> project 1x1 (32->16)+BN] + residual -> GAP -> Flatten ->
Linear(16->10).  Random init (seed 0), BN in eval mode with random non-trivial
statistics, not trained.
Run from the repo root:  .venv/bin/python sample_models/make_mobilenet_se.py
"""

from pathlib import Path

import torch
import torch.nn as nn
from _torch_common import check_against_ort, describe, export, seed_everything

OUT = Path(__file__).parent / "mobilenet_se.onnx"


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, c_squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, c: int, c_exp: int, c_squeeze: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, c_exp, 1, bias=False), nn.BatchNorm2d(c_exp), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(c_exp, c_exp, 3, padding=1, groups=c_exp, bias=False),
            nn.BatchNorm2d(c_exp),
            nn.Hardswish(),
        )
        self.se = SqueezeExcite(c_exp, c_squeeze)
        self.project = nn.Sequential(nn.Conv2d(c_exp, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class MobileNetSE(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.block = InvertedResidual(16, 32, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.block(self.stem(x)))))


def randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)  # in [0.5, 2.0]
                m.weight.copy_(torch.rand(c, generator=g) * 1.0 + 0.5)  # in [0.5, 1.5]
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def main() -> None:
    seed_everything(0)
    model = MobileNetSE()
    randomize_bn(model, torch.Generator().manual_seed(0))
    model.eval()
    m = export(model, torch.zeros(1, 3, 32, 32), OUT)
    check_against_ort(model, OUT, (4, 3, 32, 32))
    describe(m, OUT)


if __name__ == "__main__":
    main()
