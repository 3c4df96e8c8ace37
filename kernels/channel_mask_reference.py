"""Plain-torch reference of the per-example channel mask ``y[n, c, ...] = x[n, c, ...] * m(n, c)``.

This file is also the *definition* of the example-tied mask: the hash, the threshold, the mode
values and the argument checks live here once, and the Triton kernels follow it bit for bit.
It is vectorized (no loop over rows or channels): it is the CPU fast path, not a slow oracle.

The tied hash (all arithmetic mod 2**32)::

    lowbias32(h): h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15; h *= 0x846CA68B; h ^= h >> 16
    key  = lowbias32(seed mod 2**32)                    once per site
    row  = lowbias32(key ^ (index mod 2**32))           once per row (index = dataset index)
    h    = lowbias32(row ^ (c * 0x9E3779B9 mod 2**32))  per channel c
    kept = (h >> 8) < round(p_mem * 2**24)

``lowbias32`` is Chris Wellons' 32-bit integer finalizer (a bijection with low avalanche bias).
Channels ``c < floor(p_gen * C)`` are generalization channels; the rest are memorization
channels, kept by the hash in modes "train"/"own".
"""
from __future__ import annotations

import math

import torch

from .errors import ChannelMaskError, ChannelMaskTypeError

MODES = ("train", "own", "keep", "drop")
HASHED_MODES = ("train", "own")  # the modes whose mask depends on the example index

HASH_M1, HASH_M2, HASH_GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9
_U32 = 0xFFFFFFFF
THRESHOLD_BITS = 24  # (h >> 8) has 24 bits: p_mem is resolved to 2**-24


def _mul32(a, k: int):
    """``a * k mod 2**32`` for int64 tensors (or Python ints) ``a`` in [0, 2**32), split in
    16-bit halves of ``k`` so no int64 product overflows (a full 32x32-bit product would need
    64 unsigned bits). In place on tensors after the first product."""
    lo = a * (k & 0xFFFF)
    hi = a * (k >> 16)
    hi &= 0xFFFF
    hi <<= 16
    lo += hi
    lo &= _U32
    return lo


def lowbias32(h):
    """The 32-bit finalizer on int64 tensors (or Python ints) holding values in [0, 2**32); same
    values as uint32. In place after the first op: fewer temporaries than the out-of-place
    chain (bench/README.md, "Measured choices in the code")."""
    h = h ^ (h >> 16)
    h = _mul32(h, HASH_M1)
    h ^= h >> 15
    h = _mul32(h, HASH_M2)
    h ^= h >> 16
    return h


def site_key(seed: int) -> int:
    """``lowbias32(seed mod 2**32)``: the per-site constant the kernels receive, in Python ints
    (about a microsecond; no tensor, so it also runs while torch.compile traces the op, where
    the seed may be a symbolic int)."""
    return lowbias32(seed & _U32)


def _channel_keys(channels: int, device: torch.device) -> torch.Tensor:
    """int64 ``[channels]``: ``c * 0x9E3779B9 mod 2**32``, the per-channel half of the hash.
    Not cached: a tensor cached while torch.compile traces the op would be a fake tensor."""
    return _mul32(torch.arange(channels, dtype=torch.int64, device=device), HASH_GOLDEN)


def tied_hash(row_ids: torch.Tensor, *, channels: int, seed: int) -> torch.Tensor:
    """int64 ``[N, channels]`` of uint32 hash values for dataset indices ``row_ids`` (int ``[N]``)."""
    row = lowbias32((row_ids.to(torch.int64) & _U32) ^ site_key(seed))
    return lowbias32(row[:, None] ^ _channel_keys(channels, row_ids.device)[None, :])


def keep_threshold(p_mem: float) -> int:
    return round(p_mem * 2**THRESHOLD_BITS)


def generalization_channels(p_gen: float, channels: int) -> int:
    """``floor(p_gen * C)``, as the paper (and its reference code) counts them."""
    return math.floor(p_gen * channels)


def check_tied_args(*, p_gen: float, p_mem: float, mode: str, seed: int) -> None:
    """Raise ChannelMaskError for probabilities out of range, an unknown mode or a non-integer seed.

    The one check of tied-dropout settings (memkern's training config calls it too). ``p_gen``
    is the share of generalization channels and ``p_mem`` the keep probability of each other
    channel, so any pair in [0, 1] defines a mask; only mode "drop" asks more (its scale).
    """
    if mode not in MODES:
        raise ChannelMaskError(f"tied dropout mode {mode!r} is unknown: use one of {MODES}")
    for name, p in (("p_gen", p_gen), ("p_mem", p_mem)):
        if not 0.0 <= p <= 1.0:
            raise ChannelMaskError(f"{name}={p} is not a probability: pick a value in [0, 1]")
    if mode == "drop" and not 0.0 < p_gen < 1.0:
        raise ChannelMaskError(
            f"mode 'drop' zeroes the memorization channels and rescales the generalization "
            f"ones by (p_gen + p_mem) / p_gen, which needs 0 < p_gen < 1 (got p_gen={p_gen}): "
            f"use such a p_gen or evaluate with mode 'keep'"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)):  # symbolic: compiling
        raise ChannelMaskTypeError(f"seed={seed!r} must be a Python int")


def mode_values(mode: str, *, p_gen: float, p_mem: float, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``[3]`` tensor of ``dtype``: (generalization value, memorization kept, memorization dropped).

    Rounded to ``dtype`` once here so the reference and the kernels multiply by identical values.
    """
    if mode in HASHED_MODES:
        values = (1.0, 1.0, 0.0)
    elif mode == "keep":
        values = (1.0, p_mem, p_mem)
    else:  # "drop"
        values = ((p_gen + p_mem) / p_gen, 0.0, 0.0)
    return torch.tensor(values, dtype=dtype, device=device)


def tied_mask_values(row_ids: torch.Tensor | None, *, channels: int, seed: int, p_gen: float,
                     p_mem: float, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The example-tied mask, ``[N, channels]`` of ``dtype``, N = len(row_ids).

    ``row_ids``: int ``[N]`` dataset indices (any device). Modes "keep"/"drop" do not read the
    indices; there ``row_ids`` may be None, giving ``[1, channels]``.
    """
    check_tied_args(p_gen=p_gen, p_mem=p_mem, mode=mode, seed=seed)
    return _mask_values(row_ids, channels=channels, seed=seed, p_gen=p_gen, p_mem=p_mem,
                        mode=mode, dtype=dtype)


def _mask_values(row_ids, *, channels, seed, p_gen, p_mem, mode, dtype):
    """:func:`tied_mask_values` without the argument checks (the op's body: checked before)."""
    n_gen = generalization_channels(p_gen, channels)
    if mode in HASHED_MODES:
        if row_ids is None:
            raise ChannelMaskError(f"mode {mode!r} needs the dataset index of every row; got None")
        # Values (1, 1, 0): the mask is "kept or generalization" as 0/1, built in 3 ops.
        kept = (tied_hash(row_ids, channels=channels, seed=seed) >> 8) < keep_threshold(p_mem)
        kept[:, :n_gen] = True
        return kept.to(dtype)
    device = row_ids.device if row_ids is not None else torch.device("cpu")
    gen, kept_value, _ = mode_values(mode, p_gen=p_gen, p_mem=p_mem, dtype=dtype, device=device)
    rows = 1 if row_ids is None else row_ids.shape[0]
    mask = kept_value.repeat(rows, channels)
    mask[:, :n_gen] = gen
    return mask


def broadcast_channel_mask(mask: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """View ``[N, C]`` ``mask`` so it broadcasts against an ``ndim`` activation whose channels sit at
    ``channel_dim`` (1: ``[N, C, *spatial]``; -1: ``[N, *, C]``)."""
    if channel_dim == 1:
        return mask.reshape(mask.shape + (1,) * (ndim - 2))
    return mask.reshape(mask.shape[:1] + (1,) * (ndim - 2) + mask.shape[1:])


def gathered_channel_mask_reference(x: torch.Tensor, mask: torch.Tensor, *,
                                    channel_dim: int = 1) -> torch.Tensor:
    """``x * mask`` with ``mask`` ``[N, C]`` (float of any dtype, or bool) cast to ``x.dtype``.

    Differentiable in both arguments by torch autograd: grad_mask[n, c] = sum of grad_y * x over
    the channel's elements.
    """
    return x * broadcast_channel_mask(mask.to(x.dtype), x.ndim, channel_dim)


def gathered_channel_mask_grads_reference(grad_y: torch.Tensor, x: torch.Tensor | None,
                                          mask: torch.Tensor, *, channel_dim: int,
                                          need_grad_x: bool = True, need_grad_mask: bool = True,
                                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`gathered_channel_mask_reference`: (grad_x = grad_y * m like ``grad_y``,
    grad_mask[n, c] = sum of grad_y * x over the channel's elements, in ``mask.dtype``); each
    None when not asked for. ``x`` is read only for grad_mask."""
    grad_x = (grad_y * broadcast_channel_mask(mask.to(grad_y.dtype), grad_y.ndim, channel_dim)
              if need_grad_x else None)
    grad_mask = None
    if need_grad_mask:
        prod = grad_y * x
        if channel_dim != 1:
            prod = prod.movedim(channel_dim, 1)
        grad_mask = prod.flatten(2).sum(2).to(mask.dtype) if prod.ndim > 2 else prod.to(mask.dtype)
    return grad_x, grad_mask


def tied_channel_mask_reference(x: torch.Tensor, row_ids: torch.Tensor | None, *, seed: int,
                                p_gen: float, p_mem: float, mode: str,
                                channel_dim: int = 1) -> torch.Tensor:
    """``x * tied_mask_values(row_ids)`` broadcast over the channel's elements."""
    mask = _mask_values(row_ids, channels=x.shape[channel_dim], seed=seed, p_gen=p_gen,
                        p_mem=p_mem, mode=mode, dtype=x.dtype)
    return x * broadcast_channel_mask(mask.to(x.device), x.ndim, channel_dim)
