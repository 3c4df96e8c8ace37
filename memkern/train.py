"""Checkpointed, resumable training (docs/method.md, "Setup").

SGD with momentum and weight decay, linear warm-up then cosine decay, one checkpoint per epoch
plus the initialization. Everything random is derived from (seed, epoch), and SGD momentum is
checkpointed, so a run killed at any point and resumed ends with bit-identical weights.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memkern.atomic import append_jsonl, atomic_write_json, atomic_write_text, rewrite_jsonl
from memkern.checkpoints import load_checkpoint, load_model_state, restore_momentum, save_checkpoint
from memkern.config import TrainConfig, config_from_options, differing_fields
from memkern.data import PreparedData
from memkern.data.prepared import NATURAL_IMAGES, augment_batch, iterate_batches
from memkern.dynamics import DynamicsRecorder, dynamics_path
from memkern.errors import ConfigError, RunDirError
from memkern.evaluate import epoch_accuracies
from memkern.experiment import load_data, model_for, require_history, resolve_device
from memkern.finite import check_loss, check_model
from memkern.locks import hold_run, locked
from memkern.runs import RunDir
from memkern.sites import example_indices
from memkern.subset_grads import LiveSubsetTracker


def learning_rate(step: int, *, total_steps: int, base_lr: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of steps, then cosine decay to zero."""
    warm = max(1, round(warmup * total_steps))
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG of one epoch's shuffling and augmentation: a function of (seed, epoch) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def noise_record(config: TrainConfig, data: PreparedData) -> dict:
    noise = data.noise
    return {"rate": config.noise, "seed": config.seed, "num_train": len(data.train_labels),
            "noisy_indices": noise.noisy_indices.tolist(),
            "original_labels": noise.original_labels.tolist(),
            "noisy_labels": noise.labels[noise.noisy_indices].tolist()}


def _start(run: RunDir, config: TrainConfig, data: PreparedData, model) -> None:
    atomic_write_json(run.noise_path, noise_record(config, data))
    atomic_write_text(run.config_path, config.to_json() + "\n")
    save_checkpoint(run.checkpoint_path(0), model, config=config, epoch=0)


@locked(lambda a: hold_run(a["out"]))
def train(config: TrainConfig | None, *, out: str | Path, resume: bool = False,
          device: str = "auto", data_dir: str | Path | None = None, download: bool = False,
          progress: bool = True, track_grads: bool = False,
          data: PreparedData | None = None) -> RunDir:
    """Train into run directory ``out`` (or continue it with ``resume``: the run's own config is
    used, and a ``config`` given too must equal it). Returns the run directory. Every epoch's
    per-example margins, losses and correctness go to ``dynamics.safetensors``
    (:mod:`memkern.dynamics`).

    ``data``: train on these instead of the config's data (cross-validation folds; the run's
    config then does not rebuild them).

    ``track_grads``: record every epoch's summed clean and noisy gradients of the real steps in
    ``grads/live.jsonl`` (:class:`memkern.subset_grads.LiveSubsetTracker`; one more backward
    per step, the weights stay bit-identical)."""
    run = RunDir(out)
    if resume:
        if not run.config_path.is_file():
            raise RunDirError(f"cannot resume: {run.root} is not a memkern run (no config.json)")
        saved = run.load_config()
        if config is not None and config != saved:
            differing = differing_fields(saved, dataclasses.asdict(config))
            raise ConfigError(f"resume continues {run.root} with its saved config; the config "
                              f"given differs in {', '.join(differing)}: pass config=None (or "
                              f"the same options) to resume, or another output to start anew")
        config = saved
        require_history(config, "resuming training")
    elif config is None:
        raise ConfigError("a new run needs a config: pass a TrainConfig (or resume=True to "
                          "continue an existing run)")
    elif run.has_content():
        raise RunDirError(f"run directory {run.root} already exists: resume it (resume=True, "
                          f"`memkern train --resume`), or choose another output directory")
    dev = resolve_device(device)
    if data is None:
        data = load_data(config, data_dir=data_dir, download=download)
    torch.manual_seed(config.seed)
    model = model_for(config, data).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    first_epoch = 1
    if resume and run.epochs():
        ckpt = load_checkpoint(run.checkpoint_path(run.epochs()[-1]))
        load_model_state(model, ckpt)
        restore_momentum(model, optimizer, ckpt)
        first_epoch = ckpt.epoch + 1
        # Lines for epochs after the last checkpoint were written before a kill: redo them.
        rewrite_jsonl(run.metrics_path, run.load_metrics(until=ckpt.epoch))
    else:
        run.root.mkdir(parents=True, exist_ok=True)
        _start(run, config, data, model)

    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    train_x, train_y = data.train_images.to(dev), data.train_labels.to(dev)
    flip = data.name == "cifar10"
    augment = config.augment and data.name in NATURAL_IMAGES
    tracker = (LiveSubsetTracker(model, run.grads / "live.jsonl", data.noisy_mask.to(dev),
                                 first_epoch=first_epoch) if track_grads else None)
    dynamics = DynamicsRecorder(dynamics_path(run), data.train_labels, after_epoch=first_epoch - 1)
    bar = tqdm(total=total_steps, initial=(first_epoch - 1) * steps_per_epoch, unit="step",
               desc=f"train {run.root.name}", disable=not progress, dynamic_ncols=True)
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        gen = epoch_generator(config.seed, epoch)
        loss_sum, seen = 0.0, 0
        for i, (x, y, idx) in enumerate(iterate_batches(train_x, train_y, config.batch_size,
                                                         generator=gen)):
            step = (epoch - 1) * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps=total_steps, base_lr=config.lr,
                                            warmup=config.warmup)
            if augment:
                x = augment_batch(x, gen, flip=flip)
            with example_indices(idx.to(dev)):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            value = float(loss.detach())
            check_loss(value, epoch=epoch, step=i + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward(retain_graph=tracker is not None)
            if tracker is not None:
                tracker.add_step(logits, y, idx)
            optimizer.step()
            loss_sum += value * len(y)
            seen += len(y)
            bar.update(1)
        check_model(model, epoch=epoch)
        if tracker is not None:
            tracker.finish_epoch(epoch)
        metrics = {"epoch": epoch, "train_loss": loss_sum / seen,
                   "lr": optimizer.param_groups[0]["lr"],
                   **epoch_accuracies(model, data, on_train_logits=dynamics.collect)}
        metrics["seconds"] = time.perf_counter() - started
        append_jsonl(run.metrics_path, metrics)
        dynamics.finish_epoch(epoch)  # before the checkpoint: it always covers checkpointed epochs
        save_checkpoint(run.checkpoint_path(epoch), model, config=config, epoch=epoch,
                        optimizer=optimizer)
        bar.set_postfix(epoch=epoch, noisy=f"{metrics['noisy_acc']:.3f}",
                        test=f"{metrics['test_acc']:.3f}")
    bar.close()
    return run


def train_from_options(*, out: str | Path, options: dict, preset: str | None = None,
                       resume: bool = False, **kwargs) -> RunDir:
    """:func:`train` for the command line: a new run's config is ``preset`` with the ``options``
    the user set (``{config field: value}``); with ``resume``, those options must agree with the
    run's saved config (ConfigError naming the ones that differ). ``kwargs`` go to train."""
    if not resume:
        return train(config_from_options(options, preset=preset), out=out, **kwargs)
    run = RunDir(out)
    if run.config_path.is_file():
        differing = differing_fields(run.load_config(), options)
        if differing or preset:
            raise ConfigError(f"--resume continues {out} with its saved config; these options "
                              f"differ from it: {', '.join(differing or ['preset'])}")
    return train(None, out=out, resume=True, **kwargs)
