"""``memkern localize``: localize many training examples of a checkpoint, resumably.

Targets are processed in chunks; after each chunk its lines are appended (fsync'd) to the
JSON-lines output, so a killed run loses at most one chunk and a rerun skips done indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from memkern.atomic import append_jsonl, read_jsonl, rewrite_jsonl
from memkern.errors import ConfigError
from memkern.evaluate import split_accuracies
from memkern.experiment import load_trained
from memkern.localize.channels import channel_space
from memkern.localize.edited import edited_accuracies
from memkern.localize.examples import select_examples
from memkern.localize.exhaustive import exhaustive_localize
from memkern.localize.greedy import MAX_ROWS, greedy_localize
from memkern.localize.objective import LocalizationObjective, reference_indices
from memkern.localize.summary import write_summary

METHODS = ("greedy", "exhaustive")


@dataclass
class LocalizeResult:
    path: Path
    summary: dict


def default_output(ckpt: str | Path) -> Path:
    """``<run dir>/localize.jsonl`` where the run dir holds ``checkpoints/<ckpt>``."""
    return Path(ckpt).resolve().parent.parent / "localize.jsonl"


def recover_jsonl(path: Path) -> list[dict]:
    """Complete lines of ``path``; a torn line left by a kill is removed from the file, so the
    next append starts on a fresh line."""
    rows = read_jsonl(path)
    if path.exists():
        text = path.read_text()
        if sum(1 for line in text.splitlines() if line.strip()) != len(rows) or \
                (text and not text.endswith("\n")):
            rewrite_jsonl(path, rows)
    return rows


def localize(*, ckpt: str | Path, examples: str = "noisy", limit: int | None = None,
             method: str = "greedy", max_channels: int = 50, eot: int = 0, ref_batch: int = 512,
             candidates: int | None = None, sites: Sequence[str] | None = None,
             out: str | Path | None = None, chunk: int = 32, seed: int = 0,
             max_rows: int = MAX_ROWS, device: str = "auto", data_dir: str | Path | None = None,
             progress: bool = True) -> LocalizeResult:
    """Localize the selected examples of ``ckpt``; append one line per example to ``out``
    (default :func:`default_output`), then write the summary (JSON + PNG) beside it."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value, low in (("max-channels", max_channels, 1), ("eot", eot, 0),
                             ("ref-batch", ref_batch, 1), ("chunk", chunk, 1)):
        if value < low:
            raise ConfigError(f"--{name} must be at least {low}, got {value}")
    if candidates is not None and candidates < 1:
        raise ConfigError(f"--candidates must be at least 1, got {candidates}")
    trained = load_trained(ckpt, device=device, data_dir=data_dir)
    model, data = trained.model, trained.data
    space = channel_space(model, sites)
    targets = select_examples(data, examples, limit=limit)
    out = Path(out) if out is not None else default_output(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {row["index"] for row in recover_jsonl(out)}
    todo = torch.tensor([t for t in targets.tolist() if t not in done], dtype=torch.long)
    objective = LocalizationObjective(
        data.train_images, data.train_labels,
        reference_indices(len(data.train_labels), ref_batch, seed=seed), eot=eot, seed=seed)
    bar = tqdm(total=len(targets), initial=len(targets) - len(todo), unit="example",
               desc=f"localize ({method})", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        seen = [0]

        def on_step(finished: int) -> None:
            bar.update(finished - seen[0])
            seen[0] = finished

        if method == "greedy":
            results = greedy_localize(model, objective, part, space=space,
                                      max_channels=max_channels, max_rows=max_rows, on_step=on_step)
        else:
            results = exhaustive_localize(model, objective, part, space=space,
                                          max_channels=max_channels, candidates=candidates,
                                          max_rows=max_rows, on_step=on_step)
        accs = edited_accuracies(model, data, space, torch.stack([r.zeroed for r in results]))
        for r, acc in zip(results, accs):
            append_jsonl(out, {
                "index": r.index, "noisy": bool(data.noisy_mask[r.index]),
                "label": int(data.train_labels[r.index]), "method": method,
                "flipped": r.flipped, "channels": [[s, c] for s, c in r.channels],
                "n_channels": len(r.channels), "trace": r.trace, **acc})
    bar.close()
    summary = write_summary(read_jsonl(out), out.parent, site_order=space.names,
                            base=split_accuracies(model, data), max_channels=max_channels)
    return LocalizeResult(path=out, summary=summary)


def load_results(path: str | Path) -> list[dict]:
    """The complete lines of a localize output, or a clear error when there are none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run `memkern localize --ckpt ...` first")
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"{path} holds no complete localization lines")
    return rows
