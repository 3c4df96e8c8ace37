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
    """Per mask (bool ``[space.total]``) and kind of pass: the reference sum ``S(m)`` and, from
    a pass with a backward, ``dS/dm`` (``[space.total]``). Valid for one model state, one
    objective and one channel space: pass it to every
    :func:`memkern.experiments.localize.greedy.greedy_localize` call on those, and drop it
    when any of them changes. ``reused`` counts the masks served from it.

    The gradients live as rows of one block grown by doubling, the sums as Python floats (a
    float32 or float64 value is a double exactly): thousands of small tensors kept between a
    step's large activations fragmented the heap, and the process's peak memory grew by
    hundreds of MB (bench/README.md)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        if max_bytes < 0:
            raise ConfigError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.reused = 0
        # slot (key, with a gradient) -> (S(m), row of dS/dm in the block or -1)
        self._entries: dict[tuple[bytes, bool], tuple[float, int]] = {}
        self._by_zeros: dict[int, list[tuple[bytes, bool]]] = {}
        self._block: torch.Tensor | None = None
        self._free: list[int] = []
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

    def get(self, key: bytes, with_grad: bool) -> tuple[float, torch.Tensor | None] | None:
        """``(S(m), dS/dm or None)`` of the mask ``key`` as a pass with (or without) a backward
        computed it, or None. A forward-only pass is not served from a backward's entry: the two
        are kept apart so that reuse never depends on both giving the same bits."""
        entry = self._entries.get((key, with_grad))
        if entry is None:
            return None
        self.reused += 1
        return entry[0], (self._block[entry[1]] if with_grad else None)

    def put(self, key: bytes, zeros: int, total: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Keep ``S(m)`` (0-d tensor) and ``dS/dm`` when a backward ran, of the mask ``key``,
        which has ``zeros`` channels zeroed."""
        slot = (key, grad is not None)
        size = len(key) + 8 + (0 if grad is None else grad.numel() * grad.element_size())
        if slot in self._entries or size > self.max_bytes:
            return
        row = -1 if grad is None else self._row(grad)
        if row >= 0:
            self._block[row] = grad
        self._entries[slot] = (float(total), row)
        self._by_zeros.setdefault(zeros, []).append(slot)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._evict_deepest()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries: keys, sums and gradient rows (at most ``max_bytes``; the
        gradient block's unused rows come on top, at most one more than the budget holds)."""
        return self._bytes

    def _row(self, like: torch.Tensor) -> int:
        """A free row of the gradient block, growing it (doubling, within the budget)."""
        if not self._free:
            have = 0 if self._block is None else len(self._block)
            most = self.max_bytes // (like.numel() * like.element_size()) + 1
            grown = like.new_empty((min(max(64, 2 * have), most), like.numel()))
            if have:
                grown[:have] = self._block
            self._block = grown
            self._free = list(range(len(grown) - 1, have - 1, -1))
        return self._free.pop()

    def _evict_deepest(self) -> None:
        zeros = max(z for z, slots in self._by_zeros.items() if slots)
        slot = self._by_zeros[zeros].pop()
        _, row = self._entries.pop(slot)
        self._bytes -= len(slot[0]) + 8
        if row >= 0:
            self._bytes -= self._block.shape[1] * self._block.element_size()
            self._free.append(row)
