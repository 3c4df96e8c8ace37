"""``memkern scores --compute``: add the cheap signals a run lacks, and time each addition.

In order: the training dynamics (rebuilt from the checkpoints when the run predates them or has
gaps), per-example gradient norms at an early and the final epoch (``memkern grads``), and
localization of the top candidates of the combined score (``memkern localize``). Every step
resumes like the command it calls; wall times go to ``<run>/scores/timings.json``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from memkern.rundir.atomic import atomic_write_json, atomic_write_text, read_json_object
from memkern.errors import ConfigError, MemkernError, RunDirError
from memkern.rundir.paths import RunDir
from memkern.report.figures.scores import top_indices
from memkern.experiments.scores.table import (LOCALIZE_FILE, collect_scores, complete_dynamics, early_epoch,
                                  grad_epochs_present)


def scores_dir(run: RunDir) -> Path:
    return run.root / "scores"


def timings_path(run: RunDir) -> Path:
    return scores_dir(run) / "timings.json"


def read_timings(run: RunDir) -> dict:
    path = timings_path(run)
    return read_json_object(path) if path.is_file() else {}


def _record(run: RunDir, key: str, seconds: float, **details) -> None:
    timings = read_timings(run)
    timings[key] = {"seconds": round(seconds, 3), **details}
    atomic_write_json(timings_path(run), timings)


def compute_missing(*, run: str | Path, grad_epochs: Sequence[int] | None = None,
                    localize_top: int = 64, device: str = "auto",
                    data_dir: str | Path | None = None, progress: bool = True) -> list[str]:
    """Add what ``run`` lacks (module docstring); returns a line per step taken.

    ``grad_epochs``: epochs of per-example gradient norms (default: 10% of training and the
    final epoch); ``localize_top``: how many of the highest combined scores to localize (0:
    none; examples already in localize.jsonl count)."""
    if localize_top < 0:
        raise ConfigError(f"--localize-top must be at least 0, got {localize_top}")
    run = RunDir(run)
    config = run.load_config()
    final = run.final_checkpoint()
    done = []
    try:
        complete_dynamics(run)
    except RunDirError:
        from memkern.training.dynamics import rebuild_dynamics
        started = time.perf_counter()
        rebuild_dynamics(run, device=device, data_dir=data_dir, progress=progress)
        _record(run, "dynamics_rebuild", time.perf_counter() - started)
        done.append("rebuilt the training dynamics from the checkpoints")
    last = run.epochs()[-1]
    wanted = sorted(set(grad_epochs or (early_epoch(config.epochs), last)))
    todo = [e for e in wanted if e not in grad_epochs_present(run)]
    if todo:
        from memkern.experiments.gradients.run import gradient_accounting
        started = time.perf_counter()
        try:
            gradient_accounting(run=run.root, epochs=todo, device=device, data_dir=data_dir,
                                progress=progress)
        except MemkernError as e:  # a model grads cannot handle: the other signals still come
            done.append(f"skipped per-example gradient norms at epochs {todo}: {e}")
        else:
            _record(run, "grads", time.perf_counter() - started, epochs=todo)
            done.append(f"per-example gradient norms at epochs {todo}")
    if localize_top:
        table = collect_scores(run.root, device=device, data_dir=data_dir)
        localized = table.signals.get("channels_to_flip")
        candidates = [int(i) for i in top_indices("memorization_score",
                                                  table.signals["memorization_score"],
                                                  localize_top)]
        todo = [i for i in candidates if localized is None or np.isnan(localized[i])]
        if todo:
            from memkern.experiments.localize.run import localize
            listing = scores_dir(run) / "localize_candidates.txt"
            atomic_write_text(listing, "\n".join(map(str, todo)) + "\n")
            started = time.perf_counter()
            localize(ckpt=final, examples=str(listing), out=run.root / LOCALIZE_FILE,
                     device=device, data_dir=data_dir, progress=progress)
            _record(run, "localize", time.perf_counter() - started, examples=len(todo))
            done.append(f"localized the {len(todo)} top candidates of the combined score")
    return done
