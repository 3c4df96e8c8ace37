"""Triton kernels and launchers for the per-example channel mask.

Every launcher views its activation as ``[N, C, S]`` with explicit strides (``S`` = the product of
the non-batch, non-channel dims), so one kernel serves ``[N, C]``, ``[N, C, *spatial]`` (also
channels_last memory) and token layouts ``[N, T, C]``. A program owns a ``[BLOCK_R, BLOCK_S]``
tile: BLOCK_R (row, channel) pairs ``r = n * C + c``, whose mask it computes once, walking the S
axis in BLOCK_S chunks. Flattening (n, c) keeps tiles full when C is small and keeps the program
count low (the interpreter's cost grows with the program count). The mask is cast to the
activation dtype before the multiply, as in the torch reference, so values match it bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import channel_mask_reference as ref
from .channel_mask_reference import (
    HASHED_MODES, generalization_channels, keep_threshold, mode_values, site_key,
)

# The hash constants, from the reference that defines them (jit code reads only constexpr globals).
_M1 = tl.constexpr(ref.HASH_M1)
_M2 = tl.constexpr(ref.HASH_M2)
_GOLDEN = tl.constexpr(ref.HASH_GOLDEN)

# A tile of at most 4096 elements (32 values per thread at 4 warps) on GPU; under the interpreter
# large tiles mean few programs, which is what its cost grows with. Not tuned on a GPU yet.
_TILE = 4096


@triton.jit
def _lowbias32(h):
    h ^= h >> 16
    h *= _M1
    h ^= h >> 15
    h *= _M2
    h ^= h >> 16
    return h


@triton.jit
def _pairs(pid, NC, C, BLOCK_R: tl.constexpr):
    """The tile's (row, channel) pairs: n, c (int64) and the in-range flag."""
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return r // C, r % C, r < NC


@triton.jit
def _scale_pairs(src_ptr, dst_ptr, m, n, c, r_ok, S, src_sn, src_sc, src_ss, dst_sn, dst_sc,
                 dst_ss, BLOCK_S: tl.constexpr):
    """dst[n, c, :] = src[n, c, :] * m for the tile's BLOCK_R pairs (n, c)."""
    m = m.to(src_ptr.dtype.element_ty)[:, None]
    src_row = src_ptr + (n * src_sn + c * src_sc)[:, None]
    dst_row = dst_ptr + (n * dst_sn + c * dst_sc)[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = r_ok[:, None] & (s < S)[None, :]
        v = tl.load(src_row + s[None, :] * src_ss, mask=ok)
        tl.store(dst_row + s[None, :] * dst_ss, v * m, mask=ok)


@triton.jit
def _tied_kernel(src_ptr, dst_ptr, row_ids_ptr, values_ptr, key, n_gen, threshold, NC, C, S,
                 src_sn, src_sc, src_ss, dst_sn, dst_sc, dst_ss,
                 HASHED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # The op is linear in x, so the backward is this same kernel applied to grad_y: the mask is
    # regenerated from (row id, key, c) and nothing but row_ids is saved.
    n, c, r_ok = _pairs(tl.program_id(0), NC, C, BLOCK_R)
    kept = tl.load(values_ptr + 1)
    if HASHED:
        index = (tl.load(row_ids_ptr + n, mask=r_ok, other=0) & 0xFFFFFFFF).to(tl.uint32)
        row = _lowbias32(index ^ key.to(tl.uint32))
        h = _lowbias32(row ^ (c.to(tl.uint32) * _GOLDEN))
        memorization = tl.where((h >> 8) < threshold, kept, tl.load(values_ptr + 2))
    else:
        memorization = tl.zeros([BLOCK_R], dtype=kept.dtype) + kept
    m = tl.where(c < n_gen, tl.load(values_ptr), memorization)
    _scale_pairs(src_ptr, dst_ptr, m, n, c, r_ok, S, src_sn, src_sc, src_ss,
                 dst_sn, dst_sc, dst_ss, BLOCK_S)


@triton.jit
def _gathered_fwd_kernel(x_ptr, y_ptr, mask_ptr, mask_sn, mask_sc, NC, C, S, x_sn, x_sc, x_ss,
                         y_sn, y_sc, y_ss, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    n, c, r_ok = _pairs(tl.program_id(0), NC, C, BLOCK_R)
    m = tl.load(mask_ptr + n * mask_sn + c * mask_sc, mask=r_ok)
    _scale_pairs(x_ptr, y_ptr, m, n, c, r_ok, S, x_sn, x_sc, x_ss, y_sn, y_sc, y_ss, BLOCK_S)


@triton.jit
def _gathered_bwd_kernel(g_ptr, x_ptr, mask_ptr, gx_ptr, gm_ptr, mask_sn, mask_sc, NC, C, S,
                         g_sn, g_sc, g_ss, x_sn, x_sc, x_ss, gx_sn, gx_sc, gx_ss,
                         NEED_GX: tl.constexpr, NEED_GM: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """grad_x = g * m and grad_mask[n, c] = sum_s g * x, reading g once for both."""
    n, c, r_ok = _pairs(tl.program_id(0), NC, C, BLOCK_R)
    m = tl.load(mask_ptr + n * mask_sn + c * mask_sc, mask=r_ok).to(g_ptr.dtype.element_ty)
    g_row = g_ptr + (n * g_sn + c * g_sc)[:, None]
    x_row = x_ptr + (n * x_sn + c * x_sc)[:, None]
    gx_row = gx_ptr + (n * gx_sn + c * gx_sc)[:, None]
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = r_ok[:, None] & (s < S)[None, :]
        g = tl.load(g_row + s[None, :] * g_ss, mask=ok, other=0.0)
        if NEED_GX:
            tl.store(gx_row + s[None, :] * gx_ss, g * m[:, None], mask=ok)
        if NEED_GM:
            x = tl.load(x_row + s[None, :] * x_ss, mask=ok, other=0.0)
            acc += tl.sum(g.to(ACC) * x.to(ACC), axis=1)
    if NEED_GM:
        tl.store(gm_ptr + n * mask_sn + c * mask_sc, acc, mask=r_ok)


def _as_ncs(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``[N, C, S]`` view (or copy, when the strides do not merge) of an activation."""
    if t.ndim == 2:
        return t.unsqueeze(-1)
    if channel_dim == 1:
        return t.flatten(2)
    return t.flatten(1, -2).transpose(1, 2)


def _empty_ncs_like(t: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An output shaped and laid out like ``t`` (channels_last stays channels_last) and its
    ``[N, C, S]`` view; falls back to contiguous when ``t``'s layout cannot be viewed as one."""
    out = torch.empty_like(t)
    out3 = _as_ncs(out, channel_dim)
    if out3.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        out3 = _as_ncs(out, channel_dim)
    return out, out3


def _grid(N: int, C: int, S: int) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK_R, BLOCK_S) for an ``[N, C, S]`` problem: tiles of up to _TILE elements."""
    block_s = min(triton.next_power_of_2(S), _TILE)
    block_r = min(triton.next_power_of_2(N * C), max(_TILE // block_s, 1))
    return (triton.cdiv(N * C, block_r),), block_r, block_s


def tied_apply(src: torch.Tensor, row_ids: torch.Tensor | None, *, channel_dim: int, seed: int,
               p_gen: float, p_mem: float, mode: str) -> torch.Tensor:
    """``src * m_tied`` for an activation (forward) or its gradient (backward)."""
    out, out3 = _empty_ncs_like(src, channel_dim)
    src3 = _as_ncs(src, channel_dim)
    N, C, S = src3.shape
    if out.numel() == 0:
        return out
    values = mode_values(mode, p_gen=p_gen, p_mem=p_mem, dtype=src.dtype, device=src.device)
    hashed = mode in HASHED_MODES
    grid, block_r, block_s = _grid(N, C, S)
    wrap_triton(_tied_kernel)[grid](
        src3, out3, row_ids if hashed else values, values, site_key(seed),
        generalization_channels(p_gen, C), keep_threshold(p_mem), N * C, C, S,
        *src3.stride(), *out3.stride(), HASHED=hashed, BLOCK_R=block_r, BLOCK_S=block_s,
    )
    return out


def gathered_fwd(x: torch.Tensor, mask: torch.Tensor, *, channel_dim: int) -> torch.Tensor:
    """``x * mask`` for ``mask`` ``[N, C]`` of a floating dtype."""
    y, y3 = _empty_ncs_like(x, channel_dim)
    x3 = _as_ncs(x, channel_dim)
    N, C, S = x3.shape
    if y.numel() == 0:
        return y
    grid, block_r, block_s = _grid(N, C, S)
    wrap_triton(_gathered_fwd_kernel)[grid](
        x3, y3, mask, *mask.stride(), N * C, C, S, *x3.stride(), *y3.stride(),
        BLOCK_R=block_r, BLOCK_S=block_s,
    )
    return y


def gathered_bwd(grad_y: torch.Tensor, x: torch.Tensor | None, mask: torch.Tensor, *,
                 channel_dim: int, need_grad_x: bool, need_grad_mask: bool,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_x like ``grad_y`` or None, grad_mask ``[N, C]`` of ``mask.dtype`` or None).

    ``x`` is needed only for grad_mask; accumulation is fp32 (fp64 for fp64 inputs).
    """
    g3 = _as_ncs(grad_y, channel_dim)
    N, C, S = g3.shape
    grad_x, gx3 = _empty_ncs_like(grad_y, channel_dim) if need_grad_x else (None, g3)
    mask = mask.contiguous()
    grad_mask = torch.zeros_like(mask) if need_grad_mask else None
    if grad_y.numel() == 0:
        return grad_x, grad_mask
    x3 = _as_ncs(x, channel_dim) if need_grad_mask else g3
    acc = tl.float64 if grad_y.dtype == torch.float64 else tl.float32
    grid, block_r, block_s = _grid(N, C, S)
    wrap_triton(_gathered_bwd_kernel)[grid](
        g3, x3, mask, gx3, grad_mask if need_grad_mask else mask, *mask.stride(), N * C, C, S,
        *g3.stride(), *x3.stride(), *gx3.stride(),
        NEED_GX=need_grad_x, NEED_GM=need_grad_mask, ACC=acc, BLOCK_R=block_r, BLOCK_S=block_s,
    )
    return grad_x, grad_mask
