"""A site's consumer on R candidate rows, from its cached output and one input channel.

When candidate r zeroes channel ``c_r`` of a site and the consumer's input ``z`` differs from
the cached input ``z0`` only in the features of that channel, the consumer is linear in the
difference: ``layer(z) = layer(z0) + W_c (z - z0)_c``, bias excluded. For R candidates that
is one grouped conv (R groups of one input channel) or one batched matmul over each channel's
``g`` features, instead of R full layers. The difference is checked on every call; where it
reaches other features the full layer runs, and :attr:`DeltaForward.fell_back` says why.
"Differs" means by more than 4 units in the last place of ``z0``: elementwise ops give bits
that depend on a value's position in the batch (float32 GELU on CPU rounds its vectorized body
and its scalar tail differently), so the same input rows may come back a few ulps apart on R*N
rows; ignoring that is within the rounding of the full layer itself.

Layouts of a site's channel ``c`` (``C`` channels) at the consumer's input:
- conv, ``[N, C, *spatial]``: input channel ``c`` (1d, 2d, 3d; any padding mode; grouped
  convs too: channel c reaches only its group's output channels);
- linear, ``[N, *mid, F]`` with ``F = C * g``: features ``c*g .. c*g+g-1`` when the site's
  channels are dim 1 (a flatten of ``[N, C, ...]``), features ``c, c+C, ...`` when they are the
  last dim (tokens ``[N, T, C]``: ``g = 1``; a flatten of tokens: ``g = T``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
FALLBACK = "its input differs outside the zeroed channel (checked at run time)"


def delta_unsupported(module: nn.Module, z0: torch.Tensor, site_channels: int) -> str | None:
    """Why ``module`` reading cached input ``z0`` cannot take the delta path, or None."""
    if type(module) in _CONV:
        if z0.ndim != module.weight.ndim or z0.shape[1] != site_channels:
            return f"conv input of shape {tuple(z0.shape[1:])} per row has no channel dim of " \
                   f"{site_channels}"
        return None
    if type(module) is nn.Linear:
        if z0.shape[-1] % site_channels:
            return f"linear input of {z0.shape[-1]} features per position is not a multiple " \
                   f"of the site's {site_channels} channels"
        return None
    return f"{type(module).__name__} has no delta rule"


class DeltaForward:
    """Replacement ``forward`` of ``module`` on R*N rows (candidate-major) whose cached input is
    ``z0`` ``[N, ...]`` and output ``o0``; candidate r zeroes site channel ``channels[r]``."""

    def __init__(self, module: nn.Module, z0: torch.Tensor, o0: torch.Tensor,
                 channels: torch.Tensor, site_channels: int, channel_dim: int):
        self.module, self.z0, self.o0 = module, z0, o0
        self.channels, self.site_channels = channels, site_channels
        self.channel_major = channel_dim == 1
        self.tol = z0.abs() * (4 * torch.finfo(z0.dtype).eps)
        self.fell_back: str | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        r, n = len(self.channels), self.z0.shape[0]
        if z.shape != (r * n, *self.z0.shape[1:]):
            return self._full(z)
        zr = z.view(r, n, *z.shape[1:]) if z.is_contiguous() else z.reshape(r, n, *z.shape[1:])
        conv = _CONV.get(type(self.module))
        out = self._conv(zr, conv) if conv else self._linear(zr)
        return self._full(z) if out is None else out.reshape(r * n, *self.o0.shape[1:])

    def _same(self, diff: torch.Tensor) -> bool:
        return bool(torch.le(diff.abs_(), self.tol).all())  # False on NaN; diff is scratch

    def _full(self, z: torch.Tensor) -> torch.Tensor:
        self.fell_back = FALLBACK
        return type(self.module).forward(self.module, z)

    def _conv(self, zr: torch.Tensor, conv) -> torch.Tensor | None:
        m, c = self.module, self.channels
        r, n = zr.shape[:2]
        ar = torch.arange(r, device=zr.device)
        diff = zr - self.z0
        d = diff[ar, :, c]  # [R, N, *spatial]
        diff[ar, :, c] = 0
        if not self._same(diff):
            return None
        d = d.transpose(0, 1)  # [N, R, *spatial]: candidates as input channels
        padding = m.padding
        if m.padding_mode != "zeros":  # per-channel padding commutes with the channel split
            d, padding = F.pad(d, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
        k, per_group = m.weight.shape[2:], m.in_channels // m.groups
        cout = m.out_channels // m.groups  # output channels that channel c reaches
        w = m.weight.view(m.groups, cout, per_group, *k)[c // per_group, :, c % per_group]
        out = conv(d, w.reshape(r * cout, 1, *k), None, m.stride, padding, m.dilation, r)
        out = out.view(n, r, cout, *self.o0.shape[2:]).transpose(0, 1)  # [R, N, cout, *sp']
        if m.groups == 1:
            return out + self.o0
        full = self.o0.expand(r, *self.o0.shape).clone()
        full.view(r, n, m.groups, cout, *self.o0.shape[2:])[ar, :, c // per_group] += out
        return full

    def _linear(self, zr: torch.Tensor) -> torch.Tensor | None:
        r, n = zr.shape[:2]
        mid, features = zr.shape[2:-1], zr.shape[-1]
        g = features // self.site_channels
        steps = torch.arange(g, device=zr.device)
        cols = self.channels[:, None] * g + steps if self.channel_major \
            else self.channels[:, None] + self.site_channels * steps  # [R, g]
        idx = cols.view(r, *([1] * (zr.ndim - 2)), g).expand(r, n, *mid, g)
        diff = zr - self.z0
        d = diff.gather(-1, idx)  # [R, N, *mid, g]
        diff.scatter_(-1, idx, 0)
        if not self._same(diff):
            return None
        w = self.module.weight[:, cols].permute(1, 2, 0)  # [R, g, out]
        delta = torch.bmm(d.reshape(r, -1, g), w)  # [R, N*prod(mid), out]
        return delta.view(r, n, *self.o0.shape[1:]) + self.o0
