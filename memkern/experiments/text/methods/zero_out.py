"""Zero-Out (Chang et al., NAACL 2024; TinyMem, "Zero-Out"): remove one channel at a
time and see how much worse the model predicts the target's secret.

Score of channel c for target t: ``NLL_t(c zeroed) - NLL_t`` (the secret's summed negative
log-likelihood). Cost: ``T x space.total`` target rows of inference, ``rows`` per forward; a
row starts at the block holding its channel, from the targets' residual streams computed once.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.text.methods.common import (
    ROWS, block_inputs, check_settings, device_dtype, secret_nll_from, start_block,
)
from memkern.experiments.text.targets import SequenceTargets


@torch.no_grad()
def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: each target's rise of secret NLL when the channel alone is
    zeroed. ``clean`` and ``seed`` are unused (the score needs neither)."""
    check_settings(rows=rows)
    device, dtype = device_dtype(model)
    n_t, total = len(targets), space.total
    out = torch.zeros(n_t, total, dtype=torch.float64)
    states = block_inputs(model, targets)
    with row_masks(model, space) as ops:
        base = torch.zeros(n_t, dtype=torch.float64)
        for s in range(0, n_t, rows):
            base[s:s + rows] = secret_nll_from(model, targets, torch.arange(s, min(s + rows, n_t)),
                                               states, 0).cpu()
        for name, offset, count in zip(space.names, space.offsets, space.counts):
            # Row r of the site's job list asks about (target r // count, channel r % count);
            # the blocks before the site's own see no mask, so rows start at its block.
            for start in range(0, n_t * count, rows):
                job = torch.arange(start, min(start + rows, n_t * count))
                t, c = job // count, offset + job % count
                masks = torch.ones(len(job), total, device=device, dtype=dtype)
                masks[torch.arange(len(job), device=device), c.to(device)] = 0
                set_masks(ops, space, masks)
                nll = secret_nll_from(model, targets, t, states, start_block(model, name)).double()
                out[t, c] = nll.cpu() - base[t]
    return out
