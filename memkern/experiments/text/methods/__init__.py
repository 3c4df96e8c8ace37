"""Published ways to find the neurons that hold a memorized sequence, as rankings per target
(docs/lm_methods.md).

Every method has one signature::

    rank(model, space, targets, clean, *, seed=0) -> float [T, space.total]

``space``: the channels ranked (:func:`memkern.experiments.localize.channels.channel_space`, e.g.
a GPT's ``blocks.i.mlp_hidden`` and ``blocks.i.attn.heads``); ``targets``: the memorized
sequences (:class:`memkern.experiments.text.targets.SequenceTargets`); ``clean``: int64/uint8
windows ``[B, L + 1]`` of ordinary training text. Row t scores every channel for target t;
higher means more responsible for it. Each method scores heads as it scores neurons. Methods
read the model as given (mode, tied-dropout mode) and change none of its weights.
"""
from __future__ import annotations

from typing import Callable

import torch

from memkern.experiments.text.methods import (
    activations, balanced_subnet, gradient_magnitude, hard_concrete, integrated_gradients,
    memkern_greedy, random_baseline, slimming, zero_out,
)

Method = Callable[..., torch.Tensor]

METHODS: dict[str, Method] = {
    "greedy": memkern_greedy.rank,
    "zero_out": zero_out.rank,
    "activations": activations.rank,
    "integrated_gradients": integrated_gradients.rank,
    "slimming": slimming.rank,
    "hard_concrete": hard_concrete.rank,
    "balanced_subnet": balanced_subnet.rank,
    "gradient_magnitude": gradient_magnitude.rank,
    "random": random_baseline.rank,
}
