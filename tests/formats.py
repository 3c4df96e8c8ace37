"""Writers of the standard dataset file formats, shared by the data and training tests."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

MNIST_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx encoding: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the uint8 data."""
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def random_mnist(rng, n_train=7, n_test=3):
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, arrays: dict, *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in MNIST_NAMES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
