"""Gradient accounting over a run's checkpoints (``memkern grads``; docs/method.md,
Experiment 1).

Per chosen epoch, with the checkpoint in eval mode (the same model the per-example norms see;
a tied-dropout run's rows carry their dataset indices, so each example keeps its own mask):

- ``grads/per_example_epoch_NNN.csv``: every training example's per-group gradient norm
  (``index, noisy, label, <group>..., total``; ``label`` is the trained, possibly noisy label),
  so examples can be ranked by suspected memorization;
- ``grads/summary.csv``: one row per epoch x group (and ``total``): the norms of the summed
  clean and noisy gradients and their cosine, and clean vs noisy per-example norm statistics.

The summed gradients take the whole training set as the batch: loss terms
``(1/N) sum_clean CE`` and ``(1/N) sum_noisy CE``, accumulated over chunks in float64, so
clean + noisy is the full-data mean-loss gradient.

Under torchrun the chunks are dealt round-robin to the ranks: each chunk is computed exactly as
one process computes it (the same rows together), so per-example norms are bit-identical, and
the float64 partial sums are added over ranks (equal to one process up to float64 rounding).
Rank 0 gathers the norms and writes every file.

An epoch is complete once both files hold it; a rerun skips complete epochs. Every file is written atomically. A run trained with ``--track-grads`` also
gets ``live_summed_norms.png`` and ``live_cosine.png`` from the real training steps.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from memkern.rundir.atomic import atomic_write_text, read_jsonl
from memkern.data import PreparedData, iterate_batches
from memkern.training.distributed import World, joined
from memkern.errors import ConfigError, RunDirError
from memkern.rundir.context import open_run, resolve_device
from memkern.experiments.gradients.norms import MODES, per_example_grad_norms
from memkern.rundir.locks import hold_run, locked, made_folder
from memkern.rundir.ownership import require_figure_outputs, require_writable
from memkern.rundir.progress import Progress
from memkern.network.models.groups import LayerGroup, layer_groups
from memkern.rundir.paths import RunDir
from memkern.network.sites import example_indices
from memkern.experiments.gradients.subset import TOTAL, subset_gradients, subset_stats
from memkern.rundir.csv_tables import csv_text, read_csv

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def per_example_path(run: RunDir, epoch: int) -> Path:
    return run.grads / f"per_example_epoch_{epoch:03d}.csv"


def summary_path(run: RunDir) -> Path:
    return run.grads / "summary.csv"


def _norm_stats(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean and quantiles of per-example norms (nan for an empty subset)."""
    if len(values) == 0:
        return {f"{prefix}_mean": float("nan"),
                **{f"{prefix}_q{round(q * 100):02d}": float("nan") for q in QUANTILES}}
    qs = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"{prefix}_mean": float(values.double().mean()),
            **{f"{prefix}_q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs)}}


def account_epoch(model: torch.nn.Module, data: PreparedData, groups: list[LayerGroup], *,
                  mode: str, batch_size: int, world: World = World()
                  ) -> tuple[torch.Tensor, list[dict]] | None:
    """Per-example norms float ``[N, G]`` of the training set and the epoch's summary rows; on
    ranks other than 0 of a torchrun world (which compute their chunks and return) None."""
    device = next(model.parameters()).device
    noisy_mask = data.noisy_mask
    n = len(data.train_labels)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    clean_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    noisy_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    norms, rows_of = [], []
    batches = iterate_batches(data.train_images, data.train_labels, batch_size)
    for i, (x, y, idx) in enumerate(batches):
        if i % world.size != world.rank:
            continue
        x, y, noisy, idx = x.to(device), y.to(device), noisy_mask[idx].to(device), idx.to(device)
        norms.append(per_example_grad_norms(model, x, y, ids=idx, mode=mode, groups=groups).cpu())
        rows_of.append(idx.cpu())
        with example_indices(idx):
            logits = model(x)
        for total, part in ((noisy_sum, noisy), (clean_sum, ~noisy)):
            for k, g in subset_gradients(model, logits, y, part, 1.0 / n,
                                         retain_graph=True).items():
                total[k] += g
    norms = torch.cat(norms) if norms else torch.zeros(0, len(groups))
    if world.size > 1:
        mine = torch.cat(rows_of) if rows_of else torch.zeros(0, dtype=torch.long)
        norms = _gather_rows(norms, mine, n, world)
        _sum_over_ranks([*clean_sum.values(), *noisy_sum.values()], world)
        if not world.main:
            return None
    rows = subset_stats(clean_sum, noisy_sum, groups)
    columns = [*(norms[:, i] for i in range(len(groups))), norms.square().sum(1).sqrt()]
    for row, col in zip(rows, columns):
        row.update(_norm_stats(col[~noisy_mask], "clean"))
        row.update(_norm_stats(col[noisy_mask], "noisy"))
    return norms, rows


def _gather_rows(values: torch.Tensor, rows: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """Rank 0's ``[n, ...]`` tensor holding every rank's ``values`` at their ``rows``."""
    parts = [None] * world.size if world.main else None
    with world.peers():
        dist.gather_object((rows, values), parts, dst=0)
    if not world.main:
        return values
    out = torch.empty((n, *values.shape[1:]), dtype=values.dtype)
    for r, v in parts:
        out[r] = v
    return out


def _sum_over_ranks(tensors: list[torch.Tensor], world: World) -> None:
    """Sum each tensor over ranks, in place (one collective)."""
    flat = torch.cat([t.flatten() for t in tensors])
    with world.peers():
        dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _per_example_rows(norms: torch.Tensor, data: PreparedData,
                      groups: list[LayerGroup]) -> list[dict]:
    total = norms.square().sum(1).sqrt()
    noisy = data.noisy_mask.tolist()
    labels = data.train_labels.tolist()
    return [{"index": i, "noisy": int(noisy[i]), "label": labels[i],
             **{g.name: f"{float(v):.6g}" for g, v in zip(groups, norms[i])},
             TOTAL: f"{float(total[i]):.6g}"} for i in range(len(labels))]


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
    ctx = open_run(run.root, epoch=epochs[0], device=place, data_dir=data_dir)
    model, data = ctx.model, ctx.data
    groups = layer_groups(model)
    summary = read_csv(summary_path(run))
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
    live = read_jsonl(run.grads / "live.jsonl")
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
