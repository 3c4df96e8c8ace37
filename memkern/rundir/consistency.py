"""Cross-checks between a run's files that hold without a manifest: config.json against a
checkpoint's embedded config, and noise.json against the label noise the config rebuilds. A
disagreement is one line naming both files; nothing is used as it is."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from memkern.errors import RunDirError
from memkern.training.checkpoints import Checkpoint
from memkern.training.config import TrainConfig


def _extendable(config: TrainConfig) -> bool:
    """Only a run with a constant schedule is ever extended to more epochs (train's
    check_extension: a cosine decay spans all epochs), so only then may checkpoints carry
    fewer epochs than config.json."""
    return config.lr_schedule == "constant"


def check_config_agrees(config: TrainConfig, ckpt: Checkpoint, *, config_path: Path) -> None:
    """RunDirError naming the fields where ``config_path``'s ``config`` and the checkpoint's
    embedded one differ (``epochs`` may be larger in config.json for an extended run), or when
    the checkpoint's epoch lies beyond the run's epochs."""
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(ckpt.config)
    differing = [k for k in ours if k != "epochs" and ours[k] != theirs[k]]
    if config.epochs != ckpt.config.epochs and not (
            _extendable(config) and ckpt.config.epochs < config.epochs):
        differing.append("epochs")
    if differing:
        k = differing[0]
        raise RunDirError(f"{config_path} and {ckpt.path} disagree on {', '.join(differing)} "
                          f"({k}: {ours[k]!r} vs {theirs[k]!r}): one of them was edited or comes "
                          f"from another run; restore it")
    if ckpt.epoch > config.epochs:
        raise RunDirError(f"{ckpt.path} is epoch {ckpt.epoch}, beyond the {config.epochs} epochs "
                          f"of {config_path}: one of them was edited; restore it")


def check_noise_agrees(noise: dict, noisy_indices: torch.Tensor, num_train: int, *,
                       noise_path: Path) -> None:
    """RunDirError unless ``noise.json`` (``noise``) lists the noisy examples of the data the
    run's config rebuilds (``noisy_indices`` of ``num_train`` examples)."""
    listed, flipped = noise["noisy_indices"], noisy_indices.tolist()
    if noise["num_train"] == num_train and listed == flipped:
        return
    if noise["num_train"] != num_train or len(listed) != len(flipped):
        what = (f"lists {len(listed)} noisy of {noise['num_train']} examples, but the run's "
                f"config flips {len(flipped)} of {num_train}")
    else:
        i = next(i for i, (a, b) in enumerate(zip(listed, flipped)) if a != b)
        what = (f"lists example {listed[i]} as noisy where the run's config flips "
                f"{flipped[i]}")
    raise RunDirError(f"{noise_path} {what}: the file was edited or comes from another run; "
                      f"restore it")
