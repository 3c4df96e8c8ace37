"""The run context: everything a command rebuilds from a run directory or a checkpoint, built
one way for every command (config -> data with its exact label noise -> model -> weights ->
device -> tied-dropout mode).

    ctx = open_run("runs/digits", device="cpu")        # final checkpoint loaded
    ctx = load_trained("runs/digits/checkpoints/epoch_010.safetensors")
    ctx.load(0)                                        # another epoch's weights, same model

The model is in eval mode; a tied-dropout model is in mode "own": each training row gets the
mask it was trained with, from the dataset indices the analyses pass with the rows
(:func:`memkern.network.sites.example_indices`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memkern.training.checkpoints import Checkpoint, check_fits, load_checkpoint, load_model_state
from memkern.training.config import TrainConfig
from memkern.data import PreparedData, load_dataset, prepare
from memkern.data.train_labels import read_train_labels
from memkern.errors import ConfigError, RunDirError
from memkern.data.text import TextData, load_text_data
from memkern.network.models import build_model, build_text_model
from memkern.rundir.consistency import check_config_agrees, check_noise_agrees
from memkern.rundir.manifest import verify
from memkern.rundir.paths import RunDir
from memkern.network.tied_dropout import attach_tied_dropout, has_tied_dropout, set_tied_dropout_mode

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device that is not there is a
    ConfigError (one line) instead of torch's assertion deep inside the first transfer."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this torch sees no CUDA device (torch "
                              f"{torch.__version__}); use --device cpu, or install a CUDA build "
                              f"of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: only {count} CUDA device(s) here "
                              f"(0..{count - 1})")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use one of {', '.join(DEVICES)}")
    return dev


def load_data(config: TrainConfig, *, data_dir: str | Path | None = None,
              download: bool = False, run: str | Path | None = None) -> PreparedData | TextData:
    """The config's dataset with its exact label noise; ``data_dir`` overrides the config's.
    A config with its own training labels (an imported run) reads them from its ``run``
    directory. A text run's windows with the config's canaries and paragraphs planted."""
    if config.text:
        return load_text_data(config.dataset, seq_len=config.seq_len, seed=config.seed,
                              canaries=config.canaries, canary_reps=config.canary_reps,
                              dup_paragraphs=config.dup_paragraphs, dup_reps=config.dup_reps,
                              text_bytes=config.text_bytes)
    raw = load_dataset(config.dataset, data_dir=data_dir or config.data_dir, download=download)
    if config.train_labels is None:
        return prepare(raw, noise_rate=config.noise, seed=config.seed)
    if run is None:
        raise ConfigError(f"this config's training labels are the file {config.train_labels} "
                          f"of its run directory: pass run=<the run directory>")
    path = Path(run) / config.train_labels  # a plain file name (TrainConfig checks it)
    if path.is_symlink():
        raise RunDirError(f"{path} is a symbolic link; a run's training labels must be a file "
                          f"of the run itself: replace the link by the file")
    if not path.is_file():
        raise RunDirError(f"{path} is missing: this imported run's training labels live beside "
                          f"its checkpoints/ folder; keep the checkpoint in its run directory")
    verify(path, root=run)
    labels = read_train_labels(path, num_train=len(raw.train_labels),
                               num_classes=raw.num_classes)
    return prepare(raw, noise_rate=0.0, seed=config.seed, train_labels=labels)


def require_noisy_split(config: TrainConfig, what: str) -> None:
    """RunDirError unless the run knows which examples are noisy (an imported run knows only
    when imported with training labels)."""
    if config.imported and config.train_labels is None:
        raise RunDirError(f"{what} needs the noisy/clean split, which this imported run lacks: "
                          f"import it again with --train-labels FILE (the labels the weights "
                          f"were trained with)")


def require_history(config: TrainConfig, what: str) -> None:
    """RunDirError for an imported run, which holds one checkpoint and no training history."""
    if config.imported:
        raise RunDirError(f"{what} needs a run trained by memkern (checkpoints of several "
                          f"epochs); this run was imported and holds only the weights trained "
                          f"elsewhere: run evaluate, grads, localize or scores on it")


def model_for(config: TrainConfig, data: PreparedData | TextData) -> nn.Module:
    """The config's model for ``data``; with ``config.tied_dropout``, example-tied dropout (mode
    "train", seeded by ``config.seed``) at ``config.dropout_sites`` or the model's default sites,
    so a checkpoint's config alone rebuilds the exact masks."""
    if isinstance(data, TextData):
        model = build_text_model(config.model, vocab=data.num_classes, context=config.seq_len)
    else:
        model = build_model(config.model, num_classes=data.num_classes,
                            in_channels=data.in_channels, image_size=data.image_size,
                            norm=config.norm)
    if config.tied_dropout:
        attach_tied_dropout(model, sites=list(dropout_sites(config, model)), p_gen=config.p_gen,
                            p_mem=config.p_mem, seed=config.seed)
    return model


def dropout_sites(config: TrainConfig, model: nn.Module) -> tuple[str, ...]:
    """The tied-dropout sites a config names: its own, or the model's default placement."""
    return config.dropout_sites or tuple(model.default_dropout_sites)


@dataclass
class RunContext:
    """A run rebuilt for analysis. ``model`` holds ``checkpoint``'s weights (eval mode, on
    ``device``, tied dropout in mode "own"); ``data`` is the data it was trained on."""

    run: RunDir
    config: TrainConfig
    data: PreparedData
    model: nn.Module
    device: torch.device
    checkpoint: Checkpoint

    def load(self, epoch: int) -> Checkpoint:
        """Load the weights of this run's ``epoch`` into ``model`` (validated against the
        architecture) and return that checkpoint."""
        ckpt = load_checkpoint(self.run.require_checkpoint(epoch))
        check_config_agrees(self.config, ckpt, config_path=self.run.config_path)
        load_model_state(self.model, ckpt)
        self.model.eval()
        self.checkpoint = ckpt
        return ckpt

    def state(self, epoch: int) -> dict[str, torch.Tensor]:
        """The weights and buffers of ``epoch`` on ``device`` (for ``functional_call``), without
        loading them; a checkpoint holding other tensors than the model is a CheckpointError."""
        ckpt = load_checkpoint(self.run.require_checkpoint(epoch))
        check_config_agrees(self.config, ckpt, config_path=self.run.config_path)
        check_fits(self.model, ckpt)
        return {k: v.to(self.device) for k, v in ckpt.model_state.items()}


def _context(run: RunDir, config: TrainConfig, ckpt: Checkpoint, *,
             device: str | torch.device, data_dir: str | Path | None,
             text_ok: bool, cross_check: bool = True) -> RunContext:
    if not text_ok:
        config.require_image_run("this analysis")
    dev = resolve_device(device)
    if cross_check and run.config_path.is_file():
        check_config_agrees(run.load_config(), ckpt, config_path=run.config_path)
    data = load_data(config, data_dir=data_dir, run=run.root)
    if cross_check and run.noise_path.is_file():
        check_noise_agrees(run.load_noise(), data.noise.noisy_indices, len(data.train_labels),
                           noise_path=run.noise_path)
    model = model_for(config, data)
    load_model_state(model, ckpt)
    model.to(dev).eval()
    if has_tied_dropout(model):
        set_tied_dropout_mode(model, "own")
    return RunContext(run=run, config=config, data=data, model=model, device=dev, checkpoint=ckpt)


def load_trained(ckpt: str | Path, *, device: str | torch.device = "auto",
                 data_dir: str | Path | None = None, text_ok: bool = False,
                 cross_check: bool = True) -> RunContext:
    """The context of one checkpoint file: its own config rebuilds everything (the run is the
    folder holding ``checkpoints/``, or the checkpoint's folder when kept elsewhere). The run's
    config.json and noise.json, where present, must agree with it (``cross_check=False``: a
    model trained on data its config does not rebuild, a cross-validation fold). ``text_ok``:
    the caller handles text runs (others get a ConfigError for one)."""
    ckpt = load_checkpoint(ckpt)
    return _context(RunDir.of_checkpoint(ckpt.path), ckpt.config, ckpt, device=device,
                    data_dir=data_dir, text_ok=text_ok, cross_check=cross_check)


def open_run(run: str | Path, *, epoch: int | None = None, device: str | torch.device = "auto",
             data_dir: str | Path | None = None, text_ok: bool = False) -> RunContext:
    """The context of a run directory with ``epoch``'s weights (default: the final checkpoint):
    the model is the run's (config.json), and a checkpoint that does not fit it is an error."""
    run = RunDir(run)
    config = run.load_config()
    path = run.final_checkpoint() if epoch is None else run.require_checkpoint(epoch)
    return _context(run, config, load_checkpoint(path), device=device, data_dir=data_dir,
                    text_ok=text_ok)
