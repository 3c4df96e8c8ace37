"""The per-example channel mask op ``y[n, c, ...] = x[n, c, ...] * m(n, c)``: public functions,
autograd Functions and the one place that picks Triton or torch.

Layouts: ``[N, C]``, ``[N, C, *spatial]`` (``channel_dim=1``) or ``[N, *, C]`` (``channel_dim=-1``,
a ViT's ``[N, T, C]``). Dtypes: float32, float16, bfloat16 (bf16 on GPU), float64.

Backend: ``"auto"`` runs the Triton kernels on CUDA tensors when triton imports, else the
vectorized torch reference; ``"triton"`` forces the kernels (on CPU tensors that needs
``TRITON_INTERPRET=1`` set before memkern.kernels is imported: tests do this); ``"torch"`` forces
the reference. On the torch path autograd differentiates the reference directly.
"""
from __future__ import annotations

import os

import torch

from memkern.errors import ConfigError

from .channel_mask_reference import (
    HASHED_MODES, check_tied_args, gathered_channel_mask_reference, tied_channel_mask_reference,
)

try:
    from . import channel_mask_triton as _triton
except ImportError:  # triton is an optional dependency (memkern[gpu])
    _triton = None

BACKENDS = ("auto", "torch", "triton")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is unknown: use one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and _triton is not None
    if _triton is None:
        raise ConfigError("backend='triton' needs the triton package: pip install 'memkern[gpu]'")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "backend='triton' on a CPU tensor runs only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing memkern, or use backend='auto'"
        )
    return True


def _check_layout(x: torch.Tensor, channel_dim: int) -> int:
    """Channel count of ``x``; ConfigError for a layout the op does not take."""
    if channel_dim not in (1, -1):
        raise ConfigError(f"channel_dim={channel_dim} is unsupported: use 1 ([N, C, ...]) or "
                          f"-1 ([N, ..., C])")
    if x.ndim < 2:
        raise ConfigError(f"x has shape {tuple(x.shape)}: a channel mask needs [N, C, ...]")
    if not x.is_floating_point():
        raise ConfigError(f"x has dtype {x.dtype}: the channel mask takes floating tensors")
    return x.shape[channel_dim]


class _GatheredChannelMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, channel_dim):
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(x if mask.requires_grad else None, mask)
        return _triton.gathered_fwd(x, mask, channel_dim=channel_dim)

    @staticmethod
    def backward(ctx, grad_y):
        x, mask = ctx.saved_tensors
        grad_x, grad_mask = _triton.gathered_bwd(
            grad_y, x, mask, channel_dim=ctx.channel_dim,
            need_grad_x=ctx.needs_input_grad[0], need_grad_mask=ctx.needs_input_grad[1],
        )
        return grad_x, grad_mask, None


class _TiedChannelMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_ids, kwargs):
        ctx.kwargs = kwargs
        ctx.save_for_backward(row_ids)
        return _triton.tied_apply(x, row_ids, **kwargs)

    @staticmethod
    def backward(ctx, grad_y):
        (row_ids,) = ctx.saved_tensors
        return _triton.tied_apply(grad_y, row_ids, **ctx.kwargs), None, None


def gathered_channel_mask(x: torch.Tensor, mask: torch.Tensor, *, channel_dim: int = 1,
                          backend: str = "auto") -> torch.Tensor:
    """``x * mask`` broadcast over each channel's elements; ``y`` has ``x``'s shape and dtype.

    ``mask``: ``[N, C]`` float (any floating dtype, cast to ``x.dtype`` for the product) or bool.
    Backward: grad_x = grad_y * m, and when ``mask`` requires grad, grad_mask[n, c] = sum over
    the channel's elements of grad_y * x (in ``mask.dtype``; at m = 1 this is the paper's score).
    """
    channels = _check_layout(x, channel_dim)
    if mask.shape != (x.shape[0], channels):
        raise ConfigError(f"mask has shape {tuple(mask.shape)}, x needs [N, C] = "
                          f"[{x.shape[0]}, {channels}] (channel_dim={channel_dim})")
    if mask.dtype == torch.bool:
        mask = mask.to(x.dtype)
    elif not mask.is_floating_point():
        raise ConfigError(f"mask has dtype {mask.dtype}: pass a floating or bool mask")
    if not _use_triton(x, backend):
        return gathered_channel_mask_reference(x, mask, channel_dim=channel_dim)
    return _GatheredChannelMask.apply(x, mask, channel_dim)


def tied_channel_mask(x: torch.Tensor, row_ids: torch.Tensor | None, *, seed: int, p_gen: float,
                      p_mem: float, mode: str, channel_dim: int = 1,
                      backend: str = "auto") -> torch.Tensor:
    """Example-tied dropout: ``x * m`` with ``m = tied_mask_values(row_ids, ...)`` regenerated
    from (row_ids[n], seed, c) inside the kernel, forward and backward; no mask is stored.

    ``row_ids``: int ``[N]``, the dataset index of each row (on ``x``'s device); may be None in
    modes "keep" and "drop", which do not depend on the example.
    """
    _check_layout(x, channel_dim)
    check_tied_args(p_gen=p_gen, p_mem=p_mem, mode=mode, seed=seed)
    if mode in HASHED_MODES:
        if row_ids is None:
            raise ConfigError(f"mode {mode!r} needs the dataset index of every row; got None")
        if row_ids.shape != (x.shape[0],) or row_ids.is_floating_point():
            raise ConfigError(f"row_ids must be an int tensor of shape [{x.shape[0]}] (one "
                              f"dataset index per row); got {row_ids.dtype} {tuple(row_ids.shape)}")
    if not _use_triton(x, backend):
        return tied_channel_mask_reference(x, row_ids, seed=seed, p_gen=p_gen, p_mem=p_mem,
                                           mode=mode, channel_dim=channel_dim)
    if mode in HASHED_MODES:
        row_ids = row_ids.to(x.device).contiguous()
    else:
        row_ids = None
    kwargs = dict(channel_dim=channel_dim, seed=seed, p_gen=p_gen, p_mem=p_mem, mode=mode)
    return _TiedChannelMask.apply(x, row_ids, kwargs)
