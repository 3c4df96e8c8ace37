"""Exact synthetic label noise (docs/method.md, "Setup")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memkern.errors import ConfigError


@dataclass(frozen=True)
class LabelNoise:
    """``labels``: the training labels after noise, int64 ``[N]``; ``noisy_indices``: sorted
    int64 ``[round(rate * N)]``; ``original_labels``: the true labels at those indices."""

    labels: torch.Tensor
    noisy_indices: torch.Tensor
    original_labels: torch.Tensor

    @property
    def noisy_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.labels), dtype=torch.bool)
        mask[self.noisy_indices] = True
        return mask


def check_noise_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise rate must be in [0, 1), got {rate}")


def apply_label_noise(labels: torch.Tensor, *, rate: float, num_classes: int,
                      seed: int) -> LabelNoise:
    """Flip exactly ``round(rate * N)`` distinct labels, each to a class drawn uniformly from the
    ``num_classes - 1`` wrong ones (an offset 1..C-1 added mod C: every wrong class reachable,
    unlike the reference code's 1..C-2)."""
    check_noise_rate(rate)
    n = len(labels)
    count = round(rate * n)
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randperm(n, generator=gen)[:count].sort().values
    offsets = torch.randint(1, num_classes, (count,), generator=gen)
    new_labels = labels.clone()
    new_labels[noisy] = (labels[noisy] + offsets) % num_classes
    return LabelNoise(labels=new_labels, noisy_indices=noisy, original_labels=labels[noisy].clone())


def noise_of_labels(dataset_labels: torch.Tensor, train_labels: torch.Tensor) -> LabelNoise:
    """The noise of a model trained elsewhere with ``train_labels``: the examples whose training
    label differs from the dataset's (both int64 ``[N]``)."""
    noisy = torch.nonzero(train_labels != dataset_labels).flatten()
    return LabelNoise(labels=train_labels.clone(), noisy_indices=noisy,
                      original_labels=dataset_labels[noisy].clone())
