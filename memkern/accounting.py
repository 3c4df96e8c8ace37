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
``(1/N) sum_clean CE`` and ``(1/N) sum_noisy CE``, accumulated over chunks, so clean + noisy is
the full-data mean-loss gradient. An epoch is complete once both files hold it; a rerun skips
complete epochs. Every file is written atomically. A run trained with ``--track-grads`` also
gets ``live_summed_norms.png`` and ``live_cosine.png`` from the real training steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from memkern.atomic import atomic_write_text, read_jsonl
from memkern.data import PreparedData, iterate_batches
from memkern.errors import ConfigError, RunDirError
from memkern.experiment import open_run
from memkern.gradnorms import MODES, per_example_grad_norms
from memkern.locks import hold_run, locked
from memkern.progress import Progress
from memkern.models.groups import LayerGroup, layer_groups
from memkern.runs import RunDir
from memkern.sites import example_indices
from memkern.subset_grads import TOTAL, subset_gradients, subset_stats
from memkern.tables import csv_text, read_csv

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
                  mode: str, batch_size: int) -> tuple[torch.Tensor, list[dict]]:
    """Per-example norms float ``[N, G]`` of the training set and the epoch's summary rows."""
    device = next(model.parameters()).device
    noisy_mask = data.noisy_mask
    n = len(data.train_labels)
    clean_sum = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
    noisy_sum = {k: torch.zeros_like(p) for k, p in clean_sum.items()}
    norms = []
    for x, y, idx in iterate_batches(data.train_images, data.train_labels, batch_size):
        x, y, noisy, idx = x.to(device), y.to(device), noisy_mask[idx].to(device), idx.to(device)
        norms.append(per_example_grad_norms(model, x, y, ids=idx, mode=mode, groups=groups).cpu())
        with example_indices(idx):
            logits = model(x)
        for total, part in ((noisy_sum, noisy), (clean_sum, ~noisy)):
            for k, g in subset_gradients(model, logits, y, part, 1.0 / n,
                                         retain_graph=True).items():
                total[k] += g
    norms = torch.cat(norms)
    rows = subset_stats(clean_sum, noisy_sum, groups)
    columns = [*(norms[:, i] for i in range(len(groups))), norms.square().sum(1).sqrt()]
    for row, col in zip(rows, columns):
        row.update(_norm_stats(col[~noisy_mask], "clean"))
        row.update(_norm_stats(col[noisy_mask], "noisy"))
    return norms, rows


def _per_example_rows(norms: torch.Tensor, data: PreparedData,
                      groups: list[LayerGroup]) -> list[dict]:
    total = norms.square().sum(1).sqrt()
    noisy = data.noisy_mask.tolist()
    labels = data.train_labels.tolist()
    return [{"index": i, "noisy": int(noisy[i]), "label": labels[i],
             **{g.name: f"{float(v):.6g}" for g, v in zip(groups, norms[i])},
             TOTAL: f"{float(total[i]):.6g}"} for i in range(len(labels))]


@locked(lambda a: hold_run(a["run"]))
def gradient_accounting(*, run: str | Path, epochs: Sequence[int] | None = None,
                        mode: str = "auto", batch_size: int = 256, device: str = "auto",
                        data_dir: str | Path | None = None, progress: bool = True) -> RunDir:
    """Write ``run/grads/`` for ``epochs`` (default: every checkpoint) and draw the figures."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    run = RunDir(run)
    run.load_config()
    if epochs is None:
        epochs = run.epochs()
        if not epochs:
            raise RunDirError(f"{run.root} has no checkpoints: train it first (memkern train)")
    if not epochs:
        raise ConfigError("no epochs to account: pass --epochs such as 0,10,20")
    for e in epochs:
        run.require_checkpoint(e)
    ctx = open_run(run.root, epoch=epochs[0], device=device, data_dir=data_dir)
    model, data = ctx.model, ctx.data
    groups = layer_groups(model)
    summary = read_csv(summary_path(run))
    done = {int(r["epoch"]) for r in summary}
    todo = [e for e in epochs if not (e in done and per_example_path(run, e).is_file())]
    bar = Progress(total=len(todo), desc=f"grads {run.root.name}", unit="epoch", bar=progress)
    for epoch in todo:
        ctx.load(epoch)
        norms, rows = account_epoch(model, data, groups, mode=mode, batch_size=batch_size)
        per_example = _per_example_rows(norms, data, groups)
        atomic_write_text(per_example_path(run, epoch),
                          csv_text(per_example, list(per_example[0])))
        summary = [r for r in summary if int(r["epoch"]) != epoch]
        summary += [{"epoch": epoch, **r} for r in rows]
        summary.sort(key=lambda r: int(r["epoch"]))
        atomic_write_text(summary_path(run), csv_text(summary, list(summary[-1])))
        bar.advance()
        bar.step(f"epoch {epoch} accounted ({todo.index(epoch) + 1}/{len(todo)})")
    bar.close()
    from memkern.accounting_plots import plot_accounting
    plot_accounting(run, summary)
    live = read_jsonl(run.grads / "live.jsonl")
    if live:
        plot_accounting(run, live, prefix="live_", source="training steps")
    return run
