"""A folder that appears complete or not at all: built beside its place under a staging name,
then renamed into it. The staging name carries the pid of the building process, so the next
build removes what a killed one left and nothing a live one is writing."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from memkern.rundir.atomic import process_alive


def staging_folder(out: Path, *, doing: str = "importing") -> Path:
    """Where ``out`` is built before it is renamed: ``.<name>.<doing>-<pid>-<8 hex>``."""
    return out.parent / f".{out.name}.{doing}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_dead_staging(out: Path, *, doing: str = "importing") -> None:
    """Remove staging folders of ``out`` whose building process no longer runs."""
    pattern = re.compile(re.escape(f".{out.name}.{doing}-") + r"(\d+)-[0-9a-f]{8}")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def built_in_place(out: Path, *, doing: str) -> Iterator[Path]:
    """Yield an empty staging folder for ``out``; on a clean exit rename it to ``out`` (which
    must be absent or an empty folder), on an error remove it."""
    remove_dead_staging(out, doing=doing)
    staging = staging_folder(out, doing=doing)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.is_dir() and not out.is_symlink():
            out.rmdir()  # empty (the caller checked): rename cannot replace it otherwise
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
