"""The obviously correct reference: one forward and backward per example. Slow, shipped for
users and tests (as Opacus ships its microbatch reference)."""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.gradients.norms.loss import summed_loss
from memkern.network.sites import example_indices


def loop_sq_norms(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                  ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: float [B] squared norm of example b's gradient of its loss}``
    for every parameter that requires grad; row b runs with dataset index ``ids[b]``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: torch.zeros(len(inputs), dtype=p.dtype, device=p.device) for n, p in named}
    for b in range(len(inputs)):
        with example_indices(None if ids is None else ids[b:b + 1]):
            loss = summed_loss(model(inputs[b:b + 1]), targets[b:b + 1])
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                out[n][b] = g.square().sum()
    return out
