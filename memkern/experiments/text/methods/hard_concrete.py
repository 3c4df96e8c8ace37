"""HardConcrete (Chang et al., NAACL 2024): stochastic L0 gates (Louizos et al., ICLR
2018, "Learning Sparse Neural Networks through L0 Regularization", Section 2.2) trained to forget
the target while keeping clean loss.

Gate c of a target has a location ``log_alpha_c``. Each step draws ``u ~ U(0, 1)`` and sets
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretched to ``(gamma, zeta)`` and
clipped to [0, 1]: exactly 0 or 1 with positive probability, differentiable in between. The
penalty is ``lam`` times the expected number of closed gates, ``sum_c P(g_c = 0)`` with
``P(g_c != 0) = sigmoid(log_alpha_c - beta log(-gamma / zeta))``; the objective is the shared one
of :mod:`memkern.experiments.text.methods.learned_masks`. Gates start open (``log_alpha = 2``).
Score: ``-log_alpha_c`` (the more a gate leans closed, the higher). Cost: as Slimming.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.methods.common import ROWS
from memkern.experiments.text.methods.learned_masks import STEPS, WINDOWS, learn_masks
from memkern.experiments.text.targets import SequenceTargets

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # Louizos et al., Section 2.2 (their choice)
INIT = 2.0
LAM = 0.5
LR = 0.5


def sample_gates(log_alpha: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One draw of the hard-concrete gates ``[Tc, total]``; row i's noise from ``gens[i]``."""
    u = torch.stack([torch.rand(log_alpha.shape[1], generator=g, dtype=torch.float64)
                     for g in gens]).clamp(1e-6, 1 - 1e-6).to(log_alpha)
    s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def closed_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(gate = 0)`` per gate."""
    return 1 - torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, steps: int = STEPS, lr: float = LR, lam: float = LAM,
         windows: int = WINDOWS, rows: int = ROWS) -> torch.Tensor:
    """float ``[T, space.total]``: ``-log_alpha`` after ``steps`` steps of size ``lr`` on
    forgetting the target, keeping ``windows`` seeded clean windows, L0 weight ``lam``."""
    log_alpha = learn_masks(
        model, space, targets, clean, init=torch.full((space.total,), INIT), gate=sample_gates,
        penalty=lambda a: lam * closed_probability(a).sum(1), steps=steps, lr=lr, seed=seed,
        windows=windows, rows=rows)
    return -log_alpha
