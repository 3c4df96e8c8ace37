"""Datasets: the embedded default (digits) and the standard published files of the others."""
from __future__ import annotations

from pathlib import Path

from memkern.data.cifar10 import load_cifar10
from memkern.data.digits import load_digits_splits
from memkern.data.mnist import load_mnist
from memkern.data.prepared import PreparedData, iterate_batches, prepare
from memkern.data.splits import RawSplits
from memkern.data.svhn import load_svhn
from memkern.errors import ConfigError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn")

__all__ = ["DATASETS", "PreparedData", "RawSplits", "iterate_batches", "load_dataset", "prepare"]


def load_dataset(name: str, *, data_dir: str | Path | None = None,
                 download: bool = False) -> RawSplits:
    """The train and test splits of ``name``; file-based datasets read ``data_dir``."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits_splits()
    if data_dir is None:
        raise ConfigError(f"dataset {name!r} is read from files: pass --data-dir DIR "
                          f"(with --download to fetch them)")
    if name in ("mnist", "fashion-mnist"):
        return load_mnist(data_dir, download=download, variant=name)
    if name == "cifar10":
        return load_cifar10(data_dir, download=download)
    return load_svhn(data_dir, download=download)
