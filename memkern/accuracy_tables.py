"""Accuracy tables: the CSV files of the layer experiments (rewind.csv, retrain.csv).

One row per (group, epoch): ``group, epoch, clean_acc, noisy_acc, test_acc``. Written whole and
atomically, so a killed command leaves the previous table or the new one.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from memkern.atomic import atomic_write_text
from memkern.errors import RunDirError

COLUMNS = ("group", "epoch", "clean_acc", "noisy_acc", "test_acc")


def write_table(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_table(path: str | Path) -> list[dict]:
    """Rows with ``epoch`` as int and accuracies as float; a missing file is an empty table."""
    path = Path(path)
    if not path.is_file():
        return []
    reader = csv.DictReader(io.StringIO(path.read_text()))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise RunDirError(f"{path} is not a memkern accuracy table (columns {reader.fieldnames}, "
                          f"expected {', '.join(COLUMNS)}); move it away and rerun")
    return [{"group": r["group"], "epoch": int(r["epoch"]),
             **{k: float(r[k]) for k in COLUMNS[2:]}} for r in reader]
