"""Per-example, per-layer-group gradient norms (docs/method.md, Experiment 1, for every example).

    norms = per_example_grad_norms(model, x, y)          # float [B, G]
    total = norms.square().sum(1).sqrt()                  # each example's whole-model norm

Row ``b`` holds the L2 norm of the gradient of example b's own loss ``CE(model(x_b), y_b)``
(not divided by B) restricted to each layer group, in the order of
:func:`memkern.network.models.layer_groups`. Modes:

- ``ghost``: one forward and one backward, per-layer rules (:mod:`memkern.experiments.gradients.norms.rules`);
  a layer without a rule is an :class:`~memkern.errors.UnsupportedLayerError`.
- ``func``: ``torch.func`` ``vmap(grad(functional_call))``; any layer.
- ``loop``: one backward per example, the reference.
- ``auto``: ``ghost`` for the ruled layers and ``func`` for the parameters of any other.

Example-tied dropout: ``ids`` (int64 ``[B]``, each row's dataset index) reach the tied sites in
every mode, so each example's gradient is taken under its own training mask: the whole batch in
``ghost``, one index per vmapped example in ``func``, one per row in ``loop``.

BatchNorm: norms are taken with the model in eval mode (running statistics), whatever mode it
is in, so that each example's loss depends on that example alone; with batch statistics a
"per-example gradient" would depend on the rest of the batch. The subset sums of
:mod:`memkern.experiments.gradients.run` recorded during training (``--track-grads``) use the true training
step instead. The model's train/eval flags are restored afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from memkern.errors import ConfigError, UnsupportedLayerError
from memkern.experiments.gradients.norms.func import func_sq_norms
from memkern.experiments.gradients.norms.ghost import ghost_sq_norms, statically_unsupported
from memkern.experiments.gradients.norms.loop import loop_sq_norms
from memkern.network.models.groups import LayerGroup, layer_groups

MODES = ("auto", "ghost", "func", "loop")
DEFAULT_MEMORY_BUDGET = 64 << 20  # bytes of temporaries per chunk

__all__ = ["DEFAULT_MEMORY_BUDGET", "MODES", "default_groups", "per_example_grad_norms",
           "per_example_sq_norms"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, every module's own flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def default_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's layer groups; for a model without ``layer_group_paths``, one group per module
    that holds parameters of its own (named by module path)."""
    if hasattr(model, "layer_group_paths"):
        return layer_groups(model)
    out = []
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            out.append(LayerGroup(name=prefix or "<root>",
                                  param_names=tuple(f"{prefix}.{n}" if prefix else n for n in own),
                                  buffer_names=()))
    return out


def per_example_sq_norms(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                         ids: torch.Tensor | None = None, mode: str = "auto",
                         memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict[str, torch.Tensor]:
    """``{parameter name: float [B] squared per-example gradient norm}`` for every parameter
    that requires grad, computed in eval mode (see the module docstring); ``ids``: int64 ``[B]``
    dataset indices of the rows, or None."""
    if mode not in MODES:
        raise ConfigError(f"unknown gradient-norm mode {mode!r}; choose one of {', '.join(MODES)}")
    if memory_budget < 1:
        raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    if len(inputs) != len(targets) or (ids is not None and len(ids) != len(inputs)):
        raise ConfigError(f"inputs have {len(inputs)} rows but targets {len(targets)}"
                          + ("" if ids is None else f" and ids {len(ids)}"))
    if len(inputs) == 0:
        return {n: inputs.new_zeros(0, dtype=p.dtype) for n, p in model.named_parameters()
                if p.requires_grad}
    with eval_mode(model):
        if mode == "loop":
            return loop_sq_norms(model, inputs, targets, ids=ids)
        if mode == "func":
            return func_sq_norms(model, inputs, targets, ids=ids, memory_budget=memory_budget)
        unsupported = statically_unsupported(model) if mode == "ghost" else []
        if unsupported:
            more = f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
            raise UnsupportedLayerError(
                f"ghost mode has no rule for {', '.join(unsupported[:3])}{more}; use "
                f"mode='auto' (torch.func for those layers) or mode='func'")
        sq = ghost_sq_norms(model, inputs, targets, ids=ids, memory_budget=memory_budget)
        rest = [n for n, p in model.named_parameters() if p.requires_grad and n not in sq]
        if rest and mode == "ghost":
            raise UnsupportedLayerError(
                f"ghost mode could not cover parameters {rest[:3]} (a layer called more than "
                f"once, a parameter shared by two layers, or not on the path from the input); "
                f"use mode='auto'")
        if rest:
            sq.update(func_sq_norms(model, inputs, targets, ids=ids, names=rest,
                                    memory_budget=memory_budget))
        return sq


def per_example_grad_norms(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                           ids: torch.Tensor | None = None, mode: str = "auto",
                           groups: Sequence[LayerGroup] | None = None,
                           memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Float ``[B, G]`` per-example gradient norms per layer group.

    ``inputs``: the model's input batch ``[B, ...]``; ``targets``: int64 ``[B]`` class labels;
    ``ids``: int64 ``[B]`` dataset indices (needed by tied dropout in mode "own"/"train");
    ``groups``: default :func:`default_groups`; ``memory_budget``: bytes of temporaries a chunk
    of the batch may use (``func`` chunks of examples, ``ghost`` per-layer chunks).
    """
    groups = default_groups(model) if groups is None else list(groups)
    sq = per_example_sq_norms(model, inputs, targets, ids=ids, mode=mode,
                              memory_budget=memory_budget)
    dtype = next((v.dtype for v in sq.values()), inputs.dtype if inputs.is_floating_point()
                 else torch.get_default_dtype())
    out = torch.zeros(len(inputs), len(groups), dtype=dtype, device=inputs.device)
    for i, group in enumerate(groups):
        for name in group.param_names:
            if name in sq:
                out[:, i] += sq[name].to(dtype)
    return out.sqrt()
