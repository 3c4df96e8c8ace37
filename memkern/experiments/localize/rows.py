"""A localize output's lines checked before anything indexes with them.

``localize.jsonl`` may be edited by hand or come with a received run; its ``index`` selects a
training example and its ``channels`` name sites, so a string, a negative, an out-of-range
or a repeated value must be one line naming the file, not an IndexError deep in scores or the
summary (or a doubled line counted twice).
"""
from __future__ import annotations

from pathlib import Path

from memkern.errors import RunDirError

# Fields every line memkern writes has, with their JSON types (checked exactly: no bool as int).
FIELDS = {"index": int, "noisy": bool, "flipped": bool, "n_channels": int, "channels": list}


def _is(value, kind) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _problem(row: dict, fields: tuple[str, ...], num_train: int | None,
             widths: dict[str, int] | None) -> str | None:
    for name in fields:
        if name not in row:
            return f"no field {name!r}"
        if not _is(row[name], FIELDS[name]):
            return f"field {name!r} is not {FIELDS[name].__name__}"
    index = row["index"]
    if index < 0 or (num_train is not None and index >= num_train):
        return (f"index {index} is not an example of the training set"
                + (f" (0..{num_train - 1})" if num_train is not None else ""))
    if "n_channels" in fields and row["n_channels"] < 0:
        return f"n_channels {row['n_channels']} is negative"
    if "channels" not in fields:
        return None
    channels = row["channels"]
    if not all(isinstance(c, list) and len(c) == 2 and _is(c[0], str) and _is(c[1], int)
               and c[1] >= 0 for c in channels):
        return "channels are not [site, channel] pairs"
    if widths is not None:
        bad = next((c for c in channels if not c[1] < widths.get(c[0], 0)), None)
        if bad is not None:
            return f"channel {bad[1]} of site {bad[0]!r} is not a channel of the model"
    if row["n_channels"] != len(channels):
        return f"n_channels {row['n_channels']} but {len(channels)} channels listed"
    return None


def check_rows(rows: list[dict], path: str | Path, *, fields: tuple[str, ...] = tuple(FIELDS),
               num_train: int | None = None, widths: dict[str, int] | None = None) -> list[dict]:
    """``rows`` (read from ``path``) unchanged, or RunDirError naming the first bad record.
    ``fields``: those the caller reads (``index`` among them); with ``num_train``, indices
    must be below it; with ``widths`` (site -> channels), each zeroed channel must exist."""
    seen: set[int] = set()
    for n, row in enumerate(rows, 1):
        problem = _problem(row, fields, num_train, widths)
        if problem is None and row["index"] in seen:
            problem = f"example {row['index']} appears a second time"
        if problem is not None:
            raise RunDirError(f"{Path(path)}, record {n}: {problem}; was it edited? restore it, "
                              f"or move it away and rerun memkern localize")
        seen.add(row["index"])
    return rows
