"""Training-ready data: normalized tensors, noisy labels, the noise mask, batches with indices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Dataset

from memkern.data.noise import LabelNoise, apply_label_noise, noise_of_labels
from memkern.data.splits import ImageShape, RawSplits
from memkern.errors import DataError

NATURAL_IMAGES = ("cifar10", "svhn")  # datasets where crop (+ flip for cifar10) augmentation fits


@dataclass
class PreparedData(ImageShape):
    """float32 images ``[N, C, S, S]`` normalized by the train split's per-channel mean/std;
    ``train_labels`` are the (noisy) labels the model is trained on; ``noise.noisy_mask`` marks
    the noisy ("memorized") set."""

    name: str
    num_classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    noise: LabelNoise

    @property
    def noisy_mask(self) -> torch.Tensor:
        return self.noise.noisy_mask


def prepare(raw: RawSplits, *, noise_rate: float, seed: int,
            train_labels: torch.Tensor | None = None) -> PreparedData:
    """Standardize ``raw`` by its train split and apply label noise: ``noise_rate`` flips drawn
    by ``seed``, or, given ``train_labels`` (int64 ``[N]``, the labels a model was trained with
    elsewhere), those labels, noisy where they differ from the dataset's."""
    for split, labels in (("train", raw.train_labels), ("test", raw.test_labels)):
        if not len(labels):
            raise DataError(f"the {raw.name} {split} split holds no examples; check the "
                            f"dataset files in --data-dir")
    train = raw.train_images.float()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    noise = (apply_label_noise(raw.train_labels, rate=noise_rate, num_classes=raw.num_classes,
                               seed=seed) if train_labels is None
             else noise_of_labels(raw.train_labels, train_labels))
    return PreparedData(
        name=raw.name, num_classes=raw.num_classes,
        train_images=(train - mean) / std, train_labels=noise.labels,
        test_images=(raw.test_images.float() - mean) / std, test_labels=raw.test_labels,
        noise=noise,
    )


class IndexedDataset(Dataset):
    """Yields ``(x, y, index)``: every sample carries its dataset index (for DataLoader users)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], i


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                    generator: torch.Generator | None = None,
                    indices: torch.Tensor | None = None,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, index)`` batches over ``indices`` (default all), shuffled when a generator is given.

    In-memory tensor slicing: these datasets fit in RAM, and a DataLoader's per-sample collation
    would cost more than a small model's step.
    """
    order = torch.arange(len(labels)) if indices is None else indices
    if generator is not None:
        order = order[torch.randperm(len(order), generator=generator)]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield images[idx], labels[idx], idx


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, flip: bool,
                  pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` zero padding (+ horizontal flip), vectorized over the batch.
    ``generator`` is a CPU generator (the same draws on any device); the result is on ``x``'s
    device."""
    n, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [n, h, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [n, 1, w]
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(dev)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.contiguous()
