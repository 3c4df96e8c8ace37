"""Gradient magnitude (Stoehr et al., 2024, "Localizing Paragraph Memorization in Language
Models"): the parameters that the target's loss pulls hardest on, summed per channel.

For target t, take the gradient of its secret NLL with respect to the model's weights and sum
its absolute values over the weights that belong to a channel: an MLP neuron owns its row and
bias entry in the layer computing it and its output weights; an attention head owns its query,
key and value rows (and biases) and its output weights
(:mod:`memkern.network.models.channel_weights`). Cost: one forward and backward per target.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.methods.common import secret_nll
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.models.channel_weights import Owned, channel_weights


def _owned(model: nn.Module, site: str) -> tuple[Owned, ...]:
    """Every weight and bias the channels of ``site`` own (computing and reading them)."""
    weights = channel_weights(model, site)
    if weights is None:
        raise ConfigError(f"gradient_magnitude knows the MLP neuron and attention head sites of "
                          f"gpt and hf:gpt2 models, not {site!r}")
    return weights.made + weights.read


def _per_channel(view: torch.Tensor) -> torch.Tensor:
    """float64 ``[C]``: the summed absolute values of each channel's entries of ``view``."""
    return view.double().abs().reshape(len(view), -1).sum(1)


@torch.enable_grad()
def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0) -> torch.Tensor:
    """float ``[T, space.total]``: per channel, the summed |d secret NLL / d weight| over the
    weights it owns. ``clean`` and ``seed`` are unused."""
    owned = [_owned(model, n) for n in space.names]
    params = [o.param for site in owned for o in site]
    out = torch.zeros(len(targets), space.total, dtype=torch.float64)
    frozen = [p for p in params if not p.requires_grad]
    try:  # a frozen weight still has a gradient to measure; it is frozen again after
        for p in frozen:
            p.requires_grad_(True)
        for t in range(len(targets)):
            nll = secret_nll(model, targets, torch.tensor([t]))
            grads = iter(torch.autograd.grad(nll.sum(), params))
            out[t] = torch.cat([sum(_per_channel(o.of(next(grads))) for o in site).cpu()
                                for site in owned])
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return out
