"""Every per-example memorization signal a run holds, side by side: ``<run>/scores.csv``.

Columns: ``index``, ``label`` (trained), ``original_label``, ``noisy``, then one column per
signal found (see docs/scores.md), then ``memorization_score``. Sources:

- ``dynamics.safetensors`` (recorded by ``memkern train``): aum, forgetting_events,
  learned_epoch, confidence, variability, final_loss;
- ``grads/per_example_epoch_NNN.csv`` (``memkern grads``): ``grad_<group>_eNNN`` and
  ``grad_total_eNNN`` at the earliest trained epoch and the final epoch present;
- ``localize.jsonl`` (``memkern localize``): channels_to_flip (inf: not flipped within the cap;
  empty: not localized);
- the final checkpoint of a tied-dropout run: tied_gap.

A signal the run lacks is listed with the reason and the command that adds it, never an error.
This module reads the run directory; every signal is computed by a pure function of
:mod:`memkern.experiments.scores.signals`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memkern.rundir.atomic import atomic_write_text, read_jsonl
from memkern.data import PreparedData
from memkern.training.dynamics import Dynamics, dynamics_path
from memkern.errors import RunDirError
from memkern.rundir.context import load_data, open_run
from memkern.rundir.paths import RunDir
from memkern.experiments.localize.rows import check_rows
from memkern.experiments.scores.signals import (COMBINED, DYNAMICS_SIGNALS, channels_to_flip,
                                                combined_score, dynamics_signals, tied_gap)
from memkern.rundir.csv_tables import csv_text, read_checked_csv, read_csv

LOCALIZE_FILE = "localize.jsonl"
SCORES_FILE = "scores.csv"


@dataclass
class ScoreTable:
    """One row per training example: ``meta`` (index, label, original_label, noisy: int64
    ``[N]``) and ``signals`` (float64 ``[N]`` by column name; NaN where a signal does not cover
    an example). ``missing``: signal -> why it is absent and how to add it. ``combined_from``:
    the signals averaged into ``memorization_score``."""

    meta: dict[str, np.ndarray]
    signals: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    combined_from: list[str] = field(default_factory=list)

    @property
    def noisy(self) -> np.ndarray:
        return self.meta["noisy"].astype(bool)

    def rows(self) -> list[dict]:
        names = list(self.signals)
        values = np.stack([self.signals[n] for n in names], 1) if names else None
        out = []
        for i in range(len(self.meta["index"])):
            row = {k: int(v[i]) for k, v in self.meta.items()}
            if values is not None:
                row.update({n: "" if np.isnan(v) else f"{v:.6g}"
                            for n, v in zip(names, values[i])})
            out.append(row)
        return out

    def write(self, path: Path) -> None:
        atomic_write_text(path, csv_text(self.rows(), [*self.meta, *self.signals]))


def label_columns(data: PreparedData) -> dict[str, np.ndarray]:
    original = data.train_labels.clone()
    original[data.noise.noisy_indices] = data.noise.original_labels
    return {"index": np.arange(len(original)), "label": data.train_labels.numpy(),
            "original_label": original.numpy(), "noisy": data.noisy_mask.numpy().astype(np.int64)}


def complete_dynamics(run: RunDir) -> Dynamics:
    """The run's dynamics, or an error saying what is wrong and that ``--compute`` fixes it."""
    dynamics = Dynamics.load(dynamics_path(run))
    last = max(run.epochs(), default=0)
    gaps = dynamics.missing_epochs(last)
    if gaps:
        shown = ", ".join(map(str, gaps[:5])) + (" ..." if len(gaps) > 5 else "")
        raise RunDirError(f"{dynamics_path(run)} lacks epochs {shown}"
                          f" (the run was trained or resumed before memkern recorded dynamics); "
                          f"`memkern scores --run {run.root} --compute` rebuilds them")
    return dynamics.up_to(last)


def early_epoch(epochs: int) -> int:
    """The "early in training" epoch of gradient-norm scores: 10% of training (GraNd's choice,
    Paul et al. 2021, scores at epoch 20 of 200)."""
    return max(1, round(epochs / 10))


def grad_epochs_present(run: RunDir) -> list[int]:
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in run.grads.glob("per_example_epoch_*.csv"))


def grad_columns(run: RunDir, num_train: int) -> dict[str, np.ndarray]:
    """``grad_<group>_eNNN`` for the earliest trained epoch and the final epoch with per-example
    gradient norms (epoch 0 only when it is all there is)."""
    epochs = grad_epochs_present(run)
    trained = [e for e in epochs if e > 0] or epochs
    chosen = sorted({trained[0], trained[-1]}) if trained else []
    out = {}
    for epoch in chosen:
        path = run.grads / f"per_example_epoch_{epoch:03d}.csv"
        rows = read_csv(path)
        if len(rows) != num_train:
            raise RunDirError(f"{path} has {len(rows)} rows for {num_train} training examples; "
                              f"rerun `memkern grads`")
        groups = [k for k in rows[0] if k not in ("index", "noisy", "label", "insert")]
        rows = read_checked_csv(path, {"index": int, **dict.fromkeys(groups, float)},
                                fix="move it away and rerun `memkern grads`")
        index = [int(r["index"]) for r in rows]
        if sorted(index) != list(range(num_train)):
            raise RunDirError(f"{path}: the indices are not 0..{num_train - 1} once each; was it "
                              f"edited? move it away and rerun `memkern grads`")
        order = np.argsort(index)
        for g in groups:
            out[f"grad_{g}_e{epoch:03d}"] = np.array([float(r[g]) for r in rows])[order]
    return out


def collect_scores(run: str | Path, *, data: PreparedData | None = None, device: str = "auto",
                   data_dir: str | Path | None = None) -> ScoreTable:
    """Gather every signal ``run`` holds (module docstring) and the combined score; ``data``:
    the run's prepared data when the caller has it already."""
    run = RunDir(run)
    config = run.load_config()
    data = data if data is not None else load_data(config, data_dir=data_dir, run=run.root)
    n = len(data.train_labels)
    table = ScoreTable(meta=label_columns(data))
    try:
        table.signals.update(dynamics_signals(complete_dynamics(run)))
    except RunDirError as e:
        for name in DYNAMICS_SIGNALS:
            table.missing[name] = str(e)
    grads = grad_columns(run, n)
    if grads:
        table.signals.update(grads)
    else:
        table.missing["grad_*"] = (f"no per-example gradient norms in {run.grads}: `memkern grads "
                                   f"--run {run.root} --epochs "
                                   f"{early_epoch(config.epochs)},{config.epochs}` or "
                                   f"`memkern scores --compute`")
    localized = run.root / LOCALIZE_FILE
    lines = read_jsonl(localized) if localized.is_file() else []
    if lines:
        lines = check_rows(lines, localized, fields=("index", "flipped", "n_channels"),
                           num_train=n)
        table.signals["channels_to_flip"] = channels_to_flip(lines, n)
    else:
        table.missing["channels_to_flip"] = (f"no {localized}: `memkern localize --ckpt ...` or "
                                             f"`memkern scores --compute` (top candidates)")
    if config.tied_dropout:
        context = open_run(run.root, device=device, data_dir=data_dir)
        table.signals["tied_gap"] = tied_gap(context.model, context.data)
    else:
        table.missing["tied_gap"] = "the run was trained without --tied-dropout"
    grad_totals = sorted(k for k in table.signals if k.startswith("grad_total_e"))
    table.combined_from = [k for k in (*COMBINED, *grad_totals) if k in table.signals]
    if table.combined_from:
        table.signals["memorization_score"] = combined_score(table.signals, table.combined_from)
    else:
        table.missing["memorization_score"] = "no signal covers every example"
    return table
