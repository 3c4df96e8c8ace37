"""Example-tied dropout at one site: memkern's hashed mask vs no dropout vs the paper's cached masks.

The paper's reference code seeds torch with each example's index, draws that example's mask with
``torch.rand`` and keeps it, activation-shaped (``[C, H, W]``), in a per-example store; later
epochs gather from the store. :class:`PaperCachedDropout` re-implements that approach (our code,
same behaviour; bench/paper_cached_dropout.py). memkern stores nothing: the mask is a hash of (index, site seed, channel).

Groups: "tied-dropout-forward" and "tied-dropout-forward-backward"; in each, memkern, identity,
the cache's first pass (masks generated, cache emptied before every round) and its later passes
(masks gathered). Run: ``pytest bench/bench_tied_dropout_module.py --benchmark-json=out.json``.
"""
from __future__ import annotations

import pytest
import torch

from memkern.network.sites import example_indices
from memkern.network.tied_dropout import ExampleTiedDropout

from conftest import QUICK, rounds
from paper_cached_dropout import PaperCachedDropout, assert_same_kind_of_mask

P_GEN, P_MEM = 0.2, 0.1  # the reference code's defaults
SHAPE = (16, 128, 16, 16) if QUICK else (128, 128, 16, 16)
SITES = 2
DATASETS = {"cifar10_mnist_60k": 60_000, "1M": 1_000_000}


def _activation() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).relu_().requires_grad_()
    return x, torch.randn(SHAPE, generator=g), torch.randperm(50_000, generator=g)[:SHAPE[0]]


def _step(module_call, x, grad, backward):
    x.grad = None
    y = module_call(x)
    if backward:
        y.backward(grad)
    return y


@pytest.fixture(params=[False, True], ids=["forward", "forward-backward"])
def backward(request):
    return request.param


def _record(benchmark, context_info, backward, variant, **extra):
    benchmark.group = "tied-dropout-forward-backward" if backward else "tied-dropout-forward"
    benchmark.extra_info.update(context_info, shape=list(SHAPE), dtype="float32", device="cpu",
                                variant=variant, p_gen=P_GEN, p_mem=P_MEM, **extra)


def test_memkern_tied_dropout(benchmark, context_info, backward):
    x, grad, ids = _activation()
    module = ExampleTiedDropout(SHAPE[1], seed=1, p_gen=P_GEN, p_mem=P_MEM)

    def call(a):
        with example_indices(ids):
            return module(a)

    assert_same_kind_of_mask(call, SHAPE, p_gen=P_GEN, p_mem=P_MEM)
    _record(benchmark, context_info, backward, "memkern-hash", mask_bytes=0,
            **{f"mask_bytes_{k}_x{SITES}_sites": 0 for k in DATASETS})
    benchmark.pedantic(_step, args=(call, x, grad, backward), rounds=rounds(20),
                       warmup_rounds=1)


def test_no_dropout(benchmark, context_info, backward):
    x, grad, _ = _activation()
    _record(benchmark, context_info, backward, "identity")
    benchmark.pedantic(_step, args=(lambda a: a.view_as(a), x, grad, backward),
                       rounds=rounds(20), warmup_rounds=1)


@pytest.mark.parametrize("phase", ["first-pass", "cached"])
def test_paper_cached_masks(benchmark, context_info, backward, phase):
    x, grad, ids = _activation()
    module = PaperCachedDropout(SHAPE[1], P_GEN, P_MEM)
    assert_same_kind_of_mask(lambda a: module(a, ids), SHAPE, p_gen=P_GEN, p_mem=P_MEM)
    module.cache.clear()
    module(x.detach(), ids)  # fill the cache, to measure it (and for the "cached" phase)
    per_example = module.cache_bytes() // SHAPE[0]

    def setup():
        if phase == "first-pass":
            module.cache.clear()
        return (lambda a: module(a, ids), x, grad, backward), {}

    _record(benchmark, context_info, backward, f"paper-cache-{phase}",
            cache_bytes=per_example * SHAPE[0], cache_bytes_per_example=per_example,
            **{f"cache_bytes_{k}_x{SITES}_sites": per_example * n * SITES
               for k, n in DATASETS.items()})
    benchmark.pedantic(_step, setup=setup, rounds=rounds(10), warmup_rounds=1)
