"""Exact single-channel ablation scan: the objective after zeroing each channel, all at once.

For a site s, one probe forward plans the scan from the data flow (:mod:`scan_plan`): every
module whose output does not depend on s runs once on the N input rows and is cached; the
model then runs on R*N rows (R candidate channels x N inputs) with those modules replaced by
their cached outputs. The conv/linear layers that read s's output directly (its consumers) are
not recomputed either: their input differs from the cached one only in channel c, so their
output is the cached output plus that one channel's contribution (:mod:`scan_delta`), checked
at run time. :class:`ScanResult` says per site which path ran. A site that runs more than once
per forward takes the reference loop. Timings: bench/bench_localize.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace, channel_space, row_masks, set_masks
from memkern.experiments.localize.scan_delta import DeltaForward, delta_unsupported
from memkern.experiments.localize.scan_plan import SitePlan, plan_scan
from memkern.network.sites import channel_sites, example_indices, modules_with_sites

Objective = Callable[[torch.Tensor], torch.Tensor]  # logits [R, N, classes] -> [R]
MAX_ROWS = 4096
# On CPU a chunk's largest site-dependent activation is kept near this size: past it the
# suffix's activations leave the caches and rows/s falls (bench/README.md, "Scan chunks sized
# by activation bytes").
CPU_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class ScanResult:
    """``values``: float64 ``[space.total]``, the objective with each scanned channel zeroed
    (NaN where not scanned); ``path``: per scanned site, how it was computed: ``"delta via
    <consumers>"``, ``"full: <reason>"`` (suffix recomputed from the site on), ``"naive:
    <reason>"`` (one full forward per channel), or a ``"; "``-joined mix per consumer."""

    values: torch.Tensor
    path: dict[str, str]


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
    """The current mask (float ``[total]``, default all on) for ``rows`` rows; in ``like``'s
    dtype when it is an image batch (token ids: the default float, the op casts it)."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    m = torch.ones(space.total, dtype=dtype, device=like.device) if base_mask is None \
        else base_mask.to(dtype=dtype, device=like.device)
    return m.expand(rows, -1).clone()


def _checked_ids(ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if ids is None:
        return None
    if ids.shape != (len(x),):
        raise ConfigError(f"ids has shape {tuple(ids.shape)} but x has {len(x)} rows: pass the "
                          f"dataset index of each row, int64 [N]")
    return ids.to(x.device)


def _ids(ids: torch.Tensor | None, repeat: int = 1):
    """Example ids for ``repeat`` candidate-major copies of the rows (no context when None)."""
    return contextlib.nullcontext() if ids is None else example_indices(ids.repeat(repeat))


def _candidates(space: ChannelSpace, candidates) -> torch.Tensor:
    return torch.arange(space.total) if candidates is None else torch.as_tensor(candidates).cpu()


def _by_site(space: ChannelSpace, cand: torch.Tensor) -> Iterator[tuple[str, int, torch.Tensor]]:
    for s, off, count in zip(space.names, space.offsets, space.counts):
        mine = cand[(cand >= off) & (cand < off + count)]
        if len(mine):
            yield s, off, mine


def _naive_values(model, ops, space, x, objective, base_mask, cand, ids, out) -> None:
    with _ids(ids):
        for c in cand.tolist():
            m = _base_rows(space, base_mask, len(x), x)
            m[:, c] = 0
            set_masks(ops, space, m)
            out[c] = float(objective(model(x)[None])[0])


@torch.no_grad()
def naive_ablation_scan(model: nn.Module, x: torch.Tensor, y_or_objective, *,
                        sites: Sequence[str] | ChannelSpace | None = None,
                        base_mask: torch.Tensor | None = None,
                        candidates: torch.Tensor | None = None,
                        ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: one full forward per channel; the arguments of :func:`ablation_scan`, and
    its ``values`` (float64 ``[space.total]``, NaN where not scanned) as the result."""
    space, objective = _space(model, sites), _as_objective(y_or_objective)
    cand = _candidates(space, candidates)
    out = torch.full((space.total,), float("nan"), dtype=torch.float64)
    ids = _checked_ids(ids, x)
    with row_masks(model, space) as ops:
        _naive_values(model, ops, space, x, objective, base_mask, cand, ids, out)
    return out


class _Cache:
    """Hooks keeping the outputs of ``outputs`` and clones of the input and output of
    ``consumers`` in one forward."""

    def __init__(self, model: nn.Module, outputs: set[str], consumers: set[str]):
        self.model, self.keep_out, self.keep_io = model, outputs, consumers
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator["_Cache"]:
        # prepended: a module's own output, before any attached site's hook acts on it
        handles = [m.register_forward_hook(self._hook(n), prepend=True)
                   for n, m in modules_with_sites(self.model)
                   if n in self.keep_out or n in self.keep_io]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name):
        def hook(module, args, output):
            if name in self.keep_io:
                self.inputs[name], output = args[0].clone(), output.clone()
            self.outputs[name] = output
        return hook


def _expand(t: torch.Tensor, r: int) -> torch.Tensor:
    """``[N, ...] -> [R*N, ...]``, candidate-major; a zero-stride view when N = 1."""
    return t.unsqueeze(0).expand(r, *t.shape).reshape(r * t.shape[0], *t.shape[1:])


def _replay(t: torch.Tensor, r: int) -> Callable:
    return lambda *args, **kwargs: _expand(t, r)


@contextlib.contextmanager
def _swapped(modules: dict[str, nn.Module], forwards: dict[str, Callable]) -> Iterator[None]:
    for name, fwd in forwards.items():
        modules[name].forward = fwd
    try:
        yield
    finally:
        for name in forwards:
            del modules[name].forward


def _step(plan: SitePlan, n: int, max_rows: int, device: torch.device) -> int:
    """Candidates per forward of ``n`` rows each."""
    step = max_rows // n
    if device.type == "cpu" and plan.row_bytes:
        step = min(step, CPU_CHUNK_BYTES // (n * plan.row_bytes))
    return max(1, step)


def _path(plan: SitePlan, done: dict[str, str | None]) -> str:
    """The path description of a batched site; ``done``: consumer -> None (delta every time)
    or why it ran the full layer."""
    delta = [c for c, why in done.items() if why is None]
    parts = [f"delta via {', '.join(delta)}"] if delta else []
    parts += [f"full at {c}: {why}" for c, why in done.items() if why is not None]
    if plan.note and delta:
        parts.append(f"full: {plan.note}")
    return "; ".join(parts) if parts else f"full: {plan.note}"


@torch.no_grad()
def ablation_scan(model: nn.Module, x: torch.Tensor, y_or_objective, *,
                  sites: Sequence[str] | ChannelSpace | None = None,
                  base_mask: torch.Tensor | None = None,
                  candidates: torch.Tensor | None = None,
                  max_rows: int = MAX_ROWS,
                  ids: torch.Tensor | None = None) -> ScanResult:
    """The exact objective after zeroing each single channel of ``sites`` (default every pre-norm
    site), on top of ``base_mask`` (float ``[total]``, 1 = on; default all on).

    ``x``: ``[N, ...]`` inputs; ``y_or_objective``: int64 labels ``[N]`` (mean cross-entropy) or
    a callable ``logits [R, N, classes] -> [R]``; ``candidates``: flat channel indices to scan
    (default all); ``ids``: int64 ``[N]``, the dataset index of each row, set around every
    forward (tied dropout in modes "own"/"train" needs it); ``max_rows``: rows per forward (on
    CPU fewer where the site's activations would exceed :data:`CPU_CHUNK_BYTES`).
    Eval mode assumed (BatchNorm running statistics): rows must not interact.
    """
    model.eval()
    space, objective = _space(model, sites), _as_objective(y_or_objective)
    cand = _candidates(space, candidates)
    out = torch.full((space.total,), float("nan"), dtype=torch.float64)
    if len(cand) == 0 or len(x) == 0:
        return ScanResult(out, {})
    ids = _checked_ids(ids, x)
    sites_by_name = channel_sites(model)
    todo = list(_by_site(space, cand))
    n, path = len(x), {}
    with row_masks(model, space) as ops:
        modules = dict(modules_with_sites(model))  # with the mask ops
        set_masks(ops, space, _base_rows(space, base_mask, 1, x))
        with _ids(None if ids is None else ids[:1]):
            plans = plan_scan(model, x[:1], tuple(s for s, _, _ in todo))
        cache = _Cache(model, {m for p in plans.values() for m in p.cached},
                       {m for p in plans.values() for m in p.consumers})
        set_masks(ops, space, _base_rows(space, base_mask, n, x))
        with cache.recording(), _ids(ids):
            model(x)
        for s, off, mine in todo:
            plan, site = plans[s], sites_by_name[s]
            if plan.naive:
                _naive_values(model, ops, space, x, objective, base_mask, mine, ids, out)
                path[s] = f"naive: {plan.naive}"
                continue
            done = {c: delta_unsupported(modules[c], cache.inputs[c], site.channels)
                    for c in plan.consumers}
            step = _step(plan, n, max_rows, x.device)
            for start in range(0, len(mine), step):
                flat = mine[start:start + step]
                r = len(flat)
                m = _base_rows(space, base_mask, r, x)
                m[torch.arange(r), flat.to(m.device)] = 0
                set_masks(ops, space, m.repeat_interleave(n, dim=0))
                forwards = {p: _replay(cache.outputs[p], r) for p in plan.cached}
                deltas = {c: DeltaForward(modules[c], cache.inputs[c], cache.outputs[c],
                                          (flat - off).to(x.device), site.channels,
                                          site.channel_dim)
                          for c, why in done.items() if why is None}
                with _swapped(modules, {**forwards, **deltas}), _ids(ids, r):
                    logits = model(_expand(x, r))  # for modules that read x and are not cached
                out[flat] = objective(logits.unflatten(0, (r, n))).double().cpu()
                done.update({c: d.fell_back for c, d in deltas.items() if d.fell_back})
            path[s] = _path(plan, done)
        set_masks(ops, space, None)
    return ScanResult(out, path)
