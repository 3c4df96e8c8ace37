"""The clean and noisy parts of the real training steps, recorded while training
(``memkern train --track-grads``) to ``grads/live.jsonl``: the runner side of
:mod:`memkern.experiments.gradients.subset`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from memkern.experiments.gradients.subset import subset_gradients, subset_stats
from memkern.network.models.groups import layer_groups
from memkern.rundir.atomic import append_jsonl, read_jsonl, rewrite_jsonl


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
