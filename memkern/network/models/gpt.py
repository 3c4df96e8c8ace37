"""A small pre-norm GPT over bytes, with channel sites at its MLP neurons and attention heads.

``gpt`` is 4 layers, width 256, 4 heads, MLP 1024, GELU, learned positions, context = the run's
``seq_len``. Sizes come from spec keywords: ``gpt?layers=2&width=64&heads=2&mlp=256``.

Sites per block: ``blocks.i.mlp_hidden`` (``[N, T, mlp]``, channels last: one channel per MLP
neuron, after the GELU) and ``blocks.i.attn.heads`` (``[N, heads, T, head_dim]``, channels first:
one channel per head, its output before the output projection, so zeroing channel h removes
head h from the block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memkern.errors import ConfigError
from memkern.network.models.zoo import parse_keywords
from memkern.network.sites import POST_ACTIVATION, ChannelSite, name_sites

NAME = "gpt"
SIZES = {"layers": 4, "width": 256, "heads": 4, "mlp": 1024}


class CausalAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.heads = ChannelSite(heads, POST_ACTIVATION, channel_dim=1)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(
            2, 0, 3, 1, 4)
        y = self.heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class GPTBlock(nn.Module):
    """``x + attn(ln(x))``, then ``x + fc2(site(gelu(fc1(ln(x)))))``."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp)
        self.act = nn.GELU()
        self.mlp_hidden = ChannelSite(mlp, POST_ACTIVATION, channel_dim=-1)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.mlp_hidden(self.act(self.fc1(self.norm2(x)))))


class GPT(nn.Module):
    """int64 tokens ``[N, T]`` (T <= ``context``) -> next-token logits float ``[N, T, vocab]``."""

    # enters the forward only broadcast over the batch (ghost gradient norms read a copy per row)
    batch_broadcast_parameters = ("pos_embed",)

    def __init__(self, *, vocab: int, context: int, layers: int = 4, width: int = 256,
                 heads: int = 4, mlp: int = 1024):
        super().__init__()
        self.context = context
        self.tok_embed = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context, width) * 0.02)
        self.blocks = nn.Sequential(*[GPTBlock(width, heads, mlp) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.default_dropout_sites = tuple(f"blocks.{i}.mlp_hidden" for i in range(layers))
        self.block_paths = tuple(f"blocks.{i}" for i in range(layers))
        self.layer_group_paths = (("tok_embed", "pos_embed"),
                                  *(f"blocks.{i}" for i in range(layers)), ("norm", "head"))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.blocks(self.embed(tokens)))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0, float ``[N, T, width]``."""
        if tokens.shape[-1] > self.context:
            raise ConfigError(f"{tokens.shape[-1]} tokens exceed the model's context of "
                              f"{self.context}")
        return self.tok_embed(tokens) + self.pos_embed[:, :tokens.shape[-1]]

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None
                   ) -> torch.Tensor:
        """Blocks ``start..stop - 1`` on the residual stream entering block ``start``
        (:mod:`memkern.network.models.block_stack`)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block -> logits ``[N, T, vocab]``."""
        return self.head(self.norm(x))


def is_gpt(name: str) -> bool:
    return name == NAME or name.startswith(NAME + "?")


def gpt_sizes(name: str) -> dict[str, int]:
    """The sizes a ``gpt[?key=value&...]`` spec names, defaults filled in; ConfigError for an
    unknown key or a size that does not work."""
    given = parse_keywords(name.partition("?")[2], name)
    unknown = sorted(set(given) - set(SIZES))
    if unknown:
        raise ConfigError(f"model spec {name!r}: unknown size(s) {unknown}; gpt takes "
                          f"{', '.join(SIZES)}")
    sizes = {**SIZES, **given}
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ConfigError(f"model spec {name!r}: {bad[0]} must be a positive integer")
    if sizes["width"] % sizes["heads"]:
        raise ConfigError(f"model spec {name!r}: width {sizes['width']} must be a multiple of "
                          f"heads {sizes['heads']}")
    return sizes


def build_gpt(name: str, *, vocab: int, context: int) -> GPT:
    """A freshly initialized GPT of the sizes ``name`` names; sites named by module path."""
    model = GPT(vocab=vocab, context=context, **gpt_sizes(name))
    name_sites(model)
    return model
