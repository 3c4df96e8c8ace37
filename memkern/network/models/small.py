"""CPU-sized models: a small CNN and an MLP (for digits, MNIST and quick experiments)."""
from __future__ import annotations

import torch
from torch import nn

from memkern.network.models.blocks import ConvBlock, LinearBlock


class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, pool, 128), a 256-unit hidden block, a linear head.

    Flattening (not global pooling) before the hidden block leaves capacity to memorize noisy
    labels on 8x8 digits. ``[N, C, S, S] -> [N, num_classes]``.
    """

    layer_group_paths = ("block1", "block2", "block3", "hidden", "head")
    default_dropout_sites = ("block3.post", "hidden.post")

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, norm: str = "batch"):
        super().__init__()
        self.block1 = ConvBlock(in_channels, 32, norm=norm)
        self.block2 = ConvBlock(32, 64, norm=norm)
        self.pool = nn.MaxPool2d(2)
        self.block3 = ConvBlock(64, 128, norm=norm)
        side = image_size // 2
        self.hidden = LinearBlock(128 * side * side, 256, norm=norm)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.pool(self.block2(self.block1(x))))
        return self.head(self.hidden(torch.flatten(x, 1)))


class MLP(nn.Module):
    """Two 512-unit hidden blocks on the flattened image. ``[N, C, S, S] -> [N, num_classes]``."""

    layer_group_paths = ("hidden1", "hidden2", "head")
    default_dropout_sites = ("hidden1.post", "hidden2.post")

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, norm: str = "batch"):
        super().__init__()
        self.hidden1 = LinearBlock(in_channels * image_size * image_size, 512, norm=norm)
        self.hidden2 = LinearBlock(512, 512, norm=norm)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden2(self.hidden1(torch.flatten(x, 1))))
