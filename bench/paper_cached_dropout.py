"""The paper's reference approach to example-tied dropout, re-implemented for benchmarks.

The reference code seeds torch with each example's index, draws the example's mask with
``torch.rand`` and keeps it, activation-shaped, in a per-example store that grows with the
dataset. Shared by the tied-dropout benchmarks; our code, same behaviour.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.kernels.channel_mask_reference import generalization_channels
from memkern.sites import current_example_indices


class PaperCachedDropout(nn.Module):
    """Per-example ``torch.manual_seed(index)`` + ``torch.rand`` masks in a dense per-example dict."""

    def __init__(self, channels: int, p_gen: float, p_mem: float):
        super().__init__()
        self.n_gen = generalization_channels(p_gen, channels)
        self.channels, self.p_mem = channels, p_mem
        self.cache: dict[int, torch.Tensor] = {}

    def mask_for(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        if index not in self.cache:
            torch.manual_seed(index)
            keep = (torch.rand(self.channels - self.n_gen) < self.p_mem).float()
            per_channel = torch.cat([torch.ones(self.n_gen), keep])
            self.cache[index] = per_channel[:, None, None].expand(shape).clone()
        return self.cache[index]

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        mask = torch.stack([self.mask_for(i, tuple(x.shape[1:])) for i in indices.tolist()])
        return x * mask

    def cache_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.cache.values())


class PaperSiteDropout(nn.Module):
    """:class:`PaperCachedDropout` as a channel-site op: reads the batch's dataset indices from
    :func:`memkern.sites.example_indices`, as :class:`memkern.tied_dropout.ExampleTiedDropout` does."""

    def __init__(self, channels: int, p_gen: float, p_mem: float):
        super().__init__()
        self.cached = PaperCachedDropout(channels, p_gen, p_mem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cached(x, current_example_indices())
