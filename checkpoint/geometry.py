"""Model geometry: the vision encoder, the projector and the language model, with named presets.

The checkpoint generator writes these shapes and the loaders read them back from `config.json`;
both go through the dataclasses here so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

# InternVL's tokens added after Qwen3's vocabulary, at their real ids.
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
INTERNVL_ADDED_TOKENS: dict[str, int] = {
    IMG_START_TOKEN: 151669,
    IMG_END_TOKEN: 151670,
    IMG_CONTEXT_TOKEN: 151671,
    "<quad>": 151672,
    "</quad>": 151673,
    "<ref>": 151674,
    "</ref>": 151675,
    "<box>": 151676,
    "</box>": 151677,
}

# Pixel normalisation of every InternVL3.5 vision encoder (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionConfig:
    """InternViT: a pre-norm ViT with a CLS token, learned positions and layer scale."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    image_size: int = 448
    patch_size: int = 14
    layer_scale_init: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 1024 for 448 px / 14 px


@dataclass(frozen=True)
class LanguageConfig:
    """Qwen3 dense decoder geometry."""

    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    vocab_size: int = 151936
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960


@dataclass(frozen=True)
class ModelConfig:
    """A whole InternVL3.5 model: ViT, `mlp1` projector (pixel shuffle `downsample_ratio`) and LLM."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    downsample_ratio: float = 0.5
    select_layer: int = -1
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # InternVL3.5-Flash: the Visual Resolution Router (ViR) sends a tile as 64 tokens (pixel shuffle
    # 0.25 + `mlp2`) instead of 256 when its router probability p0 is above the image's own
    # `vir_relative_threshold` quantile and at least `vir_absolute_threshold`.
    flash: bool = False
    vir_relative_threshold: float = 0.5
    vir_absolute_threshold: float = 0.0

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.num_patches * self.downsample_ratio**2)  # 256 at ratio 0.5

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * int(1 / self.downsample_ratio) ** 2  # 4C

    @property
    def compressed_tokens_per_tile(self) -> int:
        return self.tokens_per_tile // 4  # 64: ViR's pixel shuffle at half the ratio

    @property
    def compressed_projector_input_size(self) -> int:
        return self.vision.hidden_size * int(1 / self.downsample_ratio) ** 4  # 16C, `mlp2`'s input

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


INTERNVIT_300M = VisionConfig()
INTERNVIT_6B = VisionConfig(  # InternViT-6B-448px-V2.5 as used by InternVL3.5-38B (45 layers kept)
    hidden_size=3200,
    num_layers=45,
    num_heads=25,
    intermediate_size=12800,
    norm_type="rms_norm",
    qkv_bias=False,
    qk_normalization=True,
)

PRESETS: dict[str, ModelConfig] = {
    # CPU-fast, real tile geometry (448 px, patch 14, 1024 patches, 256 tokens per tile); head_dim 32
    # because vLLM's CPU attention supports nothing smaller.
    "tiny": ModelConfig(
        vision=replace(INTERNVIT_300M, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        language=LanguageConfig(
            hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128
        ),
    ),
    "1b": ModelConfig(vision=INTERNVIT_300M, language=LanguageConfig()),  # Qwen3-0.6B
    "2b": ModelConfig(
        vision=INTERNVIT_300M,
        language=LanguageConfig(hidden_size=2048, intermediate_size=6144),  # Qwen3-1.7B
    ),
    "4b": ModelConfig(
        vision=INTERNVIT_300M,
        language=LanguageConfig(  # Qwen3-4B
            hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=9728
        ),
    ),
    "8b": ModelConfig(
        vision=INTERNVIT_300M,
        language=LanguageConfig(  # Qwen3-8B
            hidden_size=4096,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=12288,
            tie_word_embeddings=False,
        ),
    ),
    "38b": ModelConfig(
        vision=INTERNVIT_6B,
        language=LanguageConfig(  # Qwen3-32B
            hidden_size=5120,
            num_layers=64,
            num_heads=64,
            num_kv_heads=8,
            intermediate_size=25600,
            tie_word_embeddings=False,
        ),
    ),
}
