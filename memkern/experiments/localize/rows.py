"""The lines of a localize output, checked when read: one line per example, each index an
example of the training set, so counts and tables never take an edited or doubled line."""
from __future__ import annotations

from pathlib import Path

from memkern.errors import RunDirError


def check_rows(rows: list[dict], path: str | Path, *, num_train: int | None = None) -> None:
    """RunDirError naming ``path`` and the line when an ``index`` is not an integer of the
    training set (``0..num_train - 1``, when given) or appears twice."""
    seen: set[int] = set()
    for n, row in enumerate(rows, 1):
        i = row.get("index")
        if not isinstance(i, int) or isinstance(i, bool) or i < 0 or (
                num_train is not None and i >= num_train):
            bound = f"0..{num_train - 1}" if num_train is not None else "a non-negative integer"
            raise RunDirError(f"{path}, line {n}: index {i!r} is not an example of the training "
                              f"set ({bound}); was the file edited? restore it, or move it away "
                              f"and rerun memkern localize")
        if i in seen:
            raise RunDirError(f"{path}, line {n}: example {i} appears a second time; was the "
                              f"file edited? remove the repeated line, or move the file away "
                              f"and rerun memkern localize")
        seen.add(i)
