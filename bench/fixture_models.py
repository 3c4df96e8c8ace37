"""Models the benchmarks and the GPU check share: built as memkern builds them, with BatchNorm
running statistics made non-trivial, as after training (the init's 0/1 would make every
normalization an identity and hide errors in how a path folds it)."""
from __future__ import annotations

import torch
from torch import nn

from memkern.network.models import build_model


def with_running_statistics(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm's running mean ~ N(0, 0.1) and variance ~ U(0.5, 2),
    drawn from the global generator; returned for chaining."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def eval_model(name: str, *, image_size: int, seed: int = 0) -> nn.Module:
    """memkern's ``name`` (10 classes, 3 channels) in eval mode, seeded, running statistics set."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=3, image_size=image_size).eval()
    return with_running_statistics(model)
