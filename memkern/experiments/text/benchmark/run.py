"""``memkern benchmark-lm``: DEL and INJ for every localization method on a text run, resumably.

Each finished (method, target) is one fsync'd line of the JSON-lines output (DEL: a target's
edits at every fraction; INJ: one fresh canary planted at one fraction), so a killed run loses
at most the chunk in flight and a rerun computes only what is missing. When every line is there
the CSV, markdown table and figure are rebuilt from all lines of the output, beside it and named
after it (``X.jsonl`` -> ``X.csv``, ``X.md``, ``X.png``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from memkern.data.text import TextData
from memkern.data.text.inserts import PARAGRAPH
from memkern.errors import ConfigError, OutputNotOursError
from memkern.experiments.localize.channels import channel_space
from memkern.experiments.localize.run import recover_jsonl
from memkern.experiments.localize.settings import check_resumable
from memkern.experiments.text.benchmark.drop import EXPOSURE_CANDIDATES, baseline, drop_evaluate
from memkern.experiments.text.benchmark.figure import save_figure
from memkern.experiments.text.benchmark.inject import (LR, MAX_STEPS, fresh_canaries, inject,
                                                       recall_at_k)
from memkern.experiments.text.benchmark.neurons import mlp_sites, per_site_count
from memkern.experiments.text.benchmark.table import COLUMNS, TITLE, benchmark_table, markdown
from memkern.experiments.text.targets import SequenceTargets, sequence_targets
from memkern.network.sites import channel_sites, example_indices
from memkern.rundir.atomic import append_jsonl, atomic_write_text
from memkern.rundir.context import load_trained
from memkern.rundir.csv_tables import csv_text
from memkern.rundir.locks import for_checkpoint, hold_output, locked
from memkern.rundir.ownership import (require_figure_outputs, require_jsonl_output,
                                      require_table_output, require_writable)
from memkern.rundir.paths import RunDir
from memkern.rundir.progress import Progress
from memkern.training.config import check_seed

FRACTIONS_PCT = (0.1, 0.5, 1.0)  # DEL: % of each MLP site dropped
INJECT_FRACTIONS = (0.001, 0.01)  # INJ: MemPi's 0.1% and 1% of the MLP neurons
INJECTIONS = 8  # fresh canaries planted per INJ fraction
CLEAN_WINDOWS = 32  # ordinary training windows the methods keep right
HELDOUT_WINDOWS = 16  # held-out windows of every edit's bits per byte
CHUNK = 8  # targets ranked and saved together


def registry() -> dict[str, Callable]:
    """The ranking methods by name (memkern.experiments.text.methods)."""
    from memkern.experiments.text.methods import METHODS

    return METHODS


@dataclass
class BenchmarkResult:
    """``path``: the JSON-lines output; ``rows``: the table over all its lines; ``markdown``."""

    path: Path
    rows: list[dict]
    markdown: str


def default_output(ckpt: str | Path) -> Path:
    """``<run dir>/lm_benchmark.jsonl``."""
    return RunDir.of_checkpoint(Path(ckpt).resolve()).root / "lm_benchmark.jsonl"


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """The CSV, markdown table and figure written beside ``out``."""
    out = Path(out)
    return tuple(out.with_name(out.stem + suffix) for suffix in (".csv", ".md", ".png"))


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Percentages in (0, 100] -> fractions in (0, 1], in the order given, repeats dropped."""
    bad = [f for f in fractions if not (isinstance(f, (int, float)) and 0 < f <= 100)]
    if bad or not fractions:
        raise ConfigError(f"--fractions takes percentages of each MLP layer in (0, 100], such as "
                          f"0.1,0.5,1; got {', '.join(map(str, bad)) or 'none'}")
    return tuple(dict.fromkeys(f / 100 for f in fractions))


def _check_methods(methods: Sequence[str] | None, known: dict) -> list[str]:
    names = list(dict.fromkeys(methods)) if methods else list(known)
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(known)}")
    return names


def _require_markdown_output(path: Path) -> None:
    if not path.exists():
        return
    head = b""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(len(TITLE))
    if head != TITLE.encode():
        raise OutputNotOursError(f"{path} exists and is not a memkern benchmark table; it was "
                                 f"left untouched: move it away or pass another --out")


def _lock(args: dict):
    return for_checkpoint(args["ckpt"], lambda: hold_output(args["out"] or
                                                            default_output(args["ckpt"])))


def _evenly(count: int, total: int) -> torch.Tensor:
    return torch.from_numpy(np.linspace(0, total - 1, min(count, total)).astype(np.int64))


def _clean_windows(data: TextData, seed: int) -> torch.Tensor:
    """A seeded choice of :data:`CLEAN_WINDOWS` training windows holding no planted copy."""
    plain = torch.nonzero(data.owner < 0).flatten()
    pick = torch.randperm(len(plain), generator=torch.Generator().manual_seed(seed))
    return data.train_windows[plain[pick[:CLEAN_WINDOWS]]].long()


@torch.no_grad()
def _extracted_canaries(model, data: TextData) -> SequenceTargets:
    """The canaries the model extracts: the "other memorized sequences" each edit should keep."""
    canaries = sequence_targets(data.canaries(), data)
    dev = next(model.parameters()).device
    with example_indices(canaries.keys.to(dev)):
        hits = canaries.extracted(model(canaries.inputs().to(dev))).cpu()
    return canaries.subset(torch.nonzero(hits).flatten())


@locked(_lock)
def benchmark_lm(*, ckpt: str | Path, methods: Sequence[str] | None = None,
                 fractions: Sequence[float] = FRACTIONS_PCT, limit: int | None = None,
                 inject_canaries: bool = True, injections: int = INJECTIONS,
                 out: str | Path | None = None, seed: int = 0, device: str = "auto",
                 progress: bool = True) -> BenchmarkResult:
    """Run DEL on the memorized targets of ``ckpt`` (its extracted canaries and its duplicated
    paragraphs, at most ``limit``) and, with ``inject_canaries``, INJ on ``injections`` fresh
    canaries per fraction, for every method of ``methods`` (default: all); ``fractions``: DEL's
    percentages of each MLP site. Appends to ``out`` what is missing, then writes the table and
    figure of all its lines."""
    known = registry()
    names = _check_methods(methods, known)
    drop_fractions = check_fractions(fractions)
    for option, value in (("--limit", limit), ("--injections", injections)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    check_seed(seed, name="--seed")
    out = Path(out) if out is not None else default_output(ckpt)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out {out}: name a .jsonl file (the table, its markdown and the "
                          f"figure are written beside it, named after it)")
    csv_path, md_path, png_path = output_paths(out)
    require_jsonl_output(out, keys=("kind", "method", "target", "settings"),
                         what="a benchmark-lm output")
    require_table_output(csv_path, columns=COLUMNS, what="a benchmark-lm table")
    _require_markdown_output(md_path)
    require_figure_outputs(png_path)
    require_writable(out, csv_path, md_path, png_path)
    trained = load_trained(ckpt, device=device, text_ok=True)
    data, model = trained.data, trained.model
    if not isinstance(data, TextData):
        raise ConfigError(f"benchmark-lm needs a text run (memkern train --dataset text:...); "
                          f"{ckpt} is a run on {trained.config.dataset}")
    if not data.canaries():
        raise ConfigError(f"{ckpt} was trained without canaries: benchmark-lm measures what "
                          f"dropping neurons does to them; train with --canaries N")
    space = channel_space(model, list(channel_sites(model)))
    mlp_sites(space)  # a model without MLP neuron sites fails here, before any work
    everything = sequence_targets(data.inserts, data)
    others = _extracted_canaries(model, data)
    heldout = data.heldout_windows[_evenly(HELDOUT_WINDOWS, len(data.heldout_windows))]
    clean = _clean_windows(data, seed)
    base = baseline(model, space, everything, others=others, heldout=heldout)
    chosen = [t for t, insert in enumerate(data.inserts)
              if insert.kind == PARAGRAPH or base[t].extracted][:limit]
    if not chosen:
        raise ConfigError(f"{ckpt} extracts none of its canaries and holds no duplicated "
                          f"paragraph: nothing memorized to localize; train longer or with more "
                          f"--canary-reps")
    targets = everything.subset(torch.tensor(chosen))
    kinds = {data.inserts[t].id: data.inserts[t].kind for t in chosen}
    settings = {"ckpt": Path(ckpt).name, "fractions": list(drop_fractions),
                "clean_windows": CLEAN_WINDOWS, "heldout_windows": HELDOUT_WINDOWS, "seed": seed,
                "exposure_candidates": EXPOSURE_CANDIDATES, "inject_steps": MAX_STEPS,
                "inject_lr": LR}
    rows = recover_jsonl(out)
    check_resumable(rows, settings, out)
    done = {(r["kind"], r["method"], r["target"], r.get("fraction")) for r in rows}
    del_todo = {m: [k for k, i in enumerate(targets.ids) if ("del", m, i, None) not in done]
                for m in names}
    inj_todo = {(f, i): [m for m in names if ("inj", m, i, f) not in done]
                for f in (INJECT_FRACTIONS if inject_canaries else ()) for i in range(injections)}
    total = len(names) * len(targets) + len(names) * len(inj_todo)
    left = sum(map(len, del_todo.values())) + sum(map(len, inj_todo.values()))
    bar = Progress(total=total, initial=total - left, unit="target", bar=progress,
                   desc=f"benchmark-lm {out.parent.name}")
    for name in names:
        todo = del_todo[name]
        for start in range(0, len(todo), CHUNK):
            part = torch.tensor(todo[start:start + CHUNK])
            sub = targets.subset(part)
            began = time.perf_counter()
            scores = known[name](model, space, sub, clean, seed=seed)
            rank_s = (time.perf_counter() - began) / len(part)
            results = drop_evaluate(model, space, sub, scores.detach().cpu(),
                                    fractions=drop_fractions, others=others, heldout=heldout,
                                    before=[base[chosen[k]] for k in part.tolist()])
            per = len(drop_fractions)
            for j, target in enumerate(sub.ids):
                append_jsonl(out, {"kind": "del", "method": name, "target": target,
                                   "target_kind": kinds[target], "rank_s": rank_s,
                                   "drops": [r.row() for r in results[j * per:(j + 1) * per]],
                                   "settings": settings})
            bar.advance(len(part))
            bar.step(f"DEL {name}: {start + len(part)}/{len(todo)} targets")
    if inj_todo:
        _inject_all(model, space, data, trained.config.seed, known, inj_todo, clean, out,
                    settings, seed=seed, injections=injections, bar=bar)
    bar.close()
    lines = recover_jsonl(out)
    table = benchmark_table(lines, names + sorted(known.keys() - set(names)))
    text = markdown(table, run=RunDir.of_checkpoint(Path(ckpt).resolve()).root.name)
    atomic_write_text(csv_path, csv_text(table, COLUMNS))
    atomic_write_text(md_path, text)
    save_figure(table, png_path, title=f"DEL on {out.parent.name}: forgotten vs damage")
    return BenchmarkResult(path=out, rows=table, markdown=text)


def _inject_all(model, space, data: TextData, run_seed: int, known: dict,
                todo: dict[tuple[float, int], list[str]], clean: torch.Tensor, out: Path,
                settings: dict, *, seed: int, injections: int, bar: Progress) -> None:
    """INJ: plant fresh canary i at fraction f (one model copy each, planted once), then let
    each method in ``todo[f, i]`` rank its neurons; one line per (method, f, i)."""
    fresh = fresh_canaries(injections, seed=run_seed + seed + 1,
                           taken={c.prefix for c in data.canaries()},
                           first_key=len(data.owner) + len(data.inserts))
    sites = mlp_sites(space)
    for (fraction, i), need in todo.items():
        if not need:
            continue
        planted = inject(model, space, fresh.subset(torch.tensor([i])), fraction=fraction,
                         seed=seed * 1_000_003 + i)
        chance = float(np.mean([per_site_count(space.counts[space.names.index(s)], fraction) /
                                space.counts[space.names.index(s)] for s in sites]))
        for name in need:
            began = time.perf_counter()
            scores = known[name](planted.model, space, planted.canary, clean, seed=seed)
            rank_s = time.perf_counter() - began
            recall = float(recall_at_k(scores.detach().cpu(), planted.truth, space)[0])
            append_jsonl(out, {"kind": "inj", "method": name, "target": i, "fraction": fraction,
                               "recall": recall, "chance": chance, "planted":
                               int(planted.truth.sum()), "steps": planted.steps,
                               "extracted": planted.extracted, "rank_s": rank_s,
                               "settings": settings})
            bar.advance()
        bar.step(f"INJ {fraction:.1%} canary {i + 1}/{injections}")
