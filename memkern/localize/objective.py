"""The localization objective of PAPER.md Experiment 4, for many targets at once.

For target t (training label y_t, the noisy one for noisy examples) and a fixed reference batch
of other training examples: ``L_t = mean_{i in ref, i != t} CE_i - CE_t``. With EoT, CE_t is
taken on the mean logits of K Gaussian-noised copies (noise norm 1% of the input's norm).

Rows per target (``rows_per_target = 1 + K + B``): the clean target, its K copies, the B
references. The clean row decides the stop (prediction left y_t); the reference row equal to
the target itself, if any, has weight 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EOT_NOISE = 0.01  # noise norm / input norm (PAPER.md)


def reference_indices(num_train: int, size: int, *, seed: int) -> torch.Tensor:
    """``min(size, num_train)`` distinct training indices, sorted, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_train, generator=gen)[:size].sort().values


def eot_copies(x: torch.Tensor, indices: torch.Tensor, k: int, *, seed: int) -> torch.Tensor:
    """``x`` ``[T, ...]`` -> ``[T, k, ...]``: each example plus Gaussian noise of norm
    ``EOT_NOISE * ||x_t||``; the noise depends only on (seed, dataset index), so batched and
    one-at-a-time runs see the same copies."""
    out = []
    for xt, i in zip(x, indices.tolist()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        noise = torch.randn((k, *xt.shape), generator=gen, dtype=torch.float64)
        noise = noise / noise.flatten(1).norm(dim=1).view(k, *[1] * xt.dim())
        out.append(xt + (noise * EOT_NOISE * xt.double().norm()).to(xt.dtype))
    return torch.stack(out) if out else x.new_zeros((0, k, *x.shape[1:]))


class LocalizationObjective:
    """Holds the reference batch; builds the input rows of targets and scores their logits.

    ``images``/``labels``: the training split (float ``[N, C, S, S]``, int64 ``[N]``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, *,
                 eot: int = 0, seed: int = 0):
        self.images, self.labels, self.ref = images, labels, ref
        self.eot, self.seed = eot, seed

    @property
    def rows_per_target(self) -> int:
        return 1 + self.eot + len(self.ref)

    def inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """int64 ``[T]`` dataset indices -> ``[T * rows_per_target, C, S, S]``."""
        x = self.images[targets]
        parts = [x[:, None]]
        if self.eot:
            parts.append(eot_copies(x, targets, self.eot, seed=self.seed))
        parts.append(self.images[self.ref][None].expand(len(targets), *self.images[self.ref].shape))
        return torch.cat(parts, dim=1).flatten(0, 1)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` ``[T, rows_per_target, classes]`` -> (objective ``[T]``, clean target
        logits ``[T, classes]``)."""
        t, p, k = logits.shape
        y = self.labels[targets].to(logits.device)
        own = logits[:, 1:1 + self.eot].mean(1) if self.eot else logits[:, 0]
        ce_target = F.cross_entropy(own, y, reduction="none")
        ref_logits = logits[:, 1 + self.eot:]
        ref_y = self.labels[self.ref].to(logits.device)
        ce_ref = F.cross_entropy(ref_logits.reshape(-1, k), ref_y.repeat(t),
                                 reduction="none").view(t, -1)
        keep = (self.ref.to(logits.device)[None] != targets.to(logits.device)[:, None])
        keep = keep.to(logits.dtype)
        ref_mean = (ce_ref * keep).sum(1) / keep.sum(1).clamp_min(1)
        return ref_mean - ce_target, logits[:, 0]
