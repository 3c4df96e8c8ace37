"""The one training step and learning-rate schedule (docs/method.md, "Setup"): SGD with momentum
and weight decay (or AdamW, for text runs), linear warm-up then cosine decay. Training,
retraining, the benchmarks and the GPU check all step through here.

    optimizer = make_optimizer(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step, (x, y, ids) in enumerate(batches):
        sgd_step(model, optimizer, x, y, ids=ids,
                 lr=learning_rate(step, total_steps=n, base_lr=0.05, warmup=0.1))
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from memkern.network.sites import example_indices


def learning_rate(step: int, *, total_steps: int, base_lr: float, warmup: float,
                  schedule: str = "cosine") -> float:
    """Linear warm-up over the first ``warmup`` fraction of steps, then cosine decay to zero
    (``schedule="cosine"``) or ``base_lr`` (``"constant"``)."""
    warm = max(1, round(warmup * total_steps))
    if step < warm:
        return base_lr * (step + 1) / warm
    if schedule == "constant":
        return base_lr
    progress = (step - warm) / max(1, total_steps - warm)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: Iterable[nn.Parameter], *, lr: float, momentum: float,
                   weight_decay: float, kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD with momentum (``kind="sgd"``), or AdamW with betas ``(momentum, 0.99)``."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.99), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor, *, ids: torch.Tensor | None, lr: float | None = None,
             loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
             before_update: Callable[[torch.Tensor], None] | None = None,
             guard: ContextManager | None = None) -> torch.Tensor:
    """One step on rows ``x`` with int64 labels ``y`` and dataset indices ``ids`` ``[B]`` (they
    reach tied-dropout sites); returns the logits.

    ``lr``: this step's learning rate (None: the optimizer's as it is); ``loss_of(logits, y)``:
    the loss to back-propagate (default mean cross-entropy); ``before_update(logits)`` runs
    after the backward and before the weights change, with the graph kept for it; ``guard``:
    a context around the forward and backward (a distributed run's collectives)."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    with guard if guard is not None else contextlib.nullcontext():
        with example_indices(ids):
            logits = model(x)
            loss = loss_of(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward(retain_graph=before_update is not None)
    if before_update is not None:
        before_update(logits)
    optimizer.step()
    return logits
