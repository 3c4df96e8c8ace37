"""Accuracy on the paper's three sets: clean train, noisy train (against noisy labels), test."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from memkern.data import PreparedData
from memkern.sites import example_indices

EVAL_BATCH = 1024


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, *, indices: torch.Tensor | None = None,
                state: dict[str, torch.Tensor] | None = None,
                batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """argmax predictions, int64 ``[N]``; ``indices`` (dataset indices of ``images``' rows)
    reach the channel sites, so example-tied masks apply per example. ``state`` (parameter and
    buffer tensors by name, on the model's device) replaces the model's own for this call only,
    through ``torch.func.functional_call``: one model instance serves many weight settings."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        idx = None if indices is None else indices[start:start + batch_size].to(device)
        with example_indices(idx):
            x = images[start:start + batch_size].to(device)
            logits = model(x) if state is None else functional_call(model, state, (x,))
            out.append(logits.argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if len(hits) else float("nan")


def split_accuracies(model: nn.Module, data: PreparedData, *,
                     state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """``clean_acc``, ``noisy_acc`` (against the noisy labels: memorization) and ``test_acc``,
    in eval mode, of ``model`` or of ``model`` under ``state`` (see :func:`predictions`).
    Train rows carry their dataset indices; test rows carry none."""
    model.eval()
    train_idx = torch.arange(len(data.train_labels))
    pred = predictions(model, data.train_images, indices=train_idx, state=state)
    hits = pred == data.train_labels
    noisy = data.noisy_mask
    test_pred = predictions(model, data.test_images, state=state)
    return {"clean_acc": _mean(hits[~noisy]), "noisy_acc": _mean(hits[noisy]),
            "test_acc": _mean(test_pred == data.test_labels)}
