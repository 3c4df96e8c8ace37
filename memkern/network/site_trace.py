"""Where the channel sites of any ``nn.Module`` are, from one traced forward.

A torch-function mode follows every call of the forward (each tensor's channel layout, where
it is read, where it is written in place, which calls are activations) and module hooks record
each module call's first input and its output. From that, per site found:

- pre-norm: the output of each Conv1d/2d/3d and Linear (channels = its output channels, dim 1
  for convs, the last dim for linear layers: ``[N, C]`` or tokens ``[N, T, C]``);
- post-activation: the output X of each activation call (module or functional), acted on
  where a hook can reach exactly X: the innermost module called once whose output is X (the
  activation module itself, or a block that returns it), else the one module called once
  that reads X as its first input and is X's only reader (a hook on that module's input).

An activation output no hook reaches exactly (read by two modules, or by plain functions) is
listed in :attr:`SitePlan.skipped` with the reason. The classifier head (the last conv/linear,
with one output channel per class of the ``[N, classes]`` output) gets no site unless asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from memkern.network.sites import POST_ACTIVATION, PRE_NORM

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ACTIVATIONS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6,
    F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish, F.mish, F.selu, F.celu, F.softplus,
    torch.tanh, torch.Tensor.tanh,
})
# Layout a module gives its output: the channel dim of convs and batch/group norms, the last
# dim of linear layers and LayerNorm.
_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
                   nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                   nn.InstanceNorm3d)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)
# Calls that read a tensor's metadata, not its values: they do not make another reader.
_METADATA = frozenset({"__get__", "size", "dim", "ndimension", "numel", "stride",
                       "is_contiguous", "element_size", "is_floating_point", "data_ptr",
                       "__len__", "get_device"})

OUTPUT, INPUT = "output", "input"  # where a site's hook acts on its host module


@dataclass(frozen=True)
class FoundSite:
    """One site: ``name`` (stable), the host module path, whether the hook acts on the host's
    output or first input, and the channel count and dim."""

    name: str
    host: str
    acts_on: str
    position: str
    channels: int
    channel_dim: int
    tick: int  # when its tensor was made: sites sort in forward order


@dataclass
class SitePlan:
    sites: list[FoundSite] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    call_starts: dict[str, int] = field(default_factory=dict)  # module path -> first call
    param_first_use: dict[str, int] = field(default_factory=dict)  # parameter path -> first read


@dataclass
class _Call:
    name: str
    start: int
    first_input: torch.Tensor | None
    end: int = -1
    output: object = None


@dataclass
class _Activation:
    tick: int
    output: torch.Tensor
    channel_dim: int | None
    what: str


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Trace(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.tick = 0
        self.layout: dict[int, int] = {}  # id(tensor) -> channel dim
        self.reads: dict[int, list[int]] = {}
        self.writes: dict[int, list[int]] = {}
        self.activations: list[_Activation] = []
        self.alive: list[torch.Tensor] = []  # keeps ids unique while the trace runs

    def next_tick(self) -> int:
        self.tick += 1
        return self.tick

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tick = self.next_tick()
        name = getattr(func, "__name__", "")
        inputs = _tensors((args, kwargs))
        self.alive += inputs
        if name not in _METADATA:
            for t in inputs:
                self.reads.setdefault(id(t), []).append(tick)
        in_layout = next(((self.layout[id(t)], t.shape) for t in inputs if id(t) in self.layout),
                         None)
        out = func(*args, **kwargs)
        inplace = (name.endswith("_") and not name.startswith("__")) or kwargs.get("inplace") \
            or name == "__setitem__"
        if inplace and inputs:
            self.writes.setdefault(id(inputs[0]), []).append(tick)
        outs = _tensors(out)
        self.alive += outs
        for o in outs:
            if in_layout is not None and o.shape == in_layout[1] and id(o) not in self.layout:
                self.layout[id(o)] = in_layout[0]
        if func in ACTIVATIONS and outs and inputs:
            self.activations.append(_Activation(tick, outs[0], self.layout.get(id(inputs[0])),
                                                name))
        return out


def trace_sites(model: nn.Module, example_input: torch.Tensor, *,
                include_head: bool = False) -> SitePlan:
    """Run ``model`` once on ``example_input`` (``[N, ...]``, N >= 1; eval mode, no grad) and
    find its sites. The model's train/eval flags are restored."""
    trace, calls = _Trace(), {}
    params = {id(p): n for n, p in model.named_parameters()}

    def pre(name):
        def hook(module, args):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.setdefault(name, []).append(_Call(name, trace.next_tick(), first))
        return hook

    def post(name):
        def hook(module, args, output):
            call = calls[name][-1]
            call.end, call.output = trace.next_tick(), output
            if isinstance(output, torch.Tensor):
                trace.alive.append(output)
                dim = 1 if isinstance(module, _CHANNELS_FIRST) else \
                    -1 if isinstance(module, _CHANNELS_LAST) else None
                if dim is not None:
                    trace.layout[id(output)] = dim
        return hook

    modules = dict(model.named_modules())
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), trace:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    plan = SitePlan(call_starts={n: c[0].start for n, c in calls.items()})
    for t in trace.alive:  # parameters' first reads (for ordering layer groups)
        if id(t) in params and id(t) in trace.reads:
            plan.param_first_use.setdefault(params[id(t)], trace.reads[id(t)][0])
    rows = len(example_input)
    head = _head(modules, calls, calls[""][0].output) if not include_head else None
    taken = set()
    for name, module in modules.items():
        if isinstance(module, CONV_LINEAR) and name in calls and name != head:
            site = _pre_norm_site(name, module, calls[name], rows)
            if isinstance(site, str):
                plan.skipped.append(site)
            else:
                plan.sites.append(site)
                taken.add((name, OUTPUT))
    for act in trace.activations:
        site = _activation_site(act, calls, trace, rows, calls[""][0].output)
        if isinstance(site, str):
            plan.skipped.append(site)
        elif (site.host, site.acts_on) not in taken:
            plan.sites.append(site)
            taken.add((site.host, site.acts_on))
    plan.sites.sort(key=lambda s: s.tick)
    return plan


def _head(modules, calls, model_output) -> str | None:
    """The last conv/linear called, when it has as many output channels as the model output
    (``[N, classes]``) has classes."""
    last = max(((c.end, n) for n, cs in calls.items() for c in cs
                if n and isinstance(modules[n], CONV_LINEAR)), default=None)
    if last is None or not isinstance(model_output, torch.Tensor) or model_output.ndim != 2:
        return None
    module = modules[last[1]]
    channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    return last[1] if channels == model_output.shape[1] else None


def _pre_norm_site(name: str, module: nn.Module, module_calls: list[_Call],
                   rows: int) -> FoundSite | str:
    dim = -1 if isinstance(module, nn.Linear) else 1
    channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    for c in module_calls:
        out = c.output
        if not (isinstance(out, torch.Tensor) and out.ndim >= 2 and out.shape[0] == rows
                and out.shape[dim] == channels):
            return f"{name}: output {_shape(out)} has no batch of {rows} rows with " \
                   f"{channels} channels at dim {dim}"
    return FoundSite(name, name, OUTPUT, PRE_NORM, channels, dim, module_calls[0].end)


def _activation_site(act: _Activation, calls: dict[str, list[_Call]], trace: _Trace, rows: int,
                     model_output) -> FoundSite | str:
    x = act.output
    what = f"{act.what} output {_shape(x)} (call {act.tick})"
    if x is model_output:
        return f"{what}: it is the model output"
    dim = act.channel_dim if act.channel_dim is not None else 1 if x.ndim == 2 else None
    if dim is None or x.ndim < 2 or x.shape[0] != rows:
        return f"{what}: channel layout unknown (not after a conv, linear or norm layer)"
    overwritten = min((w for w in trace.writes.get(id(x), []) if w > act.tick), default=1 << 62)
    once = {n: cs[0] for n, cs in calls.items() if n and len(cs) == 1}
    reads = [r for r in trace.reads.get(id(x), []) if r > act.tick]
    # a module returning X hosts it only if nothing read X before the module returned it
    outs = [c for c in once.values() if c.output is x and act.tick < c.end < overwritten
            and not any(r < c.end for r in reads)]
    if outs:
        host = min(outs, key=lambda c: c.end - c.start)
        return FoundSite(host.name, host.name, OUTPUT, POST_ACTIVATION, x.shape[dim], dim,
                         act.tick)
    ins = [c for c in once.values() if c.first_input is x and act.tick < c.start < overwritten
           and all(c.start < r < c.end for r in reads)]
    if ins:
        host = min(ins, key=lambda c: c.end - c.start)
        return FoundSite(f"{host.name}:in", host.name, INPUT, POST_ACTIVATION, x.shape[dim],
                         dim, act.tick)
    return f"{what}: no module called once returns it or is its only reader"


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
