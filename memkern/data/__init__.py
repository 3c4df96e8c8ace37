"""Datasets: the embedded default (digits), the standard published files of the others, and the
user's own (``folder:PATH``, ``npz:PATH``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from memkern.data.arrays import load_arrays
from memkern.data.cifar10 import load_cifar10
from memkern.data.digits import load_digits_splits
from memkern.data.folder import load_image_folder
from memkern.data.mnist import load_mnist
from memkern.data.prepared import PreparedData, iterate_batches, prepare
from memkern.data.splits import RawSplits
from memkern.data.svhn import load_svhn
from memkern.errors import ConfigError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn")
# The user's data, named by a spec ``KIND:PATH``: an ImageFolder tree or an .npz of arrays.
USER_DATASETS = {"folder": load_image_folder, "npz": load_arrays}

__all__ = ["DATASETS", "USER_DATASETS", "PreparedData", "RawSplits", "iterate_batches",
           "load_dataset", "prepare", "user_dataset_path"]


def user_dataset_path(name: str) -> tuple[str, str] | None:
    """``("folder", PATH)`` for ``"folder:PATH"`` (likewise npz); None for a dataset name."""
    kind, sep, path = name.partition(":")
    if not sep or kind not in USER_DATASETS:
        return None
    if not path:
        raise ConfigError(f"dataset {name!r} names no path; pass {kind}:PATH")
    return kind, path


def load_dataset(name: str, *, data_dir: str | Path | None = None,
                 download: bool = False) -> RawSplits:
    """The train and test splits of ``name``; file-based datasets read ``data_dir``; a spec
    ``folder:PATH`` or ``npz:PATH`` reads the user's own data at PATH."""
    user = user_dataset_path(name)
    if user is not None:
        kind, path = user
        return dataclasses.replace(USER_DATASETS[kind](path), name=name)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or "
                          f"folder:PATH (train/<class>/*.png, test/<class>/...) or npz:FILE "
                          f"(x_train, y_train, x_test, y_test)")
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
