"""Slimming (Chang et al., NAACL 2024, after network slimming: Liu et al., ICCV 2017):
continuous channel gates, L1-penalized, trained to forget the target while keeping clean loss.

Each target's gates start at 1 and follow the shared objective of
:mod:`memkern.experiments.text.methods.learned_masks`, with ``lam * sum_c (1 - g_c)`` as the
penalty (an L1 norm of the gates' distance from "on": few channels may move) and the gates
clamped to [0, 1] after each step. Score: ``1 - g_c``, how far the gate closed. Channels whose
gate never left 1 tie at 0. Cost: ``steps`` forwards and backwards of 1 + ``windows`` rows per
target.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.methods.common import ROWS
from memkern.experiments.text.methods.learned_masks import STEPS, WINDOWS, learn_masks
from memkern.experiments.text.targets import SequenceTargets

LAM = 0.05
# 1 / steps: a gate moves at most lr per step, so none closes fully and the clamp at 0 never
# ties the most-pulled gates of a site (at 0.1 the most-pulled ones closed fully and tied)
LR = 1 / STEPS


def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, steps: int = STEPS, lr: float = LR, lam: float = LAM,
         windows: int = WINDOWS, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: ``1 - gate`` after ``steps`` steps of size ``lr`` on
    forgetting the target, keeping ``windows`` seeded clean windows, L1 weight ``lam``."""
    gates = learn_masks(
        model, space, targets, clean, init=torch.ones(space.total),
        gate=lambda g, gens: g, penalty=lambda g: lam * (1 - g).sum(1),
        project=lambda g: g.clamp_(0.0, 1.0), steps=steps, lr=lr, seed=seed, windows=windows,
        rows=rows)
    return 1 - gates
