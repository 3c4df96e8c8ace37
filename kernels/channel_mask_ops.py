"""The channel-mask ops registered with ``torch.library``, so autograd, ``torch.func`` (vmap,
grad) and ``torch.compile`` go through them like through a built-in op:

- ``memkern::tied_channel_mask(x, row_ids, seed, p_gen, p_mem, mode, channel_dim, backend)``
- ``memkern::gathered_channel_mask(x, mask, channel_dim, backend)``
- ``memkern::gathered_channel_mask_backward(grad_y, x, mask, channel_dim, need_grad_x,
  need_grad_mask, backend) -> (grad_x, grad_mask)``

Each body runs the Triton kernels (through ``wrap_triton``, so ``torch.compile`` sees them) on
CUDA tensors, or with ``backend="triton"`` under the interpreter, and the vectorized torch
reference otherwise. Arguments are checked by the public functions of
:mod:`memkern.kernels.channel_mask` before an op is called, never inside it.

vmap rules: a batched activation ``[V, N, ...]`` with batched or shared ``row_ids``/``mask`` runs
as one call on ``[V * N, ...]`` rows, which is what a mask per row means. With ``vmap`` over
single examples (``torch.func`` per-example gradients), each example's row keeps its own
dataset index.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .channel_mask_reference import (
    gathered_channel_mask_grads_reference, gathered_channel_mask_reference,
    tied_channel_mask_reference,
)

try:
    from . import channel_mask_triton as _triton
except ImportError:  # triton is an optional dependency (memkern[gpu])
    _triton = None

# triton_op lets torch.compile trace into the kernels; without triton an opaque custom op.
_define = torch.library.triton_op if _triton is not None else torch.library.custom_op


def runs_triton(x: Tensor, backend: str) -> bool:
    """Whether ``backend`` ("auto", "torch" or "triton", already validated) runs the kernels."""
    if backend == "auto":
        return x.is_cuda and _triton is not None
    return backend == "triton"


def triton_available() -> bool:
    return _triton is not None


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@_define("memkern::tied_channel_mask", mutates_args=())
def tied_channel_mask_op(x: Tensor, row_ids: Optional[Tensor], seed: int, p_gen: float,
                         p_mem: float, mode: str, channel_dim: int, backend: str) -> Tensor:
    if runs_triton(x, backend):
        return _triton.tied_apply(x, row_ids, channel_dim=channel_dim, seed=seed, p_gen=p_gen,
                                  p_mem=p_mem, mode=mode)
    return tied_channel_mask_reference(x, row_ids, seed=seed, p_gen=p_gen, p_mem=p_mem,
                                       mode=mode, channel_dim=channel_dim)


@_define("memkern::gathered_channel_mask", mutates_args=())
def gathered_channel_mask_op(x: Tensor, mask: Tensor, channel_dim: int, backend: str) -> Tensor:
    if runs_triton(x, backend):
        return _triton.gathered_fwd(x, mask, channel_dim=channel_dim)
    return gathered_channel_mask_reference(x, mask, channel_dim=channel_dim)


@_define("memkern::gathered_channel_mask_backward", mutates_args=())
def gathered_channel_mask_backward_op(grad_y: Tensor, x: Optional[Tensor], mask: Tensor,
                                      channel_dim: int, need_grad_x: bool, need_grad_mask: bool,
                                      backend: str) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_mask); a gradient not asked for is an empty placeholder."""
    impl = _triton.gathered_bwd if runs_triton(grad_y, backend) else \
        gathered_channel_mask_grads_reference
    grad_x, grad_mask = impl(grad_y, x, mask, channel_dim=channel_dim, need_grad_x=need_grad_x,
                             need_grad_mask=need_grad_mask)
    empty = grad_y.new_empty(0)
    return (empty if grad_x is None else grad_x,
            mask.new_empty(0) if grad_mask is None else grad_mask)


if _triton is None:  # triton_op derives the fake kernels from the bodies themselves
    @tied_channel_mask_op.register_fake
    def _(x, row_ids, seed, p_gen, p_mem, mode, channel_dim, backend):
        return torch.empty_like(x)

    @gathered_channel_mask_op.register_fake
    def _(x, mask, channel_dim, backend):
        return torch.empty_like(x)

    @gathered_channel_mask_backward_op.register_fake
    def _(grad_y, x, mask, channel_dim, need_grad_x, need_grad_mask, backend):
        return (torch.empty_like(grad_y) if need_grad_x else grad_y.new_empty(0),
                torch.empty_like(mask) if need_grad_mask else mask.new_empty(0))


# --- autograd -------------------------------------------------------------------------------

def _tied_setup(ctx, inputs, output):
    x, row_ids, *ctx.rest = inputs
    ctx.has_ids = row_ids is not None
    ctx.save_for_backward(*([row_ids] if ctx.has_ids else []))


# The backwards run with grad off: first derivatives only (no double backward), which is what
# every analysis needs, and the inner op then records nothing of its own under torch.func.
@torch.no_grad()
def _tied_backward(ctx, grad_y):
    # The op is linear in x with a mask that does not depend on x: the backward is the op.
    row_ids = ctx.saved_tensors[0] if ctx.has_ids else None
    return (tied_channel_mask_op(grad_y, row_ids, *ctx.rest),) + (None,) * 7


def _gathered_setup(ctx, inputs, output):
    x, mask, ctx.channel_dim, ctx.backend = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, mask)  # x: for grad_mask only


@torch.no_grad()
def _gathered_backward(ctx, grad_y):
    x, mask = ctx.saved_tensors
    need_x, need_mask = ctx.needs_input_grad[:2]
    grad_x, grad_mask = gathered_channel_mask_backward_op(
        grad_y, x if need_mask else None, mask, ctx.channel_dim, need_x, need_mask, ctx.backend)
    return (grad_x if need_x else None), (grad_mask if need_mask else None), None, None


tied_channel_mask_op.register_autograd(_tied_backward, setup_context=_tied_setup)
gathered_channel_mask_op.register_autograd(_gathered_backward, setup_context=_gathered_setup)


# In torch 2.13 an op's registered autograd does not compose with torch.func transforms (the
# generated autograd.Function lacks setup_context, so vmap(grad(...)) raises). The public
# functions therefore enter through these Functions: the same formulas, in the form torch.func
# takes; the vmap of forward and backward comes from the ops' own vmap rules. Their forwards call
# the ops with grad off, so the ops' own autograd formula is not recorded a second time.
class TiedChannelMaskFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, row_ids, seed, p_gen, p_mem, mode, channel_dim, backend):
        with torch.no_grad():
            return tied_channel_mask_op(x, row_ids, seed, p_gen, p_mem, mode, channel_dim,
                                        backend)

    setup_context = staticmethod(_tied_setup)
    backward = staticmethod(_tied_backward)


class GatheredChannelMaskFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, mask, channel_dim, backend):
        with torch.no_grad():
            return gathered_channel_mask_op(x, mask, channel_dim, backend)

    setup_context = staticmethod(_gathered_setup)
    backward = staticmethod(_gathered_backward)


# --- vmap -----------------------------------------------------------------------------------

def _rows(t: Tensor | None, bdim: int | None, size: int) -> Tensor | None:
    """``t`` with a leading vmap dim of ``size`` (moved there, or broadcast when unbatched),
    merged with the row dim: ``[size * N, ...]``."""
    if t is None:
        return None
    t = t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)
    return t.flatten(0, 1)


def _tied_vmap(info, in_dims, x, row_ids, *rest):
    size = info.batch_size
    out = tied_channel_mask_op(_rows(x, in_dims[0], size), _rows(row_ids, in_dims[1], size),
                               *rest)
    return out.unflatten(0, (size, -1)), 0


def _gathered_vmap(info, in_dims, x, mask, channel_dim, backend):
    size = info.batch_size
    out = gathered_channel_mask_op(_rows(x, in_dims[0], size), _rows(mask, in_dims[1], size),
                                   channel_dim, backend)
    return out.unflatten(0, (size, -1)), 0


def _gathered_backward_vmap(info, in_dims, grad_y, x, mask, channel_dim, need_grad_x,
                            need_grad_mask, backend):
    size = info.batch_size
    grad_x, grad_mask = gathered_channel_mask_backward_op(
        _rows(grad_y, in_dims[0], size), _rows(x, in_dims[1], size),
        _rows(mask, in_dims[2], size), channel_dim, need_grad_x, need_grad_mask, backend)
    outs = (grad_x.unflatten(0, (size, -1)) if need_grad_x else grad_x,
            grad_mask.unflatten(0, (size, -1)) if need_grad_mask else grad_mask)
    return outs, (0 if need_grad_x else None, 0 if need_grad_mask else None)


tied_channel_mask_op.register_vmap(_tied_vmap)
gathered_channel_mask_op.register_vmap(_gathered_vmap)
gathered_channel_mask_backward_op.register_vmap(_gathered_backward_vmap)
