"""Layer retraining (docs/method.md, Experiment 3): reset one layer group of the final model to an
early checkpoint, freeze everything else, fine-tune that group on the clean examples only.

If noisy-train accuracy (against the noisy labels) comes back, the noisy examples are still
memorized by the frozen layers, so that memorization was not in the retrained group. (The
reference script trains all layers, and on the wrong subset; here only the group's parameters
get gradients and only clean indices are ever batched.)

Frozen means bit-identical: the whole model runs in eval mode except the modules that own the
retrained group's parameters or buffers. Frozen BatchNorm layers therefore normalize with
their running statistics and never update them; the retrained group's own BatchNorm layers
(reset with its weights) use batch statistics and update theirs, as in training.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memkern.rundir.csv_tables import read_table, write_table
from memkern.rundir.atomic import atomic_write_json, read_json_object
from memkern.training.config import TrainConfig
from memkern.training.finite import check_loss, check_model
from memkern.data import PreparedData, iterate_batches
from memkern.errors import ConfigError
from memkern.training.evaluate import split_accuracies
from memkern.rundir.context import open_run, require_history
from memkern.report.figures.layers import plot_retrain
from memkern.rundir.locks import hold_run, locked
from memkern.rundir.ownership import require_figure_outputs, require_json_output
from memkern.network.models.groups import LayerGroup
from memkern.rundir.progress import Progress
from memkern.experiments.rewind import select_groups, with_group_from
from memkern.rundir.paths import RunDir
from memkern.network.sites import example_indices
from memkern.report.summaries import accuracy_text
from memkern.training.train import epoch_generator, learning_rate

# Default reset point: the initialization. It removes everything the group learned, so any
# noisy-train accuracy after retraining on clean data can only come from the frozen layers.
DEFAULT_FROM_EPOCH = 0
DEFAULT_EPOCHS = 10
_RETRAIN_ADVICE = ("the groups completed before it are kept in retrain.csv; rerun with a "
                   "smaller --lr (and --overwrite)")


def owning_modules(model: nn.Module, group: LayerGroup) -> list[nn.Module]:
    """The modules that directly hold one of ``group``'s parameters or buffers."""
    names = set(group.param_names) | set(group.buffer_names)
    out = []
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        if any((f"{prefix}.{n}" if prefix else n) in names for n in own):
            out.append(module)
    return out


def freeze_all_but(model: nn.Module, group: LayerGroup) -> list[nn.Parameter]:
    """Eval mode and no gradients everywhere except ``group``; returns its parameters."""
    model.eval()
    for module in owning_modules(model, group):
        module.train()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    trainable = [params[n] for n in group.param_names]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def retrain_group(model: nn.Module, group: LayerGroup, data: PreparedData, *, epochs: int,
                  lr: float, weight_decay: float, batch_size: int, seed: int,
                  momentum: float = 0.9, bar: Progress | None = None) -> list[dict]:
    """Fine-tune ``group`` of ``model`` (in place, on the model's device) on the clean training
    examples for ``epochs`` epochs: SGD with momentum and cosine decay from ``lr`` to zero.
    Returns one row per epoch, epoch 0 being the model as given (right after the reset)."""
    device = next(model.parameters()).device
    clean = torch.nonzero(~data.noisy_mask).flatten()
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    steps_per_epoch = math.ceil(len(clean) / batch_size)
    total_steps = steps_per_epoch * epochs
    rows = [{"group": group.name, "epoch": 0, **split_accuracies(model, data)}]
    trainable = freeze_all_but(model, group)
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(1, epochs + 1):
        gen = epoch_generator(seed, epoch)
        for i, (x, y, idx) in enumerate(iterate_batches(train_x, train_y, batch_size,
                                                         generator=gen, indices=clean)):
            step = (epoch - 1) * steps_per_epoch + i
            for pg in optimizer.param_groups:
                pg["lr"] = learning_rate(step, total_steps=total_steps, base_lr=lr, warmup=0.0)
            with example_indices(idx.to(device)):
                loss = F.cross_entropy(model(x), y)
            check_loss(float(loss.detach()), epoch=epoch, step=i + 1, what=f"retraining {group.name}",
                       advice=_RETRAIN_ADVICE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.advance()
        check_model(model, epoch=epoch, what=f"retraining {group.name}", advice=_RETRAIN_ADVICE)
        rows.append({"group": group.name, "epoch": epoch, **split_accuracies(model, data)})
        if bar is not None:
            bar.step(f"{group.name} epoch {epoch}/{epochs}  {accuracy_text(rows[-1])}")
        freeze_all_but(model, group)  # split_accuracies left the whole model in eval mode
    model.requires_grad_(True)
    model.eval()
    return rows


def _settings(config: TrainConfig, *, final_epoch: int, from_epoch: int, epochs: int,
              lr: float) -> dict:
    return {"final_epoch": final_epoch, "from_epoch": from_epoch, "epochs": epochs, "lr": lr,
            "weight_decay": config.weight_decay, "batch_size": config.batch_size}


def _resumable_rows(run: RunDir, settings: dict, *, overwrite: bool) -> list[dict]:
    """Rows of groups completed by an earlier call with the same settings."""
    csv_path, json_path = run.root / "retrain.csv", run.root / "retrain.json"
    if overwrite or not json_path.is_file():
        return []
    saved = read_json_object(json_path)
    differing = sorted(k for k in settings if saved.get(k) != settings[k])
    if differing:
        was = ", ".join(f"{k}={saved.get(k)}" for k in differing)
        raise ConfigError(f"{csv_path} was made with {was}; rerun with those settings to resume "
                          f"it, or pass --overwrite to start over")
    rows = read_table(csv_path)
    done = {g for g in {r["group"] for r in rows}
            if len({r["epoch"] for r in rows if r["group"] == g}) == settings["epochs"] + 1}
    return [r for r in rows if r["group"] in done]


@locked(lambda a: hold_run(a["run"]))
def retrain(*, run: str | Path, groups: list[str] | None = None,
            from_epoch: int = DEFAULT_FROM_EPOCH, epochs: int = DEFAULT_EPOCHS,
            lr: float | None = None, device: str = "auto", data_dir: str | Path | None = None,
            overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Retrain each group of ``run`` (all by default) from checkpoint ``from_epoch`` on clean
    data for ``epochs`` epochs at peak ``lr`` (default: the run's); write ``retrain.csv`` (after
    every completed group: a killed call resumes, skipping completed groups) and
    ``retrain.png``. Returns all rows ``{"group", "epoch", "clean_acc", "noisy_acc",
    "test_acc"}``."""
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr must be a positive finite number, got {lr}")
    run = RunDir(run)
    require_history(run.load_config(), "retrain")
    require_json_output(run.root / "retrain.json", keys=("from_epoch", "epochs"),
                        what="memkern's retrain settings")
    require_figure_outputs(run.root / "retrain.png")
    run.final_checkpoint()
    run.require_checkpoint(from_epoch)
    ctx = open_run(run.root, device=device, data_dir=data_dir)
    model, data, config = ctx.model, ctx.data, ctx.config
    chosen = select_groups(model, groups)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    early = ctx.state(from_epoch)  # validates the reset checkpoint too
    lr = config.lr if lr is None else lr
    settings = _settings(config, final_epoch=ctx.checkpoint.epoch, from_epoch=from_epoch,
                         epochs=epochs, lr=lr)
    rows = _resumable_rows(run, settings, overwrite=overwrite)

    done = {r["group"] for r in rows}
    todo = [g for g in chosen if g.name not in done]
    # Every input checked: now write. Table first, then settings: a kill between the two
    # leaves no rows under foreign settings.
    write_table(run.root / "retrain.csv", rows)
    atomic_write_json(run.root / "retrain.json", settings)
    steps = math.ceil(int((~data.noisy_mask).sum()) / config.batch_size) * epochs
    bar = Progress(total=steps * len(todo), unit="step", desc=f"retrain {run.root.name}",
                   bar=progress)
    for group in todo:
        model.load_state_dict(with_group_from(final, early, [group]))
        rows += retrain_group(model, group, data, epochs=epochs, lr=lr,
                              weight_decay=config.weight_decay, batch_size=config.batch_size,
                              seed=config.seed, momentum=config.momentum, bar=bar)
        write_table(run.root / "retrain.csv", rows)
    bar.close()
    write_table(run.root / "retrain.csv", rows)
    plot_retrain(rows, run.root / "retrain.png",
                 title=f"retraining one group on clean data (reset to epoch {from_epoch}): "
                       f"{run.root.name}")
    return rows
