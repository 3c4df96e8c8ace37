"""A small Vision Transformer (pre-norm blocks, class token, learned position embeddings)."""
from __future__ import annotations

import torch
from torch import nn

from memkern.network.sites import POST_ACTIVATION, ChannelSite


def patch_size_for(image_size: int) -> int:
    """4-pixel patches for 16+ pixel images (64 tokens at 32x32), smaller ones for small images."""
    for p in (4, 2):
        if image_size >= 4 * p and image_size % p == 0:
            return p
    return 1


class Attention(nn.Module):
    """Multi-head self-attention from plain Linear layers (so per-example norm rules apply)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``; the MLP's hidden units are a site."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.hidden = ChannelSite(mlp_dim, POST_ACTIVATION, channel_dim=-1)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.hidden(self.act(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    """dim 128, depth 4, 4 heads, MLP 256: CPU-sized. ``[N, C, S, S] -> [N, num_classes]``."""

    default_dropout_sites = ("blocks.2.hidden", "blocks.3.hidden")
    # Leading size 1, used only broadcast over the batch: ghost norms cover them exactly.
    batch_broadcast_parameters = ("cls_token", "pos_embed")

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, norm: str = "batch",
                 dim: int = 128, depth: int = 4, heads: int = 4, mlp_dim: int = 256):
        super().__init__()
        del norm  # a ViT uses LayerNorm whatever the CNNs are given
        patch = patch_size_for(image_size)
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.layer_group_paths = (("embed", "cls_token", "pos_embed"),
                                  *(f"blocks.{i}" for i in range(depth)), ("norm", "head"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))
