"""SVHN (cropped digits) from its published MATLAB files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io
import torch

from memkern.data.download import find_or_fetch
from memkern.data.splits import RawSplits
from memkern.errors import DataError

_NUM_CLASSES = 10


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``*_32x32.mat`` -> uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``.

    The file stores X as ``[32, 32, 3, N]`` (H, W, C, N) and y as ``[N, 1]`` in 1..10, where
    10 is the digit 0.
    """
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    # scipy fails on a bad file in many ways (MatReadError, ValueError for a foreign file;
    # IndexError or OSError for a truncated one; NotImplementedError for v7.3/HDF5); each
    # means the file is not the published one.
    except Exception as e:
        raise DataError(
            f"{path} is not an SVHN MATLAB v5 file ({e}); delete it and download it again"
        ) from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} lacks the variables X and y; it is not an SVHN *_32x32.mat file")
    x, y = mat["X"], mat["y"]
    if not (x.dtype == np.uint8 and x.ndim == 4 and x.shape[:3] == (32, 32, 3)):
        raise DataError(f"{path}: X is {x.dtype} {list(x.shape)}, expected uint8 [32, 32, 3, N]")
    y = y.reshape(-1).astype(np.int64)
    if len(y) != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    if y.size and (y.min() < 1 or y.max() > _NUM_CLASSES):
        raise DataError(f"{path}: labels span {y.min()}..{y.max()}, expected 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % _NUM_CLASSES


def load_svhn(data_dir: str | os.PathLike, *, download: bool = False) -> RawSplits:
    """Load SVHN from ``train_32x32.mat`` and ``test_32x32.mat`` in DATA_DIR/svhn or DATA_DIR;
    ``download`` fetches the missing ones into DATA_DIR/svhn. Returns uint8 images
    ``[N, 3, 32, 32]`` (73257 train, 26032 test) and int64 labels in 0..9.
    """
    root = Path(data_dir)
    folder = find_or_fetch("svhn", [root / "svhn", root], download=download)
    train_x, train_y = read_mat(folder / "train_32x32.mat")
    test_x, test_y = read_mat(folder / "test_32x32.mat")
    return RawSplits(
        "svhn",
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        _NUM_CLASSES,
    )
