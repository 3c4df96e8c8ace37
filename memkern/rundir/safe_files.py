"""Writes that never follow a symbolic link out of the run.

A run directory may come from someone else, and a link inside it (``.memkern.lock`` pointing
at ``~/.bashrc``, ``grads/`` pointing elsewhere) would turn memkern's writes into writes to the
link's target. Every file memkern creates or appends is therefore opened with ``O_NOFOLLOW``,
and a link where memkern writes is refused with one line instead.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable

from memkern.errors import RunDirError


def _refusal(path: str | Path) -> RunDirError:
    return RunDirError(f"{path} is a symbolic link; memkern does not write through links "
                       f"(it may point outside the run): remove the link, or choose another path")


def refuse_link(path: str | Path) -> None:
    """RunDirError when ``path`` itself is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise _refusal(path)


def refuse_links(paths: Iterable[str | Path]) -> None:
    for path in paths:
        refuse_link(path)


def open_nofollow(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses a symbolic link as the last component (RunDirError)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refusal(path) from None
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if absent) and fsync, never through a link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_text_nofollow(path: str | Path) -> str:
    """The text of ``path``, refusing a link (for files memkern itself writes, such as locks)."""
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd) as f:
        return f.read()
