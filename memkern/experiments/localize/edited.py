"""Accuracies of many edited models at once: one row mask per (edit, example) row."""
from __future__ import annotations

import torch
from torch import nn

from memkern.data import PreparedData
from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import unindexed_rows

EVAL_ROWS = 8192


@torch.no_grad()
def _hits(model, ops, space, on, images, labels, max_rows, indexed: bool) -> torch.Tensor:
    """bool ``[E, N]``: edit e's prediction on example n is right; rows = edits x a data chunk.
    ``indexed``: the rows are the training set, whose dataset indices reach the sites."""
    device = next(model.parameters()).device
    e = len(on)
    step = max(1, max_rows // e)
    out = []
    for start in range(0, len(images), step):
        x = images[start:start + step].to(device)
        n = len(x)
        set_masks(ops, space, on.repeat_interleave(n, dim=0))
        ids = torch.arange(start, start + n, device=device).repeat(e) if indexed else None
        with example_indices(ids):
            pred = model(x.repeat(e, *[1] * (x.dim() - 1))).argmax(1).view(e, n).cpu()
        out.append(pred == labels[start:start + step])
    return torch.cat(out, 1) if out else torch.zeros(e, 0, dtype=torch.bool)


def edited_accuracies(model: nn.Module, data: PreparedData, space: ChannelSpace,
                      zeroed: torch.Tensor, *, max_rows: int = EVAL_ROWS) -> list[dict[str, float]]:
    """``zeroed``: bool ``[E, space.total]`` (one edit per row) -> per edit ``clean_acc``,
    ``noisy_acc`` (against the noisy labels) and ``test_acc`` of the model with those channels
    zeroed (eval mode)."""
    if len(zeroed) == 0:
        return []
    model.eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    on = (~zeroed).to(device=device, dtype=dtype)
    with row_masks(model, space) as ops:
        train = _hits(model, ops, space, on, data.train_images.to(dtype), data.train_labels,
                      max_rows, indexed=True)
        with unindexed_rows(model):  # test examples have no tied mask of their own
            test = _hits(model, ops, space, on, data.test_images.to(dtype), data.test_labels,
                         max_rows, indexed=False)
        set_masks(ops, space, None)
    noisy = data.noisy_mask

    def mean(h: torch.Tensor) -> torch.Tensor:
        return h.float().mean(1) if h.shape[1] else torch.full((len(h),), float("nan"))

    clean_acc, noisy_acc, test_acc = mean(train[:, ~noisy]), mean(train[:, noisy]), mean(test)
    return [{"clean_acc": float(a), "noisy_acc": float(b), "test_acc": float(c)}
            for a, b, c in zip(clean_acc, noisy_acc, test_acc)]
