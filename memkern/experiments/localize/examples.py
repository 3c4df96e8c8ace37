"""Which training examples to localize: ``noisy``, ``clean``, ``all`` or a file of indices; on a
text run, which planted inserts: ``canaries``, ``paragraphs``, ``all`` or a file of insert ids."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from memkern.data import PreparedData
from memkern.data.text import TextData
from memkern.data.text.inserts import CANARY, PARAGRAPH
from memkern.errors import ConfigError

CHOICES = ("noisy", "clean", "all")
INSERT_CHOICES = ("canaries", "paragraphs", "all")


def select_examples(data: PreparedData, examples: str, *, limit: int | None = None) -> torch.Tensor:
    """int64 dataset indices. ``all`` interleaves noisy and clean examples (noisy first), so
    ``limit`` gives a balanced sample; a file holds integers separated by spaces, commas or
    newlines."""
    if examples in INSERT_CHOICES[:2]:
        raise ConfigError(f"--examples {examples} takes a text run with planted inserts; this "
                          f"run's targets are {', '.join(CHOICES)} or a FILE of indices")
    noisy = data.noise.noisy_indices
    clean = torch.nonzero(~data.noisy_mask).flatten()
    if examples == "noisy":
        order = noisy
    elif examples == "clean":
        order = clean
    elif examples == "all":
        k = min(len(noisy), len(clean))
        head = torch.stack([noisy[:k], clean[:k]], 1).flatten()
        order = torch.cat([head, noisy[k:], clean[k:]])
    else:
        if not examples.strip():
            raise ConfigError(f"--examples {examples!r} is empty: pass one of "
                              f"{', '.join(CHOICES)} or a file of indices")
        order = _read_indices(Path(examples), len(data.train_labels))
    if examples in ("noisy", "clean") and not len(order):
        why = "no label was flipped (noise 0)" if examples == "noisy" else "every label is noisy"
        raise ConfigError(f"--examples {examples}: this run has no {examples} examples ({why}); "
                          f"choose another --examples")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        order = order[:limit]
    return order


def select_inserts(data: TextData, examples: str, *, limit: int | None = None) -> list[int]:
    """Insert ids of a text run, most-repeated first (then by id): ``canaries``,
    ``paragraphs``, ``all`` (both), or a file of insert ids in its order."""
    if examples in CHOICES[:2]:
        raise ConfigError(f"--examples {examples} takes an image run; a text run's targets are "
                          f"{', '.join(INSERT_CHOICES)} or a FILE of insert ids")
    kinds = {"canaries": (CANARY,), "paragraphs": (PARAGRAPH,), "all": (CANARY, PARAGRAPH)}
    if examples in kinds:
        chosen = [i for i in data.inserts if i.kind in kinds[examples]]
        if not chosen:
            flag = "--canaries" if examples == "canaries" else "--dup-paragraphs"
            raise ConfigError(f"--examples {examples}: this run has no "
                              f"{'planted inserts' if examples == 'all' else examples} "
                              f"(train with {flag} N)")
        order = [i.id for i in sorted(chosen, key=lambda i: (-i.reps, i.id))]
    elif not examples.strip():
        raise ConfigError(f"--examples {examples!r} is empty: pass one of "
                          f"{', '.join(INSERT_CHOICES)} or a file of insert ids")
    else:
        if not data.inserts:
            raise ConfigError(f"--examples {examples}: this run has no planted inserts "
                              f"(train with --canaries N or --dup-paragraphs N)")
        order = _read_indices(Path(examples), len(data.inserts), what="insert id",
                              choices=INSERT_CHOICES,
                              span=f"the run has {len(data.inserts)} inserts")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        order = order[:limit]
    return [int(i) for i in order]


def _read_indices(path: Path, num_train: int, *, what: str = "index",
                  choices: tuple[str, ...] = CHOICES, span: str | None = None) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"--examples {path}: not one of {', '.join(choices)} and no such file")
    try:
        tokens = [t for t in re.split(r"[\s,]+", path.read_text()) if t]
    except UnicodeDecodeError:
        raise ConfigError(f"--examples {path}: not a text file of indices") from None
    values = []
    for t in tokens:
        if not re.fullmatch(r"[0-9]+", t):
            raise ConfigError(f"--examples {path}: {t[:20]!r} is not a non-negative integer "
                              f"{what}")
        v = int(t) if len(t) <= 18 else num_train  # longer: out of range anyway
        if v >= num_train:
            raise ConfigError(f"--examples {path}: {what} {t[:20]} is out of range ("
                              + (span or f"the training set has {num_train} examples")
                              + f"; valid: 0..{num_train - 1})")
        values.append(v)
    if not values:
        raise ConfigError(f"--examples {path}: the file holds no "
                          f"{'indices' if what == 'index' else what + 's'}")
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise ConfigError(f"--examples {path}: {what} {dup} appears more than once")
    return torch.tensor(values, dtype=torch.long)
