"""Accuracy on the paper's three sets: clean train, noisy train (against noisy labels), test.

For a model with example-tied dropout (docs/method.md, Experiment 5) the mode decides the masks:
"own" gives every training example its own tied mask; "keep" (the paper's test mode) scales
memorization channels by p_mem; "drop" removes them. Test examples have no tied mask of their
own, so in modes "train"/"own" ``test_acc`` is measured in mode "keep".
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from memkern.rundir.atomic import atomic_write_json
from memkern.data import PreparedData
from memkern.errors import ConfigError
from memkern.rundir.context import load_trained
from memkern.rundir.locks import for_checkpoint, hold_run, locked
from memkern.rundir.ownership import require_json_output
from memkern.rundir.paths import RunDir
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import has_tied_dropout, tied_dropout_mode, unindexed_rows

EVAL_BATCH = 1024
EVAL_MODES = ("own", "keep", "drop")
SPLITS = ("clean_acc", "noisy_acc", "test_acc")


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, *, indices: torch.Tensor | None = None,
                state: dict[str, torch.Tensor] | None = None, batch_size: int = EVAL_BATCH,
                on_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """argmax predictions, int64 ``[N]``; ``indices`` (dataset indices of ``images``' rows)
    reach the channel sites, so example-tied masks apply per example. ``state`` (parameter and
    buffer tensors by name, on the model's device) replaces the model's own for this call only,
    through ``torch.func.functional_call``: one model instance serves many weight settings.
    ``on_logits`` receives each chunk's logits (float ``[chunk, classes]``, rows in order)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        idx = None if indices is None else indices[start:start + batch_size].to(device)
        with example_indices(idx):
            x = images[start:start + batch_size].to(device)
            logits = model(x) if state is None else functional_call(model, state, (x,))
            if on_logits is not None:
                on_logits(logits)
            out.append(logits.argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if len(hits) else float("nan")


def split_accuracies(model: nn.Module, data: PreparedData, *,
                     state: dict[str, torch.Tensor] | None = None,
                     on_train_logits: Callable[[torch.Tensor], None] | None = None,
                     ) -> dict[str, float]:
    """``clean_acc``, ``noisy_acc`` (against the noisy labels: memorization) and ``test_acc``,
    in eval mode, of ``model`` or of ``model`` under ``state`` (see :func:`predictions`).
    Train rows carry their dataset indices; test rows carry none, so a tied dropout model whose
    masks need indices is tested in mode "keep". ``on_train_logits``: see :func:`predictions`
    (the training set's logits, in index order)."""
    model.eval()
    train_idx = torch.arange(len(data.train_labels))
    pred = predictions(model, data.train_images, indices=train_idx, state=state,
                       on_logits=on_train_logits)
    hits = pred == data.train_labels
    noisy = data.noisy_mask
    with unindexed_rows(model):
        test_pred = predictions(model, data.test_images, state=state)
    return {"clean_acc": _mean(hits[~noisy]), "noisy_acc": _mean(hits[noisy]),
            "test_acc": _mean(test_pred == data.test_labels)}


def mode_accuracies(model: nn.Module, data: PreparedData, *, mode: str,
                    on_train_logits: Callable[[torch.Tensor], None] | None = None,
                    ) -> dict[str, float]:
    """:func:`split_accuracies` with every tied dropout module in ``mode`` (one of
    ``EVAL_MODES``); a model without tied dropout takes only "own" (= plain evaluation)."""
    if mode not in EVAL_MODES:
        raise ConfigError(f"evaluation mode {mode!r} is unknown: use one of {EVAL_MODES}")
    if not has_tied_dropout(model):
        if mode != "own":
            raise ConfigError(f"mode {mode!r} needs a model trained with tied dropout (memkern "
                              f"train --tied-dropout); this one has none: use --mode own")
        return split_accuracies(model, data, on_train_logits=on_train_logits)
    with tied_dropout_mode(model, mode):
        return split_accuracies(model, data, on_train_logits=on_train_logits)


def epoch_accuracies(model: nn.Module, data: PreparedData, *,
                     on_train_logits: Callable[[torch.Tensor], None] | None = None,
                     ) -> dict[str, float]:
    """The accuracies of one ``metrics.jsonl`` line: :func:`split_accuracies` in mode "own"
    and, for a tied dropout model, also ``{clean,noisy,test}_acc_{keep,drop}``.
    ``on_train_logits`` sees the mode "own" pass over the training set (training dynamics)."""
    out = mode_accuracies(model, data, mode="own", on_train_logits=on_train_logits)
    if has_tied_dropout(model):
        for mode in ("keep", "drop"):
            out.update({f"{k}_{mode}": v for k, v in mode_accuracies(model, data, mode=mode).items()})
    return out


@locked(lambda a: for_checkpoint(
    a["ckpt"], lambda: hold_run(RunDir.of_checkpoint(a["ckpt"]).root)))
def evaluate_checkpoint(*, ckpt: str | Path, mode: str, device: str = "auto",
                        data_dir: str | Path | None = None) -> tuple[dict, Path]:
    """Accuracies of checkpoint ``ckpt`` in ``mode``, written atomically to
    ``<run>/evaluate_<epoch>_<mode>.json``; returns (the record, its path).

    The record: ``checkpoint``, ``epoch``, ``mode``, ``tied_dropout`` and the three accuracies of
    :func:`mode_accuracies`. The masks come from the checkpoint's config alone.
    """
    if mode not in EVAL_MODES:
        raise ConfigError(f"evaluation mode {mode!r} is unknown: use one of {EVAL_MODES}")
    trained = load_trained(ckpt, device=device, data_dir=data_dir)
    path = RunDir.of_checkpoint(trained.checkpoint.path).evaluation_path(
        trained.checkpoint.epoch, mode)
    require_json_output(path, keys=("checkpoint", "epoch", "mode"),
                        what="a memkern evaluation record")
    record = {"checkpoint": str(trained.checkpoint.path), "epoch": trained.checkpoint.epoch,
              "mode": mode, "tied_dropout": trained.checkpoint.config.tied_dropout,
              **mode_accuracies(trained.model, trained.data, mode=mode)}
    atomic_write_json(path, record)
    return record, path
