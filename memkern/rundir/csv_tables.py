"""CSV tables of the run directory, written whole and atomically (a killed command leaves the
previous table or the new one).

Accuracy tables (rewind.csv, retrain.csv) have one row per (group, epoch):
``group, epoch, clean_acc, noisy_acc, test_acc``. A text run's tables (measure tables) have
``group, epoch`` and then the text measures of the run (docs/text.md), whose columns vary with
its reps groups.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable, Sequence

from memkern.rundir.atomic import atomic_write_text
from memkern.errors import RunDirError
from memkern.rundir.ownership import require_table_output, require_table_start

COLUMNS = ("group", "epoch", "clean_acc", "noisy_acc", "test_acc")
KEYS = ("group", "epoch")  # a measure table's first columns
MEASURE_TABLE = "a memkern measure table"


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """``rows`` as CSV with a header of ``columns`` (other keys of a row are left out)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_csv(path: str | Path) -> list[dict]:
    """Rows as dicts of strings; a missing file is an empty table."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_checked_csv(path: str | Path, columns: dict[str, Callable[[str], object]], *,
                     fix: str) -> list[dict]:
    """:func:`read_csv`, each row checked to have ``columns`` that their converters (``int``,
    ``float``) read; a hand-edited file is one RunDirError naming the file, the line and
    ``fix`` (what to do)."""
    path = Path(path)
    rows = read_csv(path)
    missing = sorted(set(columns) - set(rows[0])) if rows else []
    if missing:
        raise RunDirError(f"{path} lacks the column(s) {', '.join(missing)}; was it edited? "
                          f"{fix}")
    for n, r in enumerate(rows, 2):
        try:
            for name, convert in columns.items():
                convert(r[name])
        except (TypeError, ValueError, OverflowError):  # a short row (None) or not a number
            raise RunDirError(f"{path}, line {n}: {name} is not a number; was it edited? "
                              f"{fix}") from None
    return rows


def write_table(path: str | Path, rows: list[dict]) -> None:
    """Replace ``path`` (an accuracy table, or nothing) by ``rows``."""
    require_table_output(path, columns=COLUMNS, what="a memkern accuracy table")
    atomic_write_text(path, csv_text(rows, COLUMNS))


def read_table(path: str | Path) -> list[dict]:
    """Rows with ``epoch`` as int and accuracies as float; a missing file is an empty table."""
    path = Path(path)
    if not path.is_file():
        return []
    reader = csv.DictReader(io.StringIO(path.read_text()))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise RunDirError(f"{path} is not a memkern accuracy table (columns {reader.fieldnames}, "
                          f"expected {', '.join(COLUMNS)}); move it away and rerun")

    def in_range(row: dict, r: dict, n: int) -> None:
        # NaN: undefined, only the accuracy of the noisy set of a run without noisy examples
        off = [k for k in COLUMNS[2:] if not (0.0 <= row[k] <= 1.0 or (
            k == "noisy_acc" and math.isnan(row[k])))]
        if off:
            raise RunDirError(f"{path}, line {n}: {off[0]} is {r[off[0]]}, not an accuracy in "
                              f"[0, 1]; was it edited? move it away and rerun")

    return _group_epoch_rows(path, reader, COLUMNS[2:], "group, epoch and three accuracies",
                             in_range)


def _group_epoch_rows(path: Path, reader: csv.DictReader, measures, row_words: str,
                      check) -> list[dict]:
    """The rows of a group x epoch table: ``epoch`` int, ``measures`` float, ``check(row, raw,
    line)`` on each; a bad cell or a repeated (group, epoch) is a RunDirError naming the line."""
    rows, seen = [], set()
    for n, r in enumerate(reader, 2):
        try:
            row = {"group": r["group"], "epoch": int(r["epoch"]),
                   **{k: float(r[k]) for k in measures}}
        except (TypeError, ValueError):  # a short row (None) or a non-number
            raise RunDirError(f"{path}, line {n}: not a row of {row_words}; was it edited? move "
                              f"it away and rerun") from None
        check(row, r, n)
        key = (row["group"], row["epoch"])
        if key in seen:
            raise RunDirError(f"{path}, line {n}: group {key[0]} at epoch {key[1]} appears a "
                              f"second time; was it edited? move it away and rerun")
        seen.add(key)
        rows.append(row)
    return rows


def write_measure_table(path: str | Path, rows: list[dict]) -> None:
    """Replace ``path`` (a measure table, or nothing) by ``rows``: ``group``, ``epoch``, then the
    other keys of the first row in their order (every row has the same keys)."""
    require_table_start(path, first=KEYS[0], what=MEASURE_TABLE)
    columns = [*KEYS, *(k for k in (rows[0] if rows else {}) if k not in KEYS)]
    if any(set(r) != set(columns) for r in rows):
        raise ValueError("the rows of a measure table must all have the same keys")
    atomic_write_text(path, csv_text(rows, columns))


def read_measure_table(path: str | Path) -> list[dict]:
    """Rows with ``epoch`` as int and every measure as float (nan: undefined); a missing file is
    an empty table."""
    path = Path(path)
    if not path.is_file():
        return []
    reader = csv.DictReader(io.StringIO(path.read_text()))
    header = tuple(reader.fieldnames or ())
    if header[:2] != KEYS or len(set(header)) != len(header):
        raise RunDirError(f"{path} is not {MEASURE_TABLE} (columns {list(header)}, expected "
                          f"group, epoch and the measures); move it away and rerun")

    def full(row: dict, r: dict, n: int) -> None:
        if None in r:  # a long row: DictReader keeps the extra cells under None
            raise RunDirError(f"{path}, line {n}: more cells than columns; was it edited? move "
                              f"it away and rerun")

    return _group_epoch_rows(path, reader, header[2:], "group, epoch and numbers", full)
