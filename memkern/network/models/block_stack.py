"""A language model seen as a stack of blocks, so that a method can start a forward at any block.

Both text models provide it (memkern's ``gpt``, ``hf:gpt2``):

- ``embed(tokens)``: int64 ``[N, T]`` -> the residual stream entering the first block, float
  ``[N, T, width]``;
- ``run_blocks(x, start, stop=None)``: the residual stream entering block ``start`` -> the one
  leaving block ``stop - 1`` (None: the last);
- ``readout(x)``: the residual stream leaving the last block -> logits ``[N, T, vocab]``;
- ``block_paths``: each block's module path, in order (a site inside block i is named
  ``block_paths[i] + "."...``),

with ``model(tokens) == readout(run_blocks(embed(tokens), 0))`` (tests/test_text_methods.py).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from memkern.errors import ConfigError


@runtime_checkable
class BlockStack(Protocol):
    block_paths: tuple[str, ...]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None
                   ) -> torch.Tensor: ...

    def readout(self, x: torch.Tensor) -> torch.Tensor: ...


def block_stack(model: nn.Module) -> BlockStack:
    """``model`` itself; ConfigError when it does not run block by block."""
    if not isinstance(model, BlockStack):
        raise ConfigError(f"this method runs a language model's blocks one by one (gpt, "
                          f"hf:gpt2); got {type(model).__name__}")
    return model


def block_of(model: BlockStack, site: str) -> int:
    """The block that holds ``site`` (0 when none does): a mask there leaves the blocks before
    it as they were."""
    for i, path in enumerate(model.block_paths):
        if site.startswith(path + "."):
            return i
    return 0
