"""Data-parallel training under ``torchrun``: every rank holds the whole model and trains on its
shard of each global batch; DistributedDataParallel sums the gradients.

A world of w processes takes the same steps as one process with the same global batch:

- the epoch order is the one global permutation of (seed, epoch), augmentation included, and
  rank r takes the r-th contiguous slice of every global batch with the rows' dataset indices,
  so example-tied dropout masks are those of one process;
- each rank's loss is ``w * sum(CE over its rows) / global batch rows``, which DDP's average of
  the w gradients turns into the global batch's mean-loss gradient, shards of unequal size
  (the last batch) included;
- BatchNorm in training mode normalizes with the statistics of the whole global batch:
  per-channel sums of x and x^2 (float64) and the row count are summed over ranks by one
  differentiable all-reduce per BatchNorm layer, so forward, backward and the running
  statistics are one process's up to summation order (plain DDP would normalize each shard
  by its own statistics and drift from a one-process run).

One process (world size 1) runs none of this: training is bit-identical to a run without it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from memkern.training.distributed import World
from memkern.errors import ConfigError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_shards(*, rows: int, batch_size: int, world: World) -> None:
    """Every rank gets at least one row of every global batch (the last one included)."""
    if world.size == 1:
        return
    last = rows % batch_size or batch_size
    if min(batch_size, last) < world.size:
        raise ConfigError(f"a global batch of {min(batch_size, last)} rows (batch size "
                          f"{batch_size}, {rows} training examples) cannot give each of "
                          f"{world.size} ranks a row: choose a batch size whose batches, the "
                          f"last included, hold at least {world.size} rows, or fewer ranks")


def shard(rows: int, world: World) -> slice:
    """Rank ``world.rank``'s contiguous slice of a global batch of ``rows`` rows."""
    bounds = torch.arange(rows).tensor_split(world.size)[world.rank]
    return slice(int(bounds[0]), int(bounds[-1]) + 1)


def step_loss(logits: torch.Tensor, targets: torch.Tensor, *, global_rows: int,
              world: World) -> tuple[torch.Tensor, float]:
    """(loss to back-propagate, summed CE of this rank's rows).

    One process: the mean CE, as always. w ranks: ``w * sum CE / global_rows``, so DDP's
    gradient average is the global batch's mean-loss gradient."""
    if world.size == 1:
        loss = F.cross_entropy(logits, targets)
        return loss, float(loss.detach()) * len(targets)
    total = F.cross_entropy(logits, targets, reduction="sum")
    return total * (world.size / global_rows), float(total.detach())


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the incoming gradients over ranks too: each rank's
    rows then get the gradient of every rank's loss through the shared statistics."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with the batch statistics of every rank's rows (training mode)."""
    dims = [0, *range(2, x.ndim)]
    channels = x.shape[1]
    count = torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)
    local = torch.cat([x.sum(dims, dtype=torch.float64),
                       x.square().sum(dims, dtype=torch.float64), count])
    total = _SumOverRanks.apply(local)
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels:2 * channels] / n - mean.square()).clamp_min(0)
    shape = (1, channels) + (1,) * (x.ndim - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + bn.eps).to(x.dtype).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                      else bn.momentum)
            unbiased = var * (n / (n - 1).clamp_min(1))
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype),
                                                 alpha=factor)
    return y


@contextmanager
def _batch_norm_over_ranks(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm of ``model`` uses the global batch's statistics in training mode (its
    own forward in eval mode) during the block."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    for bn in norms:
        own = bn.forward
        bn.forward = (lambda x, bn=bn, own=own:
                      _global_batch_norm(bn, x) if bn.training else own(x))
    try:
        yield
    finally:
        for bn in norms:
            del bn.forward  # the class's forward again


@contextmanager
def replicated(model: nn.Module, world: World) -> Iterator[nn.Module]:
    """The module to call in the training loop: ``model`` itself for one process; for several,
    ``model`` wrapped in DistributedDataParallel (rank 0's weights broadcast, gradients
    averaged) with BatchNorm over the global batch. Checkpoint ``model``, not the wrapper."""
    if world.size == 1:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (BatchNorm running statistics) are computed identically on every rank, so
    # syncing rank 0's before each forward would only add a collective.
    devices = [world.device] if world.device.type == "cuda" else None
    with _batch_norm_over_ranks(model):
        yield DistributedDataParallel(model, device_ids=devices, forward_sync_buffers=False)
