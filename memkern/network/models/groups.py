"""Layer groups: the units of gradient accounting and rewinding, named by parameter prefix.

Each model class lists ``layer_group_paths``: one entry per group, a module path or a tuple of
paths (for groups such as a ViT's embedding that gather several). A group owns the parameters
and buffers (BatchNorm running statistics) under its paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerGroup:
    name: str
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]


def _under(name: str, paths: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's groups in forward order; every trainable parameter is in exactly one."""
    groups = []
    for entry in model.layer_group_paths:
        paths = (entry,) if isinstance(entry, str) else tuple(entry)
        groups.append(LayerGroup(
            name=paths[0],
            param_names=tuple(n for n, _ in model.named_parameters() if _under(n, paths)),
            buffer_names=tuple(n for n, _ in model.named_buffers() if _under(n, paths)),
        ))
    return groups
