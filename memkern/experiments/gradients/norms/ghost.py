"""Ghost norms: every ruled layer's per-example norms from one forward and one backward.

Forward hooks keep each ruled layer's input; a tensor hook on its output receives the gradient
of the summed loss as the backward reaches it, applies the layer's rule (in batch chunks sized
to the memory budget) and drops the input at once. The backward asks autograd for the gradient
of the *input* only, so no weight gradient is ever computed: the rules spend the time that the
weight-gradient convolutions would (about half of ResNet-9's backward here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from memkern.experiments.gradients.norms.rules import Rule, covered_parameters, rule_for, temp_bytes_per_example
from memkern.experiments.gradients.norms.loss import summed_loss
from memkern.network.sites import example_indices


@dataclass
class _Capture:
    prefix: str
    module: nn.Module
    rule: Rule
    budget: int
    keep_output: bool  # only integer inputs need the outputs as ends of the backward
    rows: int  # the batch's; a layer called on another leading size is not per example
    calls: int = 0
    activation: torch.Tensor | None = None
    output: torch.Tensor | None = None
    norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def on_forward(self, module, args, output):
        self.calls += 1
        if args[0].shape[:1] != (self.rows,):  # a batch-shared input (a [1, T] position lookup):
            self.calls += 1  # its output gradient sums over rows, as a shared layer's over calls
        if self.calls > 1:  # a shared layer: its gradient sums over calls, leave it to torch.func
            self.activation = self.output = None
            return
        if output.requires_grad:
            # Holding every output would keep tensors alive that autograd frees (BatchNorm
            # outputs), raising peak memory (bench/README.md, "Per-example gradient norms").
            self.activation = args[0].detach()
            self.output = output if self.keep_output else None
            output.register_hook(self.on_grad)

    @torch.no_grad()
    def on_grad(self, g: torch.Tensor) -> None:
        if self.calls != 1 or self.activation is None:
            return
        a, self.activation = self.activation, None
        chunk = max(1, self.budget // max(1, temp_bytes_per_example(self.module, a, g)))
        parts = [self.rule.fn(self.module, a[i:i + chunk], g[i:i + chunk])
                 for i in range(0, len(a), chunk)]
        self.norms = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters held by more than one module (tied weights): a rule sees one module's share
    of their gradient only, so they are left to torch.func, which differentiates the tie."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {i for i, n in owners.items() if n > 1}


def _captures(model: nn.Module, budget: int, keep_output: bool, rows: int) -> list[_Capture]:
    shared = _shared_parameter_ids(model)
    out = []
    for prefix, module in model.named_modules():
        rule = rule_for(module)
        covered = covered_parameters(module) if rule is not None else ()
        if covered and not any(id(getattr(module, n)) in shared for n in covered):
            out.append(_Capture(prefix, module, rule, budget, keep_output, rows))
    return out


def broadcast_parameters(model: nn.Module) -> list[str]:
    """Names the model declares in ``batch_broadcast_parameters``: parameters of leading size 1
    that enter its forward only broadcast over the batch (a ViT's class token and position
    embedding), held by no other module. Row b of a ``[B, ...]`` copy then receives exactly
    example b's gradient, so one backward gives every example's gradient of them."""
    shared = _shared_parameter_ids(model)
    out = []
    for name in getattr(model, "batch_broadcast_parameters", ()):
        p = model.get_parameter(name)
        if p.requires_grad and p.dim() > 0 and p.shape[0] == 1 and id(p) not in shared:
            out.append(name)
    return out


def ghost_sq_norms(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                   memory_budget: int, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: float [B] squared norm}`` for the parameters of every ruled layer
    called once and the declared :func:`broadcast_parameters`; the caller computes the rest."""
    captures = _captures(model, memory_budget, keep_output=not inputs.is_floating_point(),
                         rows=len(inputs))
    copies = {n: model.get_parameter(n).detach().expand(len(inputs), *model.get_parameter(n).shape[1:])
              .clone().requires_grad_(True) for n in broadcast_parameters(model)}
    # prepended: the gradient at a layer's own output, before an attached site's hook acts on it
    handles = [c.module.register_forward_hook(c.on_forward, prepend=True) for c in captures]
    grads: tuple = ()
    try:
        with torch.enable_grad(), example_indices(ids):
            x = inputs.detach().requires_grad_(True) if inputs.is_floating_point() else inputs
            logits = functional_call(model, copies, (x,)) if copies else model(x)
            loss = summed_loss(logits, targets)
            # Differentiating w.r.t. the input (or, for integer inputs, the ruled outputs) makes
            # the backward skip every parameter's gradient; the hooks see every output gradient.
            ends = [x] if x.requires_grad else [c.output for c in captures if c.output is not None]
            ends += list(copies.values())
            if ends:
                grads = torch.autograd.grad(loss, ends, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = {f"{c.prefix}.{n}" if c.prefix else n: v for c in captures for n, v in c.norms.items()}
    for (name, copy), grad in zip(copies.items(), grads[len(ends) - len(copies):]):
        out[name] = (torch.zeros(len(inputs), dtype=copy.dtype, device=copy.device) if grad is None
                     else grad.flatten(1).square().sum(1))
    return out


def statically_unsupported(model: nn.Module) -> list[str]:
    """Module paths (with type) of layers holding trainable parameters that no rule covers."""
    declared = set(broadcast_parameters(model))
    out = []
    for prefix, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad
               and (f"{prefix}.{n}" if prefix else n) not in declared]
        covered = covered_parameters(module) if rule_for(module) is not None else ()
        if any(n not in covered for n in own):
            out.append(f"{prefix or '<root>'} ({type(module).__name__})")
    return out
