"""``memkern localize``: localize many training examples of a checkpoint, resumably, in one
process or sharded over the processes torchrun starts.

Targets are processed in chunks; after each chunk its lines are appended (fsync'd) to the
JSON-lines output, so a killed run loses at most one chunk and a rerun skips done indices.
Under torchrun, rank r of w localizes every w-th target still to do and appends to its own part
file ``<out>.rank<r>-of-<w>``; rank 0 merges the parts into the output when all are done, and
at the start of any run (of any world size) merges parts a killed run left behind.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from memkern.rundir.atomic import append_jsonl, read_jsonl, rewrite_jsonl
from memkern.training.config import check_seed
from memkern.training.distributed import World, joined
from memkern.errors import ConfigError
from memkern.training.evaluate import split_accuracies
from memkern.rundir.context import load_trained, require_noisy_split, resolve_device
from memkern.experiments.localize.channels import channel_space
from memkern.experiments.localize.edited import edited_accuracies
from memkern.experiments.localize.examples import (CHOICES, INSERT_CHOICES, select_examples,
                                                   select_inserts)
from memkern.experiments.localize.exhaustive import exhaustive_localize
from memkern.experiments.localize.greedy import greedy_localize
from memkern.experiments.localize.objective import LocalizationObjective, reference_indices
from memkern.experiments.localize.reference_cache import ReferenceCache
from memkern.experiments.localize.rows import check_rows
from memkern.experiments.localize.save_edited import require_edited_output
from memkern.experiments.localize.save_edited import save_edited as save_edited_models
from memkern.experiments.localize.settings import check_resumable, localize_settings
from memkern.experiments.localize.summary import (fitted, require_summary_outputs, summarize,
                                                  summary_paths, write_summary)
from memkern.experiments.localize.weight_edit import check_editable
from memkern.experiments.text.edits import edit_measures
from memkern.experiments.text.localize_summary import summarize_text, write_text_summary
from memkern.experiments.text.objective import TextObjective, clean_reference, rows_per_pass
from memkern.experiments.text.targets import sequence_targets
from memkern.rundir.locks import for_checkpoint, hold_output, locked
from memkern.rundir.ownership import require_jsonl_output, require_writable
from memkern.rundir.progress import Progress
from memkern.rundir.paths import RunDir
from memkern.network.tied_dropout import tied_sites

METHODS = ("greedy", "exhaustive")
REF_BATCH = {"image": 512, "text": 64}  # reference examples / windows kept right by default



@dataclass
class LocalizeResult:
    """``summary`` is None on ranks other than 0 of a torchrun launch (rank 0 writes it);
    ``edited``: the edited models' run folders of the targets asked for (``save_edited``)."""

    path: Path
    summary: dict | None
    edited: list[Path] | None = None


def default_output(ckpt: str | Path) -> Path:
    """``<run dir>/localize.jsonl`` where the run dir holds ``checkpoints/<ckpt>``; beside the
    checkpoint when it is kept anywhere else."""
    return RunDir.of_checkpoint(Path(ckpt).resolve()).root / "localize.jsonl"


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


def part_path(out: Path, rank: int, size: int) -> Path:
    """Where rank ``rank`` of ``size`` appends its lines: ``<out>.rank<rank>-of-<size>``."""
    return out.with_name(f"{out.name}.rank{rank}-of-{size}")


def part_files(out: Path) -> list[Path]:
    """Part files of ``out`` left by any world size, in name order."""
    pattern = re.compile(re.escape(out.name) + r"\.rank\d+-of-\d+")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def merge_parts(out: Path, targets: Sequence[int]) -> list[dict]:
    """Fold the part files of ``out`` into it and remove them; return the output's lines.

    Each index appears once: a line already in ``out`` wins, then the first part holding the
    index. New lines follow the order of ``targets`` (indices not in it last, ascending). The
    output is replaced atomically before any part is removed, so a kill in between only leaves
    parts whose lines the next merge skips as duplicates."""
    rows = check_rows(recover_jsonl(out), out, fields=("index",))
    parts = part_files(out)
    if not parts:
        return rows
    seen = {r["index"] for r in rows}
    new: dict[int, dict] = {}
    for p in parts:
        # a torn last line (killed mid-write) is skipped
        for r in check_rows(read_jsonl(p), p, fields=("index",)):
            if r["index"] not in seen:
                new.setdefault(r["index"], r)
    position = {t: i for i, t in enumerate(targets)}
    rows += sorted(new.values(), key=lambda r: (position.get(r["index"], len(position)),
                                                r["index"]))
    rewrite_jsonl(out, rows)
    for p in parts:
        p.unlink()
    return rows


def _lock(args: dict):
    """The lock of this rank on the output (memkern.rundir.locks.hold_output)."""
    world = World.from_env()
    return for_checkpoint(args["ckpt"], lambda: hold_output(
        args["out"] or default_output(args["ckpt"]), rank=world.rank, size=world.size))


@locked(_lock)
def localize(*, ckpt: str | Path, examples: str | None = None, limit: int | None = None,
             method: str = "greedy", max_channels: int = 50, eot: int = 0,
             ref_batch: int | None = None,
             candidates: int | None = None, sites: Sequence[str] | None = None,
             out: str | Path | None = None, chunk: int = 32, seed: int = 0,
             max_rows: int | None = None, device: str = "auto", data_dir: str | Path | None = None,
             progress: bool = True, save_edited: bool = False) -> LocalizeResult:
    """Localize the selected examples of ``ckpt``; append one line per example to ``out``
    (default :func:`default_output`), then write the summary of every line of the output (JSON
    + PNG, what the report shows) beside it, named after it
    (:func:`memkern.experiments.localize.summary.summary_paths`); the result's summary covers the
    selected examples alone.

    Under torchrun (``WORLD_SIZE`` > 1) every rank must call this with the same arguments; each
    localizes a disjoint shard, and rank 0 merges, summarizes and returns the summary. Inputs
    are checked and the checkpoint loaded before the process group is joined, so bad input
    fails alike on every rank without a collective.

    On a text run the targets are planted inserts (``examples``: ``canaries``, ``paragraphs``,
    ``all`` or a file of insert ids; default ``canaries``), the objective is
    :class:`memkern.experiments.text.objective.TextObjective`, the default sites are the MLP
    neurons and each line adds the edit's cost (:mod:`memkern.experiments.text.edits`). Defaults
    that differ by kind of run (None here): ``examples`` (``noisy`` / ``canaries``),
    ``ref_batch`` (512 images / 64 windows).

    ``save_edited``: also keep the edited model of every target asked for, a run directory
    with the target's channels removed from the weights
    (:mod:`memkern.experiments.localize.save_edited`); sites no weight edit removes exactly
    are refused before any work."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value, low in (("max-channels", max_channels, 1), ("eot", eot, 0),
                             ("ref-batch", ref_batch, 1), ("chunk", chunk, 1)):
        if value is not None and value < low:
            raise ConfigError(f"--{name} must be at least {low}, got {value}")
    if candidates is not None and candidates < 1:
        raise ConfigError(f"--candidates must be at least 1, got {candidates}")
    check_seed(seed, name="--seed")
    require_jsonl_output(out or default_output(ckpt), keys=("index", "settings"),
                         what="a localize output")
    require_summary_outputs(out or default_output(ckpt))
    require_writable(out or default_output(ckpt), *summary_paths(out or default_output(ckpt)))
    if save_edited:
        require_edited_output(out or default_output(ckpt))
    world = World.from_env()
    place = world.place(resolve_device(device))
    trained = load_trained(ckpt, device=place, data_dir=data_dir, text_ok=True)
    text = trained.config.text
    if text and eot:
        raise ConfigError("--eot averages noisy copies of an image; a text run's targets are "
                          "byte sequences: leave --eot at 0")
    if examples is None:
        examples = "canaries" if text else "noisy"
    ref_batch = ref_batch or REF_BATCH["text" if text else "image"]
    if examples in ("noisy", "clean") and not text:
        require_noisy_split(trained.config, f"--examples {examples}")
    model, data = trained.model, trained.data
    tied = tied_sites(model)
    # On a tied-dropout run the default sites are its tied sites: where memorization channels
    # are defined (docs/method.md, Experiment 5); a text model's default is its MLP neurons.
    space = channel_space(model, sites or list(tied) or
                          (list(model.default_dropout_sites) if text else None))
    if save_edited:
        check_editable(model, space.names)
    out = Path(out) if out is not None else default_output(ckpt)
    settings = localize_settings(ckpt=ckpt, method=method, max_channels=max_channels, eot=eot,
                                 ref_batch=ref_batch, candidates=candidates, sites=space.names,
                                 seed=seed)
    if text:
        targets = select_inserts(data, examples, limit=limit)
        objective = TextObjective(sequence_targets(data.inserts, data), data.train_windows,
                                  clean_reference(data, ref_batch, seed=seed))
        num_targets = len(data.inserts)
        max_rows = max_rows or rows_per_pass(data.seq_len)
    else:
        targets = select_examples(data, examples, limit=limit).tolist()
        objective = LocalizationObjective(
            data.train_images, data.train_labels,
            reference_indices(len(data.train_labels), ref_batch, seed=seed), eot=eot, seed=seed)
        num_targets = len(data.train_labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    with joined(world, place) as world:
        if world.main:
            merge_parts(out, targets)  # lines a killed run left in part files count as done
        world.barrier()
        rows = check_rows(read_jsonl(out), out, num_train=num_targets,
                          widths=dict(zip(space.names, space.counts)))
        check_resumable(rows, settings, out)
        done = {row["index"] for row in rows}
        todo = [t for t in targets if t not in done]
        mine = torch.tensor(todo[world.rank::world.size], dtype=torch.long)
        sink = out if world.size == 1 else part_path(out, world.rank, world.size)
        bar = Progress(total=len(targets), initial=len(targets) - len(todo), unit="example",
                       desc=f"localize {default_output(ckpt).parent.name} "
                            f"{_selection(examples, limit)} ({method})",
                       bar=progress, silent=not world.main)
        finished = len(targets) - len(todo)
        # Every rank runs the same number of rounds (rank 0's shard is the longest) and sums
        # progress after each, so waits stay within one chunk and rank 0's bar counts all.
        longest = math.ceil(len(todo) / world.size)
        cache = ReferenceCache()  # chunks share reference passes (exact; reference_cache.py)
        for start in range(0, longest, chunk):
            part = mine[start:start + chunk]
            shown = [0]

            def on_step(finished: int) -> None:
                bar.advance(finished - shown[0])
                shown[0] = finished

            if len(part):
                _localize_chunk(model, data, objective, part, sink, method=method, space=space,
                                max_channels=max_channels, candidates=candidates,
                                max_rows=max_rows, settings=settings, on_step=on_step,
                                cache=cache, text=text)
            done_now = world.sum(len(part))
            bar.advance(done_now - shown[0])
            finished += done_now
            bar.step(f"{finished}/{len(targets)} examples localized")
        bar.close()
        world.barrier()  # every part file is complete (each line was fsync'd)
        if not world.main:
            return LocalizeResult(path=out, summary=None)
        rows = merge_parts(out, targets)
    check_rows(rows, out, num_train=num_targets)
    asked = set(targets)
    edited = save_edited_models([r for r in rows if r["index"] in asked], out, model=model,
                                ckpt=trained.checkpoint, space=space) if save_edited else None
    if text:
        common = dict(site_order=space.names, site_widths=dict(zip(space.names, space.counts)),
                      settings=settings)
        write_text_summary(rows, out, selection=f"every result in {out.name} ({len(rows)})",
                           **common)
        return LocalizeResult(path=out, summary=summarize_text(
            [r for r in rows if r["index"] in asked], selection=_selection(examples, limit),
            **common), edited=edited)
    common = dict(site_order=space.names, base=split_accuracies(model, data),
                  site_widths=dict(zip(space.names, space.counts)),
                  tied={s: dict(channels=op.channels, seed=op.seed, p_gen=op.p_gen, p_mem=op.p_mem)
                        for s, op in tied.items() if s in space.names} or None,
                  settings=settings)
    # The files (what the report shows) cover every line of the output; what the command
    # returns and prints covers the targets asked for.
    write_summary(rows, out, max_channels=max_channels,
                  selection=f"every result in {out.name} ({len(rows)})", **common)
    summary = summarize([r for r in rows if r["index"] in asked],
                        selection=_selection(examples, limit), **common)
    return LocalizeResult(path=out, summary=summary, edited=edited)


def _selection(examples: str, limit: int | None) -> str:
    """The targets asked for, in words: ``noisy``, ``all, at most 288``, ``from idx.txt``."""
    what = examples if examples in (*CHOICES, *INSERT_CHOICES) \
        else f"from {Path(examples).name}"
    return what + (f", at most {limit}" if limit is not None else "")


def _localize_chunk(model, data, objective, part: torch.Tensor, sink: Path, *, method: str,
                    space, max_channels: int, candidates: int | None, max_rows: int | None,
                    settings: dict, on_step, cache: ReferenceCache, text: bool) -> None:
    """Localize ``part`` (int64 target ids) and append one line per target to ``sink``."""
    if method == "greedy":
        results = greedy_localize(model, objective, part, space=space,
                                  max_channels=max_channels, max_rows=max_rows, on_step=on_step,
                                  cache=cache)
    else:
        results = exhaustive_localize(model, objective, part, space=space,
                                      max_channels=max_channels, candidates=candidates,
                                      max_rows=max_rows, on_step=on_step)
    zeroed = torch.stack([r.zeroed for r in results])
    if text:
        inserts = [data.inserts[r.index] for r in results]
        costs = edit_measures(model, data, space, inserts, zeroed)
        rows = [{"index": r.index, "noisy": True, "kind": i.kind, "reps": i.reps, **cost}
                for r, i, cost in zip(results, inserts, costs)]
    else:
        rows = [{"index": r.index, "noisy": bool(data.noisy_mask[r.index]),
                 "label": int(data.train_labels[r.index]), **acc}
                for r, acc in zip(results, edited_accuracies(model, data, space, zeroed))]
    for r, row in zip(results, rows):
        row.update({"method": method, "flipped": r.flipped,
                    "channels": [[s, c] for s, c in r.channels], "n_channels": len(r.channels),
                    "trace": r.trace, "settings": settings})
        append_jsonl(sink, {**row, "fitted": fitted(row)})


def load_results(path: str | Path) -> list[dict]:
    """The complete lines of a localize output, or a clear error when there are none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run `memkern localize --ckpt ...` first")
    rows = check_rows(read_jsonl(path), path)
    if not rows:
        raise ConfigError(f"{path} holds no complete localization lines")
    return rows
