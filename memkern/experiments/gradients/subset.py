"""Summed gradients of the clean and the noisy loss terms (docs/method.md, Experiment 1).

For a batch of B examples the mean loss splits as ``(1/B) sum_clean CE + (1/B) sum_noisy CE``;
the gradients of the two terms add up to the real step's. Per layer group we report both
norms and the cosine between them (the paper finds comparable norms, negative cosine).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from memkern.experiments.gradients.norms.loss import summed_loss
from memkern.network.models.groups import LayerGroup

TOTAL = "total"  # the row over all groups together


def subset_stats(clean: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor],
                 groups: Sequence[LayerGroup]) -> list[dict]:
    """One row per group, then one for all of them: ``group``, ``clean_norm``, ``noisy_norm``
    (L2 norms of the summed gradients) and ``cosine`` (nan when either is zero)."""
    everything = LayerGroup(TOTAL, tuple(n for g in groups for n in g.param_names), ())
    rows = []
    for group in [*groups, everything]:
        names = [n for n in group.param_names if n in clean]
        cc = sum(float(clean[n].double().square().sum()) for n in names)
        nn_ = sum(float(noisy[n].double().square().sum()) for n in names)
        cn = sum(float((clean[n].double() * noisy[n].double()).sum()) for n in names)
        cosine = cn / math.sqrt(cc * nn_) if cc > 0 and nn_ > 0 else float("nan")
        rows.append({"group": group.name, "clean_norm": math.sqrt(cc),
                     "noisy_norm": math.sqrt(nn_), "cosine": cosine})
    return rows


def subset_gradients(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                     noisy: torch.Tensor, scale: float,
                     retain_graph: bool = False) -> dict[str, torch.Tensor]:
    """Gradient of ``scale * sum over rows where noisy of the row's loss`` (see
    :mod:`memkern.experiments.gradients.norms.loss`) for every parameter that requires grad
    (zeros when no row is noisy). ``noisy``: bool ``[B]``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not bool(noisy.any()):
        return {n: torch.zeros_like(p) for n, p in params.items()}
    loss = summed_loss(logits[noisy], targets[noisy]) * scale
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                                retain_graph=retain_graph)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
