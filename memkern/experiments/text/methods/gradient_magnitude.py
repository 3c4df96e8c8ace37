"""Gradient magnitude (Stoehr et al., 2024, "Localizing Paragraph Memorization in Language
Models"): the parameters that the target's loss pulls hardest on, summed per channel.

For target t, take the gradient of its secret NLL with respect to the model's weights and sum
its absolute values over the weights that belong to a channel: an MLP neuron owns its ``fc1``
row and bias and its ``fc2`` column; an attention head owns its query, key and value rows (and
biases) of ``qkv`` and its columns of ``proj``. Cost: one forward and backward per target.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.methods.common import secret_nll
from memkern.experiments.text.targets import SequenceTargets


def _owner(model: nn.Module, site: str) -> tuple[str, nn.Module]:
    """(kind, the module holding the site's weights) for a GPT site name."""
    parent, _, leaf = site.rpartition(".")
    if leaf == "mlp_hidden":
        return "mlp", model.get_submodule(parent)
    if leaf == "heads":
        return "heads", model.get_submodule(parent)
    raise ConfigError(f"gradient_magnitude knows GPT sites (blocks.i.mlp_hidden, "
                      f"blocks.i.attn.heads), not {site!r}")


def _params(kind: str, owner: nn.Module) -> list[torch.Tensor]:
    if kind == "mlp":
        return [owner.fc1.weight, owner.fc1.bias, owner.fc2.weight]
    return [owner.qkv.weight, owner.qkv.bias, owner.proj.weight]


def _per_channel(kind: str, owner: nn.Module, grads: list[torch.Tensor]) -> torch.Tensor:
    """float64 ``[C]``: summed |gradient| of each channel's weights."""
    w1, b1, w2 = (g.double().abs() for g in grads)
    if kind == "mlp":
        return w1.sum(1) + b1 + w2.sum(0)
    h = owner.num_heads
    # qkv rows are laid out (q|k|v, head, head_dim); proj columns (head, head_dim).
    return (w1.view(3, h, -1, w1.shape[1]).sum((0, 2, 3)) + b1.view(3, h, -1).sum((0, 2))
            + w2.view(w2.shape[0], h, -1).sum((0, 2)))


@torch.enable_grad()
def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0) -> torch.Tensor:
    """float ``[T, space.total]``: per channel, the summed |d secret NLL / d weight| over the
    weights it owns. ``clean`` and ``seed`` are unused."""
    owners = [_owner(model, n) for n in space.names]
    params = [p for kind, owner in owners for p in _params(kind, owner)]
    out = torch.zeros(len(targets), space.total, dtype=torch.float64)
    frozen = [p for p in params if not p.requires_grad]
    try:  # a frozen weight still has a gradient to measure; it is frozen again after
        for p in frozen:
            p.requires_grad_(True)
        for t in range(len(targets)):
            nll = secret_nll(model, targets, torch.tensor([t]))
            grads = torch.autograd.grad(nll.sum(), params)
            out[t] = torch.cat([_per_channel(kind, owner, list(grads[3 * i:3 * i + 3])).cpu()
                                for i, (kind, owner) in enumerate(owners)])
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return out
