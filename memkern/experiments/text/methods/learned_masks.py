"""The objective and training loop shared by the methods that learn a channel mask per target
(Slimming, HardConcrete, BalancedSubnet; docs/lm_methods.md).

Each target t gets its own parameters ``theta_t`` (``[space.total]``) and a mask
``m_t = gate(theta_t)``; with the model's weights fixed, the loop lowers, for every target,

    objective_t(m_t) = -NLL_t(m_t) / n_t + CE_clean(m_t)

where ``NLL_t`` is the secret's summed NLL over its ``n_t`` scored bytes (raising it forgets the
target) and ``CE_clean`` the mean next-byte cross-entropy on a fixed seeded choice of clean
windows (keeping it low keeps the model).

Steps are normalized per target and site: ``theta_t -= lr * (g_t / max_{c in site} |g_t[c]| +
d penalty / d theta_t)`` with ``g_t`` the objective's gradient. In every site the channel pulled
hardest moves by ``lr`` and the others in proportion (Adam would move every channel by about
``lr`` and lose the proportions), and a target the model predicts with near certainty, whose raw
gradients are tiny, still moves; the penalty's weight is thereby relative to a site's strongest
pull. Per site, because the channels are ranked per site and kinds differ in scale: an
attention head's pull is far stronger than any one MLP neuron's, and under one maximum over all
channels the neurons' masks barely moved (Slimming's neuron gates of the gpt-shakespeare preset
stayed at 1 but a few). Targets are independent (their steps are normalized apart) and a gate's
noise comes from a generator seeded by (seed, the target's insert id), so neither batching
targets nor scoring a subset of them (a resumed run) changes a target's result.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.text.methods.common import (
    ROWS, check_settings, clean_inputs, clean_loss, device_dtype, secret_nll, site_columns,
)
from memkern.experiments.text.targets import SequenceTargets

STEPS = 30
WINDOWS = 2  # clean windows per target per step: each costs a window-length row
TINY = 1e-30  # a target whose objective has no gradient at all stays put

# gate(theta [Tc, total], noise generators of the Tc targets) -> mask [Tc, total]
Gate = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]


def clean_choice(clean: torch.Tensor, windows: int, *, seed: int) -> torch.Tensor:
    """A seeded choice of ``min(windows, B)`` of the int64/uint8 windows ``clean`` ``[B, L + 1]``
    (int64), in their order; ConfigError when there is none."""
    clean = clean_inputs(clean)
    if len(clean) == 0 or windows < 1:
        raise ConfigError("a learned mask needs at least one clean window to keep the model")
    gen = torch.Generator().manual_seed(seed)
    return clean[torch.randperm(len(clean), generator=gen)[:windows].sort().values]


def per_site_normalized(grad: torch.Tensor, space: ChannelSpace) -> torch.Tensor:
    """``grad`` ``[Tc, total]`` with each row's channels of each site divided by that site's
    largest ``|grad|`` (a site without any gradient stays 0)."""
    out = torch.empty_like(grad)
    for cols in site_columns(space):
        part = grad[:, cols]
        out[:, cols] = part / part.abs().amax(1, keepdim=True).clamp_min(TINY)
    return out


@torch.enable_grad()
def learn_masks(model: nn.Module, space: ChannelSpace, targets: SequenceTargets,
                clean: torch.Tensor, *, init: torch.Tensor, gate: Gate,
                penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
                project: Callable[[torch.Tensor], None] | None = None, steps: int = STEPS,
                lr: float, seed: int, windows: int = WINDOWS, rows: int = ROWS) -> torch.Tensor:
    """float64 ``[T, space.total]``: each target's parameters after ``steps`` normalized steps
    of size ``lr`` on ``objective_t`` plus ``penalty`` from ``init`` (``[space.total]``).
    ``penalty(theta)`` -> ``[Tc]`` (None: none); ``project`` edits theta in place after each step (a
    clamp). ``rows`` bounds the rows of one forward: each target takes 1 + ``windows``."""
    check_settings(steps=steps, lr=lr, rows=rows)
    device, dtype = device_dtype(model)
    ref = clean_choice(clean, windows, seed=seed)
    chunk = max(1, rows // (1 + len(ref)))
    out = torch.zeros(len(targets), space.total, dtype=torch.float64)
    bytes_scored = targets.scored.sum(1).clamp_min(1).to(device, dtype)
    with row_masks(model, space) as ops:
        for start in range(0, len(targets), chunk):
            which = torch.arange(start, min(start + chunk, len(targets)))
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + targets.ids[t])
                    for t in which.tolist()]
            theta = init.to(device, dtype).repeat(len(which), 1).requires_grad_(True)
            for _ in range(steps):
                masks = gate(theta, gens)
                set_masks(ops, space, masks)
                forget = -secret_nll(model, targets, which) / bytes_scored[which.to(device)]
                keep = clean_loss(model, ops, space, ref, masks)
                grad, = torch.autograd.grad((forget + keep).sum(), theta)
                step = per_site_normalized(grad, space)
                if penalty is not None:
                    step = step + torch.autograd.grad(penalty(theta).sum(), theta)[0]
                with torch.no_grad():
                    theta -= lr * step
                    if project is not None:
                        project(theta)
            out[which] = theta.detach().double().cpu()
    return out
