"""Greedy's reference sums and mask gradients kept by mask, so that later greedy calls on the
same model, objective and channel space reuse them instead of running the reference rows again.

The reference part ``S(m)`` of the objective and its mask gradient depend on a target only
through its mask (:mod:`memkern.experiments.localize.objective`). Within one greedy call masks
never recur across steps (every mask at step k has exactly k zeros) and are already shared
within a step; what recurs are the masks of later calls, e.g. the runner's chunks: the all-ones
mask each chunk starts from and the common prefixes of greedy paths (bench/README.md,
"Greedy: reference passes reused across chunks"). Exact, not approximate: on CPU a mask's
reference rows give the same numbers whichever other masks share their pass, so a reused entry
is the value the pass would have computed (tests assert results with and without the cache
equal bit for bit). A GPU library that picks its kernels by batch size may round a pass of
another size differently; a reused entry then differs from a recomputed one by that rounding,
as results of two ``--chunk`` sizes already may.

Bounded: past ``max_bytes`` the masks with the most zeros go first, as they are the ones later
calls share least (a path's deeper prefixes are common to fewer targets).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace

DEFAULT_BYTES = 256 * 2**20


class ReferenceCache:
    """Per mask (bool ``[space.total]``) and kind of pass: the reference sum ``S(m)`` (0-d
    tensor) and, from a pass with a backward, ``dS/dm`` (``[space.total]``). Valid for one
    model state, one objective and one channel space: pass it to every
    :func:`memkern.experiments.localize.greedy.greedy_localize` call on those, and drop it
    when any of them changes. ``reused`` counts the masks served from it."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        if max_bytes < 0:
            raise ConfigError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.reused = 0
        self._entries: dict[tuple[bytes, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._by_zeros: dict[int, list[tuple[bytes, bool]]] = {}
        self._bytes = 0
        self._owner: tuple | None = None

    def bind(self, model: nn.Module, objective, space: ChannelSpace) -> None:
        """Refuse to serve a model, objective or channel space other than the first one's."""
        if self._owner is None:
            self._owner = (model, objective, space)
        elif not (self._owner[0] is model and self._owner[1] is objective
                  and self._owner[2] == space):
            raise ConfigError("a ReferenceCache holds one model's, objective's and channel "
                              "space's reference passes; make a new one for another")

    @staticmethod
    def keys(masks: torch.Tensor) -> list[bytes]:
        """bool ``[U, total]`` -> one key per row (the row's bits packed)."""
        packed = np.packbits(masks.cpu().numpy(), axis=1)
        return [row.tobytes() for row in packed]

    def get(self, key: bytes, with_grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(S(m), dS/dm or None)`` of the mask ``key`` as a pass with (or without) a backward
        computed it, or None. A forward-only pass is not served from a backward's entry: the two
        are kept apart so that reuse never depends on both giving the same bits."""
        entry = self._entries.get((key, with_grad))
        if entry is not None:
            self.reused += 1
        return entry

    def put(self, key: bytes, zeros: int, total: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Keep ``S(m)`` (and ``dS/dm`` when a backward ran) of the mask ``key``, which has
        ``zeros`` channels zeroed."""
        slot = (key, grad is not None)
        if slot in self._entries:
            return
        entry = (total.detach().clone(), None if grad is None else grad.detach().clone())
        size = self._size(slot, entry)
        if size > self.max_bytes:
            return
        self._by_zeros.setdefault(zeros, []).append(slot)
        self._entries[slot] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._evict_deepest()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held: keys, sums and gradients (at most ``max_bytes``)."""
        return self._bytes

    @staticmethod
    def _size(slot: tuple[bytes, bool], entry: tuple[torch.Tensor, torch.Tensor | None]) -> int:
        total, grad = entry
        return len(slot[0]) + total.element_size() + (0 if grad is None else
                                                      grad.numel() * grad.element_size())

    def _evict_deepest(self) -> None:
        zeros = max(z for z, keys in self._by_zeros.items() if keys)
        slot = self._by_zeros[zeros].pop()
        self._bytes -= self._size(slot, self._entries.pop(slot))
