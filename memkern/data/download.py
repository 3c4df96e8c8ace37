"""Checksum-verified downloads: nothing reaches its final name unless its md5 matches."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from memkern.data.sources import MIRROR_ENV, SOURCES, file_url
from memkern.errors import DataError

_CHUNK = 1 << 20
_TIMEOUT_S = 60


class _NetworkError(DataError):
    """The server could not be reached or refused the file (find_or_fetch lists what is left)."""


def fetch(url: str, dest: str | os.PathLike, *, md5: str) -> Path:
    """Stream ``url`` into a temporary file beside ``dest``, check its md5, then rename it onto
    ``dest`` (atomic on one filesystem, so an interrupted run never leaves a half file at dest).

    Raises DataError on a network failure or an md5 mismatch; the temporary file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as e:
            raise _NetworkError(f"could not download {url} (HTTP {e.code} {e.reason})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise _NetworkError(f"could not download {url} ({reason})") from None
        except ValueError as e:  # not a URL at all, e.g. a mistyped $MEMKERN_DATA_MIRROR
            raise DataError(f"cannot download {url!r}: {e}; a mirror (${MIRROR_ENV}) must be "
                            f"an http(s):// or file:// URL") from None
        actual = digest.hexdigest()
        if actual != md5:
            raise DataError(
                f"{url}: md5 {actual} does not match the published {md5}; the download is "
                f"corrupt or the mirror serves another file, so it was deleted; try again or "
                f"fetch it by hand"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def find_or_fetch(
    dataset: str,
    dirs: list[Path],
    *,
    download: bool,
    present: Callable[[Path, str], bool] = lambda d, name: (d / name).exists(),
    what: str | None = None,
    mirror: str | None = None,
) -> Path:
    """The first of ``dirs`` in which ``present`` finds every file of ``SOURCES[dataset]``.

    ``dirs[-1]`` is the user's --data-dir and ``dirs[0]`` the folder downloads go to; with
    ``download`` the files ``dirs[0]`` lacks are fetched there. ``what`` names the files in
    messages (default: their published names).
    """
    names = list(SOURCES[dataset].md5)
    what = what or ", ".join(names)
    if not download and not dirs[-1].is_dir():
        raise DataError(
            f"data directory {dirs[-1]} does not exist; pass --data-dir where the {dataset} "
            f"files ({what}) are, or --download to fetch them"
        )
    for d in dirs:
        if all(present(d, n) for n in names):
            return d
    if not download:
        raise DataError(
            f"{dataset} files not found: no directory of {', '.join(map(str, dirs))} holds all "
            f"of {what}; pass --data-dir where they are, or --download to fetch them"
        )
    missing = [n for n in names if not present(dirs[0], n)]
    md5 = SOURCES[dataset].md5
    for i, name in enumerate(missing):
        try:
            fetch(file_url(dataset, name, mirror=mirror), dirs[0] / name, md5=md5[name])
        except _NetworkError as e:
            raise DataError(
                f"{e}; place these files in --data-dir by hand ({dirs[0]}): {', '.join(missing[i:])}"
            ) from None
    return dirs[0]
