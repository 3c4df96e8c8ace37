"""What zeroing a target's channels does to a text model (docs/text.md, "Localizing a
sequence"): the target's exposure, the other canaries' extraction, held-out bits per byte.

Each edit runs as a row mask over the unchanged model (no copies): every forward of the edited
model gives all its rows the edit's mask. Rows keep their tied-dropout keys as in
:mod:`memkern.training.text_evaluate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memkern.data.text import TextData
from memkern.data.text.inserts import CANARY, Insert
from memkern.experiments.localize.channels import ChannelSpace, RowMask, row_masks, set_masks
from memkern.experiments.text.exposure import secret_exposure
from memkern.experiments.text.extraction import byte_tokens, extracted, suffix_accuracy
from memkern.network.tied_dropout import unindexed_rows

HELDOUT_WINDOWS = 64  # evenly spaced over the held-out windows: the edit's perplexity cost
# A line's exposure: exact rank within 1,000 strings scored, else estimated from 64 samples
# (the per-epoch budget of memkern.training.text_evaluate).
CANDIDATES, SAMPLES = 1_000, 64


class _Edited(nn.Module):
    """``model`` with channels ``on == 0`` zeroed for every row of every forward."""

    def __init__(self, model: nn.Module, ops: dict[str, RowMask], space: ChannelSpace,
                 on: torch.Tensor):
        super().__init__()
        self.model, self.ops, self.space, self.on = model, ops, space, on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        set_masks(self.ops, self.space, self.on[None].expand(len(x), -1))
        return self.model(x)


@dataclass(frozen=True)
class _Probe:
    """The fixed inputs every edit is measured on."""

    canaries: list[Insert]
    prompts: torch.Tensor
    secrets: torch.Tensor
    keys: torch.Tensor
    heldout: torch.Tensor


def _probe(data: TextData) -> _Probe:
    canaries = data.canaries()
    held = data.heldout_windows
    pick = np.linspace(0, len(held) - 1, min(HELDOUT_WINDOWS, len(held))).astype(np.int64)
    keys = torch.tensor([int(data.mask_keys[data.copies(c.id)[0]]) for c in canaries],
                        dtype=torch.long)
    return _Probe(canaries,
                  torch.stack([byte_tokens(c.prefix) for c in canaries]) if canaries else None,
                  torch.stack([byte_tokens(c.secret) for c in canaries]) if canaries else None,
                  keys, held[torch.from_numpy(pick)].long())


@torch.no_grad()
def _bpb(model: nn.Module, windows: torch.Tensor) -> float:
    device = next(model.parameters()).device
    w = windows.to(device)
    with unindexed_rows(model):
        logits = model(w[:, :-1])
    return float(F.cross_entropy(logits.transpose(1, 2), w[:, 1:])) / math.log(2)


def _own(model: nn.Module, data: TextData, insert: Insert) -> dict:
    """The insert's own measure: its exposure (canary) or suffix accuracy (paragraph)."""
    key = int(data.mask_keys[data.copies(insert.id)[0]])
    if insert.kind == CANARY:
        e = secret_exposure(model, byte_tokens(insert.prefix), byte_tokens(insert.secret), key=key,
                            max_candidates=CANDIDATES, samples=SAMPLES, seed=insert.id)
        return {"exposure": e.exposure, "exposure_exact": e.exact}
    row = byte_tokens(insert.prefix + insert.secret)[None]
    return {"suffix_acc": float(suffix_accuracy(model, row, len(insert.prefix),
                                                keys=torch.tensor([key]))[0])}


def _others(probe: _Probe, insert: Insert) -> torch.Tensor:
    """Positions of the canaries other than ``insert`` in ``probe``."""
    return torch.tensor([i for i, c in enumerate(probe.canaries) if c.id != insert.id],
                        dtype=torch.long)


def _hits(model: nn.Module, probe: _Probe, rows: torch.Tensor) -> torch.Tensor:
    return extracted(model, probe.prompts[rows], probe.secrets[rows], keys=probe.keys[rows])


def edit_measures(model: nn.Module, data: TextData, space: ChannelSpace,
                  inserts: list[Insert], zeroed: torch.Tensor) -> list[dict]:
    """For insert e of ``inserts`` and its bool ``zeroed[e]`` ``[space.total]``: the measures
    of the unedited model (suffix ``_before``) and of the model with those channels zeroed
    (``_after``): ``heldout_bpb``, ``exposure`` and ``exposure_exact`` (canaries) or
    ``suffix_acc`` (paragraphs), ``others_extracted`` (the fraction of the other canaries whose
    secret greedy decoding still gives; absent when there are none)."""
    model.eval()
    probe = _probe(data)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    base_bpb = _bpb(model, probe.heldout)
    base_hits = _hits(model, probe, torch.arange(len(probe.canaries))) if probe.canaries \
        else None
    out = []
    with row_masks(model, space) as ops:
        for insert, z in zip(inserts, zeroed):
            set_masks(ops, space, None)
            line = {"heldout_bpb_before": base_bpb,
                    **{f"{k}_before": v for k, v in _own(model, data, insert).items()}}
            edited = _Edited(model, ops, space, (~z).to(device=device, dtype=dtype))
            line["heldout_bpb_after"] = _bpb(edited, probe.heldout)
            line.update({f"{k}_after": v for k, v in _own(edited, data, insert).items()})
            others = _others(probe, insert)
            if len(others):
                line["others_extracted_before"] = float(base_hits[others].float().mean())
                line["others_extracted_after"] = float(_hits(edited, probe, others).float().mean())
            out.append(line)
        set_masks(ops, space, None)
    return out
