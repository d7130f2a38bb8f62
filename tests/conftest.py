"""Shared fixtures: tiny checkpoints of both formats, and real server stacks started once per module."""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from language_server import torchvision_compat  # noqa: F401  (before transformers / vLLM imports)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint (seed 0) in both formats: same weights, different layout."""
    from checkpoint.generate import write_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {fmt: write_checkpoint(root / f"tiny-{fmt}", "tiny", fmt, seed=0) for fmt in ("custom", "hf")}


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic, structured test picture (gradients + noise), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (seed + 1) * 7) % 256, (y * (seed + 2) * 5) % 256, ((x + y) * 3 + seed * 40) % 256], -1)
    noise = rng.integers(0, 60, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
