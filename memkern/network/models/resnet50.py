"""CIFAR-style ResNet-50: a 3x3 stem (no 7x7 conv, no stem pooling) and bottleneck stages."""
from __future__ import annotations

import torch
from torch import nn

from memkern.network.models.blocks import ConvBlock, norm2d
from memkern.network.sites import POST_ACTIVATION, PRE_NORM, ChannelSite

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, first stride)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 expand, added to the (projected) input, then ReLU.

    The expanding conv has a pre-norm site; the block's output has a post-activation site.
    """

    def __init__(self, cin: int, width: int, stride: int, norm: str):
        super().__init__()
        cout = width * EXPANSION
        self.reduce = ConvBlock(cin, width, kernel_size=1, padding=0, norm=norm)
        self.spatial = ConvBlock(width, width, stride=stride, norm=norm)
        self.expand = nn.Conv2d(width, cout, 1, bias=False)
        self.expand_site = ChannelSite(cout, PRE_NORM)
        self.expand_norm = norm2d(cout, norm)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          norm2d(cout, norm))
        self.act = nn.ReLU()
        self.post = ChannelSite(cout, POST_ACTIVATION)

    def forward(self, x):
        y = self.expand_norm(self.expand_site(self.expand(self.spatial(self.reduce(x)))))
        return self.post(self.act(y + self.shortcut(x)))


class ResNet50(nn.Module):
    """``[N, C, S, S] -> [N, num_classes]``; global average pooling, so any S >= 8 works."""

    default_dropout_sites = ("stage3.5.post", "stage4.2.post")

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, norm: str = "batch"):
        super().__init__()
        self.stem = ConvBlock(in_channels, 64, norm=norm)
        cin = 64
        paths = ["stem"]
        for s, (width, blocks, stride) in enumerate(STAGES, start=1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1, norm))
                cin = width * EXPANSION
                paths.append(f"stage{s}.{b}")
            setattr(self, f"stage{s}", nn.Sequential(*layers))
        self.head = nn.Linear(cin, num_classes)
        self.layer_group_paths = tuple(paths) + ("head",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(1, len(STAGES) + 1):
            x = getattr(self, f"stage{s}")(x)
        return self.head(torch.mean(x, dim=(2, 3)))
