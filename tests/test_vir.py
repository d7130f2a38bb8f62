"""ViR (InternVL3.5-Flash): router and 64-token projector against a direct re-implementation of the
reference modules, and routing decided per image, whatever shares the batch."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from safetensors import safe_open
from torch import nn

from checkpoint.generate import write_checkpoint
from checkpoint.geometry import ModelConfig
from conftest import make_image, png_bytes
from vision_server.engine import VirParams, VisionEngine
from vision_server.loader import load_vision_model
from vision_server.preprocess import preprocess
from vision_server.vir import route


class ReferencePooling(nn.Module):
    """The published pooling_before_gating, written out with nn.MultiheadAttention."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_token = nn.Parameter(torch.empty(1, dim))
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.MultiheadAttention(dim, 16, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim))

    def forward(self, tokens):
        query = self.query_token.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        out = self.norm1(self.attn1(query, tokens, tokens)[0])
        for _ in range(3):  # the reference reuses attn2/norm2 for steps 2, 3 and 4
            out = self.norm2(self.attn2(out, tokens, tokens)[0])
        return out.squeeze(1)


def reference_block(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim),
                         nn.Dropout(0.1), nn.LayerNorm(dim))


class ReferenceGating(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"block{i}", reference_block(dim))
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))

    def forward(self, x):
        for i in range(1, 5):
            x = x + getattr(self, f"block{i}")(x)
        return torch.softmax(self.gate(x), dim=-1)


def reference_pixel_shuffle(x, scale_factor):
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def reference_route_single_image(p0: torch.Tensor, relative: float, absolute: float) -> list[bool]:
    """The reference rule applied to one image's tiles alone."""
    threshold = torch.quantile(p0.to(torch.float32), relative)
    return ((p0 > threshold) & (p0 >= absolute)).tolist()


@pytest.fixture(scope="module")
def flash_checkpoint(tmp_path_factory):
    config = dataclasses.replace(ModelConfig.from_name("tiny"), flash=True)
    return write_checkpoint(tmp_path_factory.mktemp("flash") / "tiny-flash", config, "custom", seed=0)


@pytest.fixture(scope="module")
def model(flash_checkpoint):
    return load_vision_model(flash_checkpoint)


@pytest.fixture(scope="module")
def reference(flash_checkpoint, model):
    C, H = model.config.vision.hidden_size, model.config.language.hidden_size
    C16 = model.config.compressed_projector_input_size
    modules = {
        "pooling_before_gating": ReferencePooling(C),
        "gating": ReferenceGating(C),
        "mlp2": nn.Sequential(nn.LayerNorm(C16), nn.Linear(C16, 2 * H), nn.GELU(), nn.Dropout(0.1),
                              nn.Linear(2 * H, 2 * H), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * H, H)),
    }
    with safe_open(flash_checkpoint / "model.safetensors", framework="pt") as f:
        for prefix, module in modules.items():
            state = {k[len(prefix) + 1:]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix + ".")}
            module.load_state_dict(state, strict=True)
            module.eval()
    return modules


IMAGES = [make_image(900, 300, seed=31), make_image(640, 640, seed=32), make_image(300, 700, seed=33)]


@pytest.mark.parametrize("image", range(len(IMAGES)))
def test_router_and_compressed_projector_match_the_reference(model, reference, image):
    pixels = preprocess(png_bytes(IMAGES[image]), max_tiles=12)
    full, compressed, p0 = model.forward_flash(pixels)
    with torch.inference_mode():
        grid = model._vit_grid(pixels)
        want_p0 = reference["gating"](reference["pooling_before_gating"](grid.flatten(1, 2)))[:, 0]
        shuffled = reference_pixel_shuffle(grid, 0.25)
        want_compressed = reference["mlp2"](shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))
    torch.testing.assert_close(p0, want_p0, rtol=0, atol=1e-5)
    torch.testing.assert_close(compressed, want_compressed, rtol=1e-5, atol=1e-5)
    assert full.shape[1] == 256 and compressed.shape[1] == 64
    for relative, absolute in [(0.5, 0.0), (0.25, 0.0), (0.0, 0.0), (0.5, float(want_p0.median()))]:
        assert route(p0, relative, absolute).tolist() == reference_route_single_image(want_p0, relative, absolute)


def test_some_tiles_are_compressed_and_some_are_not(model):
    pixels = preprocess(png_bytes(IMAGES[0]), max_tiles=12)
    _, _, p0 = model.forward_flash(pixels)
    decisions = route(p0, 0.5, 0.0).tolist()
    assert any(decisions) and not all(decisions)


def test_routing_is_per_image_whatever_shares_the_batch(model):
    """The same image gives the same tile routing and features alone and batched with others."""
    vir = VirParams(0.5, 0.0)
    pixels = [preprocess(png_bytes(image), max_tiles=12) for image in IMAGES]

    async def run(batch_wait_s: float, images: list[int]):
        engine = VisionEngine(model, device=torch.device("cpu"), dtype=torch.float32, feature_dtype=torch.float32,
                              max_batch_tiles=64, max_wait_s=batch_wait_s, trace_spans=100)
        try:
            results = await asyncio.gather(*[engine.encode(f"r{i}", 0, pixels[i], vir) for i in images])
            return results, [span for span in engine.trace if span[0] == "compute"]
        finally:
            engine.close()

    alone, alone_batches = asyncio.run(run(0.0, [0]))
    together, together_batches = asyncio.run(run(0.2, [0, 1, 2]))
    assert len(alone_batches) == 1 and len(together_batches) == 1  # all three images in one forward pass
    assert together[0].tile_tokens == alone[0].tile_tokens
    assert 64 in alone[0].tile_tokens and 256 in alone[0].tile_tokens
    torch.testing.assert_close(together[0].features, alone[0].features, rtol=1e-5, atol=1e-5)
    # Each image's tokens: 64 per compressed tile, 256 per other tile.
    for result, p in zip(together, pixels):
        assert len(result.tile_tokens) == p.shape[0]
        assert result.features.shape[0] == sum(result.tile_tokens)
