"""Model geometry: the vision encoder, the projector and the language model, with named presets.

The checkpoint generator writes these shapes and the loaders read them back from `config.json`;
both go through the dataclasses here so the two never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
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

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.num_patches * self.downsample_ratio**2)  # 256 at ratio 0.5

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * int(1 / self.downsample_ratio) ** 2  # 4C

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


INTERNVIT_300M = VisionConfig()

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
}
