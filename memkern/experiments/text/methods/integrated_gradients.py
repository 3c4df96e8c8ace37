"""Integrated gradients over channel scalings: the knowledge-neuron attribution (Dai et al., ACL
2022, "Knowledge Neurons in Pretrained Transformers"; applied to memorized sequences by Chang
et al., NAACL 2024).

For target t and one site s, let ``f(alpha)`` be the log-likelihood of t's secret when every
channel of s is scaled by ``alpha`` (the other sites untouched). Channel c's attribution is
``integral_0^1 d f / d m_c dm`` along that path, where ``m_c`` scales channel c alone; the
gradient with respect to a channel's scale is the activation times the gradient with respect to
it, which is the integrated-gradients form with a zero baseline. The integral is the midpoint
rule with ``steps`` points, so the attributions of one site sum to about ``f(1) - f(0)``
(completeness). Score: the attribution of the secret's log-likelihood, signed (a channel whose
removal makes the secret less likely scores high).

Cost: ``T x sites x steps`` target rows, each a forward and a backward, ``rows`` per pass.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.text.methods.common import ROWS, device_dtype, secret_nll
from memkern.experiments.text.targets import SequenceTargets

STEPS = 20


def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, steps: int = STEPS, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: each channel's integrated gradient of the target's secret
    log-likelihood, its site scaled from 0 to 1 in ``steps`` midpoint steps. ``clean`` and
    ``seed`` are unused."""
    device, dtype = device_dtype(model)
    n_t, total, n_s = len(targets), space.total, len(space.names)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    out = torch.zeros(n_t, total, dtype=torch.float64)
    site_of = torch.cat([torch.full((c,), i) for i, c in enumerate(space.counts)]) if n_s \
        else torch.zeros(0, dtype=torch.long)
    with row_masks(model, space) as ops:
        # Row r of the flat job list: target r // (sites x steps), site (r // steps) % sites,
        # step r % steps.
        for start in range(0, n_t * n_s * steps, rows):
            job = torch.arange(start, min(start + rows, n_t * n_s * steps))
            t, s, k = job // (n_s * steps), (job // steps) % n_s, job % steps
            on_site = site_of[None, :] == s[:, None]  # [R, total]
            masks = torch.where(on_site, alphas[k][:, None], 1.0).to(device, dtype)
            masks.requires_grad_(True)
            set_masks(ops, space, masks)
            ll = -secret_nll(model, targets, t)
            grad, = torch.autograd.grad(ll.sum(), masks)
            contrib = torch.where(on_site, grad.detach().double().cpu(), 0.0) / steps
            out.index_add_(0, t, contrib)
    return out
