"""Exact single-channel ablation scan: the objective after zeroing each channel, all at once.

For a site s, everything that finishes before s runs once on the N input rows and is cached;
the model is then run on R*N rows (R candidate channels x N inputs) with those modules
replaced by their cached outputs, so only the suffix from s on is computed per candidate.
The first conv/linear after s (its "first consumer") is not recomputed either: its input
differs from the cached one only in channel c (norm, ReLU, pooling and residual adds act per
channel), so its output is the cached output plus a one-input-channel convolution of that
difference (a grouped conv over the R candidates). That is checked at run time; where the
difference reaches other channels the full layer runs. Measured on ResNet-9 (1,344 channels,
one 32x32 example, 2 CPU cores): see bench/bench_localize.py.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memkern.localize.channels import ChannelSpace, channel_space, row_masks, set_masks
from memkern.sites import channel_sites, example_indices

Objective = Callable[[torch.Tensor], torch.Tensor]  # logits [R, N, classes] -> [R]
MAX_ROWS = 4096


def label_objective(labels: torch.Tensor) -> Objective:
    """Mean cross-entropy of the N rows against ``labels`` (int64 ``[N]``), per candidate."""
    def objective(logits: torch.Tensor) -> torch.Tensor:
        r, n, k = logits.shape
        y = labels.to(logits.device).repeat(r)
        return F.cross_entropy(logits.reshape(r * n, k), y, reduction="none").view(r, n).mean(1)
    return objective


def _as_objective(y_or_objective) -> Objective:
    return label_objective(y_or_objective) if torch.is_tensor(y_or_objective) else y_or_objective


def _space(model, sites) -> ChannelSpace:
    return sites if isinstance(sites, ChannelSpace) else channel_space(model, sites)


def _base_rows(space: ChannelSpace, base_mask, rows: int, like: torch.Tensor) -> torch.Tensor:
    """The current mask (float ``[total]``, default all on) for ``rows`` rows."""
    m = torch.ones(space.total, dtype=like.dtype, device=like.device) if base_mask is None \
        else base_mask.to(dtype=like.dtype, device=like.device)
    return m.expand(rows, -1).clone()


@torch.no_grad()
def naive_ablation_scan(model: nn.Module, x: torch.Tensor, y_or_objective, *,
                        sites: Sequence[str] | ChannelSpace | None = None,
                        base_mask: torch.Tensor | None = None,
                        candidates: torch.Tensor | None = None,
                        ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: one full forward per channel. Same contract as :func:`ablation_scan`."""
    space, objective = _space(model, sites), _as_objective(y_or_objective)
    out = torch.full((space.total,), float("nan"), dtype=torch.float64)
    cand = range(space.total) if candidates is None else torch.as_tensor(candidates).tolist()
    with row_masks(model, space) as ops:
        for c in cand:
            m = _base_rows(space, base_mask, len(x), x)
            m[:, c] = 0
            set_masks(ops, space, m)
            with example_indices(ids):
                out[c] = float(objective(model(x)[None])[0])
    return out


class _Order:
    """Start/end order of every module call in one forward (hooks), and cached tensors."""

    def __init__(self, model: nn.Module, keep: set[str] | None = None):
        self.model, self.keep = model, keep
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.tick = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator["_Order"]:
        handles = []
        for name, module in self.model.named_modules():
            if not name:
                continue
            handles.append(module.register_forward_pre_hook(self._pre(name)))
            handles.append(module.register_forward_hook(self._post(name)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre(self, name):
        def hook(module, args):
            if name in self.start:
                raise ValueError(f"module {name} runs twice in one forward; the ablation scan "
                                 f"needs each module called once")
            self.start[name] = self.tick
            self.tick += 1
            if self.keep is not None and name in self.keep and args:
                self.inputs[name] = args[0]
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.end[name] = self.tick
            self.tick += 1
            if self.keep is not None and name in self.keep:
                self.outputs[name] = output
        return hook


def _plan(order: _Order, model: nn.Module, site: str) -> tuple[list[str], str | None]:
    """Maximal modules finished before ``site`` starts, and the first conv/linear after it."""
    names = dict(model.named_modules())
    s0, s1 = order.start[site], order.end[site]
    done = {n for n in order.end if order.end[n] < s0}
    prefix = [n for n in done if n.rpartition(".")[0] not in done]
    consumers = [n for n in order.start if order.start[n] > s1
                 and isinstance(names[n], (nn.Conv2d, nn.Linear))]
    first = min(consumers, key=order.start.get) if consumers else None
    return prefix, first


def _expand(t: torch.Tensor, r: int) -> torch.Tensor:
    """``[N, ...] -> [R*N, ...]``, candidate-major; a zero-stride view when N = 1."""
    return t.unsqueeze(0).expand(r, *t.shape).reshape(r * t.shape[0], *t.shape[1:])


def _delta_forward(module: nn.Module, z0: torch.Tensor, o0: torch.Tensor,
                   channels: torch.Tensor, site_channels: int) -> Callable:
    """``module``'s forward on R*N rows whose input differs from ``z0`` (``[N, ...]``) only in
    channel ``channels[r]`` for candidate r: cached output ``o0`` plus the layer applied to
    that one channel's difference. Falls back to the full layer when the check fails."""
    full = module.forward
    r, n = len(channels), z0.shape[0]
    ar = torch.arange(r, device=z0.device)

    def forward(z: torch.Tensor) -> torch.Tensor:
        zr = z.reshape(r, n, *z.shape[1:])
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or z.shape[1] != site_channels:
                return full(z)
            diff = zr - z0
            d = diff[ar, :, channels]  # [R, N, H, W]
            diff[ar, :, channels] = 0
            if diff.any():
                return full(z)
            w = module.weight[:, channels].transpose(0, 1).reshape(r * module.out_channels, 1,
                                                                   *module.weight.shape[2:])
            out = F.conv2d(d.transpose(0, 1), w, None, module.stride, module.padding,
                           module.dilation, groups=r)  # [N, R*Cout, H', W']
            out = out.view(n, r, *o0.shape[1:]).transpose(0, 1)
            return (out + o0).reshape(r * n, *o0.shape[1:])
        # Linear: channel c owns g consecutive input features (g > 1 after a flatten).
        if z.shape[-1] % site_channels:
            return full(z)
        g = z.shape[-1] // site_channels
        cols = channels[:, None] * g + torch.arange(g, device=z.device)  # [R, g]
        diff = zr - z0
        d = torch.gather(diff, 2, cols[:, None, :].expand(r, n, g))  # [R, N, g]
        diff.scatter_(2, cols[:, None, :].expand(r, n, g), 0)
        if diff.any():
            return full(z)
        w = module.weight[:, cols].permute(1, 0, 2)  # [R, out, g]
        return (torch.einsum("rng,rog->rno", d, w) + o0).reshape(r * n, -1)

    return forward


@contextlib.contextmanager
def _swapped(modules: dict[str, nn.Module], forwards: dict[str, Callable]) -> Iterator[None]:
    for name, fwd in forwards.items():
        modules[name].forward = fwd
    try:
        yield
    finally:
        for name in forwards:
            del modules[name].forward


@torch.no_grad()
def ablation_scan(model: nn.Module, x: torch.Tensor, y_or_objective, *,
                  sites: Sequence[str] | ChannelSpace | None = None,
                  base_mask: torch.Tensor | None = None,
                  candidates: torch.Tensor | None = None,
                  max_rows: int = MAX_ROWS, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The exact objective after zeroing each single channel of ``sites`` (default every pre-norm
    site), on top of ``base_mask`` (float ``[total]``, 1 = on; default all on).

    ``x``: ``[N, ...]`` inputs; ``y_or_objective``: int64 labels ``[N]`` (mean cross-entropy) or
    a callable ``logits [R, N, classes] -> [R]``; ``candidates``: flat channel indices to scan
    (default all); ``ids``: int64 ``[N]`` dataset indices of the rows (tied dropout), or None.
    Returns float64 ``[space.total]``, NaN where not scanned. Eval mode assumed (BatchNorm
    running statistics): rows must not interact.
    """
    model.eval()
    space, objective = _space(model, sites), _as_objective(y_or_objective)
    cand = torch.arange(space.total) if candidates is None else torch.as_tensor(candidates).cpu()
    out = torch.full((space.total,), float("nan"), dtype=torch.float64)
    if len(cand) == 0 or len(x) == 0:
        return out
    n = len(x)
    with row_masks(model, space) as ops:
        modules = dict(model.named_modules())  # with the row-mask ops just attached
        set_masks(ops, space, _base_rows(space, base_mask, 1, x))
        order = _Order(model)
        with order.recording(), example_indices(None if ids is None else ids[:1]):
            model(x[:1])
        plans = {s: _plan(order, model, s) for s in space.names}
        keep = {m for prefix, first in plans.values() for m in prefix} | \
               {first for _, first in plans.values() if first}
        cache = _Order(model, keep)
        set_masks(ops, space, _base_rows(space, base_mask, n, x))
        with cache.recording(), example_indices(ids):
            model(x)
        sites_by_name = channel_sites(model)
        for s, off, count in zip(space.names, space.offsets, space.counts):
            mine = cand[(cand >= off) & (cand < off + count)]
            prefix, first = plans[s]
            step = max(1, max_rows // n)
            for start in range(0, len(mine), step):
                flat = mine[start:start + step]
                r = len(flat)
                m = _base_rows(space, base_mask, r, x)
                m[torch.arange(r), flat.to(m.device)] = 0
                set_masks(ops, space, m.repeat_interleave(n, dim=0))
                forwards = {p: (lambda *a, _t=_expand(cache.outputs[p], r), **k: _t) for p in prefix}
                if first is not None:
                    forwards[first] = _delta_forward(
                        modules[first], cache.inputs[first], cache.outputs[first],
                        (flat - off).to(x.device), sites_by_name[s].channels)
                with _swapped(modules, forwards), \
                        example_indices(None if ids is None else ids.repeat(r)):
                    logits = model(_expand(x, r))
                out[flat] = objective(logits.view(r, n, -1)).double().cpu()
        set_masks(ops, space, None)
    return out
