"""The ratios memkern's speed claims rest on, each measured side by side in one process.

    python bench/ratios.py --size quick|full [--runs N] [--out FILE.json]

| ratio | what | better |
|---|---|---|
| ``ghost/plain <model>`` | per-example gradient norms (ghost) over a plain forward+backward | lower |
| ``naive/scan <model>`` | naive loop of forwards over the exact ablation scan | higher |
| ``one-at-a-time/batched greedy`` | greedy localization, targets one by one over together | higher |
| ``op/step tied dropout`` | the tied-dropout op at two sites over one SGD step | lower |

Every ratio first checks that both sides compute the same thing (the scan against the naive
loop, ghost against the loop reference, greedy one by one against batched). One torch thread:
on the shared 2-core machine two threads spin against other jobs and time the contention.
``quick`` sizes take seconds and are what ``bench_ratio_guard.py`` checks against
``ratios.json``; ``full`` sizes are the benchmark's (bench/README.md) and feed the README's
Performance table (``perf_table.py``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.experiments.localize import (LocalizationObjective, ablation_scan, channel_space,
                                          greedy_localize, naive_ablation_scan)
from memkern.network.models import build_model
from memkern.network.sites import channel_sites, example_indices
from memkern.network.tied_dropout import attach_tied_dropout

from bench_tied_dropout_step import site_inputs
from fixture_models import SCAN, scan_case, with_running_statistics

RECORD = Path(__file__).parent / "ratios.json"
GHOST = {"resnet9-bn": ("resnet9", "batch"), "resnet9-gn": ("resnet9", "group"),
         "vit": ("vit", "batch")}
GHOST_SIZE = {"quick": (8, 32), "full": (128, 32)}  # batch, image side

def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each callable, rounds interleaved so load drifts hit all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def ghost_over_plain(key: str, size: str) -> float:
    name, norm = GHOST[key]
    batch, side = GHOST_SIZE[size]
    torch.manual_seed(0)
    model = with_running_statistics(build_model(name, num_classes=10, in_channels=3,
                                                image_size=side, norm=norm)).eval()
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))
    got = per_example_grad_norms(model, x[:4], y[:4], mode="ghost")
    want = per_example_grad_norms(model, x[:4], y[:4], mode="loop")
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    t = _interleaved({"plain": plain,
                      "ghost": lambda: per_example_grad_norms(model, x, y, mode="ghost")},
                     reps=5 if size == "quick" else 3)
    return t["ghost"] / t["plain"]


def naive_over_scan(name: str, size: str) -> float:
    model, space, cand, x, y = scan_case(name, size)
    with torch.no_grad():
        got = ablation_scan(model, x, y, sites=space, candidates=cand).values[cand]
        want = naive_ablation_scan(model, x, y, sites=space, candidates=cand)[cand]
        assert float((got - want).abs().max()) <= 1e-4, "scan differs from the naive loop"
        t = _interleaved({
            "naive": lambda: naive_ablation_scan(model, x, y, sites=space, candidates=cand),
            "scan": lambda: ablation_scan(model, x, y, sites=space, candidates=cand)},
            reps=3 if size == "quick" else 1)
    return t["naive"] / t["scan"]


def greedy_one_over_batched(size: str) -> float:
    """Random cnn on random 8x8 images labelled by the model itself (every target starts
    fitted), so greedy runs to a flip or to its cap."""
    torch.manual_seed(0)
    n, targets, refs, cap = (64, 4, 16, 3) if size == "quick" else (600, 32, 512, 10)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).eval()
    images = torch.randn(n, 1, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(1)
    objective = LocalizationObjective(images, labels, torch.arange(targets, targets + refs))
    space = channel_space(model)
    chosen = torch.arange(targets)

    def batched():
        return greedy_localize(model, objective, chosen, space=space, max_channels=cap)

    def one_by_one():
        return [greedy_localize(model, objective, t[None], space=space, max_channels=cap)[0]
                for t in chosen]

    assert [r.channels for r in batched()] == [r.channels for r in one_by_one()]
    t = _interleaved({"one": one_by_one, "batched": batched}, reps=3 if size == "quick" else 1)
    return t["one"] / t["batched"]


def tied_op_over_step(size: str) -> float:
    batch = 8 if size == "quick" else 128
    torch.manual_seed(0)
    model = build_model("resnet9", num_classes=10, in_channels=3, image_size=32)
    sites = list(model.default_dropout_sites)
    attach_tied_dropout(model, sites=sites, p_gen=0.2, p_mem=0.1, seed=0)
    model.train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    ids = torch.randperm(50_000)[:batch]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    captured = site_inputs(model, sites, x, ids)
    ops = [channel_sites(model)[n].ops[0] for n in sites]

    def step():
        with example_indices(ids):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def op_forwards():
        with torch.no_grad(), example_indices(ids):
            for op, a in zip(ops, captured):
                op(a)

    t = _interleaved({"step": step, "ops": op_forwards}, reps=3)
    return t["ops"] / t["step"]


RATIOS: dict[str, Callable[[str], float]] = {
    **{f"ghost/plain {k}": (lambda size, k=k: ghost_over_plain(k, size)) for k in GHOST},
    **{f"naive/scan {k}": (lambda size, k=k: naive_over_scan(k, size)) for k in SCAN},
    "one-at-a-time/batched greedy": greedy_one_over_batched,
    "op/step tied dropout": tied_op_over_step,
}


def measure_one(name: str, size: str) -> float:
    """One ratio at ``size`` ("quick" or "full"), on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return RATIOS[name](size)
    finally:
        torch.set_num_threads(threads)


def measure(size: str) -> dict[str, float]:
    return {name: measure_one(name, size) for name in RATIOS}


BETTER = {"ghost/plain": "lower", "naive/scan": "higher", "one-at-a-time/batched": "higher",
          "op/step": "lower"}


def better(name: str) -> str:
    return BETTER[name.split(" ")[0]]


MIN_MARGIN = 0.15


def margin(name: str, runs: list[float]) -> float:
    """1.5 x the runs' spread (largest over smallest, minus 1), at least 15%: two-sided, as a
    loaded machine moves a ratio either way (one-sided, the ViT scan's 5 runs gave 15% and a CI
    run under load fell 20% below the median)."""
    return max(MIN_MARGIN, round(1.5 * (max(runs) / min(runs) - 1), 2))


def record(size: str, runs: list[dict[str, float]], path: Path = RECORD) -> None:
    """Write the runs into ``ratios.json``: quick ratios with their medians and margins (what
    CI checks), full ratios as measured (what the README shows)."""
    recorded = json.loads(path.read_text()) if path.exists() else {"quick": {}, "full": {}}
    for name in runs[0]:
        values = [r[name] for r in runs]
        if size == "quick":
            recorded["quick"][name] = {"value": statistics.median(values), "better": better(name),
                                       "margin": margin(name, values), "runs": values}
        else:
            recorded["full"][name] = statistics.median(values)
    path.write_text(json.dumps(recorded, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("quick", "full"), default="quick")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", help="JSON file: every run's ratios")
    parser.add_argument("--record", action="store_true", help="write them into ratios.json")
    parser.add_argument("--from-file", help="record the runs of an earlier --out file instead")
    args = parser.parse_args()
    if args.from_file:
        saved = json.loads(Path(args.from_file).read_text())
        record(saved["size"], saved["runs"])
        return
    runs = []
    for i in range(args.runs):
        runs.append(measure(args.size))
        print(json.dumps({"run": i, **runs[-1]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"size": args.size, "threads": 1,
                                              "torch": torch.__version__, "runs": runs}, indent=1))
    if args.record:
        record(args.size, runs)


if __name__ == "__main__":
    main()
