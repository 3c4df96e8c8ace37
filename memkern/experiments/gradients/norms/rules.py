"""Per-layer ghost rules: per-example squared gradient norms of one layer's own parameters from
the layer's input activation and the gradient of the summed loss with respect to its output.

A rule is registered for a layer type with :func:`register`; ``ghost`` mode
hooks every module that has one, anything else goes through ``torch.func``. A subclass
inherits its base's rule only if it keeps the base's forward (see :func:`rule_for`). Each rule returns
``{local parameter name: float [B] squared norm}`` for the parameters it covers.

Linear layers pick per layer between two exact forms (Bu et al.'s mixed ghost norm;
convolutions between the forms of :mod:`memkern.experiments.gradients.norms.conv`): with ``a``
the ``[T, d]`` inputs and ``g`` the ``[T, p]`` output gradients of one example, the per-example weight gradient is ``g^T a`` (``[p, d]``) and

    ||g^T a||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)          (Gram, ``2 T^2`` numbers)

so the Gram form is taken when ``2 T^2 <= d p``, else ``g^T a`` is formed and reduced at once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memkern.experiments.gradients.norms.conv import conv_temp_bytes_per_example, conv_weight_sq_norms

SquaredNorms = dict[str, torch.Tensor]
RuleFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], SquaredNorms]


@dataclass(frozen=True)
class Rule:
    fn: RuleFn
    supports: Callable[[nn.Module], bool]


RULES: dict[type, Rule] = {}


def register(*types: type, supports: Callable[[nn.Module], bool] = lambda m: True):
    """Register ``fn(module, activation, grad_output) -> {param name: [B] squared norms}``."""
    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            RULES[t] = Rule(fn, supports)
        return fn
    return deco


# nn.Conv*'s forward delegates to _conv_forward, which subclasses override as well
FORWARD_METHODS = ("forward", "_conv_forward")


def _register_hf_conv1d() -> None:
    """transformers' ``Conv1D`` (GPT-2's linear layers), once transformers has loaded it: read
    from ``sys.modules``, so that gradient norms never import transformers themselves."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if isinstance(conv1d, type) and conv1d not in RULES:
        register(conv1d)(conv1d_rule)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for ``module``'s exact type, or for its nearest registered base
    class when no class in between redefines the forward computation (a weight-standardized
    conv, a linear that scales its weight: their math is not the base's formula); None sends
    the layer to the exact ``torch.func`` fallback."""
    _register_hf_conv1d()
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            same_math = all(getattr(type(module), name, None) is getattr(cls, name, None)
                            for name in FORWARD_METHODS)
            return rule if same_math and rule.supports(module) else None
    return None


def covered_parameters(module: nn.Module) -> tuple[str, ...]:
    """Local names of the parameters a rule computes: ``weight`` and ``bias`` when present."""
    return tuple(n for n in ("weight", "bias")
                 if isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).requires_grad)


def gram_is_cheaper(tokens: int, d: int, p: int) -> bool:
    """Gram (``T^2 (d + p)`` multiply-adds) vs forming ``g^T a`` (``T d p``), by time.

    Bu et al.'s rule compares space (``2 T^2 <= d p``); memory is already bounded by chunking,
    and on ResNet-9 the space rule picks Gram where it is slower (bench/README.md, "Measured
    choices in the code").
    """
    return tokens * (d + p) < d * p


def temp_bytes_per_example(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> int:
    """Rough size of a rule's temporaries for one example (patches, Gram or gradient)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return conv_temp_bytes_per_example(module, a, g)
    if isinstance(module, nn.Embedding):  # token-match and gradient Gram matrices
        return 2 * a[0].numel() ** 2 * g.element_size()
    k = 1
    for size in getattr(module, "kernel_size", ()):
        k *= size
    outputs = (getattr(module, "out_features", None) or getattr(module, "out_channels", None)
               or getattr(module, "nf", None))  # nf: transformers' Conv1D
    t = g[0].numel() // outputs if outputs else 0  # positions; norm layers form no Gram
    d = a[0].numel() * k // max(1, t)
    return (a[0].numel() * k + min(2 * t * t, d * (outputs or 0)) + g[0].numel()) * a.element_size()


def weight_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||g_b a_b^T||_F^2`` per leading index; a ``[..., d, T]``, g ``[..., p, T]`` -> ``[...]``."""
    d, t, p = a.shape[-2], a.shape[-1], g.shape[-2]
    if t == 1:
        return a.square().sum((-2, -1)) * g.square().sum((-2, -1))
    if gram_is_cheaper(t, d, p):
        return ((a.transpose(-2, -1) @ a) * (g.transpose(-2, -1) @ g)).sum((-2, -1))
    return (g @ a.transpose(-2, -1)).square().sum((-2, -1))


@register(nn.Linear)
def linear_rule(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    """Inputs ``[B, d]`` or ``[B, ..., d]`` (tokens): every middle dimension is a position."""
    b = a.shape[0]
    a = a.reshape(b, -1, a.shape[-1]).transpose(1, 2)
    g = g.reshape(b, -1, g.shape[-1]).transpose(1, 2)
    out = {}
    if "weight" in covered_parameters(module):
        out["weight"] = weight_sq_norms(a, g)
    if "bias" in covered_parameters(module):
        out["bias"] = g.sum(2).square().sum(1)
    return out


def conv1d_rule(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    """transformers' ``Conv1D``: ``y = x @ weight + bias`` with ``weight`` ``[d, p]``, a Linear
    with its weight stored transposed; example b's weight gradient ``a_b^T g_b`` is the
    transpose of the Linear's ``g_b^T a_b``, of the same norm, so the Linear's forms apply."""
    return linear_rule(module, a, g)


def _plain_embedding(module: nn.Embedding) -> bool:
    """A lookup whose gradient is the scatter of the output gradient (no renorm, scaling, pad)."""
    return (module.padding_idx is None and module.max_norm is None
            and not module.scale_grad_by_freq and not module.sparse)


@register(nn.Embedding, supports=_plain_embedding)
def embedding_rule(module: nn.Embedding, tokens: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    """Tokens ``[B, ...]``: example b's weight gradient adds ``g_t`` at row ``tokens_t``, so

        ||grad||^2 = sum_{t,s: tokens_t = tokens_s} g_t . g_s

    (positions holding the same token add up before squaring, as on a sequence's Linear)."""
    if "weight" not in covered_parameters(module):
        return {}
    b = tokens.shape[0]
    tokens = tokens.reshape(b, -1)
    g = g.reshape(b, tokens.shape[1], -1)
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
    return {"weight": ((g @ g.transpose(1, 2)) * same).sum((1, 2))}


@register(nn.Conv1d, nn.Conv2d)
def conv_rule(module: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    out = {}
    if "weight" in covered_parameters(module):
        out["weight"] = conv_weight_sq_norms(module, x, g)
    if "bias" in covered_parameters(module):
        out["bias"] = g.flatten(2).sum(2).square().sum(1)
    return out


def _affine_sq_norms(module: nn.Module, xhat: torch.Tensor, g: torch.Tensor,
                     reduce_dims: tuple[int, ...]) -> SquaredNorms:
    """Elementwise affine ``xhat * weight + bias``: per-example grads are sums over positions."""
    def over_positions(t: torch.Tensor) -> torch.Tensor:  # sum(()) would reduce everything
        return (t.sum(reduce_dims) if reduce_dims else t).flatten(1).square().sum(1)

    out = {}
    covered = covered_parameters(module)
    if "weight" in covered:
        out["weight"] = over_positions(g * xhat)
    if "bias" in covered:
        out["bias"] = over_positions(g)
    return out


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, C, N] . [B, C, N] -> [B, C]`` as a batched matrix product: no ``u * v`` temporary
    (linalg.vecdot forms one, which raised GroupNorm's peak memory above a plain backward's)."""
    return torch.einsum("bcn,bcn->bc", u, v)


def _per_channel_sq_norms(module: nn.Module, centered: torch.Tensor, scale: torch.Tensor,
                          g: torch.Tensor) -> SquaredNorms:
    """A per-channel affine map of ``centered * scale`` (``[B, C, N]``, ``scale`` broadcast to
    ``[B or 1, C]``): the per-example gradients are ``scale * sum_n g * centered`` and
    ``sum_n g``, each a dot product over positions (no ``g * xhat`` temporary)."""
    out = {}
    covered = covered_parameters(module)
    if "weight" in covered:
        out["weight"] = (_dot(g, centered) * scale).square().sum(1)
    if "bias" in covered:
        out["bias"] = g.sum(2).square().sum(1)
    return out


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
          supports=lambda m: not m.training and m.running_mean is not None)
def batchnorm_eval_rule(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                        g: torch.Tensor) -> SquaredNorms:
    """Eval mode: a fixed per-channel affine map of the input (running statistics)."""
    b, c = x.shape[:2]
    mean = module.running_mean.to(x.dtype).view(1, c, 1)
    scale = torch.rsqrt(module.running_var.to(x.dtype) + module.eps).view(1, c)
    return _per_channel_sq_norms(module, x.reshape(b, c, -1) - mean, scale, g.reshape(b, c, -1))


@register(nn.LayerNorm)
def layernorm_rule(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine_sq_norms(module, xhat, g, tuple(range(1, x.dim() - len(module.normalized_shape))))


@register(nn.GroupNorm)
def groupnorm_rule(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor) -> SquaredNorms:
    """Each example's own per-group statistics, then the per-channel map of BatchNorm's rule."""
    b, c, groups = x.shape[0], x.shape[1], module.num_groups
    grouped = x.reshape(b, groups, -1)
    centered = grouped - grouped.mean(2, keepdim=True)
    rstd = torch.rsqrt(_dot(centered, centered) / centered.shape[2] + module.eps)
    scale = rstd.repeat_interleave(c // groups, dim=1)
    return _per_channel_sq_norms(module, centered.view(b, c, -1), scale, g.reshape(b, c, -1))
