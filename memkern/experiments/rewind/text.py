"""Layer rewinding of a text run (docs/text.md, "Rewinding and retraining"), as an algorithm: the
final GPT with one layer group's parameters taken from an earlier checkpoint, measured by the
text measures of a metrics.jsonl line (held-out bits per byte, extraction and exposure of the
canaries by reps group, paragraph suffix accuracy). No files, locks or progress:
:mod:`memkern.experiments.rewind.run` owns the run directory.

The text measures call the model directly (greedy decoding, best-first rank search), not through
``functional_call``: each configuration is loaded into the model, and the final weights are put
back before returning.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from memkern.data.text import TextData
from memkern.experiments.rewind.algorithm import BASELINE, with_group_from
from memkern.network.models.groups import LayerGroup
from memkern.training.text_evaluate import EPOCH_CANDIDATES, text_epoch_metrics


def rewind_text_measures(model: nn.Module, data: TextData, *,
                         states: Iterable[tuple[int, dict[str, torch.Tensor]]],
                         groups: list[LayerGroup], final_epoch: int,
                         max_candidates: int = EPOCH_CANDIDATES,
                         on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Text measures of ``model`` (holding the final weights, on its device) with each of
    ``groups`` rewound to each of ``states`` (``(epoch, state dict on the model's device)``
    pairs, taken one at a time). Returns the baseline ``{"group": "final", "epoch":
    final_epoch, **measures}`` first, then one such row per (epoch, group), grouped by epoch;
    ``on_row`` sees each rewound row as it is made. The model holds the final weights again
    when this returns (or raises)."""
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def measured(group: str, epoch: int) -> dict:
        return {"group": group, "epoch": epoch,
                **text_epoch_metrics(model, data, max_candidates=max_candidates)}

    rows = [measured(BASELINE, final_epoch)]
    try:
        for epoch, earlier in states:
            for group in groups:
                model.load_state_dict(with_group_from(final, earlier, [group]))
                rows.append(measured(group.name, epoch))
                if on_row is not None:
                    on_row(rows[-1])
    finally:
        model.load_state_dict(final)
        model.eval()
    return rows
