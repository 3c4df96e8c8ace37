"""Channel sites: the named places in a model where a per-example channel mask can act.

A :class:`ChannelSite` is an identity module placed after a conv/linear output (position
``"pre-norm"``: zeroing a channel there equals zeroing a bias-free filter) or after an
activation (``"post-activation"``: where dropout acts). A site holds an ordered stack of ops
applied one after the other (example-tied dropout first, from the model's build; then, say, a
per-row localization mask); a site without ops costs a Python call and nothing else.

The dataset index of each row reaches the ops through :func:`example_indices`, a context
manager over a thread-local value, so no model's ``forward`` signature has to carry it:

    with example_indices(batch_index):
        logits = model(x)

It is the one way in, and an implementation detail of the library: every public function that
runs rows through a model takes their indices as an argument (``ids`` / ``indices`` /
``targets``, or the positions of a :class:`memkern.data.PreparedData`'s rows) and enters this
context itself. Whoever runs rows through a model sets the indices of exactly those rows:
chunks slice them, EoT copies and candidate rows repeat them, and ``torch.func.vmap`` over
single examples sets each example's own index inside the vmapped function (the registered
op's vmap rule keeps the pairing). Rows without a dataset index (test examples) pass None.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

PRE_NORM = "pre-norm"
POST_ACTIVATION = "post-activation"
POSITIONS = (PRE_NORM, POST_ACTIVATION)

class _RowIndices(threading.local):
    """The current thread's row indices: each thread that runs forwards sets its own. A
    thread-local attribute rather than a ContextVar: torch.compile traces an attribute read into
    the graph (fullgraph included) but breaks the graph at every ContextVar.get. The context
    manager restores the outer value."""

    ids: torch.Tensor | None = None


_ROWS = _RowIndices()


@contextlib.contextmanager
def example_indices(indices: torch.Tensor | None) -> Iterator[None]:
    """Make ``indices`` (int64 ``[N]``, dataset index of each row) visible to site ops."""
    outer, _ROWS.ids = _ROWS.ids, indices
    try:
        yield
    finally:
        _ROWS.ids = outer


def current_example_indices() -> torch.Tensor | None:
    """The dataset indices set by the innermost :func:`example_indices`, or None."""
    return _ROWS.ids


@dataclass(frozen=True)
class SiteInfo:
    """What a model says about one of its sites: the stable name, position and channel count."""

    name: str
    position: str
    channels: int


class ChannelSite(nn.Module):
    """Identity unless ops are attached; ``channel_dim`` is 1 for ``[N, C, ...]`` and -1 for token
    layouts ``[N, T, C]``. ``ops`` run in attach order; each takes and returns the activation."""

    def __init__(self, channels: int, position: str, channel_dim: int = 1):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"site position must be one of {POSITIONS}, got {position!r}")
        self.channels = channels
        self.position = position
        self.channel_dim = channel_dim
        self.site_name = ""  # filled by name_sites() with the module path
        self.ops = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op(x)
        return x

    def attach(self, op: nn.Module) -> nn.Module:
        """Push ``op`` on top of the stack; returns it."""
        self.ops.append(op)
        return op

    def detach(self, op: nn.Module) -> None:
        """Remove ``op`` (by identity) from the stack; ValueError if it is not there."""
        for i, held in enumerate(self.ops):
            if held is op:
                del self.ops[i]
                return
        raise ValueError(f"site {self.site_name!r} does not hold {type(op).__name__}")

    def extra_repr(self) -> str:
        return f"channels={self.channels}, position={self.position}"


# Sites attached by hooks (memkern.network.attach) are held in this attribute of the model, outside its
# child modules (a child would change what an nn.Sequential runs); they appear under this path.
ATTACHED = "memkern_sites"


def modules_with_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` plus the hook-attached sites and their ops, each under
    ``<owner path>.memkern_sites``, right after the module holding them."""
    out = []
    for prefix, module in model.named_modules():
        out.append((prefix, module))
        held = module.__dict__.get(ATTACHED)
        if held is not None:
            out += held.named_modules(prefix=f"{prefix}.{ATTACHED}" if prefix else ATTACHED)
    return out


def name_sites(model: nn.Module) -> None:
    """Give every site its module path as a stable name (called once by each model builder)."""
    for name, module in model.named_modules():
        if isinstance(module, ChannelSite):
            module.site_name = name


def channel_sites(model: nn.Module) -> dict[str, ChannelSite]:
    """All sites of ``model`` by name, in module registration (= forward) order."""
    return {m.site_name: m for _, m in modules_with_sites(model) if isinstance(m, ChannelSite)}


def site_infos(model: nn.Module) -> list[SiteInfo]:
    return [SiteInfo(n, s.position, s.channels) for n, s in channel_sites(model).items()]


def clear_site_ops(model: nn.Module) -> None:
    for site in channel_sites(model).values():
        site.ops = nn.ModuleList()
