"""The paper's reference approach to example-tied dropout, re-implemented for benchmarks.

The reference code seeds torch with each example's index, draws the example's mask with
``torch.rand`` and keeps it, activation-shaped, in a per-example store that grows with the
dataset. Shared by the tied-dropout benchmarks; our code, same behaviour.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from memkern.kernels.channel_mask_reference import generalization_channels
from memkern.network.sites import current_example_indices


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
    :func:`memkern.network.sites.example_indices`, as :class:`memkern.network.tied_dropout.ExampleTiedDropout` does."""

    def __init__(self, channels: int, p_gen: float, p_mem: float):
        super().__init__()
        self.cached = PaperCachedDropout(channels, p_gen, p_mem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cached(x, current_example_indices())


def assert_same_kind_of_mask(op, shape: tuple[int, ...], *, p_gen: float, p_mem: float) -> None:
    """Before timing: ``op`` (ones ``[N, C, *spatial]`` -> ``ones * m``) applies what both
    approaches compute, an example-tied channel mask: constant over each channel, 0 or 1, 1 on
    the first floor(p_gen * C) channels, the other channels kept with frequency p_mem (within 5
    sigma). The masks themselves differ by construction (hash vs seeded torch.rand)."""
    y = op(torch.ones(shape))
    n, c = shape[:2]
    m = y.flatten(2)
    assert torch.equal(m, m[..., :1].expand_as(m)), "mask varies within a channel"
    m = m[..., 0]
    assert bool(((m == 0) | (m == 1)).all()), "mask values other than 0 and 1"
    gen = generalization_channels(p_gen, c)
    assert bool((m[:, :gen] == 1).all()), "a generalization channel was dropped"
    kept, count = float(m[:, gen:].sum()), n * (c - gen)
    sigma = math.sqrt(count * p_mem * (1 - p_mem))
    assert abs(kept - count * p_mem) <= 5 * sigma, (kept, count * p_mem, sigma)
