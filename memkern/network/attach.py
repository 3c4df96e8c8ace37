"""Channel sites and layer groups on any ``nn.Module``, with no change to its class or forward.

    sites = memkern.attach_sites(model, torch.randn(2, 3, 32, 32))
    attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.2, p_mem=0.1,
                        seed=0)

One traced forward (:mod:`memkern.network.site_trace`) finds the sites; each becomes a
:class:`~memkern.network.sites.ChannelSite` that acts through a forward hook on its host module (on the
host's output, or on its first input), so the rest of memkern (tied dropout, gradient norms,
rewinding, retraining, localization, the scan) uses them as it uses the sites of memkern's own
models. The sites live in ``model.memkern_sites``, an attribute outside the model's child
modules (:func:`memkern.network.sites.modules_with_sites` lists them): the module tree and state dict
are unchanged, and a site without ops returns its input itself, so outputs stay bit-identical.

Site names are module paths: ``layer1.0.conv1`` is that conv's output (pre-norm);
``blocks.3.mlp.act`` an activation module's output, ``layer1.0`` a block whose output is an
activation's, ``layer1.0.conv2:in`` an activation output read by ``layer1.0.conv2`` only
(post-activation).

Layer groups (gradient accounting, rewinding, retraining) default to the module tree: each
child of the model that holds parameters (``group_depth=2``: each grandchild, and so on), and
the model's own loose parameters (a ViT's ``cls_token``, ``pos_embed``) as one group, all in
forward order; ``layer_groups`` names them explicitly (module or parameter paths, or tuples).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.network.site_trace import INPUT, FoundSite, trace_sites
from memkern.network.sites import ATTACHED, POST_ACTIVATION, ChannelSite, SiteInfo, channel_sites

DEFAULT_DROPOUT_COUNT = 2  # the last post-activation sites, as memkern's own models place it


class _OutputHook:
    """Forward hook: the host's output through the site. An object (not a closure) so that
    ``copy.deepcopy(model)`` hooks the copy's host to the copy's site."""

    def __init__(self, site: ChannelSite):
        self.site = site

    def __call__(self, module, args, output):
        return self.site(output)


class _InputHook:
    """Forward pre-hook: the host's first input through the site."""

    def __init__(self, site: ChannelSite):
        self.site = site

    def __call__(self, module, args):
        return (self.site(args[0]), *args[1:])


def attach_sites(model: nn.Module, example_input: torch.Tensor, *, include_head: bool = False,
                 group_depth: int = 1,
                 layer_groups: Sequence[str | Sequence[str]] | None = None,
                 dropout_sites: Sequence[str] | None = None) -> list[SiteInfo]:
    """Find ``model``'s sites from one forward on ``example_input`` (``[N, ...]``, a batch the
    model accepts) and attach them; returns them in forward order.

    ``include_head``: also a site at the classifier's output; ``group_depth``: module depth of
    the default layer groups; ``layer_groups``: explicit groups instead; ``dropout_sites``: the
    default tied-dropout placement (default: the last two post-activation sites). Sets
    ``model.layer_group_paths`` and ``model.default_dropout_sites``. A model that already has
    sites is a ConfigError.
    """
    if channel_sites(model):
        raise ConfigError(f"{type(model).__name__} already has channel sites "
                          f"({', '.join(list(channel_sites(model))[:3])}, ...); call "
                          f"detach_sites(model) first to find them again")
    if group_depth < 1:
        raise ConfigError(f"group_depth must be at least 1, got {group_depth}")
    try:
        plan = trace_sites(model, example_input, include_head=include_head)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's forward: any failure is bad input
        raise ConfigError(f"{type(model).__name__} failed on an example input of shape "
                          f"{list(example_input.shape)}: {type(e).__name__}: "
                          f"{_one_line(e)}") from None
    groups = _checked_groups(model, layer_groups) if layer_groups is not None else \
        _tree_groups(model, group_depth, plan.call_starts, plan.param_first_use)
    modules = dict(model.named_modules())
    container = nn.ModuleList()
    for found in plan.sites:
        site = ChannelSite(found.channels, found.position, channel_dim=found.channel_dim)
        site.site_name = found.name
        _hook(modules[found.host], site, found)
        container.append(site)
    object.__setattr__(model, ATTACHED, container)  # not a child: see memkern.network.sites.ATTACHED
    model.layer_group_paths = groups
    post = [s.name for s in plan.sites if s.position == POST_ACTIVATION]
    model.default_dropout_sites = tuple(dropout_sites) if dropout_sites is not None \
        else tuple(post[-DEFAULT_DROPOUT_COUNT:])
    model.memkern_skipped_sites = tuple(plan.skipped)
    unknown = [s for s in model.default_dropout_sites if s not in channel_sites(model)]
    if unknown:
        detach_sites(model)
        raise ConfigError(f"dropout_sites {unknown} are not sites of this model")
    return [SiteInfo(s.name, s.position, s.channels) for s in plan.sites]


def detach_sites(model: nn.Module) -> None:
    """Remove the hooks, the site container and the attributes :func:`attach_sites` set."""
    container = model.__dict__.get(ATTACHED)
    if container is None:
        return
    ours = {id(site) for site in container}
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items()
                        if isinstance(h, (_OutputHook, _InputHook)) and id(h.site) in ours]:
                del hooks[key]
    del model.__dict__[ATTACHED]
    for attr in ("layer_group_paths", "default_dropout_sites", "memkern_skipped_sites"):
        if attr in vars(model):
            delattr(model, attr)


def hooked_on(host: nn.Module, site: ChannelSite) -> str | None:
    """``"output"`` or ``"input"``: what of ``host`` ``site`` acts on through a hook that
    :func:`attach_sites` placed; None when it has no such hook there."""
    if any(isinstance(h, _OutputHook) and h.site is site for h in host._forward_hooks.values()):
        return "output"
    if any(isinstance(h, _InputHook) and h.site is site
           for h in host._forward_pre_hooks.values()):
        return "input"
    return None


def _hook(host: nn.Module, site: ChannelSite, found: FoundSite) -> None:
    if found.acts_on == INPUT:
        host.register_forward_pre_hook(_InputHook(site))
    else:
        host.register_forward_hook(_OutputHook(site))


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _tree_groups(model: nn.Module, depth: int, call_starts: dict[str, int],
                 first_use: dict[str, int]) -> tuple:
    """Groups at module ``depth``, each module's loose parameters as one group, forward order
    (modules by their first call, loose parameters by their first read; unused ones last)."""
    entries: list[tuple[int, str | tuple[str, ...]]] = []
    never = 1 << 62

    def visit(module: nn.Module, prefix: str, left: int) -> None:
        children = [(f"{prefix}{n}", c) for n, c in module.named_children()
                    if any(True for _ in c.parameters())]
        if prefix and (left == 0 or not children):
            entries.append((call_starts.get(prefix[:-1], never), prefix[:-1]))
            return
        loose = tuple(f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False))
        if loose:
            entries.append((min(first_use.get(p, never) for p in loose), loose))
        for path, child in children:
            visit(child, path + ".", left - 1)

    visit(model, "", depth)
    entries.sort(key=lambda e: e[0])  # stable: ties keep module order
    return tuple(e for _, e in entries)


def _checked_groups(model: nn.Module, groups) -> tuple:
    """Explicit groups: every parameter in exactly one of them."""
    entries = tuple(g if isinstance(g, str) else tuple(g) for g in groups)
    owners: dict[str, int] = {}
    for name, _ in model.named_parameters():
        owners[name] = sum(any(name == p or name.startswith(p + ".")
                               for p in ((e,) if isinstance(e, str) else e)) for e in entries)
    missing = [n for n, k in owners.items() if k == 0]
    twice = [n for n, k in owners.items() if k > 1]
    if missing or twice:
        what = f"parameters in no group: {missing[:3]}" if missing else \
            f"parameters in two groups: {twice[:3]}"
        raise ConfigError(f"layer_groups must hold every parameter exactly once; {what}")
    return entries
