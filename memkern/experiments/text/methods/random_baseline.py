"""The random baseline: every channel gets a seeded uniform score, a ranking that knows nothing."""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.targets import SequenceTargets


def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0) -> torch.Tensor:
    """float ``[T, space.total]`` uniform on [0, 1) from a generator seeded with ``seed`` (the
    same seed gives the same scores; ``model`` and ``clean`` are unused)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(targets), space.total, generator=gen, dtype=torch.float64)
