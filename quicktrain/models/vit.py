"""A tiny Vision Transformer (Dosovitskiy et al., 2021) with explicit attention, for small images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import Shape, register_model


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(Q K^T / sqrt(d_head)) V``, written out so graphs can see it."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, a class token, learned positions, ``depth`` blocks and a linear head."""

    def __init__(self, in_shape: Shape, num_classes: int, patch: int, dim: int = 64, depth: int = 4, heads: int = 4):
        super().__init__()
        channels, height, width = in_shape
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        num_patches = (height // patch) * (width // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@register_model("vit_tiny", min_size=8)
def vit_tiny(*, num_classes: int, in_shape: Shape) -> VisionTransformer:
    """ViT with 64-dim tokens, 4 blocks, 4 heads; patches of 4 pixels (2 below 16 pixels)."""
    return VisionTransformer(in_shape, num_classes, patch=4 if min(in_shape[1:]) >= 16 else 2)
