"""The paper's greedy loop as its reference code runs it (docs/method.md, Experiment 4): per
target, a copy of the model, a full backward to the weights, each filter scored by the sum over
it of ``w * dL/dw``, the best filter's weights set to zero. The reference that
:func:`memkern.experiments.localize.greedy_localize` (channel masks, many targets at once) is
tested and benchmarked against: slow, one target at a time, obviously the paper's method.

Only sites fed by a bias-free filter qualify (memkern's conv and linear blocks, whose pre-norm
site follows the filter): there zeroing the filter and zeroing the site's channel are the same
edit.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.localize.greedy import Localization
from memkern.experiments.localize.objective import LocalizationObjective
from memkern.network.sites import example_indices


def site_filters(model: nn.Module, space: ChannelSpace) -> list[str]:
    """Name of the filter weight feeding each site of ``space``: ``P.conv.weight`` or
    ``P.linear.weight`` for the pre-norm site ``P.pre`` of a block; ConfigError otherwise."""
    modules = dict(model.named_modules())
    out = []
    for site in space.names:
        parent, _, leaf = site.rpartition(".")
        block = modules.get(parent)
        layer = next((getattr(block, n) for n in ("conv", "linear")
                      if isinstance(getattr(block, n, None), (nn.Conv2d, nn.Linear))), None)
        if leaf != "pre" or layer is None or layer.bias is not None:
            raise ConfigError(f"site {site} does not follow a bias-free conv or linear of a "
                              f"block: the paper's filter edit is not its channel edit")
        out.append(f"{parent}.{'conv' if isinstance(layer, nn.Conv2d) else 'linear'}.weight")
    return out


def paper_localize(model: nn.Module, objective: LocalizationObjective, targets: torch.Tensor, *,
                   space: ChannelSpace, max_channels: int) -> list[Localization]:
    """One :class:`Localization` per target (``zeroed`` unset), with the same objective,
    references and stop rule as the batched greedy; ``model`` is left unchanged."""
    filters = site_filters(model, space)
    out = []
    for t in targets.tolist():
        edited = copy.deepcopy(model).eval()
        params = dict(edited.named_parameters())
        weights = [params[n] for n in filters]
        device = weights[0].device
        rows = objective.inputs(torch.tensor([t])).to(device)
        ids = objective.ids(torch.tensor([t])).to(device)
        zeroed = [torch.zeros(w.shape[0], dtype=torch.bool, device=device) for w in weights]
        result = Localization(index=t)
        while True:
            with example_indices(ids):
                loss, clean = objective(edited(rows)[None], torch.tensor([t]))
            result.trace.append(float(loss.detach()))
            if int(clean.argmax()) != int(objective.labels[t]):
                result.flipped = True
                break
            if len(result.channels) >= max_channels:
                break
            grads = torch.autograd.grad(loss.sum(), weights)
            with torch.no_grad():
                scores = [(w * g).flatten(1).sum(1).masked_fill(z, float("-inf"))
                          for w, g, z in zip(weights, grads, zeroed)]
                best = max(range(len(scores)), key=lambda i: float(scores[i].max()))
                c = int(scores[best].argmax())
                weights[best][c] = 0
            zeroed[best][c] = True
            result.channels.append((space.names[best], c))
        out.append(result)
    return out
