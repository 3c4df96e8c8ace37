"""BalancedSubnet (Sakarvadia et al., ICLR 2025, "Mitigating Memorization in Language Models",
TinyMem): a learned top-k mask that raises the target's loss while keeping clean loss, here
over channels (their mask is over weights).

Each channel of a target has a score ``s_c``; the mask drops, in every site, the ``drop``
fraction of its channels (at least one) with the lowest scores and keeps the rest. The forward
uses that hard mask, the backward passes the mask's gradient straight to the scores (the
straight-through estimator of edge-popup, Ramanujan et al., CVPR 2020), and the
shared loop lowers the objective of :mod:`memkern.experiments.text.methods.learned_masks` with no
penalty (the top-k fixes the size). Scores start at 1 plus seeded noise below 1e-3 (ties
broken at random). Score: ``-s_c`` (the lower a channel's score, the surer it is dropped).
Cost: as Slimming.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.methods.common import ROWS, site_columns
from memkern.experiments.text.methods.learned_masks import STEPS, WINDOWS, learn_masks
from memkern.experiments.text.targets import SequenceTargets

DROP = 0.01
LR = 0.1


def top_k_mask(scores: torch.Tensor, space: ChannelSpace, drop: float) -> torch.Tensor:
    """float ``[Tc, total]``: 0 at each site's ``max(1, round(drop * C_s))`` lowest scores, 1
    elsewhere, with the straight-through gradient ``d mask / d scores = 1``."""
    hard = torch.ones_like(scores)
    for cols, count in zip(site_columns(space), space.counts):
        k = max(1, round(drop * count))
        low = scores[:, cols].detach().topk(k, dim=1, largest=False).indices + cols.start
        hard.scatter_(1, low, 0.0)
    return hard + scores - scores.detach()


def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, steps: int = STEPS, lr: float = LR, drop: float = DROP,
         windows: int = WINDOWS, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: ``-score`` after ``steps`` steps of size ``lr`` on forgetting
    the target with each site's lowest-scored ``drop`` fraction of channels dropped, keeping
    ``windows`` seeded clean windows."""
    if not 0 < drop <= 1:
        raise ConfigError(f"drop must be a fraction in (0, 1], got {drop}")
    gen = torch.Generator().manual_seed(seed)
    init = 1 + 1e-3 * torch.rand(space.total, generator=gen, dtype=torch.float64)
    scores = learn_masks(
        model, space, targets, clean, init=init,
        gate=lambda s, gens: top_k_mask(s, space, drop),
        steps=steps, lr=lr, seed=seed, windows=windows, rows=rows)
    return -scores
