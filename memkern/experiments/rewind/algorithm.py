"""Layer rewinding (docs/method.md, Experiment 2), as an algorithm: the final model with one layer
group's parameters *and* BatchNorm running statistics taken from an earlier state, evaluated on
the paper's three sets. No files, locks or progress: :mod:`memkern.experiments.rewind.run` owns
the run directory.

(The reference code rewinds weights but keeps the final running statistics; here a group's
buffers travel with its parameters.) Every configuration is evaluated through
``torch.func.functional_call`` on one model instance with a swapped tensor dict: no model copy.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from memkern.data import PreparedData
from memkern.errors import ConfigError
from memkern.network.models.groups import LayerGroup, layer_groups
from memkern.training.evaluate import split_accuracies

BASELINE = "final"  # the ``group`` of the row for the unchanged final model


def select_groups(model: nn.Module, names: list[str] | tuple[str, ...] | None) -> list[LayerGroup]:
    """The model's groups named in ``names`` (all when None or empty), in forward order."""
    groups = layer_groups(model)
    if not names:
        return groups
    known = {g.name for g in groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown layer group(s) {', '.join(unknown)}; this model's groups are "
                          f"{', '.join(g.name for g in groups)} (see `memkern sites`)")
    return [g for g in groups if g.name in names]


def with_group_from(state: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                    groups: list[LayerGroup]) -> dict[str, torch.Tensor]:
    """A shallow copy of ``state`` whose ``groups``' parameters and buffers come from ``source``
    (tensors are shared, not cloned)."""
    out = dict(state)
    for group in groups:
        for name in group.param_names + group.buffer_names:
            out[name] = source[name]
    return out


def default_epochs(available: list[int]) -> list[int]:
    """Epoch 0 and about every 10% of the run: for each target the nearest checkpoint before
    the final one (rewinding to the final epoch changes nothing)."""
    final = available[-1]
    earlier = [e for e in available if e < final]
    if not earlier:
        return []
    targets = [round(final * k / 10) for k in range(10)]
    return sorted({min(earlier, key=lambda e: (abs(e - t), e)) for t in targets})


def rewind_accuracies(model: nn.Module, data: PreparedData, *,
                      states: Iterable[tuple[int, dict[str, torch.Tensor]]],
                      groups: list[LayerGroup], final_epoch: int,
                      on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Accuracies of ``model`` (holding the final weights, on its device) with each of ``groups``
    rewound to each of ``states`` (``(epoch, state dict on the model's device)`` pairs, taken one
    at a time: a generator loads each only when needed). Rows of ``data`` carry their position
    as dataset index (tied-dropout masks). Returns the baseline ``{"group": "final", "epoch":
    final_epoch, "clean_acc", "noisy_acc", "test_acc"}`` first, then one such row per
    (epoch, group), grouped by epoch; ``on_row`` sees each rewound row as it is made."""
    final = {k: v.detach() for k, v in model.state_dict().items()}
    # One functional_call per configuration beats vmap over stacked dicts on CPU, where batched
    # weights turn each conv into a grouped conv, and a deep copy per configuration
    # (bench/bench_rewind.py; numbers in bench/README.md, "Measured choices in the code").
    rows = [{"group": BASELINE, "epoch": final_epoch, **split_accuracies(model, data)}]
    for epoch, earlier in states:
        for group in groups:
            state = with_group_from(final, earlier, [group])
            rows.append({"group": group.name, "epoch": epoch,
                         **split_accuracies(model, data, state=state)})
            if on_row is not None:
                on_row(rows[-1])
    return rows
