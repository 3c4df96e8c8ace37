"""Building blocks whose outputs carry channel sites.

A block is ``linear map (bias-free) -> pre-norm site -> norm -> activation -> post-activation
site``. The map has no bias, so zeroing a channel at the pre-norm site is exactly the paper's
"zero the filter" edit (docs/method.md, Experiment 4).
"""
from __future__ import annotations

from torch import nn

from memkern.errors import ConfigError
from memkern.network.sites import POST_ACTIVATION, PRE_NORM, ChannelSite

NORMS = ("batch", "group")


def norm2d(channels: int, norm: str) -> nn.Module:
    """BatchNorm, or GroupNorm (for per-example gradient peers that reject BatchNorm)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(32, channels), channels)
    raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class ConvBlock(nn.Module):
    """conv (bias-free) -> site -> norm -> ReLU -> site; ``[N, Cin, H, W] -> [N, Cout, H', W']``."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.pre = ChannelSite(cout, PRE_NORM)
        self.norm = norm2d(cout, norm)
        self.act = nn.ReLU()
        self.post = ChannelSite(cout, POST_ACTIVATION)

    def forward(self, x):
        return self.post(self.act(self.norm(self.pre(self.conv(x)))))


class LinearBlock(nn.Module):
    """linear (bias-free) -> site -> BatchNorm1d -> ReLU -> site; ``[N, Din] -> [N, Dout]``."""

    def __init__(self, din: int, dout: int, norm: str = "batch"):
        super().__init__()
        self.linear = nn.Linear(din, dout, bias=False)
        self.pre = ChannelSite(dout, PRE_NORM)
        self.norm = nn.BatchNorm1d(dout) if norm == "batch" else nn.GroupNorm(min(32, dout), dout)
        self.act = nn.ReLU()
        self.post = ChannelSite(dout, POST_ACTIVATION)

    def forward(self, x):
        return self.post(self.act(self.norm(self.pre(self.linear(x)))))


class Residual(nn.Module):
    """``x + body(x)``: the shape-preserving residual of ResNet-9."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*blocks)

    def forward(self, x):
        return x + self.body(x)
