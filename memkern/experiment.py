"""Rebuild what a config describes: its data (with the same label noise) and its model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memkern.checkpoints import Checkpoint, load_checkpoint, load_model_state
from memkern.config import TrainConfig
from memkern.data import PreparedData, load_dataset, prepare
from memkern.models import build_model
from memkern.tied_dropout import attach_tied_dropout


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_data(config: TrainConfig, *, data_dir: str | Path | None = None,
              download: bool = False) -> PreparedData:
    """The config's dataset with its exact label noise; ``data_dir`` overrides the config's."""
    raw = load_dataset(config.dataset, data_dir=data_dir or config.data_dir, download=download)
    return prepare(raw, noise_rate=config.noise, seed=config.seed)


def model_for(config: TrainConfig, data: PreparedData) -> nn.Module:
    """The config's model for ``data``; with ``config.tied_dropout``, example-tied dropout (mode
    "train", seeded by ``config.seed``) at ``config.dropout_sites`` or the model's default sites,
    so a checkpoint's config alone rebuilds the exact masks."""
    model = build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, norm=config.norm)
    if config.tied_dropout:
        attach_tied_dropout(model, sites=list(dropout_sites(config, model)), p_gen=config.p_gen,
                            p_mem=config.p_mem, seed=config.seed)
    return model


def dropout_sites(config: TrainConfig, model: nn.Module) -> tuple[str, ...]:
    """The tied-dropout sites a config names: its own, or the model's default placement."""
    return config.dropout_sites or tuple(model.default_dropout_sites)


@dataclass
class Trained:
    """A checkpoint's model (eval mode, on ``device``) with the data it was trained on."""

    model: nn.Module
    data: PreparedData
    checkpoint: Checkpoint


def load_trained(ckpt_path: str | Path, *, device: str = "auto",
                 data_dir: str | Path | None = None) -> Trained:
    ckpt = load_checkpoint(ckpt_path)
    data = load_data(ckpt.config, data_dir=data_dir)
    model = model_for(ckpt.config, data)
    load_model_state(model, ckpt)
    return Trained(model=model.to(resolve_device(device)).eval(), data=data, checkpoint=ckpt)
