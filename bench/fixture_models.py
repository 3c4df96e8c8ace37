"""Models and scan cases the benchmarks and the GPU check share: built as memkern builds them,
with BatchNorm running statistics made non-trivial, as after training (the init's 0/1 would
make every normalization an identity and hide errors in how a path folds it)."""
from __future__ import annotations

import torch
from torch import nn

from memkern.experiments.localize import channel_space
from memkern.network.models import build_model
from memkern.network.sites import channel_sites


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


SCAN = {  # model: (sites quick, sites full (None: every site), channels per site quick/full)
    "resnet9": (["res2.body.1.pre", "conv4.pre"], None, (None, None)),
    "vit": (["blocks.0.hidden", "blocks.3.hidden"], "hidden", (16, None)),
    "resnet50": (["stage1.2.expand_site", "stage4.2.expand_site"],
                 ["stem.pre", "stage1.0.expand_site", "stage2.3.expand_site",
                  "stage3.5.expand_site", "stage4.2.expand_site"], (16, 64)),
}
SCAN_SIDE = {"quick": {"resnet9": 12, "vit": 8, "resnet50": 8},
             "full": {"resnet9": 32, "vit": 32, "resnet50": 32}}


def scan_case(name: str, size: str):
    """One scan ratio's inputs, on the CPU: (model in eval mode with running statistics set,
    channel space, candidate channels, one input row, its label)."""
    quick_sites, full_sites, per_site = SCAN[name]
    side = SCAN_SIDE[size][name]
    model = eval_model(name, image_size=side)
    sites = quick_sites if size == "quick" else full_sites
    if sites == "hidden":
        sites = [n for n in channel_sites(model) if "hidden" in n]
    space = channel_space(model, sites)
    count = per_site[0 if size == "quick" else 1]
    cand = torch.cat([off + torch.randperm(n)[:count or n]
                      for off, n in zip(space.offsets, space.counts)])
    return model, space, cand, torch.randn(1, 3, side, side), torch.tensor([3])
