"""Localized channels removed from the weights themselves: a model that computes, with no mask
attached, exactly what the model computes with those channels zeroed at their sites.

One rule per kind of site, looked up by the exact type of the module holding the site (a
subclass may compute otherwise, so it gets no rule), each an edit that gives the zeroed
channel the value 0 at its site for every input:

- a site right after a map's output (``pre-norm``: a bias-free conv or linear): the map's
  output rows (filters) of those channels, and their bias entries where there is a bias;
- a site after ``norm -> ReLU`` (``post-activation`` of memkern's conv and linear blocks): the
  norm's per-channel scale and shift, so the norm outputs 0 and ReLU(0) = 0;
- a transformer's MLP neurons (after the activation): the second linear layer's input columns;
- a language model's MLP neurons and attention heads (gpt, hf:gpt2): their output weights in
  the layer that reads them (:mod:`memkern.network.models.channel_weights`; hf:gpt2's
  ``Conv1D`` stores its weight ``[in, out]``, so these are rows of ``c_proj.weight``).

Sites found by hooks on a model memkern did not build have a rule where the site is the output
of a plain ``nn.Conv2d`` / ``nn.Linear`` (its output rows) or the input it alone reads (its
input columns; a conv without groups); any other site is refused by :func:`check_editable`,
before any work.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace
from memkern.network.attach import hooked_on
from memkern.network.models.blocks import ConvBlock, LinearBlock
from memkern.network.models.channel_weights import ChannelWeights, holder_rule
from memkern.network.models.resnet50 import Bottleneck
from memkern.network.models.vit import TransformerBlock
from memkern.network.sites import ChannelSite, channel_sites

Rule = Callable[[nn.Module, torch.Tensor], None]  # (holder module, channels int64 [K])


def _zero_outputs(layer: nn.Module, channels: torch.Tensor) -> None:
    layer.weight[channels] = 0.0
    if layer.bias is not None:
        layer.bias[channels] = 0.0


def _zero_inputs(layer: nn.Module, columns: torch.Tensor) -> None:
    """Input features of a linear layer, input channels of a conv without groups."""
    layer.weight[:, columns] = 0.0


def _zero_norm(norm: nn.Module, channels: torch.Tensor) -> None:
    """A block's BatchNorm / GroupNorm (always affine: memkern builds them)."""
    norm.weight[channels] = 0.0
    norm.bias[channels] = 0.0


def _zero_read(weights: ChannelWeights, channels: torch.Tensor) -> None:
    for owned in weights.read:
        owned.of()[channels] = 0.0


# (exact type of the module holding the site, the site's attribute name) -> rule
RULES: dict[tuple[type, str], Rule] = {
    (ConvBlock, "pre"): lambda m, c: _zero_outputs(m.conv, c),
    (LinearBlock, "pre"): lambda m, c: _zero_outputs(m.linear, c),
    (Bottleneck, "expand_site"): lambda m, c: _zero_outputs(m.expand, c),
    (ConvBlock, "post"): lambda m, c: _zero_norm(m.norm, c),
    (LinearBlock, "post"): lambda m, c: _zero_norm(m.norm, c),
    (TransformerBlock, "hidden"): lambda m, c: _zero_inputs(m.fc2, c),
}
HOOKED_MAPS = (nn.Conv2d, nn.Linear)  # hook sites at these: their output rows / input columns


def _rule(model: nn.Module, name: str, site: ChannelSite) -> tuple[nn.Module, Rule] | None:
    """The module the rule edits and the rule for site ``name``, or None."""
    holder_path, _, attr = name.rpartition(".")
    modules = dict(model.named_modules())
    holder = modules.get(holder_path)
    if holder is not None and getattr(holder, attr, None) is site:
        rule = RULES.get((type(holder), attr))
        if rule is not None:
            return holder, rule
        owned = holder_rule(holder, attr)
        return (holder, lambda m, c: _zero_read(owned(m), c)) if owned is not None else None
    host = modules.get(name.removesuffix(":in"))  # a hook site is named after its host
    if type(host) not in HOOKED_MAPS:
        return None
    hooked = hooked_on(host, site)
    if hooked == "output":
        return host, _zero_outputs
    if hooked == "input" and getattr(host, "groups", 1) == 1:
        return host, _zero_inputs
    return None


def check_editable(model: nn.Module, sites: Sequence[str]) -> None:
    """ConfigError naming the first site of ``sites`` whose channels no weight edit removes
    exactly, and the sites of the model that have one."""
    found = channel_sites(model)
    bad = [s for s in sites if _rule(model, s, found[s]) is None]
    if bad:
        good = [s for s, site in found.items() if _rule(model, s, site) is not None]
        offer = (f"choose --sites among {', '.join(good[:6])}{', ...' if len(good) > 6 else ''}"
                 if good else "this model has no such site")
        raise ConfigError(f"--save-edited: no weight edit removes the channels of site {bad[0]} "
                          f"exactly (docs/method.md, \"Keeping the edited model\"); {offer}, or "
                          f"leave out --save-edited")


@torch.no_grad()
def without_channels(model: nn.Module, space: ChannelSpace, zeroed: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose weights remove the channels ``zeroed`` (bool
    ``[space.total]``) at their sites; ``model`` is unchanged. Site ops attached to the copy
    (tied dropout) stay as they are."""
    edited = copy.deepcopy(model)
    sites = channel_sites(edited)
    for name, part in space.split(zeroed.reshape(1, -1)).items():
        channels = torch.nonzero(part[0]).flatten()
        if len(channels):
            found = _rule(edited, name, sites[name])
            if found is None:
                check_editable(edited, [name])  # raises, naming the sites that have a rule
            holder, rule = found
            rule(holder, channels.to(next(edited.parameters()).device))
    return edited
