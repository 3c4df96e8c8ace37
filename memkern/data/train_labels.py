"""Read the labels a model was trained with elsewhere (``memkern import --train-labels``).

Two formats: ``.npy``, one integer label per training example in dataset-index order (read
without unpickling); ``.csv``, rows ``index,label`` (any order, each index once, an optional
header row) or a single column of labels in index order.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from memkern.data.file_limits import check_npy_file
from memkern.errors import DataError

_INT64 = np.iinfo(np.int64)


def _from_npy(path: Path) -> np.ndarray:
    check_npy_file(path)
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path} is not a readable .npy array of labels ({reason}); save it "
                        f"with numpy.save") from None
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 \
            or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} must hold a 1-D integer array (one label per training "
                        f"example), found shape {list(np.shape(labels))} dtype "
                        f"{getattr(labels, 'dtype', '?')}")
    return labels


def _integer(text: str, path: Path, row: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise DataError(f"{path}, row {row}: {text.strip()[:20]!r} is not an integer; write "
                        f"rows index,label") from None
    if not _INT64.min <= value <= _INT64.max:
        raise DataError(f"{path}, row {row}: {text.strip()[:20]}... is too large for an index "
                        f"or a label; write rows index,label")
    return value


def _from_csv(path: Path, num_train: int) -> np.ndarray:
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file; write rows index,label") from None
    if rows and not rows[0][-1].strip().lstrip("-").isdigit():
        rows = rows[1:]  # a header
    if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) not in (1, 2):
        raise DataError(f"{path} must hold rows index,label (or one label per row), all alike")
    if len(rows[0]) == 1:
        return np.array([_integer(r[0], path, n) for n, r in enumerate(rows, 1)], dtype=np.int64)
    labels = np.full(num_train, -1, dtype=np.int64)
    for n, (index, label) in enumerate(rows, 1):
        i = _integer(index, path, n)
        if not 0 <= i < num_train:
            raise DataError(f"{path}, row {n}: index {i} is out of range (the training set has "
                            f"{num_train} examples, indices 0..{num_train - 1})")
        if labels[i] != -1:
            raise DataError(f"{path}, row {n}: index {i} appears twice")
        labels[i] = _integer(label, path, n)
        if labels[i] < 0:
            raise DataError(f"{path}, row {n}: label {labels[i]} is negative; labels are "
                            f"classes 0..C-1")
    return labels


def read_train_labels(path: str | Path, *, num_train: int, num_classes: int) -> torch.Tensor:
    """int64 ``[num_train]`` from ``path`` (.npy or .csv); every example labelled once with a
    class in ``0 .. num_classes - 1``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training labels {path} do not exist; pass a .npy or .csv file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise DataError(f"training labels {path}: unknown format {suffix or '(no suffix)'}; "
                        f"pass a .npy array or a .csv of rows index,label")
    labels = _from_npy(path) if suffix == ".npy" else _from_csv(path, num_train)
    if len(labels) != num_train:
        raise DataError(f"{path} holds {len(labels)} labels but the training set has "
                        f"{num_train} examples; give one label per training example")
    missing = np.flatnonzero(labels == -1) if suffix == ".csv" else []
    if len(missing):
        raise DataError(f"{path} gives no label for index {int(missing[0])} (and "
                        f"{len(missing) - 1} more); label every training example")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} is not a "
                        f"class of the dataset (0..{num_classes - 1})")
    return torch.from_numpy(labels.astype(np.int64))
