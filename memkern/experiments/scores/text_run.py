"""``memkern scores`` on a text run: which training windows did the model memorize?
(docs/scores.md, "Text runs")

Every checkpoint's predictions for every training window are computed once and kept in
``scores/window_stats.npz`` (one epoch at a time, atomically), so a killed run resumes at the
next epoch. ``scores.csv`` holds one row per window: its index, the insert whose copy starts it
(-1: ordinary text), that insert's copies, whether it is planted ("memorized" split), and every
signal. ``--benchmark`` measures how well each signal finds the planted windows: AUROC and
average precision over all of them, and AUROC per group of canaries by copies.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memkern.data.text import TextData
from memkern.experiments.localize.rows import check_rows
from memkern.experiments.scores.detection import auroc, average_precision
from memkern.experiments.scores.signals import (COMBINED, combined_score, dynamics_signals,
                                                oriented)
from memkern.experiments.scores.table import grad_columns
from memkern.experiments.scores.text_signals import (TEXT_DIRECTION, WindowStats, tied_gap,
                                                     window_dynamics, window_stats)
from memkern.network.tied_dropout import has_tied_dropout
from memkern.rundir.atomic import atomic_write, atomic_write_text, read_jsonl
from memkern.rundir.context import open_run
from memkern.rundir.csv_tables import csv_text
from memkern.rundir.ownership import require_table_start
from memkern.rundir.paths import RunDir
from memkern.rundir.progress import Progress
from memkern.errors import RunDirError

STATS_FILE = "scores/window_stats.npz"
BENCHMARK_FILE = "scores/text_benchmark.csv"


@dataclass
class TextScores:
    path: Path
    signals: list[str]
    rows: list[dict]
    benchmark: list[dict] | None
    benchmark_path: Path | None


def _load_stats(path: Path, epochs: list[int], windows: int) -> dict[int, WindowStats]:
    """The epochs already computed (of those asked, for this many windows)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as f:
            have = {int(e): WindowStats(*(torch.from_numpy(f[k][i]) for k in
                                          ("nll", "margin", "accuracy")))
                    for i, e in enumerate(f["epochs"])}
    except (OSError, ValueError, KeyError) as e:
        raise RunDirError(f"{path} is not memkern's window statistics ({e}); move it away and "
                          f"rerun memkern scores") from None
    return {e: s for e, s in have.items() if e in epochs and len(s.nll) == windows}


def _save_stats(path: Path, stats: dict[int, WindowStats]) -> None:
    order = sorted(stats)
    buf = io.BytesIO()
    np.savez(buf, epochs=np.array(order, dtype=np.int64),
             **{k: np.stack([getattr(stats[e], k).numpy() for e in order])
                for k in ("nll", "margin", "accuracy")})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def _channels_to_flip(run: RunDir, data: TextData) -> np.ndarray | None:
    """Neurons greedy zeroed to stop each localized insert, on every window of its copies
    (inf: not stopped; NaN: not localized or never extracted)."""
    path = run.root / "localize.jsonl"
    rows = check_rows(read_jsonl(path), path, num_train=len(data.inserts)) if path.is_file() \
        else []
    if not rows:
        return None
    out = np.full(len(data.owner), np.nan)
    for r in rows:
        if r.get("fitted", True):
            out[data.copies(r["index"])] = r["n_channels"] if r["flipped"] else np.inf
    return out


def _benchmark(columns: dict[str, np.ndarray], data: TextData) -> list[dict]:
    planted = data.noisy_mask.numpy()
    reps = {i.id: i.reps for i in data.canaries()}
    owner = data.owner.numpy()
    groups = sorted(set(reps.values()))
    rows = []
    for name, values in columns.items():
        covered = ~np.isnan(values)
        if planted[covered].all():  # covers planted windows only: nothing to tell apart
            continue
        score = oriented(name, values, TEXT_DIRECTION)
        row = {"signal": name, "covered": int(covered.sum()),
               "auroc": auroc(score[covered], planted[covered]),
               "ap": average_precision(score[covered], planted[covered])}
        for k in groups:  # this group's copies against ordinary text
            own = np.isin(owner, [i for i, r in reps.items() if r == k])
            keep = covered & (own | ~planted)
            row[f"auroc_r{k}"] = auroc(score[keep], own[keep])
        rows.append(row)
    return sorted(rows, key=lambda r: -np.nan_to_num(r["auroc"], nan=-1.0))


def score_text_run(run: RunDir, *, benchmark: bool, device: str,
                   progress: bool) -> TextScores:
    """Write ``scores.csv`` (and with ``benchmark`` ``scores/text_benchmark.csv``) of a text
    run; the caller holds the run's lock."""
    scores_path = run.root / "scores.csv"
    require_table_start(scores_path, first="index", what="a memkern scores table")
    if benchmark:
        require_table_start(run.root / BENCHMARK_FILE, first="signal",
                            what="a memkern text benchmark table")
    ctx = open_run(run.root, device=device, text_ok=True)
    data: TextData = ctx.data
    epochs = [e for e in run.epochs() if e >= 1]
    if not epochs:
        raise RunDirError(f"{run.root} has no trained epoch yet")
    stats_path = run.root / STATS_FILE
    stats = _load_stats(stats_path, epochs, len(data.owner))
    bar = Progress(total=len(epochs), initial=len(stats), unit="epoch",
                   desc=f"scores {run.root.name}: window statistics", bar=progress)
    for e in epochs:
        if e in stats:
            continue
        ctx.load(e)
        stats[e] = window_stats(ctx.model, data.train_windows, data.mask_keys)
        _save_stats(stats_path, stats)
        bar.advance(1)
    bar.close()
    columns = dynamics_signals(window_dynamics([stats[e] for e in epochs], epochs))
    if has_tied_dropout(ctx.model):  # the final epoch's weights are loaded last
        columns["tied_gap"] = tied_gap(ctx.model, data.train_windows, data.mask_keys)
    # per-window gradient norms of the accounted epochs (memkern grads), as on an image run
    columns.update(grad_columns(run, len(data.owner)))
    flips = _channels_to_flip(run, data)
    if flips is not None:
        columns["channels_to_flip"] = flips
    combined = [n for n in COMBINED if n in columns]
    columns["memorization_score"] = combined_score(columns, combined, TEXT_DIRECTION)
    reps = {i.id: i.reps for i in data.inserts}
    owner = data.owner.tolist()
    rows = [{"index": w, "insert": o, "reps": reps.get(o, 0), "memorized": int(o >= 0),
             **{k: float(v[w]) for k, v in columns.items()}} for w, o in enumerate(owner)]
    atomic_write_text(scores_path, csv_text(rows, list(rows[0]) if rows else ["index"]))
    table = bench_path = None
    if benchmark:
        table = _benchmark(columns, data)
        bench_path = run.root / BENCHMARK_FILE
        keys = list(dict.fromkeys(k for r in table for k in r))
        atomic_write_text(bench_path, csv_text(table, keys))
    return TextScores(scores_path, list(columns), rows, table, bench_path)
