"""Layer retraining (docs/method.md, Experiment 3): reset one layer group of the final model to an
early checkpoint, freeze everything else, fine-tune that group on the clean examples only. The
algorithm: no files, locks or progress (:mod:`memkern.experiments.retrain.run` owns the run
directory).

If noisy-train accuracy (against the noisy labels) comes back, the noisy examples are still
memorized by the frozen layers, so that memorization was not in the retrained group. (The
reference script trains all layers, and on the wrong subset; here only the group's parameters
get gradients and only clean indices are ever batched.)

Frozen means bit-identical: the whole model runs in eval mode except the modules that own the
retrained group's parameters or buffers. Frozen BatchNorm layers therefore normalize with
their running statistics and never update them; the retrained group's own BatchNorm layers
(reset with its weights) use batch statistics and update theirs, as in training.

On a text run (docs/text.md) the clean examples are the windows holding no planted copy, the
loss is the next-byte cross-entropy at every position, each row carries its tied-dropout key,
and the rows report the text measures of a metrics.jsonl line instead of accuracies.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memkern.data import PreparedData, iterate_batches
from memkern.data.text import TextData
from memkern.training.evaluate import split_accuracies
from memkern.network.models.groups import LayerGroup
from memkern.training.finite import check_loss, check_model
from memkern.training.step import learning_rate, make_optimizer, sgd_step
from memkern.training.text_evaluate import text_epoch_metrics
from memkern.training.train import epoch_generator

# A diverged retraining stops before its rows are recorded; the runner keeps earlier groups.
DIVERGED_ADVICE = ("the groups completed before it are kept in retrain.csv; rerun with a "
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


def _measures(model: nn.Module, data: PreparedData | TextData) -> dict:
    if isinstance(data, TextData):
        return text_epoch_metrics(model, data)
    return split_accuracies(model, data)


def retrain_group(model: nn.Module, group: LayerGroup, data: PreparedData | TextData, *,
                  epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int,
                  momentum: float = 0.9, optimizer: str = "sgd",
                  on_step: Callable[[], None] | None = None,
                  on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Fine-tune ``group`` of ``model`` (in place, on the model's device) on the clean training
    examples for ``epochs`` epochs with the run's ``optimizer`` (``"sgd"``: SGD with
    ``momentum``; ``"adamw"``: AdamW with betas ``(momentum, 0.99)``) and cosine decay from
    ``lr`` to zero. Rows
    of ``data`` carry their position as dataset index (tied-dropout masks; a text run's rows
    their mask keys). Returns one row ``{"group", "epoch", "clean_acc", "noisy_acc",
    "test_acc"}`` (a text run: ``{"group", "epoch", **text measures}``) per epoch, epoch 0
    being the model as given (right after the reset). ``on_step`` is called after every
    optimizer step, ``on_epoch`` with each trained epoch's row."""
    device = next(model.parameters()).device
    clean = torch.nonzero(~data.noisy_mask).flatten()
    text = isinstance(data, TextData)
    keys = data.mask_keys if text else torch.arange(len(data.noisy_mask))
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    steps_per_epoch = math.ceil(len(clean) / batch_size)
    total_steps = steps_per_epoch * epochs
    rows = [{"group": group.name, "epoch": 0, **_measures(model, data)}]
    trainable = freeze_all_but(model, group)
    step_rule = make_optimizer(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               kind=optimizer)
    for epoch in range(1, epochs + 1):
        gen = epoch_generator(seed, epoch)
        for i, (x, y, idx) in enumerate(iterate_batches(train_x, train_y, batch_size,
                                                         generator=gen, indices=clean)):
            step = (epoch - 1) * steps_per_epoch + i

            def loss_of(logits, targets):  # called at once by sgd_step: the loop's variables
                if text:  # next-byte loss at every position of every window
                    logits, targets = logits.flatten(0, -2), targets.flatten()
                loss = F.cross_entropy(logits, targets)
                check_loss(float(loss.detach()), epoch=epoch, step=i + 1,
                           what=f"retraining {group.name}", advice=DIVERGED_ADVICE)
                return loss

            sgd_step(model, step_rule, x, y, ids=keys[idx].to(device), loss_of=loss_of,
                     lr=learning_rate(step, total_steps=total_steps, base_lr=lr, warmup=0.0))
            if on_step is not None:
                on_step()
        check_model(model, epoch=epoch, what=f"retraining {group.name}", advice=DIVERGED_ADVICE)
        rows.append({"group": group.name, "epoch": epoch, **_measures(model, data)})
        if on_epoch is not None:
            on_epoch(rows[-1])
        freeze_all_but(model, group)  # measuring left the whole model in eval mode
    model.requires_grad_(True)
    model.eval()
    return rows
