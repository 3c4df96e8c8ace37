"""Greedy's reference cache: results with and without it equal bit for bit, fewer reference rows
run, memory bounded (deepest masks evicted first), one model and objective per cache."""
import pytest
import torch

from memkern.errors import ConfigError
from memkern.experiments.localize import LocalizationObjective, channel_space, greedy_localize
from memkern.experiments.localize.reference_cache import ReferenceCache
from memkern.network.models import build_model


def _case(dtype, *, eot=0, n=80, refs=16, seed=0):
    """A random cnn on fresh random 8x8 images labelled by the model itself (every target starts
    fitted, so greedy runs several steps); the reference batch holds two of the targets."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).to(dtype).eval()
    images = torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype)
    with torch.no_grad():
        labels = model(images).argmax(1)
    ref = torch.cat([torch.tensor([1, 5]), torch.randperm(n - 20, generator=gen)[:refs - 2] + 20])
    objective = LocalizationObjective(images, labels, ref.sort().values, eot=eot, seed=seed)
    return model, objective, channel_space(model)


def _chunked(model, objective, space, targets, *, cache, chunk=4, cap=5, max_rows=None):
    """Greedy over ``targets`` in chunks, as the runner calls it."""
    out = []
    for part in torch.split(targets, chunk):
        out += greedy_localize(model, objective, part, space=space, max_channels=cap,
                               max_rows=max_rows, cache=cache)
    return out


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x.index, x.channels, x.flipped) == (y.index, y.channels, y.flipped), x.index
        assert x.trace == y.trace, x.index  # exact: the same floats
        assert torch.equal(x.zeroed, y.zeroed)


def _rows(model):
    rows = []
    return rows, model.register_forward_pre_hook(lambda mod, args: rows.append(len(args[0])))


@pytest.mark.parametrize("dtype,eot,max_rows", [(torch.float32, 0, None),
                                                (torch.float64, 2, 40)])
def test_reuse_equals_no_reuse_and_saves_reference_rows(dtype, eot, max_rows):
    model, objective, space = _case(dtype, eot=eot)
    targets = torch.randperm(16, generator=torch.Generator().manual_seed(7))
    rows, hook = _rows(model)
    try:
        plain = _chunked(model, objective, space, targets, cache=None, max_rows=max_rows)
        plain_rows = sum(rows)
        rows.clear()
        cache = ReferenceCache()
        reused = _chunked(model, objective, space, targets, cache=cache, max_rows=max_rows)
    finally:
        hook.remove()
    _same(reused, plain)
    assert sum(len(r.channels) for r in plain) > len(targets)  # several steps were compared
    # every chunk after the first starts from the all-ones mask the first one ran
    assert cache.reused >= len(targets) // 4 - 1
    # each reused mask is one reference batch not run again, and nothing else changed
    assert sum(rows) == plain_rows - cache.reused * len(objective.ref)


def test_bounded_cache_keeps_the_shallow_masks_and_the_results():
    model, objective, space = _case(torch.float64, seed=1)
    targets = torch.arange(12)
    plain = _chunked(model, objective, space, targets, cache=None)
    entry = 8 * (1 + space.total) + (space.total + 7) // 8  # sum, gradient, key: float64
    cache = ReferenceCache(max_bytes=6 * entry)
    _same(_chunked(model, objective, space, targets, cache=cache), plain)
    assert cache.nbytes <= 6 * entry and len(cache) >= 5
    # the deepest masks went first: the all-ones mask every chunk starts from is still there
    ones = cache.keys(torch.ones(1, space.total, dtype=torch.bool))[0]
    assert cache.get(ones, True) is not None
    assert cache.get(ones, False) is None  # a forward-only pass is never served a backward's


def test_eviction_order_and_kinds_of_pass():
    cache = ReferenceCache(max_bytes=3 * (1 + 8 + 8 * 4))
    masks = torch.ones(4, 4, dtype=torch.bool)
    masks[1, 0] = masks[2, :2] = masks[3, :3] = False
    keys = cache.keys(masks)
    assert len(set(keys)) == 4
    for zeros in (2, 0, 3, 1):  # the fourth entry overflows: the one with 3 zeros goes
        cache.put(keys[zeros], zeros, torch.tensor(float(zeros), dtype=torch.float64),
                  torch.full((4,), float(zeros), dtype=torch.float64))
    assert [cache.get(k, True) is not None for k in keys] == [True, True, True, False]
    assert cache.get(keys[2], False) is None and cache.reused == 3
    total, grad = cache.get(keys[1], True)
    assert float(total) == 1.0 and torch.equal(grad, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entries_come_back_as_put_while_the_gradient_block_grows(dtype):
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(150, 37, generator=gen) > 0.5
    sums = torch.randn(150, generator=gen, dtype=torch.float64).to(dtype) * 1e3
    grads = torch.randn(150, 37, generator=gen, dtype=torch.float64).to(dtype)
    cache, keys = ReferenceCache(), ReferenceCache.keys(masks)
    for i, key in enumerate(keys):  # 150 gradient rows: the block grows from 64 to 256
        cache.put(key, int((~masks[i]).sum()), sums[i], grads[i] if i % 3 else None)
    for i, key in enumerate(keys):
        total, grad = cache.get(key, bool(i % 3))
        assert torch.tensor(total, dtype=dtype) == sums[i]  # the same bits back
        assert torch.equal(grad, grads[i]) if i % 3 else grad is None
    assert len(cache) == 150 and cache.reused == 150


def test_cache_serves_one_model_and_objective():
    model, objective, space = _case(torch.float32)
    cache = ReferenceCache()
    greedy_localize(model, objective, torch.tensor([0]), space=space, max_channels=1,
                    cache=cache)
    other, _, _ = _case(torch.float32, seed=2)
    with pytest.raises(ConfigError, match="ReferenceCache"):
        greedy_localize(other, objective, torch.tensor([0]), space=space, max_channels=1,
                        cache=cache)
    with pytest.raises(ConfigError, match="max_bytes"):
        ReferenceCache(max_bytes=-1)
