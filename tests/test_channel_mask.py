"""The per-example channel mask: Triton kernels (under the interpreter on CPU) against the torch
reference, the tied hash, the mode constants of docs/method.md, Experiment 5, and argument errors.

Tolerances: masks, forward values and grad_x are compared exactly (atol = rtol = 0): both paths
do one multiply of identical operands. grad_mask is a sum over the channel's elements; in
float32 it must be within 1e-6 * sum|grad_y * x| of the float64 reference.
"""
import math

import pytest
import torch

from memkern.kernels.errors import ChannelMaskError
from memkern.kernels.channel_mask import gathered_channel_mask, tied_channel_mask
from memkern.kernels.channel_mask_reference import (
    HASH_M1, HASH_M2, lowbias32, tied_hash, tied_mask_values,
)

EXACT = dict(rtol=0.0, atol=0.0)
TIED = dict(seed=12345, p_gen=0.4, p_mem=0.3)
SPATIALS = [(), (3,), (5, 7)]
SHAPES = [(n, c, sp) for n in (1, 7, 33) for c in (1, 5, 64) for sp in SPATIALS]
MODES = ["train", "own", "keep", "drop"]
# backend="triton" on CPU tensors: the interpreter, or on a CUDA machine the real kernels on the
# GPU (conftest); test_cuda_* also runs the kernels on CUDA tensors.
BACKENDS = [pytest.param("triton", marks=pytest.mark.kernels), "torch"]


def make_x(n, c, spatial, channel_dim, dtype=torch.float32, seed=0):
    """Fresh random activation of ``[n, c, *spatial]`` or ``[n, *spatial, c]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial) if channel_dim == 1 else (n, *spatial, c)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def row_ids(n, seed=1):
    return torch.randint(0, 2**31, (n,), generator=torch.Generator().manual_seed(seed))


def shape_id(s):
    return f"N{s[0]}-C{s[1]}-S{'x'.join(map(str, s[2])) or '0'}"


# ---------------------------------------------------------------- the hash

def test_lowbias32_equals_uint32_arithmetic():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + list(range(12345, 2**32, 99991731))

    def python_lowbias32(h):
        h ^= h >> 16
        h = (h * HASH_M1) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * HASH_M2) & 0xFFFFFFFF
        return h ^ (h >> 16)

    got = lowbias32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [python_lowbias32(v) for v in values]


@pytest.mark.kernels
@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, -3])
def test_triton_mask_bit_identical(seed):
    # x = 1 turns the op into its mask; 9 rows x 1024 channels = 9 programs, 9216 hashes.
    ids = torch.cat([row_ids(7), torch.tensor([0, 2**32 + 5])])
    ones = torch.ones(9, 1024)
    got = tied_channel_mask(ones, ids, seed=seed, p_gen=0.25, p_mem=0.5, mode="train",
                            backend="triton")
    want = tied_mask_values(ids, channels=1024, seed=seed, p_gen=0.25, p_mem=0.5, mode="train")
    torch.testing.assert_close(got, want, **EXACT)


# ---------------------------------------------------------------- kernels vs reference

@pytest.mark.kernels
@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_tied_triton_equals_reference(shape, channel_dim):
    n, c, spatial = shape
    x = make_x(n, c, spatial, channel_dim).requires_grad_()
    ids = row_ids(n)
    g = make_x(n, c, spatial, channel_dim, seed=2)
    outs = []
    for backend in ("triton", "torch"):
        x.grad = None
        y = tied_channel_mask(x, ids, mode="train", channel_dim=channel_dim, backend=backend,
                              **TIED)
        y.backward(g)
        outs.append((y.detach(), x.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], **EXACT)
    torch.testing.assert_close(outs[0][1], outs[1][1], **EXACT)


@pytest.mark.kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_tied_modes_and_dtypes(mode, dtype, channel_dim):
    x = make_x(7, 5, (3,), channel_dim, dtype)
    ids = row_ids(7)
    got = tied_channel_mask(x, ids, mode=mode, channel_dim=channel_dim, backend="triton", **TIED)
    want = tied_channel_mask(x, ids, mode=mode, channel_dim=channel_dim, backend="torch", **TIED)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **EXACT)


def assert_grad_mask_close(gm, x, g, channel_dim):
    """|gm - float64 sum_s g * x| <= 1e-6 * sum_s |g * x| per (n, c); prints the worst pair."""
    terms = g.double() * x.double()
    cd = channel_dim % x.ndim
    other = tuple(d for d in range(1, x.ndim) if d != cd)
    want = terms.sum(other) if other else terms
    scale = terms.abs().sum(other) if other else terms.abs()
    err = (gm.double() - want).abs()
    ok = err <= 1e-6 * scale + 1e-12
    if not bool(ok.all()):
        worst = divmod(int((err - 1e-6 * scale).argmax()), err.shape[1])
        pytest.fail(f"grad_mask off at (n, c) = {worst}: {gm[worst]} vs {want[worst]}")


def _gathered_grads(x, mask, g, channel_dim, backend):
    x = x.detach().clone().requires_grad_()
    mask = mask.detach().clone().requires_grad_()
    y = gathered_channel_mask(x, mask, channel_dim=channel_dim, backend=backend)
    y.backward(g)
    return y.detach(), x.grad, mask.grad


@pytest.mark.kernels
@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gathered_triton_equals_reference(shape, channel_dim):
    n, c, spatial = shape
    x = make_x(n, c, spatial, channel_dim)
    g = make_x(n, c, spatial, channel_dim, seed=2)
    mask = torch.rand(n, c, generator=torch.Generator().manual_seed(3))
    y, gx, gm = _gathered_grads(x, mask, g, channel_dim, "triton")
    y_ref, gx_ref, _ = _gathered_grads(x, mask, g, channel_dim, "torch")
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(gx, gx_ref, **EXACT)
    assert_grad_mask_close(gm, x, g, channel_dim)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_gathered_other_dtypes(dtype):
    x = make_x(7, 5, (5, 7), 1, dtype)
    g = make_x(7, 5, (5, 7), 1, dtype, seed=2)
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, gx, gm = _gathered_grads(x, mask.to(torch.float32), g, 1, "triton")
    y_ref, gx_ref, _ = _gathered_grads(x, mask.to(torch.float32), g, 1, "torch")
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(gx, gx_ref, **EXACT)
    assert gm.dtype == torch.float32
    # fp16 products are exact in the kernel's fp32 accumulator (the torch reference rounds each
    # product to fp16 first, so it is the less accurate of the two): same bound as float32.
    assert_grad_mask_close(gm, x, g, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_bool_mask(backend):
    x = make_x(7, 5, (3,), 1)
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    y = gathered_channel_mask(x, mask, backend=backend)
    torch.testing.assert_close(y, x * mask[:, :, None].float(), **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_memory_format(backend):
    x = make_x(7, 5, (5, 7), 1).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3))
    y = gathered_channel_mask(x, mask, backend=backend)
    torch.testing.assert_close(y, x * mask[:, :, None, None], **EXACT)
    t = tied_channel_mask(x, row_ids(7), mode="train", backend=backend, **TIED)
    torch.testing.assert_close(t, tied_channel_mask(x.contiguous(), row_ids(7), mode="train",
                                                    backend="torch", **TIED), **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grad(backend):
    # y.sum() hands backward an expanded (stride 0) gradient.
    x = make_x(7, 5, (3,), -1).requires_grad_()
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3)).requires_grad_()
    gathered_channel_mask(x, mask, channel_dim=-1, backend=backend).sum().backward()
    torch.testing.assert_close(x.grad, mask.detach()[:, None, :].expand(7, 3, 5), **EXACT)
    torch.testing.assert_close(mask.grad, x.detach().sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 5, 3, requires_grad=True)
    mask = torch.rand(0, 5, requires_grad=True)
    y = gathered_channel_mask(x, mask, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 5, 3) and mask.grad.shape == (0, 5)
    t = tied_channel_mask(x, torch.zeros(0, dtype=torch.int64), mode="train", backend=backend,
                          **TIED)
    assert t.shape == (0, 5, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x = make_x(3, 4, (2,), 1, torch.float64).requires_grad_()
    mask = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(
        lambda a, m: gathered_channel_mask(a, m, backend=backend),
        (x, mask.requires_grad_()))
    for mode in ("train", "drop"):
        assert torch.autograd.gradcheck(
            lambda a: tied_channel_mask(a, row_ids(3), mode=mode, backend=backend, **TIED), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_cuda_kernels_equal_cpu_reference(dtype, channel_dim):
    x = make_x(33, 64, (5, 7), channel_dim, dtype)
    g = make_x(33, 64, (5, 7), channel_dim, dtype, seed=2)
    ids = row_ids(33)
    for mode in MODES:
        got = tied_channel_mask(x.cuda(), ids.cuda(), mode=mode, channel_dim=channel_dim, **TIED)
        want = tied_channel_mask(x, ids, mode=mode, channel_dim=channel_dim, **TIED)
        torch.testing.assert_close(got.cpu(), want, **EXACT)
    mask = torch.rand(33, 64, generator=torch.Generator().manual_seed(3))
    y, gx, gm = (t.cpu() for t in _gathered_grads(x.cuda(), mask.cuda(), g.cuda(), channel_dim,
                                                  "auto"))
    y_ref, gx_ref, _ = _gathered_grads(x, mask, g, channel_dim, "torch")
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(gx, gx_ref, **EXACT)
    if dtype == torch.float32:
        assert_grad_mask_close(gm, x, g, channel_dim)


# ---------------------------------------------------------------- the tied mask's semantics

@pytest.mark.kernels
def test_same_index_same_channels_whatever_batch_position_dtype_device_path():
    ids = row_ids(33)
    full = tied_mask_values(ids, channels=64, mode="train", **TIED)
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(4))[:7]
    for dtype in (torch.float16, torch.float64, torch.bfloat16):
        sub = tied_mask_values(ids[perm], channels=64, mode="train", dtype=dtype, **TIED)
        torch.testing.assert_close(sub.float(), full[perm], **EXACT)
    ones = torch.ones(7, 64, 1)
    via_kernel = tied_channel_mask(ones, ids[perm], mode="train", backend="triton", **TIED)
    torch.testing.assert_close(via_kernel[:, :, 0], full[perm], **EXACT)


def test_kept_fraction_is_p_mem_within_5_sigma():
    p_gen, p_mem, channels = 0.25, 0.3, 512
    mask = tied_mask_values(torch.arange(20_000), channels=channels, seed=9, p_gen=p_gen,
                            p_mem=p_mem, mode="train")
    n_gen = math.floor(p_gen * channels)
    assert bool((mask[:, :n_gen] == 1).all())
    memorization = mask[:, n_gen:]
    assert set(memorization.unique().tolist()) <= {0.0, 1.0}
    trials = memorization.numel()
    sigma = math.sqrt(p_mem * (1 - p_mem) / trials)
    assert abs(memorization.mean().item() - p_mem) < 5 * sigma
    # per channel too (20,000 trials each): no channel is biased beyond 5 sigma
    sigma_c = math.sqrt(p_mem * (1 - p_mem) / mask.shape[0])
    assert float((memorization.mean(0) - p_mem).abs().max()) < 5 * sigma_c


def test_mode_constants_as_in_paper():
    ids = row_ids(50)
    p_gen, p_mem, channels = 0.4, 0.3, 10  # 4 generalization channels
    kw = dict(channels=channels, seed=1, p_gen=p_gen, p_mem=p_mem, dtype=torch.float64)
    train = tied_mask_values(ids, mode="train", **kw)
    torch.testing.assert_close(tied_mask_values(ids, mode="own", **kw), train, **EXACT)
    assert bool((train[:, :4] == 1).all()) and set(train[:, 4:].unique().tolist()) == {0.0, 1.0}
    keep = tied_mask_values(ids, mode="keep", **kw)
    assert bool((keep[:, :4] == 1).all()) and bool((keep[:, 4:] == p_mem).all())
    drop = tied_mask_values(ids, mode="drop", **kw)
    assert bool((drop[:, :4] == (p_gen + p_mem) / p_gen).all()) and bool((drop[:, 4:] == 0).all())
    assert tied_mask_values(None, mode="keep", **kw).shape == (1, channels)


def test_hash_differs_between_seeds():
    a = tied_hash(torch.arange(1000), channels=64, seed=0)
    b = tied_hash(torch.arange(1000), channels=64, seed=1)
    assert (a == b).float().mean().item() < 1e-3


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(p_gen=1.5), "p_gen=1.5"),
    (dict(p_mem=-0.1), "p_mem=-0.1"),
    (dict(mode="dropout"), "mode 'dropout'"),
    (dict(mode="drop", p_gen=0.0), "0 < p_gen < 1"),
    (dict(mode="drop", p_gen=1.0), "0 < p_gen < 1"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(channel_dim=2), "channel_dim=2"),
    (dict(backend="cuda"), "backend 'cuda'"),
])
def test_tied_bad_arguments(kwargs, match):
    args = dict(seed=1, p_gen=0.4, p_mem=0.3, mode="train") | kwargs
    with pytest.raises(ChannelMaskError, match=match):
        tied_channel_mask(torch.randn(2, 5), row_ids(2), **args)


def test_tied_bad_row_ids():
    with pytest.raises(ChannelMaskError, match="needs the dataset index"):
        tied_channel_mask(torch.randn(2, 5), None, mode="train", **TIED)
    with pytest.raises(ChannelMaskError, match="row_ids must be"):
        tied_channel_mask(torch.randn(2, 5), row_ids(3), mode="train", **TIED)


def test_gathered_bad_arguments():
    with pytest.raises(ChannelMaskError, match="mask has shape"):
        gathered_channel_mask(torch.randn(2, 5, 3), torch.rand(2, 3))
    with pytest.raises(ChannelMaskError, match="mask has dtype"):
        gathered_channel_mask(torch.randn(2, 5), torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ChannelMaskError, match="x has shape"):
        gathered_channel_mask(torch.randn(5), torch.rand(5, 1))
