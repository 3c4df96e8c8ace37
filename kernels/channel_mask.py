"""The per-example channel mask ``y[n, c, ...] = x[n, c, ...] * m(n, c)``: the public functions,
which check their arguments and call the registered ops of
:mod:`memkern.kernels.channel_mask_ops`.

Layouts: ``[N, C]``, ``[N, C, *spatial]`` (``channel_dim=1``) or ``[N, *, C]`` (``channel_dim=-1``,
a ViT's ``[N, T, C]``). Dtypes: float32, float16, bfloat16 (bf16 on GPU), float64.

Backend: ``"auto"`` runs the Triton kernels on CUDA tensors when triton imports, else the
vectorized torch reference; ``"triton"`` forces the kernels (on CPU tensors that needs
``TRITON_INTERPRET=1`` set before memkern.kernels is imported: tests do this); ``"torch"`` forces
the reference. Bad arguments raise :class:`~memkern.kernels.errors.ChannelMaskError`.
"""
from __future__ import annotations

import torch

from .channel_mask_ops import (
    GatheredChannelMaskFunction, TiedChannelMaskFunction, gathered_channel_mask_op,
    interpreter_active, tied_channel_mask_op, triton_available,
)
from .channel_mask_reference import HASHED_MODES, check_tied_args
from .errors import ChannelMaskError, ChannelMaskTypeError

BACKENDS = ("auto", "torch", "triton")


def _check_backend(x: torch.Tensor, backend: str) -> None:
    if backend not in BACKENDS:
        raise ChannelMaskError(f"backend {backend!r} is unknown: use one of {BACKENDS}")
    if backend != "triton":
        return
    if not triton_available():
        raise ChannelMaskError("backend='triton' needs the triton package: pip install "
                               "'memkern[gpu]'")
    if not x.is_cuda and not interpreter_active():
        raise ChannelMaskError(
            "backend='triton' on a CPU tensor runs only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing memkern, or use backend='auto'"
        )


def kernel_path(device: torch.device | str) -> str:
    """What the op runs on ``device`` with ``backend="auto"``: ``"triton"`` or ``"torch"``."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


def _check_layout(x: torch.Tensor, channel_dim: int) -> int:
    """Channel count of ``x``; ChannelMaskError for a layout the op does not take."""
    if channel_dim not in (1, -1):
        raise ChannelMaskError(f"channel_dim={channel_dim} is unsupported: use 1 ([N, C, ...]) "
                               f"or -1 ([N, ..., C])")
    if x.ndim < 2:
        raise ChannelMaskError(f"x has shape {tuple(x.shape)}: a channel mask needs [N, C, ...]")
    if not x.is_floating_point():
        raise ChannelMaskTypeError(f"x has dtype {x.dtype}: the channel mask takes floating "
                                   f"tensors")
    return x.shape[channel_dim]


def gathered_channel_mask(x: torch.Tensor, mask: torch.Tensor, *, channel_dim: int = 1,
                          backend: str = "auto") -> torch.Tensor:
    """``x * mask`` broadcast over each channel's elements; ``y`` has ``x``'s shape and dtype.

    ``mask``: ``[N, C]`` float (any floating dtype, cast to ``x.dtype`` for the product) or bool.
    Backward: grad_x = grad_y * m, and when ``mask`` requires grad, grad_mask[n, c] = sum over
    the channel's elements of grad_y * x (in ``mask.dtype``; at m = 1 this is the paper's score).
    """
    channels = _check_layout(x, channel_dim)
    _check_backend(x, backend)
    if mask.shape != (x.shape[0], channels):
        raise ChannelMaskError(f"mask has shape {tuple(mask.shape)}, x needs [N, C] = "
                               f"[{x.shape[0]}, {channels}] (channel_dim={channel_dim})")
    if mask.dtype == torch.bool:
        mask = mask.to(x.dtype)
    elif not mask.is_floating_point():
        raise ChannelMaskTypeError(f"mask has dtype {mask.dtype}: pass a floating or bool mask")
    # Compiling: the registered op with its registered autograd, which torch.compile traces; eager:
    # the same formulas through an autograd.Function, the form torch.func transforms accept.
    entry = gathered_channel_mask_op if torch.compiler.is_compiling() else \
        GatheredChannelMaskFunction.apply
    return entry(x, mask.to(x.device), channel_dim, backend)


def tied_channel_mask(x: torch.Tensor, row_ids: torch.Tensor | None, *, seed: int, p_gen: float,
                      p_mem: float, mode: str, channel_dim: int = 1,
                      backend: str = "auto") -> torch.Tensor:
    """Example-tied dropout: ``x * m`` with ``m = tied_mask_values(row_ids, ...)`` regenerated
    from (row_ids[n], seed, c) inside the op, forward and backward; no mask is stored.

    ``row_ids``: int ``[N]``, the dataset index of each row; may be None in modes "keep" and
    "drop", which do not depend on the example.
    """
    _check_layout(x, channel_dim)
    _check_backend(x, backend)
    check_tied_args(p_gen=p_gen, p_mem=p_mem, mode=mode, seed=seed)
    if mode in HASHED_MODES:
        if row_ids is None:
            raise ChannelMaskError(f"mode {mode!r} needs the dataset index of every row; got None")
        if row_ids.shape != (x.shape[0],) or row_ids.is_floating_point():
            raise ChannelMaskError(f"row_ids must be an int tensor of shape [{x.shape[0]}] (one "
                                   f"dataset index per row); got {row_ids.dtype} "
                                   f"{tuple(row_ids.shape)}")
        row_ids = row_ids.to(x.device, torch.int64).contiguous()
    else:
        row_ids = None
    entry = tied_channel_mask_op if torch.compiler.is_compiling() else \
        TiedChannelMaskFunction.apply  # as in gathered_channel_mask
    return entry(x, row_ids, seed, float(p_gen), float(p_mem), mode, channel_dim, backend)
