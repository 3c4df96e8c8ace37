"""Crash-safe file writes: write beside the target, fsync, rename over it.

A temporary file is named ``.memkern-tmp.<pid>.<8 random>.<target>``: the prefix is memkern's
mark (a user's file named like that is not expected) and the pid says which process was writing
it, so :func:`remove_interrupted_writes` deletes the leftovers of killed memkern writes and
nothing else (a user's ``.notes.123.bak.tmp`` stays).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from memkern.errors import RunDirError
from memkern.rundir import json_files
from memkern.rundir.safe_files import append_text, open_nofollow, refuse_link
from memkern.rundir.ownership import require_replaceable

_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_PREFIX = ".memkern-tmp."
# mkstemp's random part: 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"(\d+)\.[a-z0-9_]{8}\..+$")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; a crash leaves
    either the old file or the new one, never half of one. The file gets the ordinary mode
    of a new file under the user's umask, whatever ``write`` did to the temporary's."""
    path = Path(path)
    refuse_link(path)  # replacing a link is harmless, but a link there is not memkern's file
    require_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp opens with O_EXCL: never an existing file or link
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}.", suffix=f".{path.name}",
                               dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = open_nofollow(tmp, os.O_RDONLY)  # still the regular file written, not a link
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; so may what ``write`` called
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from None


def _naming(error: BaseException, path: Path) -> BaseException:
    """An OSError that names no file (a write on a full disk) names ``path``, so its one line
    says where; any other error as it is."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        return OSError(error.errno, error.strerror, str(path))
    return error


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def remove_interrupted_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writing process no longer runs (a write
    that was killed); returns them. Temporaries of live processes are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if m and p.is_file() and not process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _undefined_as_null(obj):
    """NaN (an undefined value, such as the accuracy of an empty subset: no noisy examples at
    noise 0) becomes null; infinities stay, to be refused."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _undefined_as_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_undefined_as_null(v) for v in obj]
    return obj


def _json_line(obj, path: str | Path, **kw) -> str:
    try:
        return json.dumps(_undefined_as_null(obj), sort_keys=True, allow_nan=False, **kw)
    except ValueError:  # inf: would make the file invalid JSON
        raise RunDirError(f"refusing to write a non-finite number into {path}: {obj}") from None


def json_text(obj, path: str | Path) -> str:
    """``obj`` as the text :func:`atomic_write_json` writes to ``path``."""
    return _json_line(obj, path, indent=2) + "\n"


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json_text(obj, path))


def append_jsonl(path: str | Path, obj) -> None:
    """Append one JSON line and fsync: a line is either wholly on disk or absent after a kill
    (a torn last line is dropped by :func:`read_jsonl`)."""
    line = _json_line(obj, path) + "\n"
    try:
        append_text(path, line)
    except OSError as e:
        raise _naming(e, Path(path)) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete lines of a JSON-lines file, each a JSON object. Only the last line may be
    unreadable (a kill mid-append tears it) and is skipped; an unreadable line before it means
    the file was edited or is not memkern's, which is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(json_files.read_text(path).splitlines(), 1)
             if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json_files.loads(line, source=f"{path}, line {n}")
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break  # torn by a kill
            raise RunDirError(f"{path}, line {n}: not JSON; was the file edited? restore it, "
                              f"or move it away") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}, line {n}: expected a JSON object, found "
                              f"{type(row).__name__}; restore the file, or move it away")
        rows.append(row)
    return rows


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding one object (a memkern record); anything else is an error naming it."""
    path = Path(path)
    try:
        obj = json_files.loads(json_files.read_text(path), source=str(path))
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} is not a JSON object as memkern writes it; was it edited? "
                          f"restore it, or move it away")
    return obj


def rewrite_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(_json_line(r, path) + "\n" for r in rows))
