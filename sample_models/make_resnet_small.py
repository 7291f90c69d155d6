"""Build resnet_small.onnx: a tiny ResNet (stem + 2 basic blocks + GAP + Linear), input [N,3,32,32].

Random init (seed 0), not trained. BatchNorm layers are in eval mode with random,
non-trivial running_mean / running_var / weight / bias so that BN folding is exercised.

With the default export settings (eval mode + constant folding) the legacy exporter
fuses every Conv+BatchNorm pair itself, so resnet_small.onnx holds no
BatchNormalization node. The same weights are therefore also exported to
resnet_small_bn.onnx with training=TrainingMode.PRESERVE (model still in eval mode),
which skips that fusion and keeps the BatchNormalization nodes (inference form),
so robaudit's own BN folding can be tested on real exporter output.
Run from the repo root:  .venv/bin/python sample_models/make_resnet_small.py
"""

import warnings
from pathlib import Path

import torch
import torch.nn as nn
from _torch_common import check_against_ort, describe, export, seed_everything

OUT = Path(__file__).parent / "resnet_small.onnx"
OUT_BN = Path(__file__).parent / "resnet_small_bn.onnx"


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = BasicBlock(8, 8, stride=1)
        self.block2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))


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
    model = ResNetSmall()
    randomize_bn(model, torch.Generator().manual_seed(0))
    model.eval()
    m = export(model, torch.zeros(1, 3, 32, 32), OUT)
    check_against_ort(model, OUT, (4, 3, 32, 32))
    describe(m, OUT)

    with warnings.catch_warnings():
        # the warning is about models *in training mode*; ours is in eval mode
        warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
        m_bn = export(model, torch.zeros(1, 3, 32, 32), OUT_BN, training=torch.onnx.TrainingMode.PRESERVE)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m_bn.graph.node)
    assert n_bn == 6, f"expected 6 BatchNormalization nodes, found {n_bn}"
    check_against_ort(model, OUT_BN, (4, 3, 32, 32))
    describe(m_bn, OUT_BN)


if __name__ == "__main__":
    main()
