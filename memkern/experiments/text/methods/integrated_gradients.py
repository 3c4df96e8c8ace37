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

Cost: ``T x sites x steps`` target rows, each a forward and a backward, ``rows`` per pass; a
row starts at the block holding its site, from the targets' residual streams computed once.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.text.methods.common import (
    ROWS, block_inputs, check_settings, device_dtype, secret_nll_from, start_block,
)
from memkern.experiments.text.targets import SequenceTargets

STEPS = 20


@torch.enable_grad()
def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, steps: int = STEPS, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: each channel's integrated gradient of the target's secret
    log-likelihood, its site scaled from 0 to 1 in ``steps`` midpoint steps. ``clean`` and
    ``seed`` are unused."""
    check_settings(steps=steps, rows=rows)
    device, dtype = device_dtype(model)
    n_t, total = len(targets), space.total
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    out = torch.zeros(n_t, total, dtype=torch.float64)
    states = block_inputs(model, targets)
    with row_masks(model, space) as ops:
        for name, offset, count in zip(space.names, space.offsets, space.counts):
            cols = slice(offset, offset + count)
            # Row r of the site's job list: target r // steps at step r % steps.
            for start in range(0, n_t * steps, rows):
                job = torch.arange(start, min(start + rows, n_t * steps))
                t, k = job // steps, job % steps
                masks = torch.ones(len(job), total, device=device, dtype=dtype)
                masks[:, cols] = alphas[k][:, None].to(device, dtype)
                masks.requires_grad_(True)
                set_masks(ops, space, masks)
                ll = -secret_nll_from(model, targets, t, states, start_block(model, name))
                grad, = torch.autograd.grad(ll.sum(), masks)
                out[:, cols].index_add_(0, t, grad[:, cols].double().cpu() / steps)
    return out
