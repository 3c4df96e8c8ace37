"""The user's images as arrays in one ``.npz`` file: ``x_train``, ``y_train``, ``x_test``,
``y_test``.

Images are uint8 or floating point, ``[N, S, S]`` (grey), ``[N, C, S, S]`` or ``[N, S, S, C]``:
the layout is read from the shape (the channel axis is the one that differs from the two equal
image sides), and a shape where all three are equal is refused rather than guessed. Floating
images are kept as float32: training standardizes each channel by the train split's mean and
standard deviation, which makes the scale (0..1 or 0..255) irrelevant. Labels are integers
``0 .. C - 1``; the number of classes is the largest label + 1. Nothing in the file is unpickled.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from memkern.data.file_limits import check_npz
from memkern.data.splits import RawSplits
from memkern.errors import DataError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"array dataset {path} does not exist; pass --dataset npz:FILE with the "
                        f"arrays {', '.join(KEYS)} (numpy.savez)")
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in KEYS if k not in arrays.files]
            if missing:
                raise DataError(f"{path} lacks the array(s) {', '.join(missing)} (it holds "
                                f"{', '.join(arrays.files) or 'none'}); save x_train, y_train, "
                                f"x_test, y_test with numpy.savez")
            return {k: arrays[k] for k in KEYS}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path} is not a readable .npz file of plain arrays ({reason}); save "
                        f"it with numpy.savez") from None


def _channels_first(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """``x`` as ``[N, C, S, S]``."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: {name} has shape {list(x.shape)}; expected [N, S, S], "
                        f"[N, C, S, S] or [N, S, S, C]")
    _, a, b, c = x.shape
    if a == b == c:
        raise DataError(f"{path}: {name} has shape {list(x.shape)}, where channels-first and "
                        f"channels-last read alike; save it as [N, C, S, S] with C different "
                        f"from S")
    if b == c:
        return x
    if a == b:
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"{path}: {name} has shape {list(x.shape)}: images must be square "
                    f"([N, C, S, S] or [N, S, S, C]); crop or resize them to SxS")


def _images(x: np.ndarray, name: str, path: Path) -> torch.Tensor:
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: {name} holds NaN or inf; clean the images")
    else:
        raise DataError(f"{path}: {name} has dtype {x.dtype}; images must be uint8 or float")
    return torch.from_numpy(np.ascontiguousarray(_channels_first(x, name, path)))


def _labels(y: np.ndarray, name: str, count: int, path: Path) -> torch.Tensor:
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"{path}: {name} has shape {list(y.shape)}; expected [{count}], one "
                        f"label per image")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: {name} must hold non-negative integer class labels (dtype "
                        f"{y.dtype}); store labels as 0 .. C-1")
    return torch.from_numpy(y.astype(np.int64))


def load_arrays(path: str | Path) -> RawSplits:
    """The train and test splits of the ``.npz`` file ``path`` (see the module docstring)."""
    path = Path(path)
    arrays = _read(path)
    train_x = _images(arrays["x_train"], "x_train", path)
    test_x = _images(arrays["x_test"], "x_test", path)
    if train_x.shape[1:] != test_x.shape[1:] or train_x.dtype != test_x.dtype:
        raise DataError(f"{path}: x_train images are {list(train_x.shape[1:])} {train_x.dtype} "
                        f"but x_test images are {list(test_x.shape[1:])} {test_x.dtype} "
                        f"(channels first); save both splits alike")
    train_y = _labels(arrays["y_train"], "y_train", len(train_x), path)
    test_y = _labels(arrays["y_test"], "y_test", len(test_x), path)
    num_classes = max((int(y.max()) for y in (train_y, test_y) if len(y)), default=0) + 1
    if num_classes < 2:
        raise DataError(f"{path}: the labels name a single class; a classifier needs at least 2")
    return RawSplits(name=f"npz:{path}", train_images=train_x, train_labels=train_y,
                     test_images=test_x, test_labels=test_y, num_classes=num_classes)
