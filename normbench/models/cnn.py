"""A small plain CNN (no skip connections), fast on a CPU, with the norm placement as an option."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ConvUnit(nn.Sequential):
    """placement='before': conv, then the norm with its activation (conv-norm-ReLU, or conv-FRN+TLU):
    the norm normalizes the pre-activation, as in the BN paper.
    placement='after': conv-ReLU-norm (the norm, without activation, normalizes the activation).
    Here the conv feeds the ReLU, not a norm, so it keeps its bias."""

    def __init__(self, cin: int, cout: int, norm_layer: Callable[..., nn.Module], placement: str, conv_bias: bool):
        if placement == "before":
            super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=conv_bias), norm_layer(cout, apply_act=True))
        elif placement == "after":
            super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=True), nn.ReLU(inplace=True),
                             norm_layer(cout, apply_act=False))
        else:
            raise ValueError(f"model.placement={placement!r}; use before (conv-norm-ReLU) or after (conv-ReLU-norm)")


class PlainCNN(nn.Module):
    """Five conv units (32-32-64-64-128 channels) with 2x2 max pooling, global pooling, one linear layer."""

    widths = (32, 32, 64, 64, 128)

    def __init__(self, norm_layer, num_classes: int = 10, conv_bias: bool = False, *, placement: str = "before"):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate(self.widths):
            layers.append(ConvUnit(cin, cout, norm_layer, placement, conv_bias))
            if i % 2 == 1:  # downsample after every second unit: 32 -> 16 -> 8
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


MODELS = {"cnn": ("plain 5-layer CNN, fast on a CPU; norm before or after the ReLU", PlainCNN)}
