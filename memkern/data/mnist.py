"""MNIST and Fashion-MNIST from their published idx files (plain or gzipped)."""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from memkern.data.download import find_or_fetch
from memkern.data.file_limits import read_gzip
from memkern.data.splits import RawSplits
from memkern.errors import ConfigError, DataError

# idx magic: two zero bytes, a type code (0x08 = uint8), then the number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_NUM_CLASSES = 10
# variant -> torchvision's folder name, so an existing torchvision download (ROOT/MNIST/raw)
# is found by pointing --data-dir at ROOT.
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Parse an idx file (``path``, or ``path`` + ``.gz`` if only that exists) of uint8 data.

    Returns a read-only uint8 array whose shape is the header's dims: ``[N, H, W]`` for images
    (magic 0x803), ``[N]`` for labels (magic 0x801). The header is big-endian.
    """
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    try:
        raw = read_gzip(path) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}); delete it and download it again") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not an idx file; move it away and put the "
                        f"dataset file there") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = f"0x{int.from_bytes(raw[:4], 'big'):08x}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(
            f"{path} is not an idx file of {ndim}-d uint8 data: expected magic 0x{magic:08x}, "
            f"found {found}"
        )
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated: a {ndim}-d idx header needs {header} bytes, it has {len(raw)}; "
            f"delete it and download it again"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # math.prod on Python ints: a corrupt header's dims (up to 2^32 each) overflow int64.
    expected = header + math.prod(dims)
    if len(raw) < expected:
        raise DataError(
            f"{path} is truncated: its header {dims} implies {expected} bytes, it has {len(raw)}; "
            f"delete it and download it again"
        )
    if len(raw) > expected:
        raise DataError(
            f"{path} has {len(raw) - expected} bytes beyond the {expected} its header {dims} implies"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_split(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 1, H, W]`` uint8 images and ``[N]`` int64 labels of split ``prefix`` (train / t10k)."""
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", magic=_IMAGES_MAGIC)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", magic=_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {prefix} split has {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= _NUM_CLASSES:
        raise DataError(f"{folder}: {prefix} labels hold {labels.max()}, outside 0..{_NUM_CLASSES - 1}")
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist(data_dir: str | os.PathLike, *, download: bool = False, variant: str = "mnist") -> RawSplits:
    """Load MNIST or Fashion-MNIST (``variant``) from the four idx files, each plain or ``.gz``.

    Looks in DATA_DIR/<variant>, DATA_DIR/<variant>/raw, DATA_DIR/<MNIST|FashionMNIST>/raw and
    DATA_DIR, taking the first folder that holds all four; ``download`` fetches the missing
    ones into DATA_DIR/<variant>. Returns uint8 images ``[N, 1, 28, 28]``, int64 labels.
    """
    if variant not in _TORCHVISION_DIR:
        raise ConfigError(f"unknown MNIST variant {variant!r}; use one of {', '.join(_TORCHVISION_DIR)}")
    root = Path(data_dir)
    # The variant's own folders come before DATA_DIR itself, so files of the other variant
    # sitting loose in DATA_DIR are never taken for this one when both are present.
    dirs = [root / variant, root / variant / "raw", root / _TORCHVISION_DIR[variant] / "raw", root]
    folder = find_or_fetch(
        variant,
        dirs,
        download=download,
        present=lambda d, gz: (d / gz).exists() or (d / gz.removesuffix(".gz")).exists(),
        what="train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (each plain or .gz)",
    )
    train_x, train_y = _read_split(folder, "train")
    test_x, test_y = _read_split(folder, "t10k")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{folder}: train images are {tuple(train_x.shape[2:])}, test images "
            f"{tuple(test_x.shape[2:])}; the files come from different datasets"
        )
    return RawSplits(variant, train_x, train_y, test_x, test_y, _NUM_CLASSES)
