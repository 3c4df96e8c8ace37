"""Activations (Chang et al., NAACL 2024; TinyMem, "Activations"): channels that fire
harder on the target's secret than on ordinary text.

Score of channel c for target t: the mean over t's scored positions (those predicting a secret
byte) of ``|a_c|`` minus its mean over every position of the clean windows. ``|a_c|`` at one
position is the mean absolute value of the channel's elements there (one value for an MLP
neuron, ``head_dim`` values for an attention head), read at the site after any tied dropout, as
the next layer sees it. Cost: one forward of the targets and one of the clean windows.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace, attached
from memkern.experiments.text.methods.common import (
    ROWS, check_settings, clean_inputs, device_dtype,
)
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.sites import channel_sites, example_indices
from memkern.network.tied_dropout import unindexed_rows


class _PositionWeightedAbs(nn.Module):
    """Site op (identity) keeping ``sum_p weights[n, p] * |x|[n, p, c]`` as ``total`` ``[N, C]``.
    Layouts: ``[N, P, C]`` (channel_dim -1) or ``[N, C, P, ...]`` (channel_dim 1)."""

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.weights: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs()
        per_pos = a if self.channel_dim == -1 else a.flatten(3).mean(3).transpose(1, 2)
        self.total = (per_pos * self.weights[:, :, None]).sum(1).double()
        return x


def _recorders(model: nn.Module, space: ChannelSpace
               ) -> contextlib.AbstractContextManager[dict[str, _PositionWeightedAbs]]:
    sites = channel_sites(model)
    for n in space.names:
        if sites[n].channel_dim not in (1, -1):
            raise ConfigError(f"site {n!r}: activations reads [N, P, C] or [N, C, P, ...] layouts")
    return attached(model, {n: _PositionWeightedAbs(sites[n].channel_dim) for n in space.names})


def _weighted_sums(model, space, ops, inputs, weights, ids, rows) -> torch.Tensor:
    """float64 ``[N, space.total]``: ``sum_p weights[n, p] |a|[n, p, c]``, ``rows`` per forward."""
    device, dtype = device_dtype(model)
    out = []
    for s in range(0, len(inputs), rows):
        for op in ops.values():
            op.weights = weights[s:s + rows].to(device, dtype)
        with example_indices(None if ids is None else ids[s:s + rows].to(device)):
            model(inputs[s:s + rows].to(device))
        out.append(torch.cat([ops[n].total for n in space.names], 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, space.total, dtype=torch.float64)


@torch.no_grad()
def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: mean |activation| on each target's scored positions minus the
    mean over all positions of ``clean`` (int64/uint8 ``[B, L + 1]``, B >= 1). ``seed`` is
    unused."""
    check_settings(rows=rows)
    windows = clean_inputs(clean)[:, :-1]
    if len(windows) == 0:
        raise ConfigError("activations needs at least one clean window")
    scored = targets.scored.double()
    with _recorders(model, space) as ops:
        on_target = _weighted_sums(model, space, ops, targets.inputs(),
                                   scored / scored.sum(1, keepdim=True).clamp_min(1),
                                   targets.keys, rows)
        with unindexed_rows(model):
            flat = torch.full(windows.shape, 1.0 / windows.numel(), dtype=torch.float64)
            on_clean = _weighted_sums(model, space, ops, windows, flat, None, rows).sum(0)
    return on_target - on_clean
