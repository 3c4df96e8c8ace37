"""Channel sites: the named places in a model where a per-example channel mask can act.

A :class:`ChannelSite` is an identity module placed after a conv/linear output (position
``"pre-norm"``: zeroing a channel there equals zeroing a bias-free filter) or after an
activation (``"post-activation"``: where dropout acts). Experiments attach an ``op`` to a site
(example-tied dropout, a gathered per-row mask for localization); a site without one costs a
Python call and nothing else.

The dataset index of each row reaches the sites through :func:`example_indices`, a context
manager over a context variable, so no model's ``forward`` signature has to carry it:

    with example_indices(batch_index):
        logits = model(x)
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

PRE_NORM = "pre-norm"
POST_ACTIVATION = "post-activation"
POSITIONS = (PRE_NORM, POST_ACTIVATION)

_example_indices: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "memkern_example_indices", default=None
)


@contextlib.contextmanager
def example_indices(indices: torch.Tensor | None) -> Iterator[None]:
    """Make ``indices`` (int64 ``[N]``, dataset index of each row) visible to site ops."""
    token = _example_indices.set(indices)
    try:
        yield
    finally:
        _example_indices.reset(token)


def current_example_indices() -> torch.Tensor | None:
    """The dataset indices set by the innermost :func:`example_indices`, or None."""
    return _example_indices.get()


@dataclass(frozen=True)
class SiteInfo:
    """What a model says about one of its sites: the stable name, position and channel count."""

    name: str
    position: str
    channels: int


class ChannelSite(nn.Module):
    """Identity unless an ``op`` is attached; ``channel_dim`` is 1 for ``[N, C, ...]`` and -1
    for token layouts ``[N, T, C]``."""

    def __init__(self, channels: int, position: str, channel_dim: int = 1):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"site position must be one of {POSITIONS}, got {position!r}")
        self.channels = channels
        self.position = position
        self.channel_dim = channel_dim
        self.site_name = ""  # filled by name_sites() with the module path
        self.op: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is None:
            return x
        return self.op(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, position={self.position}"


def name_sites(model: nn.Module) -> None:
    """Give every site its module path as a stable name (called once by each model builder)."""
    for name, module in model.named_modules():
        if isinstance(module, ChannelSite):
            module.site_name = name


def channel_sites(model: nn.Module) -> dict[str, ChannelSite]:
    """All sites of ``model`` by name, in module registration (= forward) order."""
    return {m.site_name: m for m in model.modules() if isinstance(m, ChannelSite)}


def site_infos(model: nn.Module) -> list[SiteInfo]:
    return [SiteInfo(n, s.position, s.channels) for n, s in channel_sites(model).items()]


def clear_site_ops(model: nn.Module) -> None:
    for site in channel_sites(model).values():
        site.op = None
