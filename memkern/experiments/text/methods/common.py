"""What the localization methods of this package share: running target rows and clean windows
through a model whose channels are scaled per row (docs/lm_methods.md).

Target rows carry their insert's tied-dropout key (``SequenceTargets.keys``), so a tied-dropout
model answers with the mask that insert's copies trained; clean windows carry none and run under
:func:`memkern.network.tied_dropout.unindexed_rows`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace, RowMask, set_masks
from memkern.experiments.text.targets import SequenceTargets
from memkern.network.models.block_stack import block_of, block_stack
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import unindexed_rows

ROWS = 256  # rows per forward: what bounds every method's memory


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def check_settings(**values: float) -> None:
    """ConfigError naming the first setting that is not positive (``rows``, ``steps``, ``lr``,
    ``windows``...): each is a count or a step size of a method."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def clean_inputs(clean: torch.Tensor) -> torch.Tensor:
    """int64/uint8 windows ``[B, L + 1]`` -> int64 ``[B, L + 1]``; ConfigError for another shape."""
    if clean.ndim != 2 or clean.shape[1] < 2 or clean.dtype not in (torch.int64, torch.uint8):
        raise ConfigError(f"clean windows must be int64/uint8 [B, L + 1] with L >= 1, got "
                          f"{clean.dtype} {tuple(clean.shape)}")
    return clean.long()


def secret_nll(model: nn.Module, targets: SequenceTargets, which: torch.Tensor) -> torch.Tensor:
    """float ``[R]``: the secret NLL of target ``which[r]`` (int64 ``[R]``) in one forward; row r
    runs under whatever row masks the caller set (:func:`set_masks` with R rows)."""
    device, _ = device_dtype(model)
    rows = targets.subset(which.cpu())
    with example_indices(rows.keys.to(device)):
        logits = model(rows.inputs().to(device))
    return rows.secret_nll(logits)


def start_block(model: nn.Module, site: str) -> int:
    """The block of ``model`` that holds ``site``: a mask there leaves the blocks before it as
    they were."""
    return block_of(block_stack(model), site)


def block_inputs(model: nn.Module, targets: SequenceTargets) -> list[torch.Tensor]:
    """The residual stream entering each block of a language model (gpt, hf:gpt2) for every
    target row, unmasked: ``[T, L - 1, width]`` per block."""
    stack = block_stack(model)
    device, _ = device_dtype(model)
    out = []
    with torch.no_grad(), example_indices(targets.keys.to(device)):
        x = stack.embed(targets.inputs().to(device))
        for i in range(len(stack.block_paths)):
            out.append(x)
            x = stack.run_blocks(x, i, i + 1)
    return out


def secret_nll_from(model: nn.Module, targets: SequenceTargets, which: torch.Tensor,
                    states: list[torch.Tensor], start: int) -> torch.Tensor:
    """:func:`secret_nll` of rows ``which``, run from block ``start``'s input ``states[start]``
    (:func:`block_inputs`): rows whose masks all sit in blocks ``start..`` need no more."""
    stack = block_stack(model)
    device, _ = device_dtype(model)
    rows = targets.subset(which.cpu())
    x = states[start][which.to(device)]
    with example_indices(rows.keys.to(device)):
        logits = stack.readout(stack.run_blocks(x, start))
    return rows.secret_nll(logits)


def clean_loss(model: nn.Module, ops: dict[str, RowMask], space: ChannelSpace,
               clean: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """float ``[M]``: the mean next-byte cross-entropy over every position of the int64 windows
    ``clean`` ``[B, L + 1]`` under each mask of ``masks`` ``[M, space.total]`` (M x B rows in one
    forward)."""
    device, _ = device_dtype(model)
    m, b = len(masks), len(clean)
    w = clean.to(device).repeat(m, 1)
    set_masks(ops, space, masks.repeat_interleave(b, dim=0))
    with example_indices(None), unindexed_rows(model):
        logits = model(w[:, :-1])
    ce = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
    return ce.view(m, -1).mean(1)


def site_columns(space: ChannelSpace) -> list[slice]:
    """Each site's columns of the flat channel index, in ``space.names`` order."""
    return [slice(o, o + c) for o, c in zip(space.offsets, space.counts)]
