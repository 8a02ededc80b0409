"""CIFAR ResNets of He et al. 2016 (6n+2 layers, 16-32-64 channels) and PreAct-ResNet-18.

Like torchvision's ResNet, every class takes a `norm_layer` callable and knows nothing about
which normalization it gets. Like timm's norm-activation layers, it asks for
`norm_layer(channels, apply_act=True)` where the original has BN+ReLU (the norm and its
nonlinearity: BN then ReLU, or FRN+TLU / EvoNorm alone) and `apply_act=False` where BN has no
activation after it (before the residual add, in projection shortcuts). The ReLU after the
residual add stays.

Each residual block names its `residual_norm` (the last norm of the branch, or None) and
`residual_conv` (the branch's last conv), which `zero_init_residual` uses.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

NormLayer = Callable[..., nn.Module]  # norm_layer(channels, apply_act=...) -> module


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer, conv_bias: bool):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride, conv_bias)
        self.bn1 = norm_layer(cout, apply_act=True)
        self.conv2 = conv3x3(cout, cout, 1, conv_bias)
        self.bn2 = norm_layer(cout, apply_act=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # projection shortcut (option B), normalized like the main path
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=conv_bias),
                                          norm_layer(cout, apply_act=False))
        self.residual_norm, self.residual_conv = self.bn2, self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n basic blocks at 16, 32, 64 channels."""

    def __init__(self, depth: int, norm_layer: NormLayer, num_classes: int = 10, conv_bias: bool = False, *,
                 zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16, 1, conv_bias)
        self.bn1 = norm_layer(16, apply_act=True)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm_layer, conv_bias))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.zero_init_residual = zero_init_residual  # applied by build_model, after weight reparametrization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): norm-ReLU-conv twice; the shortcut sees the pre-activated input.

    Its last norm is followed by a ReLU, so a zero gamma there would also stop that gamma's own
    gradient; zero_init_residual zeroes the last conv instead (as SkipInit / Fixup do)."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer, conv_bias: bool):
        super().__init__()
        self.bn1 = norm_layer(cin, apply_act=True)
        self.conv1 = conv3x3(cin, cout, stride, conv_bias)
        self.bn2 = norm_layer(cout, apply_act=True)
        self.conv2 = conv3x3(cout, cout, 1, conv_bias)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=conv_bias)
        self.residual_norm, self.residual_conv = None, self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.bn2(self.conv1(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, norm_layer: NormLayer, num_classes: int = 10, conv_bias: bool = False, *,
                 zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = conv3x3(3, 64, 1, conv_bias)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for i in range(2):
                layers.append(PreActBlock(cin, cout, stride if i == 0 else 1, norm_layer, conv_bias))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = norm_layer(512, apply_act=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        self.zero_init_residual = zero_init_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.layers(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS = {
    "resnet20": ("CIFAR ResNet-20 (He et al. 2016), 0.27M parameters", partial(CifarResNet, 20)),
    "resnet32": ("CIFAR ResNet-32 (He et al. 2016), 0.46M parameters", partial(CifarResNet, 32)),
    "resnet56": ("CIFAR ResNet-56 (He et al. 2016), 0.85M parameters", partial(CifarResNet, 56)),
    "resnet110": ("CIFAR ResNet-110 (He et al. 2016), 1.7M parameters", partial(CifarResNet, 110)),
    "preact_resnet18": ("PreAct-ResNet-18 (He et al. 2016b), 11M parameters", PreActResNet18),
}
