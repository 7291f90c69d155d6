"""Approximate deep architectures in plain torch (random weights, no torchvision) for the cost
part of ``bench_trained.py``.

* ResNet-18-like: ImageNet stem (7×7/2 conv, BN, ReLU, 3×3/2 max-pool), four stages of two
  basic blocks (64, 128, 256, 512 channels, 1×1 downsampling shortcuts), global average
  pool, 1000 classes; at 32×32.
* U-Net-like: three levels (8, 16, 32 channels, two 3×3 conv-ReLU each), max-pool down,
  ConvTranspose up, skip concatenation, a 1×1 conv to a 1×64×64 image.
* MobileNetV3-Small-like: the paper's eleven bottlenecks (expansion, depthwise k×k, SE with
  a hard-sigmoid gate, ReLU / HardSwish), 576-channel head, 1024 hidden, 1000 classes; at 64×64.
* EfficientNet-B0-like: the seven MBConv stages (expansion 1/6, depthwise 3×3/5×5, SE with
  SiLU and a sigmoid gate, residuals), 1280-channel head, 1000 classes; at 64×64.

The shapes, widths and block types follow the published architectures; details
(BatchNorm placement inside the SE, dropout, stochastic depth) do not.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.a = conv_bn(c_in, c_out, 3, stride, act=nn.ReLU())
        self.b = conv_bn(c_out, c_out, 3)
        self.short = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.short(x))


def resnet18(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 64, 7, 2, act=nn.ReLU()), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(c_in, c_out, stride), Basic(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def double(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU())

        self.e1, self.e2, self.e3 = double(1, 8), double(8, 16), double(16, 32)
        self.u2, self.d2 = nn.ConvTranspose2d(32, 16, 2, stride=2), double(32, 16)
        self.u1, self.d1 = nn.ConvTranspose2d(16, 8, 2, stride=2), double(16, 8)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(nn.functional.max_pool2d(e1, 2))
        e3 = self.e3(nn.functional.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.u2(e3), e2], dim=1))
        d1 = self.d1(torch.cat([self.u1(d2), e1], dim=1))
        return self.out(d1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act = nn.Conv2d(channels, squeezed, 1), act
        self.fc2, self.gate = nn.Conv2d(squeezed, channels, 1), gate

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, expanded, c_out, k, stride, se: bool, act: type[nn.Module], gate: type[nn.Module],
                 se_act: type[nn.Module], se_ratio: float):
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(conv_bn(c_in, expanded, 1, act=act()))
        layers.append(conv_bn(expanded, expanded, k, stride, groups=expanded, act=act()))
        if se:
            squeezed = max(8, int(round(expanded * se_ratio)))
            layers.append(SqueezeExcite(expanded, squeezed, se_act(), gate()))
        layers.append(conv_bn(expanded, c_out, 1))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def mobilenet_v3_small(classes: int = 1000) -> nn.Module:
    relu, hs = nn.ReLU, nn.Hardswish
    spec = [  # in, expanded, out, k, stride, SE, activation
        (16, 16, 16, 3, 2, True, relu), (16, 72, 24, 3, 2, False, relu), (24, 88, 24, 3, 1, False, relu),
        (24, 96, 40, 5, 2, True, hs), (40, 240, 40, 5, 1, True, hs), (40, 240, 40, 5, 1, True, hs),
        (40, 120, 48, 5, 1, True, hs), (48, 144, 48, 5, 1, True, hs), (48, 288, 96, 5, 2, True, hs),
        (96, 576, 96, 5, 1, True, hs), (96, 576, 96, 5, 1, True, hs),
    ]
    layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=hs())]
    for c_in, expanded, c_out, k, stride, se, act in spec:
        layers.append(InvertedResidual(c_in, expanded, c_out, k, stride, se, act, nn.Hardsigmoid, nn.ReLU, 0.25))
    layers += [conv_bn(96, 576, 1, act=hs()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(576, 1024), hs(), nn.Linear(1024, classes)]
    return nn.Sequential(*layers)


def efficientnet_b0(classes: int = 1000) -> nn.Module:
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # expansion, k, stride, out, repeats
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.SiLU())]
    c_in = 32
    for expansion, k, stride, c_out, repeats in stages:
        for index in range(repeats):
            layers.append(InvertedResidual(c_in, c_in * expansion, c_out, k, stride if index == 0 else 1, True,
                                           nn.SiLU, nn.Sigmoid, nn.SiLU, 0.25 / expansion))
            c_in = c_out
    layers += [conv_bn(320, 1280, 1, act=nn.SiLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Random running statistics, so that BatchNorm is not the identity."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


#: name → (builder, input shape)
DEEP = {
    "resnet18_1000_32x32": (lambda: _randomize_bn(resnet18()), (1, 3, 32, 32)),
    "unet_64x64": (UNet, (1, 1, 64, 64)),
    "mobilenetv3s_64x64": (lambda: _randomize_bn(mobilenet_v3_small()), (1, 3, 64, 64)),
    "efficientnetb0_64x64": (lambda: _randomize_bn(efficientnet_b0()), (1, 3, 64, 64)),
}
