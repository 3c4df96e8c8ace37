"""The weights each channel of a language model's site owns, as views with the channel first.

For an MLP neuron: the row (and bias entry) of the layer that computes it and its output
weights in the layer that reads it; for an attention head: its query, key and value rows (and
biases) and its output weights in the output projection. One rule per site kind, looked up by
the exact type of the module holding the site (a subclass may compute otherwise):

- memkern's ``gpt``: ``GPTBlock.mlp_hidden`` (``fc1``, ``fc2``: ``nn.Linear``, weight
  ``[out, in]``), ``CausalAttention.heads`` (``qkv``, ``proj``);
- ``hf:gpt2``: ``GPT2MLP.hidden`` (``c_fc``, ``c_proj``), ``GPT2Attention.heads``
  (``c_attn``, ``c_proj``); transformers' ``Conv1D`` stores its weight transposed,
  ``[in, out]``, so neuron j's output weights are row j of ``mlp.c_proj.weight`` and head h's
  rows ``h*D:(h+1)*D`` of ``attn.c_proj.weight``.

A view is a function of a tensor shaped like the parameter (the parameter, its gradient), so
writing into the view writes into that tensor.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from memkern.network.models.gpt import CausalAttention, GPTBlock

HF_GPT2_MODULE = "transformers.models.gpt2.modeling_gpt2"
View = Callable[[torch.Tensor], torch.Tensor]  # tensor shaped like the parameter -> [C, ...]


@dataclass(frozen=True)
class Owned:
    """``param`` and the ``view`` that puts channel c's entries at index c."""

    param: nn.Parameter
    view: View

    def of(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The view of ``tensor`` (default: the parameter itself)."""
        return self.view(self.param if tensor is None else tensor)


@dataclass(frozen=True)
class ChannelWeights:
    """``made``: the weights and biases computing each channel; ``read``: its output weights."""

    made: tuple[Owned, ...]
    read: tuple[Owned, ...]


def _heads_rows(h: int) -> View:
    """``[3W, ...]`` laid out (q|k|v, head, head_dim) -> ``[H, 3, D, ...]``."""
    return lambda w: w.unflatten(0, (3, h, -1)).transpose(0, 1)


def _gpt_mlp(block: GPTBlock) -> ChannelWeights:
    return ChannelWeights(
        made=(Owned(block.fc1.weight, lambda w: w), Owned(block.fc1.bias, lambda b: b)),
        read=(Owned(block.fc2.weight, lambda w: w.t()),))


def _gpt_heads(attn: CausalAttention) -> ChannelWeights:
    h = attn.num_heads
    return ChannelWeights(
        made=(Owned(attn.qkv.weight, _heads_rows(h)), Owned(attn.qkv.bias, _heads_rows(h))),
        read=(Owned(attn.proj.weight, lambda w: w.t().unflatten(0, (h, -1))),))


def _hf_mlp(mlp: nn.Module) -> ChannelWeights:
    return ChannelWeights(
        made=(Owned(mlp.c_fc.weight, lambda w: w.t()), Owned(mlp.c_fc.bias, lambda b: b)),
        read=(Owned(mlp.c_proj.weight, lambda w: w),))


def _hf_heads(attn: nn.Module) -> ChannelWeights:
    h = attn.num_heads
    return ChannelWeights(
        made=(Owned(attn.c_attn.weight, lambda w: _heads_rows(h)(w.t())),
              Owned(attn.c_attn.bias, _heads_rows(h))),
        read=(Owned(attn.c_proj.weight, lambda w: w.unflatten(0, (h, -1))),))


def _rules() -> dict[tuple[type, str], Callable[[nn.Module], ChannelWeights]]:
    rules = {(GPTBlock, "mlp_hidden"): _gpt_mlp, (CausalAttention, "heads"): _gpt_heads}
    gpt2 = sys.modules.get(HF_GPT2_MODULE)  # loaded whenever an hf:gpt2 model exists
    if gpt2 is not None:
        rules[gpt2.GPT2MLP, "hidden"] = _hf_mlp
        rules[gpt2.GPT2Attention, "heads"] = _hf_heads
    return rules


def holder_rule(holder: nn.Module, attr: str) -> Callable[[nn.Module], ChannelWeights] | None:
    """The rule for the site ``attr`` of ``holder`` (by exact type), or None."""
    return _rules().get((type(holder), attr))


def channel_weights(model: nn.Module, site: str) -> ChannelWeights | None:
    """The weights the channels of ``site`` own, or None for a site of no known kind."""
    holder_path, _, attr = site.rpartition(".")
    holder = dict(model.named_modules()).get(holder_path)
    rule = None if holder is None else holder_rule(holder, attr)
    return None if rule is None else rule(holder)
