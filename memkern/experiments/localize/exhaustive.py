"""Exhaustive localization (memkern's exact variant of docs/method.md, Experiment 4).

At each step the channel whose zeroing gives the lowest true objective is zeroed: exactly the
argmin of :func:`memkern.experiments.localize.scan.ablation_scan` over the candidates, found by
:func:`memkern.experiments.localize.exact_argmin.bounded_argmin` (scans of the target's own
rows, then of the heaviest references, bound every candidate; only those the bounds cannot
rule out are scanned with every reference). Candidates: every channel still on, or the top K
by the greedy gradient score. Targets run one after another; the batching is over candidates.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.localize.greedy import Localization, frozen, model_input
from memkern.experiments.localize.objective import LocalizationObjective
from memkern.experiments.localize.exact_argmin import bounded_argmin
from memkern.experiments.localize.scan import MAX_ROWS
from memkern.network.sites import example_indices


def _state(model, objective, space, x, ids, target, on, need_grad: bool):
    """Objective, whether the target is flipped, and (optionally) the mask gradient under mask
    ``on``."""
    with row_masks(model, space) as ops:
        m = on.to(next(model.parameters()).dtype)[None].requires_grad_(need_grad)
        set_masks(ops, space, m.expand(len(x), -1))
        with torch.set_grad_enabled(need_grad), example_indices(ids):
            loss, clean = objective(model(x)[None], target[None])
        grad = torch.autograd.grad(loss.sum(), m)[0][0] if need_grad else None
    return float(loss[0].detach()), bool(objective.flipped(clean, target[None])[0]), grad


def exhaustive_localize(model: nn.Module, objective: LocalizationObjective, targets: torch.Tensor,
                        *, space: ChannelSpace, max_channels: int = 50,
                        candidates: int | None = None, max_rows: int | None = None,
                        on_step: Callable[[int], None] | None = None) -> list[Localization]:
    """Same contract as :func:`memkern.experiments.localize.greedy.greedy_localize`; ``candidates`` = K
    limits each step's exact scan to the K best channels by gradient score."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    results = []
    with frozen(model):
        for n_done, t in enumerate(targets.tolist(), start=1):
            tt = torch.tensor(t)
            x = model_input(objective.inputs(tt[None]), device, dtype)
            ids = objective.ids(tt[None]).to(device)
            on = torch.ones(space.total, dtype=torch.bool, device=device)
            res = Localization(t)
            while True:
                loss, flipped, grad = _state(model, objective, space, x, ids, tt, on,
                                          need_grad=candidates is not None)
                res.trace.append(loss)
                if flipped or len(res.channels) >= min(max_channels, space.total):
                    res.flipped = flipped
                    break
                pool = torch.nonzero(on).flatten().cpu()
                if candidates is not None and candidates < len(pool):
                    pool = pool[grad[pool.to(device)].topk(candidates).indices.cpu()]
                best = bounded_argmin(model, objective, tt, x, ids, space=space, base_mask=on,
                                      candidates=pool, max_rows=max_rows or MAX_ROWS).channel
                on[best] = False
                res.channels.append(space.locate(best))
            res.zeroed = ~on.cpu()
            results.append(res)
            if on_step is not None:
                on_step(n_done)
    return results
