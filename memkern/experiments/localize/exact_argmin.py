"""Exact argmin of the localization objective over single-channel ablations, pruned by a bound.

Exhaustive localization needs only the channel whose zeroing gives the lowest objective, not
every channel's value. The objective of a target is ``R(m) + P(m)``: ``R`` a mean of reference
cross-entropies, never negative, and ``P`` the target part (``target_terms``), which the
target's own rows alone determine. So ``P(c) <= L(c)`` for every candidate ``c``, and ``P``
costs one scan of the target rows (one row per candidate without EoT) where ``L`` costs a scan
of the target rows and every reference (513 rows per candidate at the default 512 references).

:func:`bounded_argmin` scans ``P`` for every candidate, then evaluates ``L`` exactly for the
few candidates of lowest ``P``, and then every other candidate whose ``P`` is not above the
best ``L`` found: the rest cannot be lower. Two scans with the references at most: each call
repeats the scan's planning and prefix pass, which rounds of growing size would multiply. The
result is the argmin of the full scan (ties go to the candidate first in ``candidates``, as
with ``argmin``); only near-ties within float rounding of the best value could differ, so the
bound keeps a relative slack of :data:`SLACK` to keep those candidates in.
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
FIRST_ROUND = 4  # candidates with the lowest bounds evaluated in full to set the bar


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

    def evaluate(chosen: torch.Tensor) -> float:
        values[chosen] = ablation_scan(
            model, x, lambda lg: objective(lg, target.expand(len(lg)))[0],
            candidates=candidates[chosen], ids=ids, **scan).values[candidates[chosen]]
        return float(values.min())

    best = evaluate(order[:FIRST_ROUND])
    rest = order[FIRST_ROUND:]
    left_in = rest[bound[rest] <= best + SLACK * (1 + abs(best))]
    if len(left_in):  # a lower value found among them only shrinks the set: one more scan
        evaluate(left_in)
    pick = int(values.argmin())  # the first of equal values in ``candidates`` order
    return BoundedArgmin(int(candidates[pick]), float(values[pick]),
                         int(torch.isfinite(values).sum()))
