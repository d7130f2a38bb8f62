"""ImageNet normalisation of uint8 tiles, on whatever device they are: torch only (no PIL), so the vision model
can run it on its own device without the host's image libraries.

The reference (the model card's ToTensor + Normalize, on the CPU) computes (u8 / 255 - mean) / std in float32.
Computed elementwise on a GPU that need not give the same bits: PyTorch's CUDA kernel divides by a scalar as a
multiplication by its reciprocal, which is one bit off for 126 of the 256 values. So on the CPU the reference's
arithmetic runs as it is; for any other device it runs once, on the CPU, over the 256 possible values of each
channel, and the device looks its pixels up in that [3, 256] table: the same math, bit-equal everywhere.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from checkpoint.geometry import IMAGENET_MEAN, IMAGENET_STD


def _reference_normalize(tiles: torch.Tensor) -> torch.Tensor:
    """The reference's arithmetic on the CPU: [tiles, H, W, 3] uint8 -> [tiles, 3, H, W] float32."""
    pixels = tiles.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


@lru_cache(maxsize=8)
def _table(device: torch.device) -> torch.Tensor:
    """[3, 256] float32: the normalised value of each uint8 value in each channel, made on the CPU."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3)
    return _reference_normalize(values).reshape(3, 256).to(device)


def normalize(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 tiles [tiles, H, W, 3] to normalised float32 pixel values [tiles, 3, H, W], on `tiles`' device.

    Bit-equal to the reference's (u8 / 255 - mean) / std in float32 (see the module's docstring); the result is
    contiguous (NCHW), as the reference's is, so that the patch embedding sees the same layout."""
    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles [tiles, H, W, 3], got {tiles.dtype} {list(tiles.shape)}")
    if tiles.device.type == "cpu":
        return _reference_normalize(tiles)
    return lookup(tiles, _table(tiles.device))


def lookup(tiles: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[tiles, H, W, 3] uint8 -> [tiles, 3, H, W] float32 through a [3, 256] table, on the tiles' device."""
    count, height, width, _ = tiles.shape
    out = torch.empty((count, 3, height, width), dtype=torch.float32, device=tiles.device)
    for channel in range(3):
        index = tiles[..., channel].reshape(-1).to(torch.int32)
        out[:, channel] = table[channel].index_select(0, index).view(count, height, width)
    return out
