"""InternViT (300M and 6B) in plain PyTorch: a pre-norm ViT with CLS token, learned positions, layer scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint.geometry import VisionConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as the reference does.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(config: VisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class PatchEmbedding(nn.Module):
    """Non-overlapping patch convolution, a prepended CLS token and learned positions (1 + patches rows)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [tiles, 3, 448, 448] -> x: [tiles, C, 32, 32] -> [tiles, 1024, C]
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        # x: [tiles, 1025, C]
        return torch.cat([cls, x], dim=1) + self.pos_embed


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; the 6B variant RMS-normalises q and k over all heads."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim, config.norm_eps) if config.qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(dim, config.norm_eps) if config.qk_normalization else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, seq, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        # q, k, v: [tiles, seq, C] -> [tiles, heads, seq, head_dim]
        q, k, v = (t.view(tiles, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        # out: [tiles, heads, seq, head_dim] -> [tiles, seq, C]
        return self.proj(out.transpose(1, 2).reshape(tiles, seq, dim))


class FeedForward(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block whose two branches are scaled per channel (layer scale ls1, ls2)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.ls1 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))
        self.norm2 = make_norm(config)
        self.mlp = FeedForward(config)
        self.ls2 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternViT(nn.Module):
    """Patch embedding and transformer blocks; no final norm."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embed = PatchEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Hidden states [tiles, 1 + patches, C] after the first `num_layers` blocks (all by default)."""
        x = self.embed(pixel_values)
        for block in self.blocks[:num_layers]:
            x = block(x)
        return x
