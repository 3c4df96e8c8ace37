"""Example-tied dropout (docs/method.md, Experiment 5) as an op on a model's channel
sites.

Each training example keeps a fixed subset of each site's memorization channels, decided by a
hash of (dataset index, site seed, channel) inside the kernel, so no mask is stored for any
dataset size. The dataset indices reach the sites through :func:`memkern.network.sites.example_indices`:

    attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.2, p_mem=0.1, seed=0)
    with example_indices(batch_index):
        loss = criterion(model(x), y)          # mode "train"
    with tied_dropout_mode(model, "drop"):
        logits = model(x_test)                 # memorization channels removed

The module ignores ``nn.Module.training``: its ``mode`` alone says what it does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.kernels.channel_mask import tied_channel_mask
from memkern.kernels.channel_mask_reference import HASH_GOLDEN, HASHED_MODES, check_tied_args
from memkern.kernels.errors import ChannelMaskError
from memkern.network.sites import channel_sites, current_example_indices, modules_with_sites


def check_tied_config(**kwargs) -> None:
    """:func:`check_tied_args` with memkern's error type (ConfigError) for a user's settings."""
    try:
        check_tied_args(**kwargs)
    except ChannelMaskError as e:
        raise ConfigError(str(e)) from None


def site_seed(seed: int, position: int) -> int:
    """Seed of the site at ``position`` in the list given to :func:`attach_tied_dropout`:
    ``(seed + position * 0x9E3779B9) mod 2**32``; distinct for the first 2**32 positions, and the
    hash's ``lowbias32(seed)`` key decorrelates neighbouring seeds."""
    return (seed + position * HASH_GOLDEN) & 0xFFFFFFFF


class ExampleTiedDropout(nn.Module):
    """``x * m(index, c)`` at one site; ``x``: ``[N, C, ...]`` (channel_dim=1) or ``[N, ..., C]``
    (channel_dim=-1), float32/float16/bfloat16/float64, any device.

    mode "train"/"own": generalization channels 1, memorization channels 0/1 by the hash (needs
    the batch's dataset indices); "keep": memorization channels p_mem; "drop": memorization
    channels 0 and generalization channels (p_gen + p_mem) / p_gen.
    """

    def __init__(self, channels: int, *, seed: int, p_gen: float, p_mem: float,
                 channel_dim: int = 1, mode: str = "train", backend: str = "auto"):
        super().__init__()
        check_tied_config(p_gen=p_gen, p_mem=p_mem, mode=mode, seed=seed)
        self.channels = channels
        self.seed = seed
        self.p_gen = p_gen
        self.p_mem = p_mem
        self.channel_dim = channel_dim
        self.backend = backend
        self._mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        check_tied_config(p_gen=self.p_gen, p_mem=self.p_mem, mode=mode, seed=self.seed)
        self._mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[self.channel_dim] != self.channels:
            raise ConfigError(f"tied dropout built for {self.channels} channels at dim "
                              f"{self.channel_dim} got an input of shape {tuple(x.shape)}")
        indices = None
        if self._mode in HASHED_MODES:
            indices = current_example_indices()
            if indices is None:
                raise ConfigError(
                    f"tied dropout mode {self._mode!r} needs each row's dataset index: wrap the "
                    f"forward in `with memkern.network.sites.example_indices(batch_index):`, or evaluate "
                    f"with mode 'keep' or 'drop'"
                )
            if indices.shape != (x.shape[0],):
                raise ConfigError(f"example_indices has shape {tuple(indices.shape)} but the batch "
                                  f"has {x.shape[0]} rows: pass one dataset index per row")
        return tied_channel_mask(x, indices, seed=self.seed, p_gen=self.p_gen, p_mem=self.p_mem,
                                 mode=self._mode, channel_dim=self.channel_dim,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, seed={self.seed}, p_gen={self.p_gen}, "
                f"p_mem={self.p_mem}, mode={self._mode!r}")


# torch.compile: each instance's seed and probabilities are constants of its site. Left to
# dynamo, sites with different seeds make the seed a symbolic int, whose hash arithmetic
# inductor mistypes on CPU (a C++ compile error); static modules keep integer attributes constant.
torch._dynamo.mark_static(ExampleTiedDropout)


def site_tied_dropout(site) -> ExampleTiedDropout | None:
    """The tied dropout op a :class:`~memkern.network.sites.ChannelSite` holds, or None."""
    return next((op for op in site.ops if isinstance(op, ExampleTiedDropout)), None)


def tied_sites(model: nn.Module) -> dict[str, ExampleTiedDropout]:
    """``{site name: its tied dropout op}`` for every site that holds one, in forward order."""
    found = {name: site_tied_dropout(site) for name, site in channel_sites(model).items()}
    return {name: op for name, op in found.items() if op is not None}


def _tied_modules(model: nn.Module) -> list[ExampleTiedDropout]:
    return [m for _, m in modules_with_sites(model) if isinstance(m, ExampleTiedDropout)]


def has_tied_dropout(model: nn.Module) -> bool:
    return bool(_tied_modules(model))


def needs_example_indices(model: nn.Module) -> bool:
    """True when some tied dropout module is in a mode that reads each row's dataset index."""
    return any(m.mode in HASHED_MODES for m in _tied_modules(model))


def attach_tied_dropout(model: nn.Module, *, sites: list[str], p_gen: float, p_mem: float,
                        seed: int, backend: str = "auto") -> None:
    """Attach one :class:`ExampleTiedDropout` to each named site, the i-th with
    ``site_seed(seed, i)``, in mode "train", at the bottom of each site's op stack. Unknown names,
    a name given twice or a site that already holds tied dropout raise ConfigError (nothing
    attached)."""
    check_tied_config(p_gen=p_gen, p_mem=p_mem, mode="train", seed=seed)
    by_name = channel_sites(model)
    unknown = [s for s in sites if s not in by_name]
    if unknown:
        raise ConfigError(f"unknown channel site(s) {unknown}: valid names are {list(by_name)}")
    taken = [s for s in sites if site_tied_dropout(by_name[s]) is not None]
    repeated = sorted({s for s in sites if list(sites).count(s) > 1})
    if taken or repeated:
        raise ConfigError(f"site(s) {taken or repeated} would get tied dropout twice: each site "
                          f"takes one tied dropout op")
    for position, name in enumerate(sites):
        site = by_name[name]
        op = ExampleTiedDropout(site.channels, seed=site_seed(seed, position), p_gen=p_gen,
                                p_mem=p_mem, channel_dim=site.channel_dim, backend=backend)
        site.ops.insert(0, op)


def set_tied_dropout_mode(model: nn.Module, mode: str) -> None:
    """Set ``mode`` on every tied dropout module of ``model`` (ConfigError if there is none)."""
    modules = _tied_modules(model)
    if not modules:
        raise ConfigError("the model has no tied dropout: call attach_tied_dropout first")
    for module in modules:
        module.mode = mode


@contextlib.contextmanager
def tied_dropout_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run the block with every tied dropout module in ``mode``; restore each old mode after."""
    modules = _tied_modules(model)
    old = [m.mode for m in modules]
    set_tied_dropout_mode(model, mode)
    try:
        yield
    finally:
        for module, previous in zip(modules, old):
            module.mode = previous


def unindexed_rows(model: nn.Module) -> contextlib.AbstractContextManager:
    """For rows without a dataset index of their own (test examples): tied dropout in a mode that
    reads indices runs in "keep" (the paper's test mode) inside the block; otherwise nothing
    changes."""
    return tied_dropout_mode(model, "keep") if needs_example_indices(model) \
        else contextlib.nullcontext()
