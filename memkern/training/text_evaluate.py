"""What a text run's metrics.jsonl line and ``memkern evaluate`` report (docs/text.md).

``heldout_bpb``: bits per byte of the held-out works' windows (next-byte cross-entropy / ln 2;
rows carry no dataset index, so a tied-dropout model runs in mode "keep"). Per reps group ``r``
of the canaries: ``extracted_r{r}`` (fraction whose greedy continuation of the prefix is the
secret) and ``exposure_r{r}`` (mean exposure, rank exact up to ``max_candidates``); for
duplicated paragraphs ``suffix_acc`` (teacher-forced, bytes 32..79). A tied-dropout model adds
each of them in modes "keep" and "drop" (suffix ``_keep`` / ``_drop``).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from memkern.data.text import TextData
from memkern.data.text.inserts import PARAGRAPH, Insert
from memkern.experiments.text.exposure import secret_exposure
from memkern.experiments.text.extraction import byte_tokens, extracted, suffix_accuracy
from memkern.network.tied_dropout import has_tied_dropout, tied_dropout_mode, unindexed_rows

EVAL_ROWS = 64
# Each epoch's exposure is a cheap look (exact ranks up to 1,000 strings scored, else estimated
# from 64 samples): per canary at most 165 rows of <= 29 bytes, against the 2,431 windows of 128
# an epoch of the preset trains. `memkern evaluate` searches 10^5 strings (--max-candidates;
# 10^6 is the paper's) and estimates from 512 samples.
EPOCH_CANDIDATES, EPOCH_SAMPLES = 1_000, 64
EVALUATE_CANDIDATES, EVALUATE_SAMPLES = 100_000, 512


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = EVAL_ROWS,
               ) -> torch.Tensor:
    """float32 ``[W]``: mean next-byte NLL (nats) of each uint8 ``[W, T + 1]`` window."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        w = windows[start:start + batch_size].to(device).long()
        logits = model(w[:, :-1])
        nll = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
        out.append(nll.mean(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def heldout_bpb(model: nn.Module, data: TextData) -> float:
    """Bits per byte on ``data``'s held-out windows."""
    model.eval()
    with unindexed_rows(model):
        return float(window_nll(model, data.heldout_windows).mean()) / math.log(2)


def _group_means(values: list[float], reps: list[int], name: str) -> dict[str, float]:
    return {f"{name}_r{r}": float(np.mean([v for v, k in zip(values, reps) if k == r]))
            for r in sorted(set(reps))}


def canary_results(model: nn.Module, data: TextData, *, max_candidates: int = EPOCH_CANDIDATES,
                   samples: int = EPOCH_SAMPLES,
                   on_canary: Callable[[], None] | None = None) -> list[dict]:
    """Per canary: ``id``, ``reps``, ``extracted`` (bool), ``exposure``, ``rank``, ``exact``.
    Each canary's rows carry its tied-dropout key. ``on_canary`` is called after each canary's
    exposure search (the long part: up to ``max_candidates`` strings scored each)."""
    canaries = data.canaries()
    if not canaries:
        return []
    model.eval()
    keys = data.mask_keys[[data.copies(c.id)[0] for c in canaries]]
    hits = extracted(model, torch.stack([byte_tokens(c.prefix) for c in canaries]),
                     torch.stack([byte_tokens(c.secret) for c in canaries]), keys=keys)
    out = []
    for c, hit, key in zip(canaries, hits.tolist(), keys.tolist()):
        e = secret_exposure(model, byte_tokens(c.prefix), byte_tokens(c.secret), key=key,
                            max_candidates=max_candidates, samples=samples, seed=c.id)
        out.append({"id": c.id, "reps": c.reps, "extracted": hit, "exposure": e.exposure,
                    "rank": e.rank, "exact": e.exact})
        if on_canary is not None:
            on_canary()
    return out


def paragraph_accuracy(model: nn.Module, data: TextData) -> float:
    """Mean teacher-forced suffix accuracy over the duplicated paragraphs (nan: none)."""
    paragraphs: list[Insert] = [i for i in data.inserts if i.kind == PARAGRAPH and i.secret]
    accs = [float(suffix_accuracy(model, byte_tokens(p.prefix + p.secret)[None], len(p.prefix),
                                  keys=data.mask_keys[data.copies(p.id)[:1]])[0])
            for p in paragraphs]
    return float(np.mean(accs)) if accs else float("nan")


def text_measures(model: nn.Module, data: TextData, *, max_candidates: int = EVALUATE_CANDIDATES,
                  on_canary: Callable[[], None] | None = None) -> dict:
    """:func:`_measures` and each canary's :func:`canary_results` under ``canaries``."""
    rows = canary_results(model, data, max_candidates=max_candidates, samples=EVALUATE_SAMPLES,
                          on_canary=on_canary)
    return {**_measures(model, data, max_candidates, rows=rows), "canaries": rows}


def _measures(model: nn.Module, data: TextData, max_candidates: int, *,
              rows: list[dict] | None = None) -> dict[str, float]:
    if rows is None:
        rows = canary_results(model, data, max_candidates=max_candidates)
    reps = [r["reps"] for r in rows]
    out = {"heldout_bpb": heldout_bpb(model, data),
           **_group_means([float(r["extracted"]) for r in rows], reps, "extracted"),
           **_group_means([r["exposure"] for r in rows], reps, "exposure")}
    if any(i.kind == PARAGRAPH for i in data.inserts):
        out["suffix_acc"] = paragraph_accuracy(model, data)
    return out


def text_epoch_metrics(model: nn.Module, data: TextData, *,
                       max_candidates: int = EPOCH_CANDIDATES) -> dict[str, float]:
    """The text measures of one metrics.jsonl line (see the module docstring)."""
    out = _measures(model, data, max_candidates)
    if has_tied_dropout(model):
        for mode in ("keep", "drop"):
            with tied_dropout_mode(model, mode):
                out.update({f"{k}_{mode}": v for k, v in
                            _measures(model, data, max_candidates).items()})
    return out
