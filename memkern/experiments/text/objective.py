"""The localization objective on memorized sequences (docs/text.md, "Localizing a sequence").

For target t (a planted insert: its prefix and secret, :mod:`memkern.experiments.text.targets`)
and a fixed batch of B clean training windows: ``L_t = mean_{i in ref} NLL_i - NLL_t``, where
``NLL_i`` is window i's mean next-byte NLL and ``NLL_t = -log p(secret | prefix)``. Zeroing
channels that lower L raises the secret's loss while keeping ordinary text predicted. The
target is flipped once greedy decoding from its prefix no longer gives the secret.

The class has the interface of :class:`memkern.experiments.localize.objective.LocalizationObjective`,
so greedy and exhaustive localization (and their sharing of reference passes between targets)
run on it unchanged. Targets are insert ids; a target's row carries its insert's tied-dropout
key, a reference row its window index (a clean window's key). Target rows are padded to the
windows' length: causal attention keeps the padding out of every scored position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memkern.data.text import TextData
from memkern.experiments.text.targets import SequenceTargets


# Rows of a text pass are windows: a pass holds this many tokens (activations of every site for
# each), so memory does not grow with the window length.
TOKENS_PER_PASS = 16_384


def rows_per_pass(length: int) -> int:
    """Rows of ``length`` tokens per greedy/exhaustive pass."""
    return max(1, TOKENS_PER_PASS // length)


def clean_reference(data: TextData, size: int, *, seed: int) -> torch.Tensor:
    """``min(size, clean windows)`` distinct indices of windows holding no planted copy, sorted,
    from a seeded generator."""
    clean = torch.nonzero(~data.noisy_mask).flatten()
    gen = torch.Generator().manual_seed(seed)
    return clean[torch.randperm(len(clean), generator=gen)[:size]].sort().values


class TextObjective:
    """``targets``: every insert that may be localized; ``windows``: the training windows
    (uint8 ``[W, T + 1]``); ``ref``: int64 indices of the clean reference windows."""

    target_rows = 1  # no EoT copies: a byte sequence has no small Gaussian neighbourhood

    def __init__(self, targets: SequenceTargets, windows: torch.Tensor, ref: torch.Tensor):
        # One row length for targets and references; a reference window shorter than a target
        # is padded and its loss taken over its own positions only.
        length = max(windows.shape[1] - 1, targets.tokens.shape[1] - 1)
        self.targets, self.ref = targets, ref
        self._row = {insert: r for r, insert in enumerate(targets.ids)}
        self._inputs = F.pad(targets.inputs(), (0, length - targets.tokens.shape[1] + 1))
        self._ref_windows = F.pad(windows[ref].long(), (0, length + 1 - windows.shape[1]))
        self._ref_positions = windows.shape[1] - 1

    @property
    def rows_per_target(self) -> int:
        return self.target_rows + len(self.ref)

    def _rows(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._row[int(t)] for t in targets.tolist()], dtype=torch.long)

    def target_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """int64 insert ids ``[T]`` -> int64 ``[T, length]``."""
        return self._inputs[self._rows(targets)]

    def target_ids(self, targets: torch.Tensor) -> torch.Tensor:
        return self.targets.keys[self._rows(targets)]

    def ref_inputs(self) -> torch.Tensor:
        return self._ref_windows[:, :-1]

    def inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """All rows of each target, ``[T * rows_per_target, length]``, target row first."""
        ref = self.ref_inputs()
        own = self.target_inputs(targets)[:, None]
        return torch.cat([own, ref[None].expand(len(targets), *ref.shape)], 1).flatten(0, 1)

    def ids(self, targets: torch.Tensor) -> torch.Tensor:
        own = self.target_ids(targets)[:, None]
        return torch.cat([own, self.ref[None].expand(len(targets), -1)], 1).flatten()

    def _scored(self, logits: torch.Tensor, targets: torch.Tensor
                ) -> tuple[SequenceTargets, torch.Tensor]:
        chosen = self.targets.subset(self._rows(targets))
        return chosen, logits[:, :chosen.tokens.shape[1] - 1]

    def target_terms(self, logits: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the target rows ``[T, 1, length, vocab]`` -> (``-NLL_t`` ``[T]``, the
        target rows' logits ``[T, length, vocab]``, what :meth:`flipped` reads)."""
        chosen, own = self._scored(logits[:, 0], targets)
        return -chosen.secret_nll(own), logits[:, 0]

    def flipped(self, clean: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """bool ``[T]``: greedy decoding from the prefix no longer gives the secret."""
        chosen, own = self._scored(clean, targets)
        return ~chosen.extracted(own).cpu()

    def ref_losses(self, logits: torch.Tensor, positions: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Logits of reference rows under U masks ``[U, B, length, vocab]`` -> each window's
        mean NLL ``[U, B]``; ``positions``: the rows are those windows only (int64 positions
        in ``ref``)."""
        u, b, _, v = logits.shape
        t = self._ref_positions
        windows = self._ref_windows if positions is None else self._ref_windows[positions.cpu()]
        y = windows[:, 1:t + 1].to(logits.device).repeat(u, 1)
        nll = F.cross_entropy(logits[:, :, :t].reshape(u * b, t, v).transpose(1, 2), y,
                              reduction="none")
        return nll.mean(1).view(u, b)

    def ref_sums(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of reference rows under U masks ``[U, B, length, vocab]`` -> the sum of the
        windows' mean NLL per mask, ``[U]``."""
        return self.ref_losses(logits).sum(1)

    def in_ref(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(targets), dtype=torch.bool)  # references are clean windows

    def ref_counts(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.full((len(targets),), max(len(self.ref), 1), dtype=torch.long)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of each target ``[T, rows_per_target, length, vocab]`` -> (objective
        ``[T]``, target rows' logits)."""
        part, clean = self.target_terms(logits[:, :1], targets)
        sums = self.ref_sums(logits[:, 1:])
        return sums / self.ref_counts(targets).to(logits.device, logits.dtype) + part, clean
