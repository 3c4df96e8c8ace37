"""One SGD step of ResNet-9 with example-tied dropout: memkern vs no dropout vs the paper's cache.

A step is forward + backward + optimizer step on ``[B, 3, 32, 32]`` (B = 128; quick: 8), with
dropout at ResNet-9's two default 128x16x16 sites (``res1.body.0.post``, ``res1.body.1.post``).
Variants, all in group "tied-dropout-step": no dropout; memkern's hashed mask (no mask memory);
the paper's per-example cached masks (bench/paper_cached_dropout.py), on the first pass (masks
generated; the cache is emptied before every round) and on later passes (masks gathered).

Step times differ by less than their noise on a shared CPU, so each variant also times its site
op alone on the captured site input (``module_forward_ms``, two sites, forward only) and
records it as a fraction of the step (``module_fraction_of_step``). Ratios to the no-dropout
step (measured first, in the same run) go in ``step_ratio_vs_no_dropout``.
Run: ``pytest bench/bench_tied_dropout_step.py --benchmark-json=out.json``.
"""
from __future__ import annotations

import time

import pytest
import torch

from memkern.network.models import build_model
from memkern.network.sites import channel_sites, example_indices
from memkern.network.tied_dropout import attach_tied_dropout
from memkern.training.step import make_optimizer, sgd_step

from conftest import QUICK, rounds
from paper_cached_dropout import PaperSiteDropout, assert_same_kind_of_mask

P_GEN, P_MEM = 0.2, 0.1
BATCH = 8 if QUICK else 128
DATASETS = {"cifar10_mnist_60k": 60_000, "1M": 1_000_000}
_STEP_MEAN_S: dict[str, float] = {}  # variant -> mean step seconds, for ratios within one run


def _model(variant: str):
    torch.manual_seed(0)
    model = build_model("resnet9", num_classes=10, in_channels=3, image_size=32)
    sites = list(model.default_dropout_sites)
    if variant == "memkern-hash":
        attach_tied_dropout(model, sites=sites, p_gen=P_GEN, p_mem=P_MEM, seed=0)
    elif variant.startswith("paper-cache"):
        for name in sites:
            site = channel_sites(model)[name]
            site.attach(PaperSiteDropout(site.channels, P_GEN, P_MEM))
    return model.train(), sites


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g),
            torch.randperm(50_000, generator=g)[:BATCH])


def site_inputs(model, sites, x, ids) -> list[torch.Tensor]:
    """The activation reaching each dropout site in one forward."""
    captured = []
    hooks = [channel_sites(model)[n].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
             for n in sites]
    with torch.no_grad(), example_indices(ids):
        model(x)
    for h in hooks:
        h.remove()
    return captured


def _module_forward_ms(model, sites, inputs, ids, reset) -> float:
    """Mean time of the site ops' forwards (all sites) over a few repeats, in ms."""
    ops = [channel_sites(model)[n].ops[0] for n in sites]
    reps = 1 if QUICK else 10
    total = 0.0
    with torch.no_grad(), example_indices(ids):
        for _ in range(reps):
            reset()
            start = time.perf_counter()
            for op, a in zip(ops, inputs):
                op(a)
            total += time.perf_counter() - start
    return total / reps * 1e3


@pytest.mark.parametrize("variant", ["no-dropout", "memkern-hash", "paper-cache-first-pass",
                                     "paper-cache-cached"])
def test_resnet9_sgd_step(benchmark, context_info, variant):
    model, sites = _model(variant)
    x, y, ids = _batch()
    opt = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    caches = [channel_sites(model)[n].ops[0].cached for n in sites] if "paper" in variant else []

    def reset():
        if variant == "paper-cache-first-pass":
            for cache in caches:
                cache.cache.clear()

    def step():
        sgd_step(model, opt, x, y, ids=ids)

    inputs = site_inputs(model, sites, x, ids)  # also fills the paper caches
    info = dict(context_info, variant=variant, model="resnet9", batch=BATCH, dtype="float32",
                device="cpu", sites=sites, site_shape=list(inputs[0].shape[1:]), p_gen=P_GEN,
                p_mem=P_MEM)
    if variant == "memkern-hash":
        info.update(mask_bytes=0, **{f"mask_bytes_{k}": 0 for k in DATASETS})
    elif caches:
        per_example = sum(c.cache_bytes() for c in caches) // BATCH  # all sites
        info.update(mask_bytes_per_example=per_example,
                    **{f"mask_bytes_{k}": per_example * n for k, n in DATASETS.items()})
    if variant != "no-dropout":
        with torch.no_grad(), example_indices(ids):
            for name, a in zip(sites, inputs):
                assert_same_kind_of_mask(channel_sites(model)[name].ops[0], tuple(a.shape),
                                         p_gen=P_GEN, p_mem=P_MEM)
        info["module_forward_ms"] = _module_forward_ms(model, sites, inputs, ids, reset)
    benchmark.group = "tied-dropout-step"
    benchmark.pedantic(step, setup=lambda: reset() or ((), {}), rounds=rounds(3),
                       warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    _STEP_MEAN_S[variant] = mean
    info["step_ms"] = mean * 1e3
    if "module_forward_ms" in info:
        info["module_fraction_of_step"] = info["module_forward_ms"] / 1e3 / mean
    if "no-dropout" in _STEP_MEAN_S:
        info["step_ratio_vs_no_dropout"] = mean / _STEP_MEAN_S["no-dropout"]
    benchmark.extra_info.update(info)
