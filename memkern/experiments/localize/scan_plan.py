"""Plan of the ablation scan from the data flow of one probe forward.

One row runs through the model under a dispatch mode that follows every aten op: each storage
carries a set of bits, two per site ("depends on the site's output", "depends on it through a
conv/linear"), and an op's outputs and the storages it writes get the union of its inputs'
bits. A value that leaves tensors (``.item()``, ``if x.sum() > 0``) hands its bits to every
later op. Module hooks read the bits at each call's start and end. Per site that gives:

- cached: the maximal modules whose output does not depend on the site (also those called
  after it, such as a shortcut conv that reads the block input), called once, writing no
  storage that existed before their call, their output not written afterwards;
- consumers: the conv/linear modules called once that read the site's output with no
  conv/linear in between (for a ResNet-50 expand site: the next block's reduce conv, and
  its shortcut conv at a stage boundary): their input differs from the cached one only in
  the zeroed channel, which the scan checks at run time before using it;
- naive: the reason the site needs the reference loop (it runs more than once per forward);
- row_bytes: the largest output of a module that depends on the site, in bytes per input row
  (what the scan sizes its candidate chunks by).

The bits over-approximate dependence (a storage is tainted as a whole), which can only cost
speed: a module wrongly held dependent is recomputed, exactly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memkern.network.sites import ChannelSite, modules_with_sites

# Consumers whose per-input-channel contribution the scan computes alone (exact types: a
# user's subclass may change the forward, so it takes the full layer).
CONSUMER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class SitePlan:
    """What the scan reuses for one site (module names as in ``named_modules``)."""

    cached: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    naive: str | None = None  # reason for the reference loop, None when batched
    note: str = ""  # why no consumer is on the fast path, when none is
    row_bytes: int = 0  # largest site-dependent module output, bytes per input row


@dataclass
class _Call:
    start: int
    end: int = -1
    input_bits: int = 0
    output_bits: int = 0
    output_key: int | None = None  # storage of a single-tensor output, None otherwise
    output_bytes: int = 0
    first_arg_tensor: bool = False
    side_effect: bool = False


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Taint(TorchDispatchMode):
    """Per-storage dependence bits, the op count, and the last write of each storage."""

    def __init__(self):
        super().__init__()
        self.bits: dict[int, int] = {}
        self.created: dict[int, int] = {}  # op count at which a storage first appeared
        self.last_write: dict[int, int] = {}
        self.writes: list[tuple[int, int]] = []  # (op count, creation of the storage written)
        self.leaked = 0  # bits of every value that left tensors
        self.tick = 0
        self.alive: list[torch.Tensor] = []  # keeps storages (and their addresses) unique

    def of(self, tensors) -> int:
        out = 0
        for t in tensors:
            out |= self.bits.get(_key(t), 0)
        return out

    def add(self, t: torch.Tensor, bits: int) -> None:
        k = _key(t)
        self.bits[k] = self.bits.get(k, 0) | bits
        self.created.setdefault(k, self.tick)
        self.alive.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.tick += 1
        inputs = _tensors((args, kwargs))
        for t in inputs:  # storages first seen as inputs existed before the probe
            self.created.setdefault(_key(t), -1)
            self.alive.append(t)
        bits = self.of(inputs) | self.leaked
        out = func(*args, **kwargs)
        written = [a for a, spec in zip(args, func._schema.arguments)
                   if isinstance(a, torch.Tensor) and spec.alias_info is not None
                   and spec.alias_info.is_write]
        written += [v for k, v in kwargs.items() if isinstance(v, torch.Tensor)
                    and any(s.name == k and s.alias_info is not None and s.alias_info.is_write
                            for s in func._schema.arguments)]
        for t in written:
            self.add(t, bits)
            self.last_write[_key(t)] = self.tick
            self.writes.append((self.tick, self.created[_key(t)]))
        flat = tree_flatten(out)[0]
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.add(t, bits)
            else:
                self.leaked |= bits
        return out


class _Probe:
    """Module hooks recording each call against the taint state; sites mark their outputs."""

    def __init__(self, model: nn.Module, site_bits: dict[str, int]):
        self.model, self.site_bits = model, site_bits
        self.raw = sum(site_bits.values())
        self.taint = _Taint()
        self.calls: dict[str, list[_Call]] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator["_Probe"]:
        handles = []
        for name, module in modules_with_sites(self.model):
            if name:
                handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                # ahead of the hooks through which attached sites act (memkern.network.attach): the
                # probe sees a host module's own output, its site as a call of its own
                handles.append(module.register_forward_hook(self._post(name, module),
                                                            prepend=True))
        try:
            with self.taint:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _pre(self, name):
        def hook(module, args, kwargs):
            call = _Call(start=self.taint.tick, input_bits=self.taint.of(_tensors((args, kwargs))),
                         first_arg_tensor=bool(args) and isinstance(args[0], torch.Tensor))
            self.calls.setdefault(name, []).append(call)
        return hook

    def _post(self, name, module):
        def hook(module_, args, output):
            call = self.calls[name][-1]
            if isinstance(module, ChannelSite) and isinstance(output, torch.Tensor):
                output = output.clone()  # own storage, so marking it marks nothing upstream
                self.taint.add(output, self.site_bits.get(module.site_name, 0))
            elif type(module) in CONSUMER_TYPES:
                raw = call.input_bits & self.raw
                for t in _tensors(output):
                    self.taint.add(t, raw << 1)
            call.end = self.taint.tick
            call.output_bits = self.taint.of(_tensors(output))
            call.output_bytes = sum(t.numel() * t.element_size() for t in _tensors(output))
            if isinstance(output, torch.Tensor):
                call.output_key = _key(output)
            return output
        return hook

    def finish(self) -> None:
        """Side effects: a call writing a storage older than itself."""
        for calls in self.calls.values():
            for c in calls:
                c.side_effect = any(made <= c.start < w <= c.end for w, made in self.taint.writes)


def plan_scan(model: nn.Module, x1: torch.Tensor, sites: tuple[str, ...]) -> dict[str, SitePlan]:
    """Probe ``model`` on ``x1`` (one input row, masks and example ids already set) and plan
    each of ``sites``."""
    site_bits = {s: 1 << (2 * i) for i, s in enumerate(sites)}
    probe = _Probe(model, site_bits)
    with probe.running():
        model(x1)
    probe.finish()
    modules = dict(modules_with_sites(model))
    # a site's module path is its name on memkern's models, not on attached ones
    paths = {m.site_name: n for n, m in modules.items() if isinstance(m, ChannelSite)}
    return {s: _plan_site(probe, modules, paths[s], site_bits[s]) for s in sites}


def _cacheable(probe: _Probe, name: str, bit: int) -> bool:
    calls = probe.calls.get(name, [])
    if len(calls) != 1:
        return False
    c = calls[0]
    return (not c.output_bits & bit and c.output_key is not None and not c.side_effect
            and probe.taint.last_write.get(c.output_key, -1) <= c.end)


def _plan_site(probe: _Probe, modules: dict[str, nn.Module], site: str, bit: int) -> SitePlan:
    """``site``: the site module's path."""
    runs = len(probe.calls.get(site, []))
    if runs != 1:
        return SitePlan(naive=f"the site runs {runs} times in one forward")
    cached: list[str] = []
    for name in probe.calls:  # call order: parents before their children
        # the site's own ops read its varying mask: the probe marks only the site's output
        inside = any(name.startswith(c + ".") for c in cached) or name.startswith(site + ".")
        if not inside and _cacheable(probe, name, bit):
            cached.append(name)
    consumers, skipped = [], []
    for name, calls in probe.calls.items():
        in_cached = any(name.startswith(c + ".") for c in cached)
        if type(modules[name]) not in CONSUMER_TYPES or in_cached:
            continue
        if not any(c.input_bits & bit and not c.input_bits & (bit << 1) for c in calls):
            continue
        if len(calls) != 1:
            skipped.append(f"{name} runs {len(calls)} times in one forward")
        elif not calls[0].first_arg_tensor:
            skipped.append(f"{name} gets its input by keyword")
        else:
            consumers.append(name)
    note = "; ".join(skipped) if skipped else \
        "" if consumers else "no conv/linear reads the site's output directly"
    row_bytes = max((c.output_bytes for calls in probe.calls.values() for c in calls
                     if c.output_bits & bit), default=0)
    return SitePlan(cached=tuple(cached), consumers=tuple(consumers), note=note,
                    row_bytes=row_bytes)
