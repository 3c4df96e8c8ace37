"""DEL: drop a method's top neurons for one memorized target and measure what the model lost.

For each target and fraction the edit zeroes the top ``ceil(fraction * width)`` neurons of every
MLP site by the method's scores for that target (:func:`top_per_site`). All edits of a call run
batched: row ``r`` of a forward carries its own edit through the row masks of
:mod:`memkern.experiments.localize.channels`, so E edited models cost no model copy. Each edit
is measured on the target (greedy extraction of its secret, the secret's NLL, the teacher-forced
accuracy of its bytes: a paragraph's suffix accuracy), on other memorized canaries (the fraction
still extracted) and on a fixed set of held-out windows (bits per byte); a canary's exposure is
searched one edit at a time with a bounded budget (docs/text.md).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.text.benchmark.neurons import top_per_site
from memkern.experiments.text.exposure import DIGITS, secret_exposure
from memkern.experiments.text.targets import SequenceTargets
from memkern.kernels.channel_mask import gathered_channel_mask
from memkern.network.sites import channel_sites, example_indices
from memkern.network.tied_dropout import unindexed_rows

MAX_ROWS = 512  # rows of one masked forward
# Exposure under an edit is a bounded look: exact while the secret is among the first strings
# of the best-first search, else estimated from a few sampled strings (docs/text.md).
EXPOSURE_CANDIDATES, EXPOSURE_SAMPLES = 200, 32


@dataclass(frozen=True)
class Measures:
    """One target on one model: ``extracted`` (greedy decoding gives the secret), the secret's
    summed ``nll`` (nats), ``acc`` (teacher-forced accuracy of its bytes), ``exposure`` (nan when
    the secret is not digits), ``others`` (fraction of the canaries of ``others`` but the
    target that are extracted; nan: none)
    and ``bpb`` (held-out bits per byte)."""

    extracted: bool
    nll: float
    acc: float
    exposure: float
    others: float
    bpb: float


@dataclass(frozen=True)
class DropResult:
    """Target ``target`` (insert id) with ``neurons`` MLP neurons dropped (``fraction`` of
    each MLP site): its measures ``before`` and ``after`` the edit."""

    target: int
    fraction: float
    neurons: int
    before: Measures
    after: Measures

    def row(self) -> dict:
        """Flat: ``target, fraction, neurons`` and every measure as ``<name>_before/_after``."""
        out = {"target": self.target, "fraction": self.fraction, "neurons": self.neurons}
        for when, m in (("before", self.before), ("after", self.after)):
            out.update({f"{k}_{when}": v for k, v in vars(m).items()})
        return out


class _FixedMask(nn.Module):
    """Site op: one mask row ``[C]`` applied to every row of the batch."""

    def __init__(self, row: torch.Tensor, channel_dim: int):
        super().__init__()
        self.row, self.channel_dim = row, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.row.to(x.device).expand(x.shape[0], -1)
        return gathered_channel_mask(x, mask, channel_dim=self.channel_dim)


@contextlib.contextmanager
def single_edit(model: nn.Module, space: ChannelSpace, keep: torch.Tensor) -> Iterator[None]:
    """Inside the block the model runs with float ``keep`` ``[total]`` (1 = on, 0 = zeroed) on
    every row, whatever the batch size."""
    sites = channel_sites(model)
    ops = {n: _FixedMask(part[0], sites[n].channel_dim)
           for n, part in space.split(keep[None].float()).items()}
    try:
        for n, op in ops.items():
            sites[n].attach(op)
        yield
    finally:
        for n, op in ops.items():
            if any(held is op for held in sites[n].ops):
                sites[n].detach(op)


def _masked(model: nn.Module, space: ChannelSpace, ops, keep: torch.Tensor, edit: torch.Tensor,
            row: torch.Tensor, inputs: torch.Tensor, keys: torch.Tensor | None,
            measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_rows: int
            ) -> torch.Tensor:
    """``measure(logits, rows)`` of ``inputs[row[r]]`` under edit ``keep[edit[r]]`` for every
    pair r, ``max_rows`` pairs per forward; ``keys``: tied-dropout keys of ``inputs`` (None:
    rows without a dataset index)."""
    dev = next(model.parameters()).device
    out = []
    for start in range(0, len(row), max_rows):
        rows, edits = row[start:start + max_rows], edit[start:start + max_rows]
        set_masks(ops, space, keep[edits].to(dev, torch.float32))
        context = example_indices(keys[rows].to(dev)) if keys is not None else \
            unindexed_rows(model)
        with context:
            logits = model(inputs[rows].to(dev))
        out.append(measure(logits, rows).cpu())
    set_masks(ops, space, None)
    return torch.cat(out) if out else torch.zeros(0)


def _target_measure(targets: SequenceTargets):
    def measure(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        sub = targets.subset(rows)
        scored = sub.scored.to(logits.device)
        right = (logits.argmax(-1) == sub.tokens[:, 1:].to(logits.device)) & scored
        acc = right.sum(1) / scored.sum(1).clamp(min=1)
        return torch.stack([sub.secret_nll(logits).double(), sub.extracted(logits).double(),
                            acc.double()], 1)
    return measure


def _extracted_measure(targets: SequenceTargets):
    return lambda logits, rows: targets.subset(rows).extracted(logits).float()


def _window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:].to(logits.device),
                          reduction="none")
    return nll.mean(1).double()


def _digit_secret(targets: SequenceTargets, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(prefix, secret) of target ``t`` when its secret is digits (exposure is defined over
    digit strings), else None."""
    pos = torch.nonzero(targets.scored[t]).flatten()
    first, last = int(pos[0]), int(pos[-1])
    secret = targets.tokens[t, first + 1:last + 2]
    if not all(int(b) in DIGITS for b in secret):
        return None
    return targets.tokens[t, :first + 1], secret


def _exposure(model: nn.Module, targets: SequenceTargets, t: int, candidates: int) -> float:
    parts = _digit_secret(targets, t)
    if parts is None:
        return math.nan
    return secret_exposure(model, *parts, key=int(targets.keys[t]), max_candidates=candidates,
                           samples=EXPOSURE_SAMPLES, seed=targets.ids[t]).exposure


def _others_mean(hits: torch.Tensor, others: SequenceTargets, target_id: int) -> float:
    """Mean of ``hits`` ``[n]`` over the canaries of ``others`` other than ``target_id``."""
    mine = torch.tensor([i != target_id for i in others.ids], dtype=torch.bool)
    return float(hits[mine].mean()) if mine.any() else math.nan


@torch.no_grad()
def _measures(model, space, keep: torch.Tensor, edit_target: torch.Tensor, *,
              targets: SequenceTargets, others: SequenceTargets, heldout: torch.Tensor,
              max_rows: int, candidates: int, edited: bool) -> list[Measures]:
    """Measures of target ``edit_target[e]`` under edit ``keep[e]`` (``edited`` False: one
    all-ones row, the model as it is, shared by every target)."""
    kinds = len(keep)
    n, h = len(others), len(heldout)
    windows = heldout.long()
    with row_masks(model, space) as ops:
        tgt = _masked(model, space, ops, keep,
                      torch.arange(len(edit_target)) if edited else torch.zeros_like(edit_target),
                      edit_target, targets.inputs(), targets.keys, _target_measure(targets),
                      max_rows)
        grid = torch.arange(kinds).repeat_interleave(n), torch.arange(n).repeat(kinds)
        hits = _masked(model, space, ops, keep, *grid, others.inputs(), others.keys,
                       _extracted_measure(others), max_rows).reshape(kinds, n) if n else \
            torch.zeros(kinds, 0)
        grid = torch.arange(kinds).repeat_interleave(h), torch.arange(h).repeat(kinds)
        nll = _masked(model, space, ops, keep, *grid, windows[:, :-1], None,
                      lambda logits, rows: _window_nll(logits, windows[rows]),
                      max_rows).reshape(kinds, h)
    bpb = nll.mean(1) / math.log(2)
    out = []
    for e, t in enumerate(edit_target.tolist()):
        k = e if edited else 0
        if edited:
            with single_edit(model, space, keep[e]):
                exposure = _exposure(model, targets, t, candidates)
        else:
            exposure = _exposure(model, targets, t, candidates)
        out.append(Measures(extracted=bool(tgt[e, 1]), nll=float(tgt[e, 0]), acc=float(tgt[e, 2]),
                            exposure=exposure, others=_others_mean(hits[k], others, targets.ids[t]),
                            bpb=float(bpb[k])))
    return out


def baseline(model: nn.Module, space: ChannelSpace, targets: SequenceTargets, *,
             others: SequenceTargets, heldout: torch.Tensor, max_rows: int = MAX_ROWS,
             exposure_candidates: int = EXPOSURE_CANDIDATES) -> list[Measures]:
    """The measures of every target on the model as it is (what each edit is compared with).
    ``others``: the canaries each edit should keep (the runner: those the model extracts);
    ``heldout``: uint8 ``[H, L + 1]`` windows."""
    model.eval()
    return _measures(model, space, torch.ones(1, space.total), torch.arange(len(targets)),
                     targets=targets, others=others, heldout=heldout, max_rows=max_rows,
                     candidates=exposure_candidates, edited=False)


def drop_evaluate(model: nn.Module, space: ChannelSpace, targets: SequenceTargets,
                  scores: torch.Tensor, *, fractions: Sequence[float], others: SequenceTargets,
                  heldout: torch.Tensor, before: list[Measures] | None = None,
                  max_rows: int = MAX_ROWS,
                  exposure_candidates: int = EXPOSURE_CANDIDATES) -> list[DropResult]:
    """DEL for every target of ``targets`` and every fraction (in (0, 1]) of ``fractions``:
    float ``scores`` ``[T, total]`` rank the neurons (higher = dropped first). Results target by
    target, fractions in the order given. ``before``: :func:`baseline` of the same targets
    (computed when None)."""
    if scores.shape != (len(targets), space.total):
        raise ValueError(f"scores have shape {tuple(scores.shape)}, expected "
                         f"[{len(targets)}, {space.total}]")
    if before is None:
        before = baseline(model, space, targets, others=others, heldout=heldout,
                          max_rows=max_rows, exposure_candidates=exposure_candidates)
    model.eval()
    dropped = torch.stack([top_per_site(scores, space, f) for f in fractions], 1)  # [T, F, total]
    keep = (~dropped).reshape(-1, space.total).float()
    edit_target = torch.arange(len(targets)).repeat_interleave(len(fractions))
    after = _measures(model, space, keep, edit_target, targets=targets, others=others,
                      heldout=heldout, max_rows=max_rows, candidates=exposure_candidates,
                      edited=True)
    return [DropResult(target=targets.ids[t], fraction=float(fractions[e % len(fractions)]),
                       neurons=int(dropped[t, e % len(fractions)].sum()), before=before[t],
                       after=after[e])
            for e, t in enumerate(edit_target.tolist())]
