"""Test images: uniform random pixels (what vLLM's `random-mm` sends: the worst case for codecs, and never the same
twice) and smooth photo-like JPEGs (that compress as photos do), as encoded bytes or data URLs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def encode(pixels: np.ndarray, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int | np.random.Generator, format: str = "PNG") -> bytes:
    """Uniform random pixels, encoded; `seed` may be a generator that goes on to draw the next image."""
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), format)


def smooth_photo(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photo: smooth colour fields and gentle grain, not white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(2, height // 256), max(2, width // 256), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    return encode(np.clip(field + grain, 0, 255).astype(np.uint8), "JPEG", quality=quality)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_url(width: int, height: int, seed: int, kind: str = "noise") -> str:
    """A chat request's image: `noise` (random pixels as PNG: about 1.2 MB at 896x448, the worst case for the
    gateway's base64 decoding and the gRPC hop) or `photo` (a smooth JPEG of tens of kB)."""
    if kind == "photo":
        return data_url(smooth_photo(width, height, seed), "image/jpeg")
    if kind != "noise":
        raise ValueError(f"image kind {kind!r}: noise or photo")
    return data_url(noise(width, height, seed), "image/png")
