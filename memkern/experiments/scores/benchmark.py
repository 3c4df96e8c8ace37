"""``memkern scores --benchmark``: how well each signal finds the flipped labels, beside cleanlab.

For every signal: AUROC, average precision and precision at k = the number of flipped labels
(over the examples the signal covers), with what it cost: trainings and wall seconds (the run's
own training, from metrics.jsonl, plus the ``--compute`` steps it needed, from
scores/timings.json). The peer: cleanlab's label-quality score (``self_confidence``, its
default) and ``find_label_issues`` on out-of-sample probabilities from K-fold cross-validation
with the run's model and config (:mod:`memkern.experiments.scores.crossval`). Writes
``scores/benchmark.csv``, ``scores/benchmark.md`` and ``scores/benchmark_curves.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memkern.rundir.atomic import atomic_write_text, read_jsonl
from memkern.data import PreparedData
from memkern.errors import ConfigError, RunDirError
from memkern.rundir.paths import RunDir
from memkern.experiments.scores.compute import read_timings, scores_dir
from memkern.experiments.scores.crossval import check_folds, cross_validate
from memkern.experiments.scores.detection import auroc, average_precision, precision_at_k
from memkern.report.figures.scores import detection_curves
from memkern.experiments.scores.signals import DYNAMICS_SIGNALS, oriented
from memkern.experiments.scores.table import ScoreTable
from memkern.rundir.csv_tables import csv_text

COLUMNS = ("method", "covered", "flipped", "auroc", "ap", "precision_at_k", "trainings",
           "seconds", "flagged", "flagged_precision", "flagged_recall")
CLEANLAB = "cleanlab"


@dataclass
class Benchmark:
    rows: list[dict]
    csv: Path
    markdown: Path
    figure: Path


def detection_row(name: str, scores: np.ndarray, flipped: np.ndarray) -> dict:
    """Metrics of oriented ``scores`` over the examples they cover (not NaN)."""
    covered = ~np.isnan(scores)
    s, y = scores[covered], flipped[covered]
    k = int(y.sum())
    return {"method": name, "covered": int(covered.sum()), "flipped": k,
            "auroc": auroc(s, y), "ap": average_precision(s, y),
            "precision_at_k": precision_at_k(s, y, k) if k else float("nan")}


def signal_cost(name: str, *, train_seconds: float, timings: dict,
                combined_from: list[str]) -> float | None:
    """Wall seconds a signal took: training, plus each ``--compute`` step it needs (None when a
    step ran outside ``memkern scores`` and was not timed)."""
    steps = set()
    for part in combined_from if name == "memorization_score" else [name]:
        if part.startswith("grad_"):
            steps.add("grads")
        elif part == "channels_to_flip":
            steps.add("localize")
        elif part in DYNAMICS_SIGNALS and "dynamics_rebuild" in timings:
            steps.add("dynamics_rebuild")
    if any(step not in timings for step in steps):
        return None
    return train_seconds + sum(timings[step]["seconds"] for step in steps)


def require_peers(folds: int) -> None:
    """ConfigError when the benchmark needs cleanlab (``folds`` >= 2) and it is not installed:
    checked before anything is trained or written."""
    if not folds:
        return
    try:
        import cleanlab.filter  # noqa: F401
        import cleanlab.rank  # noqa: F401
    except ImportError:
        raise ConfigError("the benchmark's peer cleanlab is not installed: pip install cleanlab "
                          "(or the bench-peers extra), or pass --folds 0 to skip it") from None


def cleanlab_rows(labels: np.ndarray, probabilities: np.ndarray,
                  flipped: np.ndarray) -> tuple[dict, np.ndarray]:
    """cleanlab's row (ranking by 1 - label quality, plus its flagged set) and its oriented
    scores."""
    require_peers(2)
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    issues = find_label_issues(labels, probabilities)
    scores = -quality
    row = detection_row(CLEANLAB, scores, flipped)
    hits = int((issues & flipped).sum())
    row.update(flagged=int(issues.sum()),
               flagged_precision=hits / issues.sum() if issues.any() else float("nan"),
               flagged_recall=hits / flipped.sum())
    return row, scores


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as :func:`memkern.report.summaries.benchmark_table` shows them, in markdown."""
    from memkern.report.summaries import benchmark_table

    header, cells = benchmark_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def run_benchmark(*, run: str | Path, table: ScoreTable, data: PreparedData, folds: int = 5,
                  cv_epochs: int | None = None, device: str = "auto",
                  progress: bool = True) -> Benchmark:
    """Score every signal of ``table`` against the flipped labels, and cleanlab beside them
    when ``folds`` >= 2 (``cv_epochs``: see :func:`memkern.experiments.scores.crossval.cross_validate`)."""
    run = RunDir(run)
    flipped = table.noisy
    if not flipped.any():
        raise RunDirError(f"{run.root} has no flipped labels: the benchmark measures how well "
                          f"signals find them; train with --noise 0.1")
    check_folds(folds)
    require_peers(folds)
    train_seconds = sum(r["seconds"] for r in read_jsonl(run.metrics_path))
    timings = read_timings(run)
    rows, curves = [], {}
    for name, values in table.signals.items():
        scores = oriented(name, values)
        row = detection_row(name, scores, flipped)
        row.update(trainings=1, seconds=signal_cost(name, train_seconds=train_seconds,
                                                    timings=timings,
                                                    combined_from=table.combined_from))
        rows.append(row)
        if row["covered"] == len(flipped) and not (name.startswith("grad_")
                                                   and not name.startswith("grad_total_")):
            curves[name] = (scores, flipped)
    if folds:
        cv = cross_validate(run=run.root, folds=folds, epochs=cv_epochs, device=device,
                            data=data, progress=progress)
        started = time.perf_counter()
        row, scores = cleanlab_rows(table.meta["label"], cv.probabilities, flipped)
        row.update(method=f"{CLEANLAB} ({folds}-fold, self_confidence)", trainings=cv.trainings,
                   seconds=cv.seconds + time.perf_counter() - started)
        rows.append(row)
        curves[CLEANLAB] = (scores, flipped)
    # Best first: the signals that score every example by AUROC, cleanlab among them; then the
    # partial ones (ranked on easier ground).
    rows.sort(key=lambda r: (r["covered"] != len(flipped),
                             np.inf if np.isnan(r["auroc"]) else -r["auroc"]))
    out = scores_dir(run)
    bench = Benchmark(rows=rows, csv=out / "benchmark.csv", markdown=out / "benchmark.md",
                      figure=out / "benchmark_curves.png")
    atomic_write_text(bench.csv, csv_text([{k: _fmt(v) for k, v in r.items()} for r in rows],
                                          COLUMNS))
    atomic_write_text(bench.markdown, markdown_table(rows))
    detection_curves(curves, bench.figure,
                     title=f"finding the {int(flipped.sum())} flipped labels of {run.root.name}")
    return bench
