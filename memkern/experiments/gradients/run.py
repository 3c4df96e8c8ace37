"""Gradient accounting over a run's checkpoints (``memkern grads``; docs/method.md,
Experiment 1).

Per chosen epoch, with the checkpoint in eval mode (the same model the per-example norms see;
a tied-dropout run's rows carry their dataset indices, so each example keeps its own mask; a
text run's windows carry their mask keys, docs/text.md, "Gradient accounting"):

- ``grads/per_example_epoch_NNN.csv``: every training example's per-group gradient norm
  (``index, noisy, label, <group>..., total``; ``label`` is the trained, possibly noisy label;
  a text run's windows have ``insert`` instead: the planted insert a window holds, -1 for
  plain text), so examples can be ranked by suspected memorization;
- ``grads/summary.csv``: one row per epoch x group (and ``total``): the norms of the summed
  clean and noisy gradients and their cosine, and clean vs noisy per-example norm statistics.

Each epoch is computed by :func:`memkern.experiments.gradients.accounting.account_epoch` (the
algorithm: how the sums are taken, and how torchrun ranks share the chunks); rank 0 gathers the
norms and writes every file.

An epoch is complete once both files hold it; a rerun skips complete epochs. Every file is
written atomically. A run trained with ``--track-grads`` also gets ``live_summed_norms.png``
and ``live_cosine.png`` from the real training steps.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from memkern.data import PreparedData
from memkern.data.text import TextData
from memkern.errors import ConfigError, RunDirError
from memkern.experiments.gradients.accounting import account_epoch
from memkern.experiments.gradients.norms import MODES
from memkern.experiments.gradients.subset import TOTAL
from memkern.network.models.groups import LayerGroup, layer_groups
from memkern.rundir.atomic import atomic_write_text, read_jsonl
from memkern.rundir.context import open_run, resolve_device
from memkern.rundir.csv_tables import csv_text, read_checked_csv
from memkern.rundir.locks import hold_run, locked, made_folder
from memkern.rundir.ownership import require_figure_outputs, require_writable
from memkern.rundir.paths import RunDir
from memkern.rundir.progress import Progress
from memkern.training.distributed import World, joined


def per_example_path(run: RunDir, epoch: int) -> Path:
    return run.grads / f"per_example_epoch_{epoch:03d}.csv"


# The columns later steps read from summary.csv (besides the group name), with their types.
SUMMARY_COLUMNS = {"epoch": int, "group": str, "clean_norm": float, "noisy_norm": float,
                   "cosine": float}


def _live_summary(run: RunDir) -> list[dict]:
    """``grads/live.jsonl`` (``memkern train --track-grads``), each record checked to hold
    SUMMARY_COLUMNS (a number may be null: undefined, as for an empty subset)."""
    path = run.grads / "live.jsonl"
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        for name, kind in SUMMARY_COLUMNS.items():
            value = row.get(name)
            fits = (isinstance(value, str) if kind is str else
                    isinstance(value, int) if kind is int else
                    value is None or isinstance(value, (int, float)))
            if name not in row or not fits or isinstance(value, bool):
                raise RunDirError(f"{path}, record {n}: {name} is missing or not "
                                  f"{'text' if kind is str else 'a number'}; was it edited? "
                                  f"move it away (memkern train --track-grads writes it)")
    return rows


def summary_path(run: RunDir) -> Path:
    return run.grads / "summary.csv"


def _per_example_rows(norms: torch.Tensor, data: PreparedData | TextData,
                      groups: list[LayerGroup]) -> list[dict]:
    """An image example's ``label`` is its trained label; a text window's ``insert`` is the id
    of the planted insert it holds (canaries.json), -1 for plain text."""
    total = norms.square().sum(1).sqrt()
    noisy = data.noisy_mask.tolist()
    kind, values = (("insert", data.owner.tolist()) if isinstance(data, TextData)
                    else ("label", data.train_labels.tolist()))
    return [{"index": i, "noisy": int(noisy[i]), kind: values[i],
             **{g.name: f"{float(v):.6g}" for g, v in zip(groups, norms[i])},
             TOTAL: f"{float(total[i]):.6g}"} for i in range(len(values))]


def _lock(args: dict):
    """Rank 0 (or a lone process) holds the run: the other ranks write nothing in it."""
    return hold_run(args["run"]) if World.from_env().main else contextlib.nullcontext()


@locked(_lock)
def gradient_accounting(*, run: str | Path, epochs: Sequence[int] | None = None,
                        mode: str = "auto", batch_size: int = 256, device: str = "auto",
                        data_dir: str | Path | None = None, progress: bool = True) -> RunDir:
    """Write ``run/grads/`` for ``epochs`` (default: every checkpoint) and draw the figures.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments and
    computes its share of each epoch's chunks; rank 0 writes the files, equal to one
    process's. Inputs are checked before the process group is joined."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    run = RunDir(run)
    run.load_config()
    require_figure_outputs(*(run.grads / f"{prefix}{name}.png" for prefix in ("", "live_")
                             for name in ("summed_norms", "cosine")))
    require_writable(run.grads / "summary.csv")
    if epochs is None:
        epochs = run.epochs()
        if not epochs:
            raise RunDirError(f"{run.root} has no checkpoints: train it first (memkern train)")
    if not epochs:
        raise ConfigError("no epochs to account: pass --epochs such as 0,10,20")
    for e in epochs:
        run.require_checkpoint(e)
    world = World.from_env()
    place = world.place(resolve_device(device))
    ctx = open_run(run.root, epoch=epochs[0], device=place, data_dir=data_dir, text_ok=True)
    model, data = ctx.model, ctx.data
    groups = layer_groups(model)
    summary = read_checked_csv(summary_path(run), SUMMARY_COLUMNS,
                               fix="move it away and rerun memkern grads")
    done = {int(r["epoch"]) for r in summary}
    todo = [e for e in epochs if not (e in done and per_example_path(run, e).is_file())]
    with joined(world, place) as world, made_folder(run.grads):
        bar = Progress(total=len(todo), desc=f"grads {run.root.name}", unit="epoch",
                       bar=progress, silent=not world.main)
        for epoch in todo:
            ctx.load(epoch)
            result = account_epoch(model, data, groups, mode=mode, batch_size=batch_size,
                                   world=world)
            if result is not None:
                summary = _write_epoch(run, epoch, *result, data=data, groups=groups,
                                       summary=summary)
            bar.advance()
            bar.step(f"epoch {epoch} accounted ({todo.index(epoch) + 1}/{len(todo)})")
        bar.close()
    if not world.main:
        return run
    from memkern.report.figures.gradients import plot_accounting
    plot_accounting(run, summary)
    live = _live_summary(run)
    if live:
        plot_accounting(run, live, prefix="live_", source="training steps")
    return run


def _write_epoch(run: RunDir, epoch: int, norms: torch.Tensor, rows: list[dict], *,
                 data: PreparedData, groups: list[LayerGroup], summary: list[dict]) -> list[dict]:
    """Write ``epoch``'s per-example file and its rows of summary.csv; the new summary."""
    per_example = _per_example_rows(norms, data, groups)
    atomic_write_text(per_example_path(run, epoch), csv_text(per_example, list(per_example[0])))
    summary = [r for r in summary if int(r["epoch"]) != epoch]
    summary += [{"epoch": epoch, **r} for r in rows]
    summary.sort(key=lambda r: int(r["epoch"]))
    atomic_write_text(summary_path(run), csv_text(summary, list(summary[-1])))
    return summary
