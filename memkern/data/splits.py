"""The in-memory form every dataset loader returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memkern.errors import DataError


class ImageShape:
    """Shape facts of a dataclass holding ``train_images`` ``[N, C, S, S]``."""

    train_images: torch.Tensor

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


@dataclass(frozen=True)
class RawSplits(ImageShape):
    """A dataset's standard train and test splits, as loaded from its published files.

    Images are uint8 ``[N, C, H, W]`` (channels first, whatever the file's layout; float32 for an
    array file that holds floating-point images); labels are
    int64 ``[N]`` in ``0 .. num_classes - 1``. Normalization and label noise are applied later.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def __post_init__(self):
        if self.num_classes < 2:
            raise DataError(f"dataset {self.name} has {self.num_classes} class(es); a classifier "
                            f"needs at least 2")
