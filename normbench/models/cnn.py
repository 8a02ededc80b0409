"""A small plain CNN (no skip connections), fast on a CPU, with the norm placement as an option."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ConvUnit(nn.Sequential):
    """conv-norm-ReLU (placement='before': the norm normalizes the pre-activation, as in the BN paper)
    or conv-ReLU-norm (placement='after': the norm normalizes the activation)."""

    def __init__(self, cin: int, cout: int, norm_layer: Callable[[int], nn.Module], placement: str, conv_bias: bool):
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=conv_bias)
        if placement == "before":
            super().__init__(conv, norm_layer(cout), nn.ReLU(inplace=True))
        elif placement == "after":
            super().__init__(conv, nn.ReLU(inplace=True), norm_layer(cout))
        else:
            raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")


class PlainCNN(nn.Module):
    """Five conv units (32-32-64-64-128 channels) with 2x2 max pooling, global pooling, one linear layer."""

    def __init__(self, norm_layer, num_classes: int = 10, placement: str = "before", conv_bias: bool = False,
                 widths: tuple[int, ...] = (32, 32, 64, 64, 128)):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            layers.append(ConvUnit(cin, cout, norm_layer, placement, conv_bias))
            if i % 2 == 1:  # downsample after every second unit: 32 -> 16 -> 8
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
