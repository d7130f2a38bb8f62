"""ImageNet normalisation of uint8 tiles, on whatever device they are: torch only (no PIL), so the vision model
can run it on its own device without the host's image libraries."""

from __future__ import annotations

import torch

from checkpoint.presets import IMAGENET_MEAN, IMAGENET_STD


def normalize(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 tiles [tiles, H, W, 3] to normalised float32 pixel values [tiles, 3, H, W], on `tiles`' device.

    The reference's ToTensor and Normalize: (u8 / 255 - mean) / std, in float32, in this order; the result is
    contiguous (NCHW), as the reference's is, so that the patch embedding sees the same layout. In place after
    the one float copy (64 video frames are 154 MB of float32)."""
    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles [tiles, H, W, 3], got {tiles.dtype} {list(tiles.shape)}")
    pixels = tiles.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)
