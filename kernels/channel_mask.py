"""Gathered per-row channel mask: ``y[n, c, ...] = x[n, c, ...] * mask[n, c]``.

Plain-torch stand-in with the final signature; autograd gives ``grad_x`` and
``grad_mask[n, c] = sum over the channel's elements of grad_y * x``.
"""
from __future__ import annotations

import torch


def gathered_channel_mask(x: torch.Tensor, mask: torch.Tensor, *, channel_dim: int = 1) -> torch.Tensor:
    """``x``: ``[N, ..., C, ...]`` with channels at ``channel_dim``; ``mask``: float ``[N, C]``."""
    shape = [1] * x.dim()
    shape[0] = mask.shape[0]
    shape[channel_dim] = mask.shape[1]
    return x * mask.reshape(shape)
