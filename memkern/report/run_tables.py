"""What a run directory holds for the report: every table the commands wrote, read once and
checked, and the figures beside them. An analysis the run lacks is None, not an error."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memkern.rundir.atomic import read_json_object
from memkern.training.config import TrainConfig
from memkern.errors import RunDirError, printable
from memkern.report.findings import TOTAL
from memkern.rundir.paths import RunDir
from memkern.experiments.gradients.run import SUMMARY_COLUMNS
from memkern.experiments.localize.summary import LEGACY_SUMMARY, summary_paths
from memkern.rundir.csv_tables import (read_checked_csv, read_csv, read_measure_table,
                                       read_table)
from memkern.experiments.scores.text_run import BENCHMARK_FILE as TEXT_BENCHMARK_FILE

CURVES = ("clean_acc", "noisy_acc", "test_acc")


@dataclass
class RunTables:
    """One run's outputs. ``metrics``: ``metrics.jsonl`` lines; ``grads``: ``grads/summary.csv``
    rows (strings); ``rewind`` / ``retrain``: accuracy rows; ``localize``:
    ``localize.summary.json``; ``benchmark``: ``scores/benchmark.csv`` rows; ``figures``: PNG
    paths by name (``rewind``, ``summed_norms``, ...)."""

    run: RunDir
    config: TrainConfig
    noise: dict
    metrics: list[dict]
    grads: list[dict] | None = None
    rewind: list[dict] | None = None
    retrain: list[dict] | None = None
    localize: dict | None = None
    scores: bool = False
    benchmark: list[dict] | None = None
    lm_benchmark: list[dict] | None = None  # a text run's lm_benchmark.csv rows (strings)
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return printable(self.run.root.name)

    @property
    def last(self) -> dict:
        """The final accuracies ({} for an imported run not evaluated yet)."""
        return self.metrics[-1] if self.metrics else {}

    @property
    def tied(self) -> bool:
        return "noisy_acc_drop" in self.last


FIGURES = {"lm_benchmark": "lm_benchmark.png","summed_norms": "grads/summed_norms.png", "cosine": "grads/cosine.png",
           "live_summed_norms": "grads/live_summed_norms.png",
           "live_cosine": "grads/live_cosine.png", "rewind": "rewind.png",
           "retrain": "retrain.png", "localize": "localize.png",
           "benchmark_curves": "scores/benchmark_curves.png",
           "top_memorization_score": "scores/top_memorization_score.png"}


def _grads_summary(run: RunDir) -> list[dict] | None:
    rows = read_checked_csv(run.grads / "summary.csv", SUMMARY_COLUMNS,
                            fix="move it away and rerun memkern grads")
    return rows or None


LOCALIZE_FIELDS = ("count", "flip_rate", "median_channels_flipped", "mean_channels_flipped",
                   "site_fraction", "edited_clean_acc", "edited_noisy_acc", "edited_test_acc")


def run_summary_path(run: RunDir) -> Path:
    """The run's own localization summary: that of ``localize.jsonl`` (a run localized before
    summaries were named after their output has ``localize_summary.json``)."""
    summary = summary_paths(run.root / "localize.jsonl")[0]
    legacy = run.root / LEGACY_SUMMARY
    return legacy if not summary.exists() and legacy.is_file() else summary


def _localize_summary(path: Path, fields: tuple[str, ...] = LOCALIZE_FIELDS) -> dict | None:
    if not path.is_file():
        return None
    summary = read_json_object(path)
    groups = summary.get("groups")
    fine = (isinstance(summary.get("sites"), list) and isinstance(groups, dict) and groups
            and all(isinstance(e, dict) and all(k in e for k in fields)
                    for e in groups.values()))
    if not fine:
        raise RunDirError(f"{path} is not memkern's localization summary (fields missing); "
                          f"rerun memkern localize on the run, which rewrites it")
    return summary


def _benchmark(path: Path) -> list[dict] | None:
    rows = read_csv(path)
    if rows and not {"method", "covered", "auroc", "ap"} <= set(rows[0]):
        raise RunDirError(f"{path} is not memkern's benchmark table; rerun memkern scores "
                          f"--benchmark")
    try:
        for r in rows:
            int(r["covered"]), float(r["auroc"] or "nan"), float(r["ap"] or "nan")
    except (TypeError, ValueError):
        raise RunDirError(f"{path} holds a row that is not numbers; was it edited? rerun "
                          f"memkern scores --benchmark") from None
    return rows or None


def _imported_accuracies(run: RunDir) -> list[dict]:
    """An imported run has no training history: its one checkpoint's accuracies, as a metrics
    line, when `memkern evaluate` has written them."""
    epochs = run.epochs()
    path = run.evaluation_path(epochs[-1], "own") if epochs else None
    return [read_json_object(path)] if path is not None and path.is_file() else []


def load_run_tables(run_dir: str | Path) -> RunTables:
    """Read everything the report shows from ``run_dir``; a missing analysis stays None."""
    run = RunDir(run_dir)
    config = run.load_config(check_model=False)  # shown, never built
    metrics = _imported_accuracies(run) if config.imported else run.load_history()
    if not metrics and not config.imported:
        raise RunDirError(f"{run.root} has no completed epoch in metrics.jsonl yet")
    if config.text:
        return _text_tables(run, config, metrics)
    missing = [k for k in CURVES if any(k not in r for r in metrics)]
    if missing:
        raise RunDirError(f"{run.metrics_path} lacks {missing[0]} in some lines; was it edited? "
                          f"restore it")
    return RunTables(
        run=run, config=config, noise=run.load_noise(), metrics=metrics,
        grads=_grads_summary(run), rewind=read_table(run.root / "rewind.csv") or None,
        retrain=read_table(run.root / "retrain.csv") or None,
        localize=_localize_summary(run_summary_path(run)),
        scores=(run.root / "scores.csv").is_file(),
        benchmark=_benchmark(run.root / "scores" / "benchmark.csv"),
        figures={k: run.root / p for k, p in FIGURES.items() if (run.root / p).is_file()})


TEXT_LOCALIZE_FIELDS = ("count", "extracted", "flipped", "median_channels_flipped",
                        "share_flipped", "exposure_before", "exposure_after", "others_change",
                        "perplexity_rise", "perplexity_rise_max")


def _text_benchmark(path: Path) -> list[dict] | None:
    """``scores/text_benchmark.csv``: AUROC / AP per signal, numbers checked."""
    rows = read_csv(path) if path.is_file() else []
    try:
        return [{k: (v if k == "signal" else float(v or "nan")) for k, v in r.items()}
                for r in rows] or None
    except (TypeError, ValueError):
        raise RunDirError(f"{path} holds a row that is not numbers; was it edited? rerun "
                          f"memkern scores --benchmark") from None


def _text_tables(run: RunDir, config: TrainConfig, metrics: list[dict]) -> RunTables:
    """A text run's tables: its metrics (held-out bits per byte in every line) and its text
    localization summary."""
    if any("heldout_bpb" not in r for r in metrics):
        raise RunDirError(f"{run.metrics_path} lacks heldout_bpb in some lines; was it edited? "
                          f"restore it")
    path = run_summary_path(run)
    return RunTables(run=run, config=config, noise={}, metrics=metrics,
                     localize=_localize_summary(path, TEXT_LOCALIZE_FIELDS),
                     lm_benchmark=read_csv(run.root / "lm_benchmark.csv")
                     if (run.root / "lm_benchmark.csv").is_file() else None,
                     scores=(run.root / "scores.csv").is_file(),
                     benchmark=_text_benchmark(run.root / TEXT_BENCHMARK_FILE),
                     grads=_grads_summary(run),
                     rewind=read_measure_table(run.root / "rewind.csv") or None,
                     retrain=read_measure_table(run.root / "retrain.csv") or None,
                     figures={k: run.root / p for k, p in FIGURES.items()
                              if (run.root / p).is_file()})


def last_accounted(rows: list[dict]) -> list[dict]:
    """The rows of the last epoch in ``grads/summary.csv``, groups first, the total last."""
    epoch = max(int(r["epoch"]) for r in rows)
    mine = [r for r in rows if int(r["epoch"]) == epoch]
    return [r for r in mine if r["group"] != TOTAL] + [r for r in mine if r["group"] == TOTAL]
