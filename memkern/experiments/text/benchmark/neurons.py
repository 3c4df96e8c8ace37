"""Which neurons a benchmark drops or plants: the top (or a seeded random) share of every MLP
site, counted per site so that each layer gives up the same fraction of its neurons."""
from __future__ import annotations

import math

import torch

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace

# MLP neuron sites by name: gpt's blocks.i.mlp_hidden, hf:gpt2's transformer.h.i.mlp.hidden
MLP_SITES = (".mlp_hidden", ".mlp.hidden")


def mlp_sites(space: ChannelSpace) -> tuple[str, ...]:
    """The MLP neuron sites of ``space``; ConfigError when it holds none."""
    names = tuple(n for n in space.names if n.endswith(MLP_SITES))
    if not names:
        raise ConfigError(f"the channel space ({', '.join(space.names)}) holds no MLP neuron site "
                          f"(*{', *'.join(MLP_SITES)}); the benchmark drops and plants MLP "
                          f"neurons")
    return names


def per_site_count(width: int, fraction: float) -> int:
    """Neurons taken from a site of ``width``: ``ceil(fraction * width)``, at least one."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"a fraction of neurons must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * width - 1e-9))


def top_per_site(scores: torch.Tensor, space: ChannelSpace, fraction: float) -> torch.Tensor:
    """bool ``[T, total]``: for each row of float ``scores`` ``[T, total]``, the top
    :func:`per_site_count` neurons of every MLP site (higher score = chosen first)."""
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    for name in mlp_sites(space):
        off, width = space.offsets[space.names.index(name)], space.counts[space.names.index(name)]
        k = per_site_count(width, fraction)
        top = scores[:, off:off + width].float().topk(k, dim=1).indices
        chosen[:, off:off + width].scatter_(1, top.cpu(), True)
    return chosen


def random_per_site(space: ChannelSpace, fraction: float, *, generator: torch.Generator
                    ) -> torch.Tensor:
    """bool ``[total]``: a uniformly drawn :func:`per_site_count` neurons of every MLP site."""
    chosen = torch.zeros(space.total, dtype=torch.bool)
    for name in mlp_sites(space):
        off, width = space.offsets[space.names.index(name)], space.counts[space.names.index(name)]
        pick = torch.randperm(width, generator=generator)[:per_site_count(width, fraction)]
        chosen[off + pick] = True
    return chosen
