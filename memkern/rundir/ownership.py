"""Ownership before writing: a command replaces or appends to an existing file only when the
file is one it wrote itself. Anything else at an output path (notes, another command's output,
a file of another program) is refused with :class:`memkern.errors.OutputNotOursError` and left
untouched."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from memkern.errors import OutputNotOursError
from memkern.rundir import json_files


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
