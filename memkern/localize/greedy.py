"""Greedy localization (PAPER.md Experiment 4), many targets at once.

Each target's zeroed set is one row of a flat channel mask; its rows of the batch (clean target,
EoT copies, reference batch) run under that mask, so T targets need no model copies and no
Python loop over targets. Score of channel c = dL/dm_c at m = 1: zeroing c changes L by about
-dL/dm_c (for a bias-free filter before its norm this equals the paper's sum over the filter of
w * dL/dw), so the channel with the largest score is zeroed. A target stops when its clean
prediction leaves its training label ("flipped") or at ``max_channels`` zeroed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from memkern.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.localize.objective import LocalizationObjective

MAX_ROWS = 8192  # rows per forward/backward pass: bounds activation memory


@dataclass
class Localization:
    """One target's result: ``zeroed`` is bool ``[space.total]``; ``trace[k]`` is the objective
    with the first k channels zeroed."""

    index: int
    flipped: bool = False
    channels: list[tuple[str, int]] = field(default_factory=list)
    trace: list[float] = field(default_factory=list)
    zeroed: torch.Tensor | None = None


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient while only mask gradients are asked for (saves the weight
    half of the backward)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def greedy_localize(model: nn.Module, objective: LocalizationObjective, targets: torch.Tensor, *,
                    space: ChannelSpace, max_channels: int = 50, max_rows: int = MAX_ROWS,
                    on_step: Callable[[int], None] | None = None) -> list[Localization]:
    """Localize every target of ``targets`` (int64 ``[T]`` dataset indices) together; finished
    targets drop out of the batch. ``on_step(n)`` is told how many targets finished."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    p = objective.rows_per_target
    inputs = objective.inputs(targets).to(device=device, dtype=dtype).view(len(targets), p, -1)
    shape = objective.images.shape[1:]
    on = torch.ones(len(targets), space.total, dtype=torch.bool, device=device)
    results = [Localization(int(i)) for i in targets]
    active = torch.arange(len(targets))
    group = max(1, max_rows // p)
    with frozen(model), row_masks(model, space) as ops:
        while len(active):
            still = []
            for start in range(0, len(active), group):
                ids = active[start:start + group]
                still.append(ids[_step(model, objective, ops, space, inputs[ids].view(-1, *shape),
                                       targets[ids], on, ids, results, max_channels)])
            active = torch.cat(still)
            if on_step is not None:
                on_step(sum(r.zeroed is not None for r in results))
        set_masks(ops, space, None)
    return results


def _step(model, objective, ops, space, x, targets, on, ids, results, max_channels) -> torch.Tensor:
    """One forward (+ backward for those continuing) of targets ``ids``; zeroes one channel
    each. Returns the bool mask of ``ids`` still running."""
    m = on[ids].to(x.dtype).requires_grad_(True)
    set_masks(ops, space, m.repeat_interleave(objective.rows_per_target, dim=0))
    logits = model(x).view(len(ids), objective.rows_per_target, -1)
    loss, clean = objective(logits, targets)
    flipped = (clean.argmax(1).cpu() != objective.labels[targets])
    counts = torch.tensor([len(results[i].channels) for i in ids.tolist()])
    cont = ~flipped & (counts < min(max_channels, space.total))
    for j, i in enumerate(ids.tolist()):
        results[i].trace.append(float(loss[j].detach()))
        if not cont[j]:
            results[i].flipped = bool(flipped[j])
            results[i].zeroed = ~on[i].cpu()
    if cont.any():
        (grad,) = torch.autograd.grad(loss[cont.to(loss.device)].sum(), m)
        score = grad.detach().masked_fill(~on[ids], float("-inf"))
        pick = score.argmax(1).cpu()
        for j in torch.nonzero(cont).flatten().tolist():
            i, c = int(ids[j]), int(pick[j])
            on[i, c] = False
            results[i].channels.append(space.locate(c))
    return cont
