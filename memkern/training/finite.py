"""The NaN/inf guard of training: a non-finite loss or parameter stops the run before anything
non-finite is saved, so the last checkpoint on disk is the last good one."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from memkern.errors import DivergedError


def _advice(epoch: int) -> str:
    return (f"checkpoints up to epoch {epoch - 1} are kept; resuming would diverge again, so "
            f"train a new run with a smaller --lr")


def check_loss(loss: float, *, epoch: int, step: int, what: str = "training",
               advice: str | None = None) -> None:
    """``step`` counts from 1 within ``epoch``; ``what`` diverged, ``advice`` says what to do
    (default: train's)."""
    if not math.isfinite(loss):
        raise DivergedError(f"{what} diverged: the loss is {loss} at epoch {epoch}, step "
                            f"{step}; {advice or _advice(epoch)}")


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((name for name, t in tensors
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_model(model: nn.Module, *, epoch: int, what: str = "training",
                advice: str | None = None) -> None:
    """Every floating-point parameter and buffer is finite (after ``epoch``'s last step)."""
    name = first_nonfinite((*model.named_parameters(), *model.named_buffers()))
    if name is not None:
        raise DivergedError(f"{what} diverged: {name} holds non-finite values after "
                            f"epoch {epoch}; {advice or _advice(epoch)}")
