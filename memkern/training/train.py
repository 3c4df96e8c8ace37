"""Checkpointed, resumable training (docs/method.md, "Setup").

SGD with momentum and weight decay, linear warm-up then cosine decay, one checkpoint per epoch
plus the initialization. Everything random is derived from (seed, epoch), and SGD momentum is
checkpointed, so a run killed at any point and resumed ends with bit-identical weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

from memkern.rundir.atomic import append_jsonl, json_text, rewrite_jsonl
from memkern.rundir.manifest import write_recorded
from memkern.training.checkpoints import load_checkpoint, load_model_state, restore_optimizer, save_checkpoint
from memkern.training.config import TrainConfig, config_from_options, differing_fields
from memkern.data import PreparedData
from memkern.data.text import TextData
from memkern.training.data_parallel import check_shards, replicated, shard, step_loss
from memkern.data.prepared import NATURAL_IMAGES, augment_batch, iterate_batches
from memkern.training.distributed import World, joined
from memkern.training.dynamics import DynamicsRecorder, dynamics_path
from memkern.errors import ConfigError, RunDirError
from memkern.training.evaluate import epoch_accuracies
from memkern.training.text_evaluate import text_epoch_metrics
from memkern.rundir.context import load_data, model_for, require_history, resolve_device
from memkern.training.finite import check_loss, check_model
from memkern.training.step import learning_rate, make_optimizer, sgd_step
from memkern.rundir.locks import hold_run, locked
from memkern.rundir.consistency import check_config_agrees
from memkern.rundir.progress import Progress
from memkern.rundir.paths import RunDir, require_utf8_path
from memkern.report.summaries import epoch_line
from memkern.experiments.gradients.live import LiveSubsetTracker


def check_extension(config: TrainConfig, *, epochs: int, steps_per_epoch: int) -> None:
    """Continuing a run trained for ``config.epochs`` up to ``epochs`` is the same schedule only
    if every step already taken had the learning rate it would have had in an ``epochs``-long
    run; otherwise a ConfigError says why (a cosine decay or a warm-up spans all epochs)."""
    if epochs < config.epochs:
        raise ConfigError(f"the run was set up for {config.epochs} epochs; extending takes more "
                          f"epochs, not {epochs}")
    done, longer = config.epochs * steps_per_epoch, epochs * steps_per_epoch
    same = all(learning_rate(s, total_steps=done, base_lr=config.lr, warmup=config.warmup,
                             schedule=config.lr_schedule)
               == learning_rate(s, total_steps=longer, base_lr=config.lr, warmup=config.warmup,
                                schedule=config.lr_schedule) for s in range(done))
    if same:
        return
    why = ("its cosine decay spans all epochs (it reached zero at epoch "
           f"{config.epochs})" if config.lr_schedule == "cosine" else
           f"its warm-up lasts warmup={config.warmup} of all steps")
    raise ConfigError(f"cannot extend the run from {config.epochs} to {epochs} epochs with the "
                      f"same schedule: {why}; train a new run for {epochs} epochs (only runs "
                      f"with lr_schedule='constant' and warmup=0 can be extended)")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG of one epoch's shuffling and augmentation: a function of (seed, epoch) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def noise_record(config: TrainConfig, data: PreparedData) -> dict:
    noise = data.noise
    return {"rate": config.noise, "seed": config.seed, "num_train": len(data.train_labels),
            "noisy_indices": noise.noisy_indices.tolist(),
            "original_labels": noise.original_labels.tolist(),
            "noisy_labels": noise.labels[noise.noisy_indices].tolist()}


def _start(run: RunDir, config: TrainConfig, data: PreparedData | TextData, model) -> None:
    if isinstance(data, TextData):
        write_recorded(run.root, run.canaries_path,
                       json_text(data.record(), run.canaries_path).encode())
    else:
        write_recorded(run.root, run.noise_path,
                       json_text(noise_record(config, data), run.noise_path).encode())
    write_config(run, config)
    save_checkpoint(run.checkpoint_path(0), model, config=config, epoch=0, run=run.root)


def write_config(run: RunDir, config: TrainConfig) -> None:
    """config.json, recorded in the run's manifest."""
    write_recorded(run.root, run.config_path, (config.to_json() + "\n").encode())


def check_tracking(run: RunDir, *, track_grads: bool, first_epoch: int) -> None:
    """A resumed run records what it recorded before: ``grads/live.jsonl`` covers every epoch
    of a run trained with ``--track-grads`` and none of one trained without."""
    if first_epoch == 1:
        return
    tracked = (run.grads / "live.jsonl").is_file()
    if tracked != track_grads:
        how = "with" if tracked else "without"
        raise ConfigError(f"{run.root} was trained {how} --track-grads (grads/live.jsonl "
                          f"{'exists' if tracked else 'is absent'}); resume it {how} the flag, "
                          f"or train a new run")


def _lock(args: dict):
    """Rank 0 (or a lone process) holds the run; the other ranks of a torchrun launch write
    nothing in it."""
    return hold_run(args["out"]) if World.from_env().main else contextlib.nullcontext()


@locked(_lock)
def train(config: TrainConfig | None, *, out: str | Path, resume: bool = False,
          device: str = "auto", data_dir: str | Path | None = None, download: bool = False,
          progress: bool = True, track_grads: bool = False,
          data: PreparedData | None = None) -> RunDir:
    """Train into run directory ``out`` (or continue it with ``resume``: the run's own config is
    used, and a ``config`` given too must equal it, except for more ``epochs``, which extends a
    run whose schedule allows it, see :func:`check_extension`). Returns the run directory.
    Every epoch's per-example margins, losses and correctness go to ``dynamics.safetensors``
    (:mod:`memkern.training.dynamics`).

    ``data``: train on these instead of the config's data (cross-validation folds; the run's
    config then does not rebuild them).

    ``track_grads``: record every epoch's summed clean and noisy gradients of the real steps in
    ``grads/live.jsonl`` (:class:`memkern.experiments.gradients.live.LiveSubsetTracker`; one more backward
    per step, the weights stay bit-identical).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments and
    trains its shard of each global batch (:mod:`memkern.training.data_parallel`); rank 0 alone writes
    the run, which is the one a single process writes, with ``world_size`` in each metrics
    line (and, for the launch that started the run, in the config). A run may be resumed
    with any world size. Inputs are checked before the process group is joined."""
    require_utf8_path(out, option="--out")
    world = World.from_env()
    run = RunDir(out)
    extend_to = None
    if resume:
        if not run.config_path.is_file():
            raise RunDirError(f"cannot resume: {run.root} is not a memkern run (no config.json)")
        saved = run.load_config()
        # The world size a run was started with is a record, not a setting: any may resume it.
        given = None if config is None else dataclasses.replace(config,
                                                                 world_size=saved.world_size)
        if given is not None and given != saved:
            differing = differing_fields(saved, dataclasses.asdict(given))
            if differing != ["epochs"]:
                raise ConfigError(f"resume continues {run.root} with its saved config; the "
                                  f"config given differs in {', '.join(differing)}: pass "
                                  f"config=None (or the same config, with more epochs to extend "
                                  f"the run) to resume, or another out= to start anew")
            extend_to = config.epochs
        config = saved
        require_history(config, "resuming training")
    elif config is None:
        raise ConfigError("a new run needs a config: pass a TrainConfig (or resume=True to "
                          "continue an existing run)")
    elif run.has_content():
        raise RunDirError(f"run directory {run.root} already holds a run: pass resume=True to "
                          f"continue it, or another out= to start a new one")
    if not resume:
        config = dataclasses.replace(config, world_size=world.size)
    if track_grads and world.size > 1:
        raise ConfigError("--track-grads runs in one process: launch without torchrun, or "
                          "record the accounting afterwards with `memkern grads` (it shards)")
    dev = world.place(resolve_device(device))
    if data is None:
        data = load_data(config, data_dir=data_dir, download=download)
    if track_grads and isinstance(data, TextData):
        raise ConfigError("--track-grads accounts clean vs noisy examples of image runs; on a "
                          "text run record the accounting afterwards with `memkern grads`")
    check_shards(rows=len(data.train_labels), batch_size=config.batch_size, world=world)
    torch.manual_seed(config.seed)
    model = model_for(config, data).to(dev)
    optimizer = make_optimizer(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, kind=config.optimizer)
    first_epoch = 1
    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    if extend_to is not None:
        check_extension(config, epochs=extend_to, steps_per_epoch=steps_per_epoch)
        config = dataclasses.replace(config, epochs=extend_to)
    resumed = resume and bool(run.epochs())
    if resumed:
        ckpt = load_checkpoint(run.checkpoint_path(run.epochs()[-1]))
        check_config_agrees(saved, ckpt, config_path=run.config_path)
        load_model_state(model, ckpt)
        restore_optimizer(model, optimizer, ckpt)
        first_epoch = ckpt.epoch + 1
        check_tracking(run, track_grads=track_grads, first_epoch=first_epoch)
        run.load_history()  # a gap refuses before metrics.jsonl is rewritten
    with joined(world, dev) as world:
        if world.main:
            if resumed:
                # Lines for epochs after the last checkpoint were written before a kill: redo.
                rewrite_jsonl(run.metrics_path, run.load_metrics(until=first_epoch - 1))
                if extend_to is not None:
                    write_config(run, config)
            else:
                run.root.mkdir(parents=True, exist_ok=True)
                _start(run, config, data, model)
        _train_epochs(run, config, data, model, optimizer, world=world,
                      first_epoch=first_epoch, dev=dev, progress=progress,
                      track_grads=track_grads)
    return run


def _train_epochs(run: RunDir, config: TrainConfig, data: PreparedData, model, optimizer, *,
                  world: World, first_epoch: int, dev: torch.device, progress: bool,
                  track_grads: bool) -> None:
    """Epochs ``first_epoch..config.epochs``: steps through ``model`` (or its DDP wrapper, which
    lives only in this call: it must be gone before the process group is left), then on
    rank 0 the epoch's metrics, dynamics and checkpoint."""
    with replicated(model, world) as replica:
        _epochs(run, config, data, model, replica, optimizer, world=world,
                first_epoch=first_epoch, dev=dev, progress=progress, track_grads=track_grads)


def _epochs(run: RunDir, config: TrainConfig, data: PreparedData, model, replica, optimizer, *,
            world: World, first_epoch: int, dev: torch.device, progress: bool,
            track_grads: bool) -> None:
    steps_per_epoch = math.ceil(len(data.train_labels) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    train_x, train_y = data.train_images.to(dev), data.train_labels.to(dev)
    text = isinstance(data, TextData)
    # Tied-dropout keys of the rows: dataset indices, or a text run's mask keys (one per canary)
    keys = data.mask_keys.to(dev) if text else None
    targets_per_row = train_y[0].numel()  # 1, or a text window's seq_len next bytes
    flip = data.name == "cifar10"
    augment = config.augment and data.name in NATURAL_IMAGES
    tracker = (LiveSubsetTracker(model, run.grads / "live.jsonl", data.noisy_mask.to(dev),
                                 first_epoch=first_epoch) if track_grads else None)
    dynamics = (DynamicsRecorder(dynamics_path(run), data.train_labels,
                                 after_epoch=first_epoch - 1) if world.main and not text
                else None)
    bar = Progress(total=total_steps, initial=(first_epoch - 1) * steps_per_epoch, unit="step",
                   desc=f"train {run.root.name}", bar=progress, silent=not world.main)
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        gen = epoch_generator(config.seed, epoch)
        loss_sum = 0.0
        for i, (x, y, idx) in enumerate(iterate_batches(train_x, train_y, config.batch_size,
                                                         generator=gen)):
            step = (epoch - 1) * steps_per_epoch + i
            if augment:  # on the global batch: the generator advances as in one process
                x = augment_batch(x, gen, flip=flip)
            global_rows = len(y)
            mine = shard(global_rows, world)
            x, y, idx = x[mine], y[mine], idx[mine]
            ce_sums = []

            def loss_of(logits, targets):  # called at once by sgd_step: the loop's variables
                if text:  # next-byte loss at every position of every window
                    logits, targets = logits.flatten(0, -2), targets.flatten()
                loss, ce_sum = step_loss(logits, targets,
                                         global_rows=global_rows * targets_per_row, world=world)
                check_loss(ce_sum / targets.numel(), epoch=epoch, step=i + 1)
                ce_sums.append(ce_sum)
                return loss

            def track(logits):
                tracker.add_step(logits, y, idx)

            sgd_step(replica, optimizer, x, y, ids=keys[idx] if text else idx.to(dev),
                     loss_of=loss_of,
                     lr=learning_rate(step, total_steps=total_steps, base_lr=config.lr,
                                      warmup=config.warmup, schedule=config.lr_schedule),
                     guard=world.peers(),  # DDP's collectives: in the forward and the backward
                     before_update=None if tracker is None else track)
            loss_sum += ce_sums[0]
            bar.advance()
        check_model(model, epoch=epoch)
        if tracker is not None:
            tracker.finish_epoch(epoch)
        train_loss = world.sum(loss_sum) / data.train_labels.numel()
        if world.main:
            _finish_epoch(run, config, data, model, optimizer, dynamics, epoch=epoch,
                          train_loss=train_loss, world=world, started=started, bar=bar)
    bar.close()


def _finish_epoch(run: RunDir, config: TrainConfig, data: PreparedData | TextData, model,
                  optimizer, dynamics: DynamicsRecorder | None, *, epoch: int, train_loss: float,
                  world: World, started: float, bar) -> None:
    """Rank 0's end of an epoch: metrics line, dynamics (image runs), then the checkpoint."""
    measures = (text_epoch_metrics(model, data) if isinstance(data, TextData)
                else epoch_accuracies(model, data, on_train_logits=dynamics.collect))
    metrics = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               **measures, "world_size": world.size}
    metrics["seconds"] = time.perf_counter() - started
    append_jsonl(run.metrics_path, metrics)
    if dynamics is not None:  # before the checkpoint: it always covers checkpointed epochs
        dynamics.finish_epoch(epoch)
    save_checkpoint(run.checkpoint_path(epoch), model, config=config, epoch=epoch,
                    optimizer=optimizer, run=run.root)
    bar.step(epoch_line(metrics, epochs=config.epochs))


def train_from_options(*, out: str | Path, options: dict, preset: str | None = None,
                       resume: bool = False, **kwargs) -> RunDir:
    """:func:`train` for the command line: a new run's config is ``preset`` with the ``options``
    the user set (``{config field: value}``); with ``resume``, those options must agree with the
    run's saved config (ConfigError naming the ones that differ), except a larger ``epochs``,
    which extends the run. Errors name the command's flags. ``kwargs`` go to train."""
    run = RunDir(out)
    if not resume:
        if run.has_content():
            raise RunDirError(f"run directory {run.root} already exists: resume it with --resume "
                              f"(add --epochs N to extend a finished run), or choose another --out")
        return train(config_from_options(options, preset=preset), out=out, **kwargs)
    if not run.config_path.is_file():
        return train(None, out=out, resume=True, **kwargs)  # the error of a non-run
    saved = run.load_config()
    differing = differing_fields(saved, options)
    if preset or [d for d in differing if d != "epochs"]:
        named = differing + (["preset"] if preset else [])
        raise ConfigError(f"--resume continues {out} with its saved config; these options "
                          f"differ from it: {', '.join(named)}")
    extended = dataclasses.replace(saved, epochs=options["epochs"]) if differing else None
    return train(extended, out=out, resume=True, **kwargs)
