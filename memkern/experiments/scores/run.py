"""``memkern scores``: which training examples did the model memorize? (docs/scores.md)"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from memkern.errors import ConfigError, RunDirError
from memkern.rundir.context import load_data, require_noisy_split, resolve_device
from memkern.rundir.locks import hold_run, locked
from memkern.rundir.ownership import require_table_start
from memkern.rundir.paths import RunDir
from memkern.experiments.scores.benchmark import Benchmark, require_peers, run_benchmark
from memkern.experiments.scores.compute import compute_missing, scores_dir
from memkern.experiments.scores.crossval import check_folds
from memkern.report.figures.scores import write_grids
from memkern.experiments.scores.table import SCORES_FILE, ScoreTable, collect_scores
from memkern.experiments.scores.text_run import TextScores, score_text_run


@dataclass
class ScoresResult:
    """``path``: scores.csv; ``computed``: a line per ``--compute`` step taken; ``grids``: the
    image grids written; ``benchmark``: set with ``benchmark=True``."""

    path: Path
    table: ScoreTable
    computed: list[str]
    grids: list[Path]
    benchmark: Benchmark | None


@locked(lambda a: hold_run(a["run"]))
def score_run(*, run: str | Path, compute: bool = False, benchmark: bool = False, top: int = 32,
              grad_epochs: Sequence[int] | None = None, localize_top: int = 64, folds: int = 5,
              cv_epochs: int | None = None, device: str = "auto",
              data_dir: str | Path | None = None, progress: bool = True
              ) -> ScoresResult | TextScores:
    """Write ``<run>/scores.csv`` and the image grids of the ``top`` highest-ranked examples of
    every signal (``<run>/scores/*.png``); with ``compute``, first add the cheap signals the run
    lacks (:func:`memkern.experiments.scores.compute.compute_missing`); with ``benchmark``, measure every
    signal against the flipped labels beside cleanlab on ``folds``-fold cross-validation
    (:func:`memkern.experiments.scores.benchmark.run_benchmark`). A text run is scored per
    window instead (:func:`memkern.experiments.scores.text_run.score_text_run`; ``compute``,
    ``top``, the folds and the gradient epochs do not apply)."""
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    check_folds(folds)
    if cv_epochs is not None and cv_epochs < 1:
        raise ConfigError(f"--cv-epochs must be at least 1, got {cv_epochs}")
    run = RunDir(run)
    config = run.load_config()
    if config.text:
        run.final_checkpoint()
        resolve_device(device)
        return score_text_run(run, benchmark=benchmark, device=device, progress=progress)
    require_table_start(run.root / SCORES_FILE, first="index", what="a memkern scores table")
    run.final_checkpoint()  # a clear error for a run without checkpoints
    resolve_device(device)  # a device that is not there fails before anything is written
    if benchmark:
        require_noisy_split(config, "--benchmark")
        require_peers(folds)  # before any training or file: a refusal leaves nothing behind
    if benchmark and not run.load_noise()["noisy_indices"]:
        raise RunDirError(f"{run.root} has no flipped labels: the benchmark measures how well "
                          f"signals find them; train with --noise 0.1")
    computed = (compute_missing(run=run.root, grad_epochs=grad_epochs, localize_top=localize_top,
                                device=device, data_dir=data_dir, progress=progress)
                if compute else [])
    data = load_data(config, data_dir=data_dir, run=run.root)
    table = collect_scores(run.root, data=data, device=device, data_dir=data_dir)
    path = run.root / SCORES_FILE
    table.write(path)
    grids = write_grids(table, data.train_images, scores_dir(run), k=top)
    bench = (run_benchmark(run=run.root, table=table, data=data, folds=folds,
                           cv_epochs=cv_epochs, device=device, progress=progress)
             if benchmark else None)
    return ScoresResult(path=path, table=table, computed=computed, grids=grids, benchmark=bench)
