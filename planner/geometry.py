"""The shapes the planner's cost model needs, for any vision-language model, not only InternVL.

A model is a vision encoder (a ViT: its size, patch and merge), a rule that turns an image of a given
resolution into encoder sequences and language tokens (InternVL's dynamic 448 px tiles, or Qwen-VL's native
resolution with a 2x2 merge), and a language model (dense or MoE: layers, hidden size, heads, KV heads,
experts). The InternVL3.5 presets are read from `checkpoint.geometry`, the shapes the project's checkpoints
are written with; other models are given here (with their published config) or as a JSON file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from checkpoint.geometry import PRESETS as CHECKPOINT_PRESETS
from checkpoint.geometry import ModelConfig
from planner.files import load_model


class VisionEncoder(BaseModel):
    """A pre-norm ViT followed by a projector MLP into the language model's hidden size."""

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    values_per_patch: int = Field(gt=0)  # input features of the patch embedding: 3 x p x p (x 2 for Qwen's frames)
    class_tokens: int = Field(0, ge=0)  # InternViT's CLS token rides along in every layer
    merge: int = Field(2, gt=0)  # tokens out = patches / merge^2 (pixel shuffle 0.5, or Qwen's 2x2 merger)
    projector_hidden_size: int = Field(gt=0)  # the projector MLP's inner width
    projectors: int = Field(1, gt=0)  # Qwen3-VL: the merger and its DeepStack mergers, each on every token

    def flops(self, patches: int, out_hidden: int) -> tuple[float, float]:
        """(matrix-multiply, attention) FLOPs (2 x MACs) of one image sequence of `patches` patch tokens through
        the ViT and the projector(s); attention is full (bidirectional) over the sequence."""
        n, c = patches + self.class_tokens, self.hidden_size
        embed = 2 * patches * self.values_per_patch * c
        layers = self.num_layers * 2 * n * (4 * c * c + 2 * c * self.intermediate_size)
        tokens, merged = patches // self.merge ** 2, c * self.merge ** 2
        projector = 2 * tokens * (merged * self.projector_hidden_size + self.projector_hidden_size * out_hidden)
        return embed + layers + self.projectors * projector, self.num_layers * 4 * n * n * c

    def params(self, out_hidden: int) -> int:
        c, merged = self.hidden_size, self.hidden_size * self.merge ** 2
        layers = self.num_layers * (4 * c * c + 2 * c * self.intermediate_size)
        projector = merged * self.projector_hidden_size + self.projector_hidden_size * out_hidden
        return self.values_per_patch * c + layers + self.projectors * projector


class TiledImages(BaseModel):
    """InternVL: the image resized to the grid of 448 px tiles closest to its aspect ratio (at most `max_tiles`),
    plus a thumbnail tile when there is more than one; each tile is its own encoder sequence."""

    kind: Literal["tiles"] = "tiles"
    tile_px: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    tokens_per_tile: int = 256
    compressed_tokens_per_tile: int = 64  # InternVL3.5-Flash's ViR

    def tiles(self, width: int, height: int, max_tiles: int | None = None) -> int:
        from vision_server.preprocess import tile_grid

        cols, rows = tile_grid(width, height, self.min_tiles, max_tiles or self.max_tiles, self.tile_px)
        return cols * rows + (1 if self.thumbnail and cols * rows > 1 else 0)

    def sequences(self, width: int, height: int, patch_size: int) -> list[int]:
        return [(self.tile_px // patch_size) ** 2] * self.tiles(width, height)

    def max_tokens(self) -> int:
        return (self.max_tiles + (1 if self.thumbnail and self.max_tiles > 1 else 0)) * self.tokens_per_tile


class NativeImages(BaseModel):
    """Qwen2/2.5/3-VL: the image resized to multiples of patch x merge px, its pixel count kept between
    `min_pixels` and `max_pixels`; one encoder sequence per image, merge x merge patches per token
    (Qwen3-VL, patch 16: 640x640 -> 40x40 patches -> 400 tokens)."""

    kind: Literal["native"] = "native"
    patch_size: int = 16
    merge: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of patches after the resize rule of Qwen-VL's image processor (`smart_resize`)."""
        factor = self.patch_size * self.merge
        h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = (max(factor, math.floor(x / beta / factor) * factor) for x in (height, width))
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = (math.ceil(x * beta / factor) * factor for x in (height, width))
        return h // self.patch_size, w // self.patch_size

    def sequences(self, width: int, height: int, patch_size: int) -> list[int]:
        rows, cols = self.grid(width, height)
        return [rows * cols]

    def tokens(self, width: int, height: int) -> int:
        rows, cols = self.grid(width, height)
        return rows * cols // self.merge ** 2

    def max_tokens(self) -> int:
        return self.max_pixels // (self.patch_size * self.merge) ** 2


ImageRule = Annotated[TiledImages | NativeImages, Field(discriminator="kind")]


class LanguageModel(BaseModel):
    """A decoder (Qwen3, Qwen3-MoE, GPT-OSS): what each token costs and what the KV cache holds."""

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)  # dense MLP width (MoE: unused unless shared experts are given)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = True
    num_experts: int = Field(0, ge=0)  # 0: dense
    experts_per_token: int = Field(0, ge=0)
    expert_intermediate_size: int = Field(0, ge=0)

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attention_params(self) -> int:
        return self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size  # gate, up, down

    @property
    def mlp_params(self) -> int:
        """Weights of one layer's MLP: all experts of an MoE layer, or the dense MLP."""
        if self.moe:
            return self.num_experts * self.expert_params + self.hidden_size * self.num_experts  # + router
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def active_mlp_params(self) -> int:
        """MLP weights one token multiplies by."""
        if self.moe:
            return self.experts_per_token * self.expert_params + self.hidden_size * self.num_experts
        return self.mlp_params

    @property
    def head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def weight_params(self) -> int:
        """Every weight in memory: layers, the output head, and the embedding when it is not the head."""
        embedding = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * (self.attention_params + self.mlp_params) + self.head_params + embedding

    def active_params(self) -> int:
        """Weights one token multiplies by in the layers (the output head is counted per sequence)."""
        return self.num_layers * (self.attention_params + self.active_mlp_params)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts one layer reads for `tokens` tokens routed uniformly at random."""
        if not self.moe:
            return 0.0
        return self.num_experts * (1 - (1 - self.experts_per_token / self.num_experts) ** tokens)


class ModelGeometry(BaseModel):
    name: str
    vision: VisionEncoder
    images: ImageRule
    language: LanguageModel
    vision_dtype_bytes: int = 2
    source: str = ""

    def image_sequences(self, width: int, height: int) -> list[int]:
        """Patch tokens of each encoder sequence one image becomes."""
        return self.images.sequences(width, height, self.vision.patch_size)

    def image_tokens(self, width: int, height: int) -> int:
        """Language tokens of one image's features."""
        if isinstance(self.images, NativeImages):
            return self.images.tokens(width, height)
        return self.images.tiles(width, height) * self.images.tokens_per_tile

    def vision_params(self) -> int:
        return self.vision.params(self.language.hidden_size)

    @classmethod
    def load(cls, path: Path) -> ModelGeometry:
        return load_model(cls, path, "model geometry")


def from_checkpoint(name: str, config: ModelConfig) -> ModelGeometry:
    """An InternVL3.5 preset of `checkpoint.geometry`: InternViT with a CLS token and pixel shuffle 0.5, `mlp1`
    (4C -> H -> H), 448 px tiles of 256 tokens; MoE fields are read where the preset has them."""
    v, lang = config.vision, config.language
    merge = round(1 / config.downsample_ratio)
    moe = dict(num_experts=getattr(lang, "num_experts", 0) or 0,
               experts_per_token=getattr(lang, "num_experts_per_tok", 0) or getattr(lang, "experts_per_token", 0) or 0,
               expert_intermediate_size=getattr(lang, "moe_intermediate_size", 0) or 0)
    return ModelGeometry(
        name=f"internvl3.5-{name}",
        vision=VisionEncoder(hidden_size=v.hidden_size, num_layers=v.num_layers, num_heads=v.num_heads,
                             intermediate_size=v.intermediate_size, patch_size=v.patch_size,
                             values_per_patch=3 * v.patch_size ** 2, class_tokens=1, merge=merge,
                             projector_hidden_size=lang.hidden_size),
        images=TiledImages(tile_px=v.image_size, min_tiles=config.min_dynamic_patch,
                           max_tiles=config.max_dynamic_patch, thumbnail=config.use_thumbnail,
                           tokens_per_tile=config.tokens_per_tile,
                           compressed_tokens_per_tile=config.compressed_tokens_per_tile),
        language=LanguageModel(hidden_size=lang.hidden_size, num_layers=lang.num_layers, num_heads=lang.num_heads,
                               num_kv_heads=lang.num_kv_heads, head_dim=lang.head_dim,
                               intermediate_size=lang.intermediate_size, vocab_size=lang.vocab_size,
                               tie_word_embeddings=lang.tie_word_embeddings, **moe),
        source=f"checkpoint.geometry preset {name!r}",
    )


# Qwen3-VL-4B-Instruct as published (config.json and preprocessor_config.json on the Hugging Face hub): a
# 24-layer ViT (hidden 1024, MLP 4096, 16 heads, patch 16 over 2 frames, 2x2 merge, mergers 4096 -> 2560 plus
# three DeepStack mergers at layers 5, 11, 17) on Qwen3-4B; images at native resolution, 65,536 to 16,777,216 px.
QWEN3_VL_4B = ModelGeometry(
    name="qwen3-vl-4b",
    vision=VisionEncoder(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=16,
                         values_per_patch=3 * 2 * 16 * 16, merge=2, projector_hidden_size=4096, projectors=4),
    images=NativeImages(patch_size=16, merge=2, min_pixels=65536, max_pixels=16777216),
    language=LanguageModel(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                           intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True),
    source="Qwen/Qwen3-VL-4B-Instruct config.json and preprocessor_config.json (Hugging Face hub)",
)


def presets() -> dict[str, ModelGeometry]:
    """Every named geometry: the checkpoint presets (InternVL3.5) and Qwen3-VL-4B."""
    named = {name: from_checkpoint(name, config) for name, config in CHECKPOINT_PRESETS.items()}
    return named | {QWEN3_VL_4B.name: QWEN3_VL_4B}


def geometry(name: str) -> ModelGeometry:
    """A preset by name (`8b`, `38b`, `qwen3-vl-4b`, ...), or a JSON file of a `ModelGeometry`."""
    if name.endswith(".json"):
        return ModelGeometry.load(Path(name))
    known = presets()
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown model geometry {name!r}; choose one of {sorted(known)} "
                         "or give a JSON file") from None
