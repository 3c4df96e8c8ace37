"""Which training examples to localize: ``noisy``, ``clean``, ``all`` or a file of indices."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from memkern.data import PreparedData
from memkern.errors import ConfigError

CHOICES = ("noisy", "clean", "all")


def select_examples(data: PreparedData, examples: str, *, limit: int | None = None) -> torch.Tensor:
    """int64 dataset indices. ``all`` interleaves noisy and clean examples (noisy first), so
    ``limit`` gives a balanced sample; a file holds integers separated by spaces, commas or
    newlines."""
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


def _read_indices(path: Path, num_train: int) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"--examples {path}: not one of {', '.join(CHOICES)} and no such file")
    try:
        tokens = [t for t in re.split(r"[\s,]+", path.read_text()) if t]
    except UnicodeDecodeError:
        raise ConfigError(f"--examples {path}: not a text file of indices") from None
    values = []
    for t in tokens:
        if not re.fullmatch(r"[0-9]+", t):
            raise ConfigError(f"--examples {path}: {t[:20]!r} is not a non-negative integer "
                              f"index")
        v = int(t) if len(t) <= 18 else num_train  # longer: out of range anyway
        if v >= num_train:
            raise ConfigError(f"--examples {path}: index {t[:20]} is out of range (the "
                              f"training set has {num_train} examples, indices "
                              f"0..{num_train - 1})")
        values.append(v)
    if not values:
        raise ConfigError(f"--examples {path}: the file holds no indices")
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise ConfigError(f"--examples {path}: index {dup} appears more than once")
    return torch.tensor(values, dtype=torch.long)
