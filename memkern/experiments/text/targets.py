"""Memorized sequences as localization targets: each planted insert's prefix + secret, one row.

A row is right-padded to a common length; causal attention keeps padding out of every scored
position. Position j of ``scored`` is True where the model's prediction after bytes ``0..j``
must be the secret's byte ``tokens[j + 1]``: the secret's negative log-likelihood sums there,
and greedy decoding from the prefix reproduces the secret exactly iff the argmax is right at
every scored position (teacher forcing follows the greedy path while it is right).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memkern.data.text import TextData
from memkern.data.text.inserts import Insert


@dataclass(frozen=True)
class SequenceTargets:
    """``tokens`` int64 ``[T, L]`` (prefix + secret, right-padded with 0); ``scored`` bool
    ``[T, L - 1]``; ``keys`` int64 ``[T]``: each insert's tied-dropout key (all its copies share
    one mask); ``ids``: insert ids."""

    tokens: torch.Tensor
    scored: torch.Tensor
    keys: torch.Tensor
    ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: torch.Tensor) -> "SequenceTargets":
        """The targets at int64 ``rows``."""
        return SequenceTargets(self.tokens[rows], self.scored[rows], self.keys[rows],
                               tuple(self.ids[i] for i in rows.tolist()))

    def inputs(self) -> torch.Tensor:
        """int64 ``[T, L - 1]``: what the model reads."""
        return self.tokens[:, :-1]

    def secret_nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of :meth:`inputs` ``[T, L - 1, V]`` -> the secret's summed NLL ``[T]``."""
        nll = F.cross_entropy(logits.transpose(1, 2), self.tokens[:, 1:].to(logits.device),
                              reduction="none")
        return (nll * self.scored.to(logits.device, nll.dtype)).sum(1)

    def extracted(self, logits: torch.Tensor) -> torch.Tensor:
        """bool ``[T]``: greedy decoding from the prefix gives the secret exactly."""
        right = logits.argmax(-1) == self.tokens[:, 1:].to(logits.device)
        return (right | ~self.scored.to(logits.device)).all(1)


def sequence_targets(inserts: list[Insert], data: TextData) -> SequenceTargets:
    """The targets of ``inserts`` (each planted in ``data``)."""
    rows = [insert.prefix + insert.secret for insert in inserts]
    width = max((len(r) for r in rows), default=1)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for t, (insert, row) in enumerate(zip(inserts, rows)):
        tokens[t, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        scored[t, len(insert.prefix) - 1:len(row) - 1] = True
    keys = torch.tensor([int(data.mask_keys[data.copies(i.id)[0]]) for i in inserts],
                        dtype=torch.long)
    return SequenceTargets(tokens, scored, keys, tuple(i.id for i in inserts))
