"""Exact argmin of the localization objective over single-channel ablations, pruned by a bound.

Exhaustive localization needs only the channel whose zeroing gives the lowest objective, not
every channel's value. The objective of a target is ``R(m) + P(m)``: ``R`` a mean of reference
cross-entropies, never negative, and ``P`` the target part (``target_terms``), which the
target's own rows alone determine. So ``P(c) <= L(c)`` for every candidate ``c``, and ``P``
costs one scan of the target rows (one row per candidate without EoT) where ``L`` costs a scan
of the target rows and every reference (513 rows per candidate at the default 512 references).

:func:`bounded_argmin` scans ``P`` for every candidate, then evaluates ``L`` exactly for the
candidates in increasing order of ``P``, in rounds that double in size, and stops once every
candidate left has ``P`` above the best ``L`` found: none of them can be lower. The result is
the argmin of the full scan (ties go to the candidate first in ``candidates``, as with
``argmin``); only near-ties within float rounding of the best value could differ, so the bound
keeps a relative slack of :data:`SLACK` to keep those candidates in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.localize.objective import LocalizationObjective
from memkern.experiments.localize.scan import MAX_ROWS, ablation_scan

# Float rounding differs between the target-only scan and the full scan (other batch shapes):
# a candidate is pruned only when its bound exceeds the best value by more than this fraction.
SLACK = 1e-5
FIRST_ROUND = 4  # candidates evaluated in full before the first check; doubles each round


@dataclass(frozen=True)
class BoundedArgmin:
    """``channel``: the flat index of the best candidate; ``value``: its objective;
    ``evaluated``: candidates whose objective was computed in full (the rest were pruned)."""

    channel: int
    value: float
    evaluated: int


def bounded_argmin(model: nn.Module, objective: LocalizationObjective, target: torch.Tensor,
                   x: torch.Tensor, ids: torch.Tensor, *, space: ChannelSpace,
                   base_mask: torch.Tensor, candidates: torch.Tensor,
                   max_rows: int = MAX_ROWS) -> BoundedArgmin:
    """The candidate (flat channel index, among ``candidates``) whose zeroing on top of
    ``base_mask`` gives the lowest objective for ``target`` (a 0-dim int64 tensor); ``x`` and
    ``ids`` are all the target's rows, ``objective.inputs(target[None])`` and its ids, target
    rows first."""
    own = objective.target_rows
    scan = dict(sites=space, base_mask=base_mask, max_rows=max_rows)
    bound = ablation_scan(
        model, x[:own], lambda lg: objective.target_terms(lg, target.expand(len(lg)))[0],
        candidates=candidates, ids=ids[:own], **scan).values[candidates]
    order = torch.argsort(bound, stable=True)
    values = torch.full((len(candidates),), float("inf"), dtype=torch.float64)
    done, size = 0, FIRST_ROUND
    while done < len(order):
        chunk = order[done:done + size]
        values[chunk] = ablation_scan(
            model, x, lambda lg: objective(lg, target.expand(len(lg)))[0],
            candidates=candidates[chunk], ids=ids, **scan).values[candidates[chunk]]
        done += len(chunk)
        best = float(values.min())
        if done < len(order) and float(bound[order[done]]) > best + SLACK * (1 + abs(best)):
            break
        size *= 2
    pick = int(values.argmin())  # the first of equal values in ``candidates`` order
    return BoundedArgmin(int(candidates[pick]), float(values[pick]), done)
