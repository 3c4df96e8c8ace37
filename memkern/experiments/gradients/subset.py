"""Summed gradients of the clean and the noisy loss terms (docs/method.md, Experiment 1).

For a batch of B examples the mean loss splits as ``(1/B) sum_clean CE + (1/B) sum_noisy CE``;
the gradients of the two terms add up to the real step's. Per layer group we report both
norms and the cosine between them (the paper finds comparable norms, negative cosine).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memkern.rundir.atomic import append_jsonl, read_jsonl, rewrite_jsonl
from memkern.network.models.groups import LayerGroup, layer_groups

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
    """Gradient of ``scale * sum over rows where noisy of CE(logits, targets)`` for every
    parameter that requires grad (zeros when no row is noisy). ``noisy``: bool ``[B]``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not bool(noisy.any()):
        return {n: torch.zeros_like(p) for n, p in params.items()}
    loss = F.cross_entropy(logits[noisy], targets[noisy], reduction="sum") * scale
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                                retain_graph=retain_graph)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


class LiveSubsetTracker:
    """Accumulates the clean and noisy parts of the real training steps over an epoch and appends
    one line per group to ``path`` (``memkern train --track-grads``).

    Call :meth:`add_step` after ``loss.backward(retain_graph=True)`` and before the optimizer
    step: the step's gradient is read from ``param.grad`` (untouched, so training is
    bit-identical to an untracked run), the noisy part costs one more backward, and the clean
    part is their difference.
    """

    def __init__(self, model: nn.Module, path: str | Path, noisy_mask: torch.Tensor, *,
                 first_epoch: int):
        self.model, self.path, self.noisy_mask = model, Path(path), noisy_mask
        self.groups = layer_groups(model)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Lines of epochs that will be trained again (a resumed run) are dropped.
        rewrite_jsonl(self.path, [r for r in read_jsonl(self.path) if r["epoch"] < first_epoch])
        self._reset()

    def _reset(self) -> None:
        self.step_sum = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()
                         if p.requires_grad}
        self.noisy_sum = {n: torch.zeros_like(p) for n, p in self.step_sum.items()}

    def add_step(self, logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor) -> None:
        """``logits`` ``[B, C]`` of the step's graph, ``targets`` ``[B]``, ``idx`` dataset indices."""
        noisy = self.noisy_mask[idx.to(self.noisy_mask.device)].to(logits.device)
        for n, g in subset_gradients(self.model, logits, targets, noisy, 1.0 / len(targets)).items():
            self.noisy_sum[n] += g
        for n, p in self.model.named_parameters():
            if n in self.step_sum and p.grad is not None:
                self.step_sum[n] += p.grad

    def finish_epoch(self, epoch: int) -> None:
        clean = {n: self.step_sum[n] - self.noisy_sum[n] for n in self.step_sum}
        for row in subset_stats(clean, self.noisy_sum, self.groups):
            append_jsonl(self.path, {"epoch": epoch, **row})
        self._reset()
