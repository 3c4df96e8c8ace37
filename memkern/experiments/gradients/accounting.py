"""Gradient accounting of one model state (docs/method.md, Experiment 1), as an algorithm:
every training example's per-group gradient norm, and the summed gradients of the clean and the
noisy loss terms with their norms and cosine. No files, locks or progress:
:mod:`memkern.experiments.gradients.run` owns the run directory.

The summed gradients take the whole training set as the batch: loss terms
``(1/N) sum_clean loss`` and ``(1/N) sum_noisy loss`` (a text window's loss: its mean
next-byte NLL; its noisy split: the windows that hold a planted canary or paragraph copy),
accumulated over chunks in float64, so clean + noisy is the full-data mean-loss gradient.

Under torchrun the chunks are dealt round-robin to the ranks: each chunk is computed exactly as
one process computes it (the same rows together), so per-example norms are bit-identical, and
the float64 partial sums are added over ranks (equal to one process up to float64 rounding).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from memkern.data import PreparedData, iterate_batches
from memkern.data.text import TextData
from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.experiments.gradients.subset import subset_gradients, subset_stats
from memkern.network.models.groups import LayerGroup
from memkern.network.sites import example_indices
from memkern.training.distributed import World

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _norm_stats(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean and quantiles of per-example norms (nan for an empty subset)."""
    if len(values) == 0:
        return {f"{prefix}_mean": float("nan"),
                **{f"{prefix}_q{round(q * 100):02d}": float("nan") for q in QUANTILES}}
    qs = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"{prefix}_mean": float(values.double().mean()),
            **{f"{prefix}_q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs)}}


def account_epoch(model: torch.nn.Module, data: PreparedData | TextData,
                  groups: list[LayerGroup], *, mode: str, batch_size: int, world: World = World()
                  ) -> tuple[torch.Tensor, list[dict]] | None:
    """Gradient accounting of ``model`` as it is (its current weights: load a state to account
    it; eval mode for the paper's setup) on ``data``'s training set, in chunks of
    ``batch_size`` rows keyed by their dataset indices (tied-dropout masks; a text run's rows
    by its mask keys, every copy of an insert alike). A text window's loss is its mean
    next-byte NLL and its noisy split the windows holding a planted copy (``data.noisy_mask``).

    Returns the per-example norms float ``[N, G]`` (``G = len(groups)``; ``mode``: see
    :func:`memkern.experiments.gradients.norms.per_example_grad_norms`) and one summary row per
    group and one for all of them: ``group, clean_norm, noisy_norm, cosine`` and the mean and
    quantiles of the clean and the noisy per-example norms. On ranks other than 0 of a
    torchrun ``world`` (which compute their chunks and return) None."""
    device = next(model.parameters()).device
    noisy_mask = data.noisy_mask
    n = len(data.train_labels)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    clean_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    noisy_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    norms, rows_of = [], []
    # Tied-dropout keys of the rows: dataset indices, or a text run's mask keys (one per insert)
    keys = data.mask_keys if isinstance(data, TextData) else torch.arange(n)
    batches = iterate_batches(data.train_images, data.train_labels, batch_size)
    for i, (x, y, idx) in enumerate(batches):
        if i % world.size != world.rank:
            continue
        x, y, noisy = x.to(device), y.to(device), noisy_mask[idx].to(device)
        key = keys[idx].to(device)
        norms.append(per_example_grad_norms(model, x, y, ids=key, mode=mode, groups=groups).cpu())
        rows_of.append(idx.cpu())
        with example_indices(key):
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
