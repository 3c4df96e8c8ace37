"""Greedy extraction of planted secrets and teacher-forced suffix accuracy.

Rows carry the tied-dropout key of the insert they ask about (``keys``), so a tied-dropout model
in mode "own" answers with the mask its copies were trained with.
"""
from __future__ import annotations

import torch
from torch import nn

from memkern.network.sites import example_indices

ROWS = 256


def byte_tokens(raw: bytes) -> torch.Tensor:
    """int64 ``[len(raw)]``: the bytes as token ids."""
    return torch.tensor(list(raw), dtype=torch.long)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: torch.Tensor, length: int, *,
                         keys: torch.Tensor | None = None, batch_size: int = ROWS) -> torch.Tensor:
    """int64 ``[B, length]``: the argmax continuation of each int64 ``[B, P]`` prompt."""
    dev = _device(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        seq = prompts[start:start + batch_size].to(dev)
        rows = None if keys is None else keys[start:start + batch_size].to(dev)
        with example_indices(rows):
            for _ in range(length):
                nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        out.append(seq[:, prompts.shape[1]:].cpu())
    return torch.cat(out) if out else torch.zeros(0, length, dtype=torch.long)


def extracted(model: nn.Module, prompts: torch.Tensor, secrets: torch.Tensor, *,
              keys: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B]``: greedy decoding from each prompt ``[B, P]`` reproduces its secret
    ``[B, S]`` exactly."""
    got = greedy_continuations(model, prompts, secrets.shape[1], keys=keys)
    return (got == secrets.cpu()).all(1)


@torch.no_grad()
def suffix_accuracy(model: nn.Module, texts: torch.Tensor, prefix: int, *,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
    """float ``[B]``: the fraction of bytes ``prefix..`` of each int64 ``[B, L]`` text that the
    model predicts (argmax) given the true bytes before them (teacher forcing)."""
    dev = _device(model)
    with example_indices(None if keys is None else keys.to(dev)):
        pred = model(texts[:, :-1].to(dev)).argmax(-1).cpu()
    return (pred[:, prefix - 1:] == texts[:, prefix:]).float().mean(1)
