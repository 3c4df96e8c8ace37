"""ResNet-9 as in the paper's experiments (docs/method.md, "Setup")."""
from __future__ import annotations

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.network.models.blocks import ConvBlock, Residual


def _resnet9_final_side(image_size: int) -> int:
    side = (image_size + 2 * 2 - 5) // 2 + 1  # conv2: kernel 5, stride 2, padding 2
    return side // 2 - 2  # max-pool 2, then conv4 with padding 0


class ResNet9(nn.Module):
    """conv-BN-ReLU blocks 64, 128 (5x5, stride 2), residual (128, 128), 256, max-pool,
    residual (256, 256), 128 (padding 0), global max-pool, bias-free linear, logits x 0.2.

    Its conv blocks hold 1,344 channels. ``[N, C, S, S] -> [N, num_classes]``; S >= 12.
    """

    layer_group_paths = ("conv1", "conv2", "res1.body.0", "res1.body.1", "conv3",
                         "res2.body.0", "res2.body.1", "conv4", "head")
    default_dropout_sites = ("res1.body.0.post", "res1.body.1.post")
    logit_scale = 0.2

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, norm: str = "batch"):
        super().__init__()
        if _resnet9_final_side(image_size) < 1:
            raise ConfigError(f"resnet9 needs images of at least 12x12 pixels, got {image_size}x"
                              f"{image_size}; use --model cnn or mlp for small images")
        self.conv1 = ConvBlock(in_channels, 64, norm=norm)
        self.conv2 = ConvBlock(64, 128, kernel_size=5, stride=2, padding=2, norm=norm)
        self.res1 = Residual(ConvBlock(128, 128, norm=norm), ConvBlock(128, 128, norm=norm))
        self.conv3 = ConvBlock(128, 256, norm=norm)
        self.pool = nn.MaxPool2d(2)
        self.res2 = Residual(ConvBlock(256, 256, norm=norm), ConvBlock(256, 256, norm=norm))
        self.conv4 = ConvBlock(256, 128, padding=0, norm=norm)
        self.head = nn.Linear(128, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res1(self.conv2(self.conv1(x)))
        x = self.conv4(self.res2(self.pool(self.conv3(x))))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.logit_scale
