"""InternVL3.5's vision side: InternViT, pixel shuffle and the `mlp1` projector into the LLM's hidden size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint.geometry import ModelConfig
from vision_server.intern_vit import InternViT
from vision_server.normalize import normalize
from vision_server.vir import CompressedProjector, Gating, RouterPooling


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """InternVL's v2 pixel shuffle: [tiles, w, h, C] -> [tiles, w*ratio, h*ratio, C/ratio^2]."""
    tiles, w, h, c = x.shape
    scale = round(1 / ratio)
    if scale * ratio != 1 or w % scale or h % scale:
        raise ValueError(f"cannot pixel-shuffle a {w}x{h} grid by ratio {ratio}")
    # Fold `scale` neighbouring rows into channels, transpose, fold neighbouring columns, transpose back.
    x = x.reshape(tiles, w, h // scale, c * scale)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(tiles, h // scale, w // scale, c * scale * scale)
    return x.permute(0, 2, 1, 3).contiguous()


class Projector(nn.Module):
    """`mlp1`: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)  # eps 1e-5, PyTorch's default, as in the reference
        self.fc1 = nn.Linear(in_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class VisionModel(nn.Module):
    """Pixel values [tiles, 3, 448, 448] to LLM-ready features [tiles, tokens_per_tile, H].

    The input may also be uint8 tiles [tiles, 448, 448, 3] (`vision_server.preprocess.preprocess_tiles`): they
    are normalised here, on the weights' device, in float32 exactly as the host would
    (`vision_server.normalize`), then cast to the weights' dtype. So the host ships a quarter of the bytes and
    none of the float work."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        layers = config.vision.num_layers
        # select_layer indexes hidden states [embeddings, block 1, ..., block N] as the reference does.
        self.num_layers = (
            config.select_layer if config.select_layer >= 0 else layers + 1 + config.select_layer
        )
        if not 1 <= self.num_layers <= layers:
            raise ValueError(f"select_layer {config.select_layer} is outside a {layers}-layer ViT")
        self.vit = InternViT(config.vision)
        self.projector = Projector(config.projector_input_size, config.language.hidden_size)
        if config.flash:  # ViR: router and the 64-token projector
            self.router_pooling = RouterPooling(config.vision.hidden_size)
            self.gating = Gating(config.vision.hidden_size)
            self.compressed_projector = CompressedProjector(
                config.compressed_projector_input_size, config.language.hidden_size
            )
        # Names of the checkpoint tensors this model was loaded from; set by `vision_server.loader`.
        self.checkpoint_tensors: tuple[str, ...] = ()
        self.weights_fingerprint = ""  # SHA-256 of the checkpoint tensors read (set by the loader)

    def _vit_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.vit.embed.proj.weight
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize(pixel_values.to(weight.device, non_blocking=True))
        x = self.vit(pixel_values.to(weight.device, weight.dtype), self.num_layers)
        # x: [tiles, 1025, C] -> drop CLS -> [tiles, 32, 32, C]
        side = self.config.vision.image_size // self.config.vision.patch_size
        return x[:, 1:].reshape(x.shape[0], side, side, -1)

    def _project(self, grid: torch.Tensor) -> torch.Tensor:
        # grid: [tiles, 32, 32, C] -> [tiles, 16, 16, 4C] -> [tiles, 256, 4C] -> [tiles, 256, H]
        return self.projector(pixel_shuffle(grid, self.config.downsample_ratio).flatten(1, 2))

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features [tiles, 256, H] of every tile, no routing."""
        return self._project(self._vit_grid(pixel_values))

    @torch.inference_mode()
    def forward_flash(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both projections and the router's p0 per tile: ([tiles, 256, H], [tiles, 64, H], [tiles])."""
        if not self.config.flash:
            raise ValueError("this checkpoint has no Visual Resolution Router (not a Flash checkpoint)")
        grid = self._vit_grid(pixel_values)
        p0 = self.gating(self.router_pooling(grid.flatten(1, 2)))[:, 0]
        # grid: [tiles, 32, 32, C] -> [tiles, 8, 8, 16C] -> [tiles, 64, 16C] -> [tiles, 64, H]
        compressed = self.compressed_projector(pixel_shuffle(grid, self.config.downsample_ratio / 2).flatten(1, 2))
        return self._project(grid), compressed, p0
