"""CIFAR-10 from its "python version" batches, unpickled without running any code."""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from memkern.data.download import find_or_fetch
from memkern.data.splits import RawSplits
from memkern.errors import DataError

_ARCHIVE = "cifar-10-python.tar.gz"
_BATCH_DIR = "cifar-10-batches-py"
_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_TEST = "test_batch"
_NUM_CLASSES = 10
_ROW = 3 * 32 * 32
_READ = 1 << 20

# The only globals a real batch references (pickled by Python 2 numpy: the `data` array).
# numpy 2 moved numpy.core to numpy._core; both spellings name the same function, which we
# take from ndarray's own reduce so no deprecated module is imported.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Refuses every global but the numpy array constructors, so a hostile file cannot run code."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``.

    Python 2 pickled the batch; its str keys come back as bytes under ``encoding="bytes"``.
    """
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    # Garbage bytes can fail inside the unpickler in many ways (struct, memo, unicode, numpy
    # setstate errors); each of them means the same thing to the user.
    except Exception as e:
        raise DataError(
            f"{path} is not a CIFAR-10 batch ({e}); delete it and extract the archive again"
        ) from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    is_rows = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not (is_rows and data.shape[1] == _ROW):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected b'data', a uint8 [N, {_ROW}] array")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(y, int) and not isinstance(y, bool) for y in labels)):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected b'labels', a list of {len(data)} ints")
    # Checked as Python ints: a corrupt label such as 2**70 does not fit int64.
    if labels and (min(labels) < 0 or max(labels) >= _NUM_CLASSES):
        raise DataError(f"{path}: labels span {min(labels)}..{max(labels)}, outside "
                        f"0..{_NUM_CLASSES - 1}; delete it and extract the archive again")
    labels = np.asarray(labels, dtype=np.int64)
    # Rows are the red plane, then green, then blue, each 32x32 row-major: already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def check_gzip(archive: Path) -> None:
    """Read ``archive`` to the end through gzip, which checks the CRC and length in its trailer
    (tarfile stops reading at the tar end marker, before the trailer, so a flipped byte in a
    member would otherwise be extracted unnoticed)."""
    try:
        with gzip.open(archive, "rb") as f:
            while f.read(_READ):
                pass
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{archive} is not a readable tar.gz, it is corrupt ({e}); delete it "
                        f"and download it again (--download fetches and checks it)") from None


def _extract(archive: Path) -> None:
    """Unpack the batches from ``archive`` into ``archive.parent / cifar-10-batches-py`` once
    the whole archive passed :func:`check_gzip`.

    Only the six known member names are read and each is written to a path built from our own
    names, so a crafted archive cannot write outside the folder (no traversal, no links).
    """
    out = archive.parent / _BATCH_DIR
    wanted = {f"{_BATCH_DIR}/{n}": n for n in [*_TRAIN, _TEST]}
    check_gzip(archive)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.name in wanted and m.isfile()}
            if len(members) != len(wanted):
                missing = sorted(set(wanted) - set(members))
                raise DataError(
                    f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python archive"
                )
            out.mkdir(exist_ok=True)
            for member_name, name in wanted.items():
                tmp = out / f".{name}.part"
                tmp.write_bytes(tar.extractfile(members[member_name]).read())
                os.replace(tmp, out / name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{archive} is not a readable tar.gz ({e}); delete it and download it again"
        ) from None


def load_cifar10(data_dir: str | os.PathLike, *, download: bool = False) -> RawSplits:
    """Load CIFAR-10 from ``cifar-10-batches-py/`` (or its ``cifar-10-python.tar.gz``, which is
    extracted beside it) in DATA_DIR/cifar10 or DATA_DIR; ``download`` fetches the archive into
    DATA_DIR/cifar10. Returns uint8 images ``[N, 3, 32, 32]`` (50000 train, 10000 test) and
    int64 labels.
    """
    root = Path(data_dir)
    folder = find_or_fetch(
        "cifar10",
        [root / "cifar10", root],
        download=download,
        present=lambda d, archive: (d / _BATCH_DIR).is_dir() or (d / archive).is_file(),
        what=f"{_BATCH_DIR}/ or {_ARCHIVE}",
    )
    if not (folder / _BATCH_DIR).is_dir():
        _extract(folder / _ARCHIVE)
    batches = folder / _BATCH_DIR
    missing = [n for n in [*_TRAIN, _TEST] if not (batches / n).is_file()]
    if missing:
        raise DataError(f"{batches} lacks {', '.join(missing)}; extract {_ARCHIVE} there again")
    train = [read_batch(batches / n) for n in _TRAIN]
    test_x, test_y = read_batch(batches / _TEST)
    return RawSplits(
        "cifar10",
        torch.from_numpy(np.concatenate([x for x, _ in train])),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        _NUM_CLASSES,
    )
