"""Per-window memorization signals of a text run (docs/scores.md, "Text runs").

Each training window is scored from what the model predicted for its bytes at every epoch's
checkpoint (teacher forcing): its mean next-byte loss, mean margin (the true byte's logit minus
the largest other) and byte accuracy. These form the same dynamics as an image run's, so the
image signals (:func:`memkern.experiments.scores.signals.dynamics_signals`) apply per window,
with "correct" = learned (byte accuracy at least :data:`LEARNED_ACCURACY`), and with the
directions of :data:`TEXT_DIRECTION`. A tied-dropout model adds ``tied_gap``:
the window's loss with the memorization neurons kept minus under its own mask.
No files: tensors in, arrays out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memkern.training.dynamics import Dynamics
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import tied_dropout_mode

# Which way points at a memorized window. A planted text the model has by heart is predicted
# *better* than ordinary text, so the loss-like signals point the other way from an image run's,
# where a memorized (flipped) label is fitted late and with a high loss.
TEXT_DIRECTION = {"aum": +1, "forgetting_events": -1, "learned_epoch": -1, "confidence": +1,
                  "variability": +1, "final_loss": -1, "tied_gap": +1, "channels_to_flip": -1,
                  "grad": -1, "memorization_score": +1}
LEARNED_ACCURACY = 0.5  # a window counts as learned when the model predicts half its bytes
ROWS = 64


@dataclass(frozen=True)
class WindowStats:
    """float64 ``[W]`` each: mean NLL (nats), mean margin, byte accuracy."""

    nll: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor


@torch.no_grad()
def window_stats(model: nn.Module, windows: torch.Tensor, keys: torch.Tensor | None, *,
                 rows: int = ROWS) -> WindowStats:
    """What ``model`` predicts for each uint8 ``[W, T + 1]`` window, its rows carrying
    ``keys`` (tied-dropout keys, int64 ``[W]``) when given."""
    device = next(model.parameters()).device
    nll, margin, acc = [], [], []
    for start in range(0, len(windows), rows):
        w = windows[start:start + rows].to(device).long()
        with example_indices(None if keys is None else keys[start:start + rows].to(device)):
            logits = model(w[:, :-1]).double()
        y = w[:, 1:]
        nll.append(F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1).cpu())
        true = logits.gather(-1, y[..., None]).squeeze(-1)
        other = logits.scatter(-1, y[..., None], float("-inf")).amax(-1)
        margin.append((true - other).mean(1).cpu())
        acc.append((logits.argmax(-1) == y).double().mean(1).cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    return WindowStats(*(torch.cat(v) if v else empty for v in (nll, margin, acc)))


def window_dynamics(per_epoch: list[WindowStats], epochs: list[int]) -> Dynamics:
    """The windows' stats at ``epochs`` (ascending) as the dynamics of an image run: margin and
    loss per epoch, "correct" = learned (:data:`LEARNED_ACCURACY`)."""
    return Dynamics(epochs=torch.tensor(epochs, dtype=torch.long),
                    margin=torch.stack([s.margin for s in per_epoch]),
                    loss=torch.stack([s.nll for s in per_epoch]),
                    correct=torch.stack([s.accuracy for s in per_epoch]) >= LEARNED_ACCURACY)


def tied_gap(model: nn.Module, windows: torch.Tensor, keys: torch.Tensor) -> np.ndarray:
    """Loss with the memorization neurons kept (x p_mem) minus under the window's own mask."""
    with tied_dropout_mode(model, "own"):
        own = window_stats(model, windows, keys).nll
    with tied_dropout_mode(model, "keep"):
        kept = window_stats(model, windows, None).nll
    return (kept - own).numpy()
