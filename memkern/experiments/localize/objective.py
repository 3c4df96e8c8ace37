"""The localization objective of docs/method.md, Experiment 4, for many targets at
once.

For target t (training label y_t, the noisy one for noisy examples) and a fixed reference batch
of B other training examples: ``L_t = mean_{i in ref, i != t} CE_i - CE_t``. With EoT, CE_t is
taken on the mean logits of K Gaussian-noised copies (noise norm 1% of the input's norm).

The objective splits into a reference part that depends on the target only through its mask,
``S(m) = sum_{i in ref} CE_i(m)``, and target rows (the clean target and its K copies):
``L_t = (S(m_t) - [t in ref] * CE_t^clean) / (B - [t in ref]) - CE_t`` (the clean row is the
target's own reference row when t is in the batch). Targets whose masks coincide share S, which
is what makes batching targets pay (see :mod:`memkern.experiments.localize.greedy`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EOT_NOISE = 0.01  # noise norm / input norm (docs/method.md, Experiment 4)


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
    def target_rows(self) -> int:
        """Rows per target besides the references: the clean target and its EoT copies."""
        return 1 + self.eot

    @property
    def rows_per_target(self) -> int:
        return self.target_rows + len(self.ref)

    def target_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """int64 ``[T]`` dataset indices -> ``[T * target_rows, C, S, S]``."""
        x = self.images[targets]
        if not self.eot:
            return x
        return torch.cat([x[:, None], eot_copies(x, targets, self.eot, seed=self.seed)],
                         dim=1).flatten(0, 1)

    def target_ids(self, targets: torch.Tensor) -> torch.Tensor:
        """Dataset index of each row of :meth:`target_inputs`: EoT copies carry their target's
        (an example-tied dropout mask belongs to the example, whatever the noise added)."""
        return targets.repeat_interleave(self.target_rows)

    def ref_inputs(self) -> torch.Tensor:
        """``[B, C, S, S]``."""
        return self.images[self.ref]

    def inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """All rows of each target: ``[T * rows_per_target, C, S, S]``, target rows first."""
        own = self.target_inputs(targets).unflatten(0, (len(targets), self.target_rows))
        ref = self.ref_inputs()
        return torch.cat([own, ref[None].expand(len(targets), *ref.shape)], dim=1).flatten(0, 1)

    def ids(self, targets: torch.Tensor) -> torch.Tensor:
        """Dataset index of each row of :meth:`inputs`, int64 ``[T * rows_per_target]``."""
        own = self.target_ids(targets).view(len(targets), self.target_rows)
        return torch.cat([own, self.ref[None].expand(len(targets), -1)], dim=1).flatten()

    def target_terms(self, logits: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the target rows ``[T, target_rows, classes]`` -> (the objective's target
        part ``-[t in ref] CE_t^clean / (B - [t in ref]) - CE_t``, ``[T]``; clean logits
        ``[T, classes]``)."""
        y = self.labels[targets].to(logits.device)
        own = logits[:, 1:].mean(1) if self.eot else logits[:, 0]
        ce_own = F.cross_entropy(own, y, reduction="none")
        in_ref = self.in_ref(targets).to(logits.device, logits.dtype)
        ce_clean = F.cross_entropy(logits[:, 0], y, reduction="none") if self.eot else ce_own
        return -in_ref * ce_clean / self.ref_counts(targets).to(logits.device, logits.dtype) \
            - ce_own, logits[:, 0]

    def ref_losses(self, logits: torch.Tensor, positions: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Logits of reference rows under U masks ``[U, B, classes]`` -> each row's
        cross-entropy ``[U, B]``; ``positions``: the rows are those references only (int64
        positions in ``ref``)."""
        u, b, k = logits.shape
        ref = self.ref if positions is None else self.ref[positions.cpu()]
        y = self.labels[ref].to(logits.device).repeat(u)
        return F.cross_entropy(logits.reshape(-1, k), y, reduction="none").view(u, b)

    def ref_sums(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of reference rows under U masks ``[U, B, classes]`` -> ``S`` per mask, ``[U]``."""
        return self.ref_losses(logits).sum(1)

    def flipped(self, clean: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """bool ``[T]``: the clean prediction has left the target's training label."""
        return clean.argmax(1).cpu() != self.labels[targets.cpu()]

    def in_ref(self, targets: torch.Tensor) -> torch.Tensor:
        """bool ``[T]``: the target is one of the reference examples."""
        return torch.isin(targets, self.ref)

    def ref_counts(self, targets: torch.Tensor) -> torch.Tensor:
        """``B - [t in ref]`` per target (at least 1), int64 ``[T]``."""
        return (len(self.ref) - self.in_ref(targets).long()).clamp_min(1)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of each target, ``[T, rows_per_target, classes]`` -> (objective ``[T]``,
        clean target logits ``[T, classes]``)."""
        part, clean = self.target_terms(logits[:, :self.target_rows], targets)
        sums = self.ref_sums(logits[:, self.target_rows:])
        return sums / self.ref_counts(targets).to(logits.device, logits.dtype) + part, clean
