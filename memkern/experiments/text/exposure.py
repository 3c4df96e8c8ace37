"""Exposure of a canary's secret (Carlini et al. 2019, "The Secret Sharer"; docs/text.md).

exposure = log2 |space| - log2 rank, where rank is the secret's place among all digit strings
of its length ordered by the model's probability given the prefix (rank 1: the most likely).
The rank is exact when found by best-first search within ``max_candidates`` strings (partial
or complete) scored: a heap of partial strings keyed by their log-probability, an upper bound
for every completion (log-probabilities are <= 0), so complete strings leave the heap in order
of probability. Partial strings are expanded in batches (those within :data:`BATCH_MARGIN` of
the best); a complete string is only counted once it is on top, so batching keeps the order
exact. When the search stops first, the rank is
estimated from a normal fit to the log-probabilities of uniformly sampled strings (the
extrapolation of the paper's Section 4.3), never below the complete strings already ahead.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from memkern.network.sites import example_indices

DIGITS = tuple(range(ord("0"), ord("9") + 1))
EXPAND_ROWS = 512
# A batch takes partial strings at most this many nats below the best one: a memorized secret's
# path (log-probabilities near 0) is then expanded alone, one forward per digit, instead of
# beside hundreds of strings a thousand times less likely that the budget would run out on.
BATCH_MARGIN = math.log(1000.0)
SAMPLES = 512


@dataclass(frozen=True)
class Exposure:
    """``rank`` of the secret (1 = most likely); ``exact``: found by search, else estimated."""

    rank: float
    exact: bool
    space: int

    @property
    def exposure(self) -> float:
        return math.log2(self.space) - math.log2(self.rank)


@torch.no_grad()
def _next_log_probs(model: nn.Module, prefix: torch.Tensor, partials: list[tuple[int, ...]],
                    key: int | None, alphabet: torch.Tensor) -> np.ndarray:
    """float64 ``[len(partials), len(alphabet)]``: log p(next symbol) after prefix + partial."""
    dev = prefix.device
    width = max(len(p) for p in partials)
    rows = torch.full((len(partials), len(prefix) + max(width, 1)), int(alphabet[0]),
                      dtype=torch.long, device=dev)
    rows[:, :len(prefix)] = prefix
    for i, p in enumerate(partials):
        if p:
            rows[i, len(prefix):len(prefix) + len(p)] = alphabet[list(p)]
    ends = torch.tensor([len(prefix) + len(p) - 1 for p in partials], device=dev)
    keys = None if key is None else torch.full((len(partials),), key, device=dev)
    with example_indices(keys):  # right padding: causal attention keeps it out of the ends
        logits = model(rows[:, :len(prefix) + width] if width else rows[:, :len(prefix)])
    lp = torch.log_softmax(logits[torch.arange(len(partials), device=dev), ends].double(), -1)
    return lp[:, alphabet].cpu().numpy()


@torch.no_grad()
def sequence_log_probs(model: nn.Module, prefix: torch.Tensor, strings: torch.Tensor, *,
                       key: int | None = None, batch_size: int = EXPAND_ROWS) -> np.ndarray:
    """float64 ``[B]``: log p(string | prefix) of each int64 ``[B, S]`` byte string."""
    dev = prefix.device
    out = []
    for start in range(0, len(strings), batch_size):
        s = strings[start:start + batch_size].to(dev)
        rows = torch.cat([prefix.expand(len(s), -1), s], 1)
        keys = None if key is None else torch.full((len(s),), key, device=dev)
        with example_indices(keys):
            lp = torch.log_softmax(model(rows[:, :-1])[:, len(prefix) - 1:].double(), -1)
        out.append(lp.gather(-1, s[..., None]).squeeze(-1).sum(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def secret_exposure(model: nn.Module, prefix: torch.Tensor, secret: torch.Tensor, *,
                    key: int | None = None, max_candidates: int = 1_000_000,
                    alphabet: tuple[int, ...] = DIGITS, samples: int = SAMPLES,
                    seed: int = 0) -> Exposure:
    """The exposure of ``secret`` (int64 ``[S]``, bytes of ``alphabet``) after ``prefix`` (int64
    ``[P]``); ``key``: the tied-dropout key of the rows; ``samples``: strings drawn (from
    ``seed``) for an estimated rank."""
    dev = next(model.parameters()).device
    prefix, alpha = prefix.to(dev), torch.tensor(alphabet, device=dev)
    target = tuple(alphabet.index(int(b)) for b in secret)
    length, space = len(target), len(alphabet) ** len(target)
    heap: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    ahead = scored = 0  # complete strings popped before the secret; strings scored
    while heap and scored < max_candidates:
        if len(heap[0][1]) == length:
            _, done = heapq.heappop(heap)
            if done == target:
                return Exposure(rank=ahead + 1, exact=True, space=space)
            ahead += 1
            continue
        batch = []
        room = min(EXPAND_ROWS, -(-(max_candidates - scored) // len(alphabet)))
        best = heap[0][0]
        while (heap and len(heap[0][1]) < length and len(batch) < room
               and heap[0][0] <= best + BATCH_MARGIN):
            batch.append(heapq.heappop(heap))
        scored += len(batch) * len(alphabet)
        lp = _next_log_probs(model, prefix, [p for _, p in batch], key, alpha)
        for (neg, partial), row in zip(batch, lp):
            for sym, value in enumerate(row):
                heapq.heappush(heap, (neg - float(value), partial + (sym,)))
    return Exposure(rank=_estimated_rank(model, prefix, secret.to(dev), key, alpha, space,
                                         floor=ahead + 1, samples=samples, seed=seed),
                    exact=False, space=space)


def _estimated_rank(model, prefix, secret, key, alpha, space, *, floor: int, samples: int,
                    seed: int) -> float:
    """``space`` x P(log p(random string) > log p(secret)) under a normal fit, in
    [``floor``, ``space``]."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(alpha), (samples, len(secret)), generator=gen)
    sampled = sequence_log_probs(model, prefix, alpha.cpu()[picks], key=key)
    own = sequence_log_probs(model, prefix, secret[None], key=key)[0]
    z = (own - sampled.mean()) / max(sampled.std(), 1e-12)
    above = 0.5 * math.erfc(z / math.sqrt(2))  # P(X > own) for X ~ N(mean, std)
    return float(min(space, max(floor, above * space)))
