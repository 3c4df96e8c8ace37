"""The channel space of a localization: chosen sites, their channels, one flat index.

A flat mask ``[R, total]`` (1 = on, 0 = zeroed) is split into one ``[R, C_s]`` view per site
and attached to the sites as per-row :func:`gathered_channel_mask` ops, so R rows of one batch
run R differently edited models with no model copies.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.kernels.channel_mask import gathered_channel_mask
from memkern.network.sites import PRE_NORM, ChannelSite, channel_sites


class RowMask(nn.Module):
    """Site op applying ``mask`` (float ``[N, C]``, one row per batch row); None = identity."""

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return x
        return gathered_channel_mask(x, self.mask, channel_dim=self.channel_dim)


@dataclass(frozen=True)
class ChannelSpace:
    """``names[i]`` has ``counts[i]`` channels at flat positions ``offsets[i]:offsets[i]+counts[i]``."""

    names: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for c in self.counts:
            out.append(total)
            total += c
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[R, total] -> {site: [R, C_s]}`` (views)."""
        return dict(zip(self.names, torch.split(flat, list(self.counts), dim=1)))

    def locate(self, flat_index: int) -> tuple[str, int]:
        """Flat index -> ``(site name, channel)``."""
        for name, off, count in zip(self.names, self.offsets, self.counts):
            if flat_index < off + count:
                return name, flat_index - off
        raise IndexError(flat_index)

    def flat(self, site: str, channel: int) -> int:
        return self.offsets[self.names.index(site)] + channel


def channel_space(model: nn.Module, sites: Sequence[str] | None = None) -> ChannelSpace:
    """The given sites (default: every pre-norm site) in forward order; unknown names are an
    error listing the model's sites."""
    all_sites = channel_sites(model)
    if sites:
        unknown = [s for s in sites if s not in all_sites]
        if unknown:
            raise ConfigError(f"unknown site(s) {', '.join(unknown)}; this model has "
                              f"{', '.join(all_sites)} (see `memkern sites`)")
        chosen = [n for n in all_sites if n in set(sites)]
    else:
        chosen = [n for n, s in all_sites.items() if s.position == PRE_NORM]
        if not chosen:
            raise ConfigError("this model has no pre-norm sites; pass --sites (see `memkern sites`)")
    return ChannelSpace(tuple(chosen), tuple(all_sites[n].channels for n in chosen))


@contextlib.contextmanager
def attached(model: nn.Module, ops: dict[str, nn.Module]) -> Iterator[dict[str, nn.Module]]:
    """Push each op of ``ops`` (site name -> op) on top of its site; remove exactly those on
    exit."""
    sites: dict[str, ChannelSite] = channel_sites(model)
    try:
        for n, op in ops.items():
            sites[n].attach(op)
        yield ops
    finally:
        for n, op in ops.items():
            if any(held is op for held in sites[n].ops):
                sites[n].detach(op)


def row_masks(model: nn.Module, space: ChannelSpace
              ) -> contextlib.AbstractContextManager[dict[str, RowMask]]:
    """Push a :class:`RowMask` on top of every site of ``space`` (above any tied dropout, which
    keeps acting); remove exactly those on exit."""
    sites = channel_sites(model)
    return attached(model, {n: RowMask(sites[n].channel_dim) for n in space.names})


def set_masks(ops: dict[str, RowMask], space: ChannelSpace, flat: torch.Tensor | None) -> None:
    """Give every op its ``[R, C_s]`` slice of ``flat`` (``[R, total]``), or clear them (None)."""
    parts = space.split(flat) if flat is not None else {n: None for n in space.names}
    for n, op in ops.items():
        op.mask = parts[n]
