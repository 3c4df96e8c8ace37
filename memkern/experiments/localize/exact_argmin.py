"""Exact argmin of the localization objective over single-channel ablations, pruned by bounds.

Exhaustive localization needs only the channel whose zeroing gives the lowest objective, not
every channel's value. The objective of a target is ``L = P + S / B'``: ``P`` the target part
(``target_terms``), which the target's own rows alone determine, and ``S`` a sum of reference
losses (cross-entropies), each never negative, over ``B'`` (``ref_counts``). So for every
candidate ``c`` and every subset ``H`` of the references, ``P(c) <= P(c) + S_H(c) / B' <=
L(c)``. ``P`` costs one row per candidate (without EoT) where ``L`` costs the target rows and
every reference (513 rows at the default 512 references).

:func:`bounded_argmin` scans ``P`` for every candidate, then ``L`` for the :data:`FIRST_ROUND`
candidates of lowest ``P``; a candidate whose bound is above the best ``L`` found cannot win.
When many are left in, the references that carry most of the loss are the ``1/``
:data:`HEAVY_SHARE` with the largest loss under those first candidates, ``H``; if adding their
share of the loss would rule out at least half of those left, the survivors are scanned with
``H`` alone (1/8 of the rows) and pruned again. The rest are scanned in full. The result is the
full scan's argmin (ties go to the candidate first in ``candidates``, as with ``argmin``); only
near-ties within float rounding of the best value could differ, so every bound keeps a relative
slack of :data:`SLACK`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.localize.objective import LocalizationObjective
from memkern.experiments.localize.scan import MAX_ROWS, ablation_scan

# Float rounding differs between scans of other row sets (other batch shapes): a candidate is
# pruned only when its bound exceeds the best value by more than this fraction.
SLACK = 1e-5
FIRST_ROUND = 4  # candidates with the lowest bounds evaluated in full to set the bar
HEAVY_SHARE = 8  # the second bound reads this fraction (1/8) of the references


@dataclass(frozen=True)
class BoundedArgmin:
    """``channel``: the flat index of the best candidate; ``value``: its objective;
    ``evaluated``: candidates whose objective was computed in full (the rest were pruned);
    ``heavy``: candidates scanned with the heaviest references only (0: that bound not used)."""

    channel: int
    value: float
    evaluated: int
    heavy: int = 0


def bounded_argmin(model: nn.Module, objective: LocalizationObjective, target: torch.Tensor,
                   x: torch.Tensor, ids: torch.Tensor, *, space: ChannelSpace,
                   base_mask: torch.Tensor, candidates: torch.Tensor,
                   max_rows: int = MAX_ROWS) -> BoundedArgmin:
    """The candidate (flat channel index, among ``candidates``) whose zeroing on top of
    ``base_mask`` gives the lowest objective for ``target`` (a 0-dim int64 tensor); ``x`` and
    ``ids`` are all the target's rows, ``objective.inputs(target[None])`` and its ids, target
    rows first."""
    own = objective.target_rows
    count = float(objective.ref_counts(target[None])[0])
    scan = dict(sites=space, base_mask=base_mask, max_rows=max_rows)
    losses: list[torch.Tensor] = []  # per-reference losses under the first candidates

    def part(lg: torch.Tensor) -> torch.Tensor:
        return objective.target_terms(lg[:, :own], target.expand(len(lg)))[0]

    def whole(lg: torch.Tensor) -> torch.Tensor:
        return objective(lg, target.expand(len(lg)))[0]

    def whole_recorded(lg: torch.Tensor) -> torch.Tensor:  # the first round only
        losses.append(objective.ref_losses(lg[:, own:]).double().mean(0))
        return whole(lg)

    def scanned(fn, rows: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor:
        xs, ids_ = (x, ids) if rows is None else (x[rows], ids[rows])
        return ablation_scan(model, xs, fn, candidates=candidates[chosen], ids=ids_,
                             **scan).values[candidates[chosen]]

    def kept(chosen: torch.Tensor, lower: torch.Tensor, best: float) -> torch.Tensor:
        return chosen[lower <= best + SLACK * (1 + abs(best))]

    everything = torch.arange(len(candidates))
    bound = scanned(part, torch.arange(own), everything)
    order = torch.argsort(bound, stable=True)
    values = torch.full((len(candidates),), float("inf"), dtype=torch.float64)
    values[order[:FIRST_ROUND]] = scanned(whole_recorded, None, order[:FIRST_ROUND])
    best = float(values.min())
    left_in = kept(order[FIRST_ROUND:], bound[order[FIRST_ROUND:]], best)
    heavy_scanned = 0
    if len(left_in) > FIRST_ROUND and losses and len(losses[0]):
        mean = torch.stack(losses).mean(0)
        heavy = mean.argsort(descending=True)[:max(1, len(mean) // HEAVY_SHARE)]
        # Worth a scan only if the heavy references' loss, as under the first candidates,
        # would rule out half of those left in (a guess that picks the path, not the result).
        if int((bound[left_in] + float(mean[heavy].sum()) / count <= best).sum()) \
                <= len(left_in) // 2:
            rows = torch.cat([torch.arange(own), own + heavy])
            tighter = scanned(lambda lg: part(lg) + objective.ref_losses(
                lg[:, own:], heavy).sum(1) / count, rows, left_in)
            heavy_scanned = len(left_in)
            left_in = kept(left_in, tighter, best)
    if len(left_in):  # a lower value found among them only shrinks the set: one more scan
        values[left_in] = scanned(whole, None, left_in)
    pick = int(values.argmin())  # the first of equal values in ``candidates`` order
    return BoundedArgmin(int(candidates[pick]), float(values[pick]),
                         int(torch.isfinite(values).sum()), heavy_scanned)
