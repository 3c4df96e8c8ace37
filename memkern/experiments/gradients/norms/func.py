"""``torch.func`` per-example gradients: ``vmap(grad(functional_call))``, any layer type.

Each example's gradient is reduced to squared norms inside the vmapped function, so at most one
chunk's per-example gradients exist at a time; the chunk is sized to the memory budget.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from memkern.experiments.gradients.norms.loss import summed_loss
from memkern.network.sites import example_indices

# Per-example bytes ~ (gradient + autograd temporaries) per parameter element plus activations
# per input element; rough factors, fitted to ResNet-9 at 32x32 (bench/README.md, "Measured
# choices in the code").
_BYTES_PER_PARAM = 3
_BYTES_PER_INPUT = 400


def func_chunk_size(model: nn.Module, inputs: torch.Tensor, memory_budget: int) -> int:
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_example = inputs.element_size() * (_BYTES_PER_PARAM * params
                                           + _BYTES_PER_INPUT * inputs[0].numel())
    return max(1, memory_budget // per_example)


def func_sq_norms(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                  ids: torch.Tensor | None = None, names: Iterable[str] | None = None,
                  memory_budget: int) -> dict[str, torch.Tensor]:
    """``{name: float [B] squared per-example gradient norm}`` for ``names`` (default: every
    parameter that requires grad); the other parameters are held constant. Each vmapped example
    runs with its own dataset index ``ids[b]`` (the channel-mask op's vmap rule pairs them)."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    wanted = {n: trainable[n] for n in (trainable if names is None else names)}
    constants = {n: p for n, p in trainable.items() if n not in wanted}
    constants.update(model.named_buffers())

    def loss(params, x, y, i):
        with example_indices(None if i is None else i.unsqueeze(0)):
            logits = functional_call(model, (params, constants), (x.unsqueeze(0),))
        return summed_loss(logits, y.unsqueeze(0))

    def sq_norms(params, x, y, i):
        return {n: g.square().sum() for n, g in grad(loss)(params, x, y, i).items()}

    chunk = func_chunk_size(model, inputs, memory_budget)
    return vmap(sq_norms, in_dims=(None, 0, 0, None if ids is None else 0),
                chunk_size=chunk)(wanted, inputs, targets, ids)
