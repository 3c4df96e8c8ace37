"""memkern's greedy localization (docs/text.md, "Localizing a sequence") as a ranking: the
neurons greedy zeroed for the target come first, in the order it zeroed them; every other
channel follows by the objective's gradient score at the unedited model (dL/dm at m = 1, the
score greedy's first step picks by), so a top-k larger than greedy's set is still greedy's own
order of preference.

The reference rows are the ``clean`` windows given. They carry no dataset index of their own,
so a model with example-tied dropout is refused: localize a tied run with ``memkern localize``,
which runs every reference window under its own mask.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.localize.greedy import frozen, greedy_localize
from memkern.experiments.text.objective import TextObjective, rows_per_pass
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import has_tied_dropout

MAX_CHANNELS = 50  # localize's default cap


def _first_scores(model, objective: TextObjective, space: ChannelSpace,
                  ids: torch.Tensor) -> torch.Tensor:
    """float64 ``[T, total]``: dL/dm at m = 1 for each target, one pass per target."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out = []
    with frozen(model), row_masks(model, space) as ops, torch.enable_grad():
        for t in ids:
            x = objective.inputs(t[None]).to(device)
            m = torch.ones(1, space.total, dtype=dtype, device=device, requires_grad=True)
            set_masks(ops, space, m.expand(len(x), -1))
            with example_indices(objective.ids(t[None]).to(device)):
                loss, _ = objective(model(x)[None], t[None])
            out.append(torch.autograd.grad(loss.sum(), m)[0][0].double().cpu())
        set_masks(ops, space, None)
    return torch.stack(out) if out else torch.zeros(0, space.total, dtype=torch.float64)


@torch.enable_grad()
def rank(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, clean: torch.Tensor,
         *, seed: int = 0, max_channels: int = MAX_CHANNELS) -> torch.Tensor:
    """float ``[T, space.total]``; ``seed`` is unused (greedy is deterministic)."""
    if has_tied_dropout(model):
        raise ConfigError("the greedy method of the benchmark takes models without tied "
                          "dropout; localize a tied run with memkern localize")
    if max_channels < 1:
        raise ConfigError(f"max_channels must be at least 1, got {max_channels}")
    model.eval()
    objective = TextObjective(targets, clean, torch.arange(len(clean)))
    ids = torch.tensor(targets.ids, dtype=torch.long)
    scores = _first_scores(model, objective, space, ids)
    results = greedy_localize(model, objective, ids, space=space, max_channels=max_channels,
                              max_rows=rows_per_pass(clean.shape[1] - 1))
    # Below every zeroed channel, whatever the gradients' scale.
    top = scores.abs().max() + 1.0 if scores.numel() else torch.tensor(1.0)
    for row, res in zip(scores, results):
        for k, (site, c) in enumerate(res.channels):
            row[space.flat(site, c)] = top + len(res.channels) - k
    return scores
