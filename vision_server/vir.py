"""InternVL3.5-Flash's Visual Resolution Router (ViR): which tiles may travel as 64 tokens instead of 256.

A learned query pools each tile's ViT tokens by cross-attention; a residual MLP stack and a two-way
head give p0, the probability that the tile can be compressed. Compressed tiles go through pixel
shuffle 0.25 and `mlp2` (64 tokens) instead of pixel shuffle 0.5 and `mlp1` (256 tokens).

The reference takes the p0 quantile over whatever tiles share one forward pass, so an answer would
depend on the request's neighbours in a batch; `route` takes it over one image's tiles only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_HEADS = 16  # fixed in the reference, whatever the ViT width


class CrossAttention(nn.Module):
    """Multi-head attention of a few queries over a tile's tokens (fused in-projection, as stored)."""

    def __init__(self, dim: int, num_heads: int = ROUTER_HEADS):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # query: [tiles, 1, C], tokens: [tiles, N, C]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        tiles, _, dim = tokens.shape
        q = F.linear(query, w_q, b_q).view(tiles, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)
        k = F.linear(tokens, w_k, b_k).view(tiles, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)
        v = F.linear(tokens, w_v, b_v).view(tiles, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [tiles, heads, 1, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(tiles, -1, dim))  # [tiles, 1, C]


class RouterPooling(nn.Module):
    """`pooling_before_gating`: a learned query attends to the tile four times -> one vector per tile.

    The reference stores four attention/norm pairs but its forward uses the second pair for steps 2, 3
    and 4; the same is done here so that real Flash checkpoints route as they were trained to.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query_token = nn.Parameter(torch.empty(1, dim))
        self.attn = nn.ModuleList(CrossAttention(dim) for _ in range(4))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [tiles, 1024, C] -> pooled: [tiles, C]
        x = self.norm[0](self.attn[0](self.query_token.expand(tokens.shape[0], 1, -1), tokens))
        for _ in range(3):
            x = self.norm[1](self.attn[1](x, tokens))
        return x.squeeze(1)


class ResidualMLP(nn.Module):
    """x + LayerNorm(fc2(GELU(fc1(x))))."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.fc2 = nn.Linear(dim * expansion, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.fc2(F.gelu(self.fc1(x))))


class Gating(nn.Module):
    """Four residual MLP blocks, then LayerNorm -> Linear(C, 2) -> softmax: [tiles, C] -> p [tiles, 2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualMLP(dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.softmax(self.head(self.norm(x)).float(), dim=-1)


class CompressedProjector(nn.Module):
    """`mlp2`: LayerNorm(16C) -> Linear(16C, 2H) -> GELU -> Linear(2H, 2H) -> GELU -> Linear(2H, H)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, 2 * hidden_size)
        self.fc2 = nn.Linear(2 * hidden_size, 2 * hidden_size)
        self.fc3 = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))


def route(p0: torch.Tensor, relative_threshold: float, absolute_threshold: float) -> torch.Tensor:
    """Which of ONE image's tiles to compress: p0 above the image's own quantile and the absolute floor."""
    p0 = p0.float()
    quantile = torch.quantile(p0, relative_threshold)
    return (p0 > quantile) & (p0 >= absolute_threshold)
