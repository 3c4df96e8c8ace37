"""INJ: plant fresh canaries into known MLP neurons, then ask a method where they are.

The protocol of MemPi (Chang et al., NAACL 2024, Section 3): a seeded random share of the
neurons of every MLP site is drawn, and only those neurons' weights are trained, on a fresh
canary's secret NLL given its prefix, until it is extracted or a step budget runs out; the
neurons that hold it are then known exactly. A neuron's weights are its input row and bias in
the layer that computes the site and its output weights in the layer that reads it
(:mod:`memkern.network.models.channel_weights`). A method's recall is the share of them among
its top-ranked neurons of the same count per site.

Why rows and columns at a small step: output weights alone at a large step grow far beyond
every other neuron's, so a ranking by weight norm finds them without reading the canary; spread
over rows and columns at :data:`LR` they end closer to the others' norms (docs/text.md, INJ).
Each canary is planted into its own copy of the model: canaries share their prefix's wording,
so neurons planted for one fire on the others' prefixes as well, and several planted together
in one model fight over their digits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.data.text.inserts import make_canaries
from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.text.benchmark.neurons import mlp_sites, random_per_site
from memkern.experiments.text.targets import SequenceTargets, sequence_targets
from memkern.network.models.channel_weights import Owned, channel_weights
from memkern.network.sites import example_indices

MAX_STEPS = 1000
LR = 5e-4  # Adam; small against the weights' scale (module docstring)


@dataclass
class Injection:
    """``model``: the edited copy; ``canary``: the fresh canary (one row); ``truth`` bool
    ``[1, total]``: the neurons it was planted in; ``steps`` taken; ``extracted``: at the end
    (False: the step budget ran out first, and ``model`` is as far as it got)."""

    model: nn.Module
    canary: SequenceTargets
    truth: torch.Tensor
    steps: int
    extracted: bool


class _Unplanted:
    """What :func:`sequence_targets` reads of a dataset, for canaries in no window: canary i's
    tied-dropout key is ``first_key + i``, a key no training window has."""

    def __init__(self, first_key: int, count: int):
        self.mask_keys = torch.arange(first_key, first_key + count)

    def copies(self, insert_id: int) -> list[int]:
        return [insert_id]


def fresh_canaries(count: int, *, seed: int, taken: set[bytes], first_key: int
                   ) -> SequenceTargets:
    """``count`` new canaries drawn from ``seed`` whose prefixes are none of ``taken`` (the
    run's own); tied-dropout keys from ``first_key`` on."""
    drawn = make_canaries(count + len(taken), (1,), seed=seed, documents=[])
    fresh = [c for c in drawn if c.prefix not in taken][:count]
    return sequence_targets(fresh, _Unplanted(first_key, count))


def neuron_weights(model: nn.Module, site: str) -> tuple[Owned, ...]:
    """The weights MLP site ``site``'s neurons own, each viewed with neuron j at index j: the
    row and bias computing it and its output weights (gpt: ``fc1``, ``fc2``; hf:gpt2: ``c_fc``,
    ``c_proj``)."""
    weights = channel_weights(model, site)
    if weights is None:
        raise ConfigError(f"no known layers compute and read site {site}: INJ plants into the "
                          f"MLP neurons of a gpt or hf:gpt2 model")
    return weights.made + weights.read


def inject(model: nn.Module, space: ChannelSpace, canary: SequenceTargets, *, fraction: float,
           seed: int = 0, max_steps: int = MAX_STEPS, lr: float = LR) -> Injection:
    """Plant ``canary`` (one row) into a copy of ``model``: into a seeded random ``fraction`` of
    every MLP site, by Adam on those neurons' input rows, biases and output weights only, until
    it is extracted (teacher-forced greedy) or ``max_steps`` steps. ``model`` is unchanged."""
    if len(canary) != 1:
        raise ValueError(f"inject plants one canary per model copy, got {len(canary)}")
    edited = copy.deepcopy(model).eval()
    dev = next(edited.parameters()).device
    wanted = [p.requires_grad for p in edited.parameters()]  # given back at the end
    for p in edited.parameters():
        p.requires_grad_(False)
    truth = random_per_site(space, fraction, generator=torch.Generator().manual_seed(seed))[None]
    chosen = space.split(truth.float().to(dev))
    trained = [(s, w) for s in mlp_sites(space) for w in neuron_weights(edited, s)]
    for _, w in trained:
        w.param.requires_grad_(True)
    opt = torch.optim.Adam([w.param for _, w in trained], lr=lr)
    inputs, keys = canary.inputs().to(dev), canary.keys.to(dev)
    steps = 0
    while True:
        with example_indices(keys):
            logits = edited(inputs)
        hit = bool(canary.extracted(logits)[0])
        if hit or steps == max_steps:
            break
        opt.zero_grad()
        canary.secret_nll(logits).sum().backward()
        for s, w in trained:  # Adam leaves an entry whose gradients are all 0 as it was
            grad = w.of(w.param.grad)
            grad.mul_(chosen[s][0].view(-1, *[1] * (grad.dim() - 1)))
        opt.step()
        steps += 1
    for _, w in trained:
        w.param.grad = None
    for p, flag in zip(edited.parameters(), wanted):
        p.requires_grad_(flag)
    return Injection(model=edited, canary=canary, truth=truth, steps=steps, extracted=hit)


def recall_at_k(scores: torch.Tensor, truth: torch.Tensor, space: ChannelSpace) -> torch.Tensor:
    """float ``[T]``: per row, the share of the planted neurons (bool ``truth`` ``[T, total]``)
    among the top-k of float ``scores`` ``[T, total]`` in every MLP site, k = the number planted
    there."""
    found = torch.zeros(len(truth))
    for name in mlp_sites(space):
        i = space.names.index(name)
        cols = slice(space.offsets[i], space.offsets[i] + space.counts[i])
        s, t = scores[:, cols].float().cpu(), truth[:, cols]
        place = torch.empty_like(s, dtype=torch.long)
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        place.scatter_(1, order, torch.arange(s.shape[1]).expand_as(s).contiguous())
        found += (t & (place < t.sum(1, keepdim=True))).sum(1).float()
    return found / truth.sum(1).clamp(min=1).float()
