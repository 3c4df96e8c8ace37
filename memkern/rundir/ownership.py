"""Ownership before writing: a command replaces or appends to an existing file only when the
file is one it wrote itself. Anything else at an output path (notes, another command's output,
a file of another program) is refused with :class:`memkern.errors.OutputNotOursError` and left
untouched.

Figures carry a mark (the PNG text chunk ``Software: memkern``) and report pages their title,
so :func:`require_replaceable`, called by every atomic write, recognizes them by content; JSON
records and CSV tables are recognized by their fields (:func:`require_json_output`,
:func:`require_table_output`), checked by each command before it starts its work."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

from memkern.errors import OutputNotOursError
from memkern.rundir import json_files

PNG_MARK = "memkern"  # the Software text chunk of every figure memkern saves
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_REPORT_TITLE = b"<title>memkern report:"
_HEAD = 4096  # bytes read to recognize a figure or a page


def _refuse(path: Path, what: str, why: str) -> None:
    raise OutputNotOursError(f"{path} exists and is not {what} ({why}); it was left untouched: "
                             f"move it away or pass another output path")


def _text(path: Path, what: str) -> str | None:
    if not path.exists():
        return None
    if not path.is_file():
        _refuse(path, what, "not a regular file")
    if path.stat().st_size > json_files.MAX_BYTES:
        _refuse(path, what, f"larger than the {json_files.MAX_BYTES:,} bytes memkern reads")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        _refuse(path, what, "not UTF-8 text")


def require_jsonl_output(path: str | Path, *, keys: Sequence[str], what: str) -> None:
    """``path`` is absent, empty, or JSON lines that are all objects with ``keys``; only an
    unterminated last line (torn by a kill mid-append) may be anything."""
    path = Path(path)
    text = _text(path, what)
    if not text:
        return
    lines = text.split("\n")
    complete = lines[:-1]  # what follows the last newline is torn or empty
    for n, line in enumerate(complete, 1):
        try:
            row = json_files.loads(line, source=f"{path}, line {n}", error=OutputNotOursError)
        except json.JSONDecodeError:
            _refuse(path, what, f"line {n} is not JSON")
        if not isinstance(row, dict) or not all(k in row for k in keys):
            _refuse(path, what, f"line {n} lacks {', '.join(keys)}")


def require_table_output(path: str | Path, *, columns: Sequence[str], what: str) -> None:
    """``path`` is absent, or a CSV whose header is ``columns``."""
    path = Path(path)
    text = _text(path, what)
    if text is None:
        return
    header = next(csv.reader(io.StringIO(text)), [])
    if tuple(header) != tuple(columns):
        _refuse(path, what, f"its columns are {', '.join(header) or 'none'}")


def require_table_start(path: str | Path, *, first: str, what: str) -> None:
    """``path`` is absent, or a CSV whose first column is ``first`` (a table whose further
    columns vary, such as scores.csv with the signals a run holds)."""
    path = Path(path)
    text = _text(path, what)
    if text is None:
        return
    header = next(csv.reader(io.StringIO(text)), [])
    if header[:1] != [first]:
        _refuse(path, what, f"its first column is {header[0] if header else 'none'!r}, not "
                            f"{first!r}")


def require_json_output(path: str | Path, *, keys: Sequence[str], what: str) -> None:
    """``path`` is absent, or a JSON object holding ``keys`` (a record memkern wrote)."""
    path = Path(path)
    text = _text(path, what)
    if text is None:
        return
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        _refuse(path, what, "not JSON")
    if not isinstance(obj, dict) or not all(k in obj for k in keys):
        _refuse(path, what, f"it lacks {', '.join(keys)}")


def _in_run_without_manifest(path: Path) -> bool:
    """``path`` lies in a run written before runs had a manifest (memkern.rundir.manifest),
    whose figures were saved without memkern's mark."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
            return not (folder / "manifest.json").exists()
    return False


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD)


def require_replaceable(path: str | Path) -> None:
    """Called before an atomic write replaces ``path``: a figure (``.png``) or a report page
    (``.html``) already there must be memkern's (the mark, or the report's title); other
    kinds are checked by their commands before they start."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".png", ".html") or not (path.exists() or path.is_symlink()):
        return
    what = "a memkern figure" if kind == ".png" else "a memkern report page"
    if not path.is_file():
        _refuse(path, what, "not a regular file")
    head = _head(path)
    if kind == ".html":
        if _REPORT_TITLE not in head:
            _refuse(path, what, "no memkern report title")
        return
    if not head.startswith(_PNG_SIGNATURE):
        _refuse(path, what, "not a PNG image")
    if b"tEXtSoftware\x00" + PNG_MARK.encode() in head:
        return
    if b"tEXtSoftware\x00Matplotlib" in head and _in_run_without_manifest(path):
        return  # saved by a memkern of before the mark, into its own run
    _refuse(path, what, "no memkern mark")


def require_figure_outputs(*paths: str | Path) -> None:
    """:func:`require_replaceable` for each figure or page a command is about to write, before
    its work starts."""
    for p in paths:
        require_replaceable(p)


def require_writable(*paths: str | Path) -> None:
    """Before a command's work starts: each path can be written (an existing file, and its
    folder for the atomic rename; else the nearest existing folder, where it will be made),
    so a read-only output is named at once rather than after the work."""
    for path in map(Path, paths):
        targets = [path] if path.exists() else []
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        targets.append(folder)
        for t in targets:
            if not os.access(t, os.W_OK):
                kind = "folder" if t.is_dir() else "file"
                raise OutputNotOursError(f"cannot write {path}: the {kind} {t} is read-only; "
                                         f"change its permissions, or pass another output path")
