"""Greedy localization (docs/method.md, Experiment 4), many targets at once.

Each target's zeroed set is one row of a flat channel mask; its rows run under that mask, so T
targets need no model copies and no Python loop over targets. Score of channel c = dL/dm_c at
m = 1: zeroing c changes L by about -dL/dm_c (for a bias-free filter before its norm this equals
the paper's sum over the filter of w * dL/dw), so the channel with the largest score is zeroed.
A target stops when its clean prediction leaves its training label ("flipped") or at
``max_channels`` zeroed.

Work sharing, exact: the reference batch (B rows, nearly all the work when B >> 1) depends on a
target only through its mask (:mod:`memkern.experiments.localize.objective`), so each step runs it once per
distinct mask among the running targets, not once per target: every target shares it at step 0,
and targets whose greedy paths coincide keep sharing. Targets that stop at a step need the
reference rows forward only (their trace value), never backward. A
:class:`~memkern.experiments.localize.reference_cache.ReferenceCache` passed to several calls
(the runner's chunks) carries the reference passes of one call over to the next.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.localize.objective import LocalizationObjective
from memkern.experiments.localize.reference_cache import ReferenceCache
from memkern.network.sites import example_indices

# Rows per forward/backward pass. On CPU, passes that outgrow the caches run slower per row
# (bench/README.md, "Measured choices in the code"). A GPU needs large passes to be busy; the
# cap bounds activation memory.
CPU_ROWS, GPU_ROWS = 1024, 8192


def rows_per_pass(device: torch.device) -> int:
    return CPU_ROWS if device.type == "cpu" else GPU_ROWS


def model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``x`` on ``device``; images in the model's ``dtype``, token ids left integer."""
    return x.to(device=device, dtype=dtype if x.is_floating_point() else None)


@dataclass
class Localization:
    """One target's result: ``zeroed`` is bool ``[space.total]``; ``trace[k]`` is the objective
    with the first k channels zeroed."""

    index: int
    flipped: bool = False
    channels: list[tuple[str, int]] = field(default_factory=list)
    trace: list[float] = field(default_factory=list)
    zeroed: torch.Tensor | None = None


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient while only mask gradients are asked for (saves the weight
    half of the backward)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def greedy_localize(model: nn.Module, objective: LocalizationObjective, targets: torch.Tensor, *,
                    space: ChannelSpace, max_channels: int = 50, max_rows: int | None = None,
                    on_step: Callable[[int], None] | None = None,
                    cache: ReferenceCache | None = None) -> list[Localization]:
    """Localize every target of ``targets`` (int64 ``[T]`` dataset indices) together; finished
    targets drop out. ``on_step(n)`` is told how many targets finished; ``max_rows`` caps the
    rows of one pass (default :func:`rows_per_pass`); ``cache`` reuses (and keeps) reference
    passes of earlier calls on the same model, objective and space, with the same results."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_rows = max_rows or rows_per_pass(device)
    if cache is not None:
        cache.bind(model, objective, space)
    passes = _Passes(model, objective, space, targets, device, dtype, max_rows, cache)
    on = torch.ones(len(targets), space.total, dtype=torch.bool, device=device)
    results = [Localization(int(i)) for i in targets]
    counts = torch.zeros(len(targets), dtype=torch.long)
    active = torch.arange(len(targets))
    cap = min(max_channels, space.total)
    with frozen(model), row_masks(model, space) as passes.ops:
        while len(active):
            part, clean = passes.targets(on, active)
            flipped = objective.flipped(clean, targets[active])
            cont = ~flipped & (counts[active] < cap)
            loss, grad = passes.references(on, active, cont, part)
            for j, i in enumerate(active.tolist()):
                results[i].trace.append(float(loss[j]))
                if not cont[j]:
                    results[i].flipped = bool(flipped[j])
                    results[i].zeroed = ~on[i].cpu()
            if cont.any():
                score = grad.masked_fill(~on[active[cont]], float("-inf"))
                for i, c in zip(active[cont].tolist(), score.argmax(1).tolist()):
                    on[i, c] = False
                    results[i].channels.append(space.locate(c))
                    counts[i] += 1
            active = active[cont]
            if on_step is not None:
                on_step(len(targets) - len(active))
        set_masks(passes.ops, space, None)
    return results


class _Passes:
    """The two kinds of forward/backward pass of one greedy step, chunked to ``max_rows``."""

    def __init__(self, model, objective, space, targets, device, dtype, max_rows, cache):
        self.model, self.objective, self.space, self.ids = model, objective, space, targets
        self.max_rows, self.dtype, self.cache = max_rows, dtype, cache
        self.x_targets = model_input(objective.target_inputs(targets), device, dtype)
        self.id_targets = objective.target_ids(targets).to(device)
        self.x_ref = model_input(objective.ref_inputs(), device, dtype)
        self.id_ref = objective.ref.to(device)
        self.ops: dict = {}
        self._graphs: list = []

    def targets(self, on: torch.Tensor, active: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward of the target rows of ``active``, graphs kept for the backward: (target part
        of the objective ``[A]``, clean logits ``[A, classes]``)."""
        r = self.objective.target_rows
        shape = self.x_targets.shape[1:]
        x = self.x_targets.view(len(self.ids), r, *shape)
        ids = self.id_targets.view(len(self.ids), r)
        self._graphs, parts, cleans = [], [], []
        for chunk in torch.split(active, max(1, self.max_rows // r)):
            m = on[chunk].to(self.dtype).requires_grad_(True)
            set_masks(self.ops, self.space, m.repeat_interleave(r, dim=0))
            rows = chunk.to(x.device)
            with example_indices(ids[rows].flatten()):
                logits = self.model(x[rows].flatten(0, 1)).unflatten(0, (len(chunk), r))
            part, clean = self.objective.target_terms(logits, self.ids[chunk])
            self._graphs.append((m, part))
            parts.append(part.detach())
            cleans.append(clean.detach())
        return torch.cat(parts), torch.cat(cleans)

    def references(self, on: torch.Tensor, active: torch.Tensor, cont: torch.Tensor,
                   part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference rows once per distinct mask of ``active``: (objective ``[A]``, and for the
        continuing targets ``cont`` the gradient ``dL/dm`` ``[sum(cont), total]``)."""
        masks, which = torch.unique(on[active], dim=0, return_inverse=True)
        which = which.cpu()
        needs_grad = torch.zeros(len(masks), dtype=torch.bool)
        needs_grad[which[cont]] = True
        sums = torch.empty(len(masks), dtype=part.dtype, device=part.device)
        grads = torch.zeros(len(masks), self.space.total, dtype=part.dtype, device=part.device)
        keys = self.cache.keys(masks) if self.cache is not None else None
        todo = self._reuse(keys, needs_grad, sums, grads)
        per_pass = max(1, self.max_rows // len(self.x_ref))
        for grad_on in (True, False):
            chosen = torch.nonzero(todo & (needs_grad == grad_on)).flatten()
            for chunk in torch.split(chosen, per_pass) if len(chosen) else ():
                m = masks[chunk.to(masks.device)].to(part.dtype).requires_grad_(grad_on)
                with torch.set_grad_enabled(grad_on):
                    s = self._ref_sums(m)
                sums[chunk] = s.detach()
                if grad_on:
                    (grads[chunk],) = torch.autograd.grad(s.sum(), m)
                self._keep(keys, masks, chunk, sums, grads if grad_on else None)
        counts = self.objective.ref_counts(self.ids[active]).to(part.device, part.dtype)
        loss = sums[which.to(sums.device)] / counts + part
        if not cont.any():
            return loss, None
        grad = grads[which[cont].to(grads.device)] / counts[cont.to(counts.device), None]
        return loss, grad + self._target_grads(active, cont)

    def _reuse(self, keys, needs_grad, sums, grads) -> torch.Tensor:
        """Fill ``sums``/``grads`` of the masks the cache holds; bool ``[U]``: still to run."""
        todo = torch.ones(len(sums), dtype=torch.bool)
        if keys is None:
            return todo
        for u, key in enumerate(keys):
            entry = self.cache.get(key, bool(needs_grad[u]))
            if entry is not None:
                todo[u] = False
                sums[u] = entry[0]
                if needs_grad[u]:
                    grads[u] = entry[1]
        return todo

    def _keep(self, keys, masks, chunk, sums, grads) -> None:
        """Hand the masks of ``chunk`` just run (and their gradients, if any) to the cache."""
        if keys is None:
            return
        zeros = (~masks[chunk.to(masks.device)]).sum(1).tolist()
        for u, z in zip(chunk.tolist(), zeros):
            self.cache.put(keys[u], z, sums[u], None if grads is None else grads[u])

    def _ref_sums(self, m: torch.Tensor) -> torch.Tensor:
        b = len(self.x_ref)
        set_masks(self.ops, self.space, m.repeat_interleave(b, dim=0))
        x = self.x_ref.repeat(len(m), *[1] * (self.x_ref.dim() - 1))
        with example_indices(self.id_ref.repeat(len(m))):
            logits = self.model(x)
        return self.objective.ref_sums(logits.unflatten(0, (len(m), b)))

    def _target_grads(self, active: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        """``d(target part)/dm`` of the continuing targets, from the graphs kept by
        :meth:`targets`, ``[sum(cont), total]``."""
        out, start = [], 0
        for m, part in self._graphs:
            keep = cont[start:start + len(m)].to(part.device)
            start += len(m)
            if keep.any():
                (g,) = torch.autograd.grad(part[keep].sum(), m)
                out.append(g[keep])
        self._graphs = []
        return torch.cat(out)
