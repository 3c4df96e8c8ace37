"""The per-example loss whose gradient the norms and the accounting take.

An image example's loss is its cross-entropy; a text window's (targets ``[T]``, logits
``[T, vocab]``) is its mean next-byte NLL over positions, as in training (docs/text.md), so
the full-data mean of per-example losses is the training loss either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def example_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float ``[B]``: each row's loss; ``targets`` int64 ``[B]`` (classes) or ``[B, T]``
    (next tokens, ``logits`` ``[B, T, vocab]``: the mean over the T positions)."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    return nll.view(targets.shape).flatten(1).mean(1)


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of :func:`example_losses`: its gradient is the sum of per-example gradients."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="sum")
    return example_losses(logits, targets).sum()
