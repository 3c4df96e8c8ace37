"""Sizes a data file claims, checked against what it holds before anything is allocated.

An array header, an archive member or a compressed stream says how large its content is; a
hostile or damaged file can claim terabytes in a few bytes. Each reader here compares the claim
with the bytes present (or a fixed bound, for a compressed stream) and raises DataError naming
the file instead of letting the allocator fail.
"""
from __future__ import annotations

import gzip
import math
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from memkern.errors import DataError

# Deflate cannot expand data by more than about 1032x: a member claiming more is not honest.
_DEFLATE_RATIO = 1100
# Bound for one decompressed dataset file (the MNIST training images are 47 MB).
MAX_DECOMPRESSED = 1 << 30
# Bound for one image of a folder dataset, in pixels (4096 x 4096).
MAX_IMAGE_PIXELS = 1 << 24


def check_npy(f: BinaryIO, size: int, what: str) -> None:
    """DataError unless the ``.npy`` stream ``f`` (``size`` bytes, positioned at its start)
    holds the bytes its header claims; ``f`` is left at its start."""
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"{what} is not a readable .npy array ({str(e)[:80]})") from None
    claimed = math.prod(shape) * dtype.itemsize
    present = size - (f.tell() - start)
    f.seek(start)
    if claimed > present:
        raise DataError(f"{what} claims an array of shape {list(shape)} ({claimed:,} bytes) but "
                        f"holds {present:,} bytes: a damaged or hostile file; replace it")


def check_npz(path: Path) -> None:
    """DataError unless every array of the ``.npz`` archive ``path`` fits in its member."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                where = f"{path}: array {info.filename.removesuffix('.npy')}"
                if info.file_size > info.compress_size * _DEFLATE_RATIO + 4096:
                    raise DataError(f"{where} claims {info.file_size:,} bytes from "
                                    f"{info.compress_size:,} compressed: not an honest archive; "
                                    f"replace it")
                if info.filename.endswith(".npy"):
                    with archive.open(info) as f:
                        check_npy(f, info.file_size, where)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .npz file ({str(e)[:80]}); save it with "
                        f"numpy.savez") from None


def check_npy_file(path: Path) -> None:
    with open(path, "rb") as f:
        check_npy(f, path.stat().st_size, str(path))


def read_gzip(path: Path, *, limit: int = MAX_DECOMPRESSED) -> bytes:
    """The decompressed bytes of ``path``, refused past ``limit`` bytes (a gzip bomb)."""
    with gzip.open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise DataError(f"{path} decompresses to more than {limit:,} bytes, more than any "
                        f"dataset file memkern reads: replace it")
    return raw


def check_image_pixels(path: Path, size: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"{path} is {size[0]}x{size[1]} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS:,} memkern reads per image; resize it")
