"""Model geometry: the vision encoder, the projector and the language model, with named presets.

The checkpoint generator writes these shapes and the loaders read them back from `config.json`;
both go through the dataclasses here so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# InternVL's tokens, added after the language model's tokenizer in this order.
INTERNVL_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                   "</box>")
# Where they start: after Qwen3's vocabulary (151669, as published), or after GPT-OSS's o200k_harmony tokenizer,
# whose last token is <|endofprompt|> 200018 (InternVL's training code appends them to whatever tokenizer it loads).
FIRST_ADDED_TOKEN_ID: dict[str, int] = {"qwen3": 151669, "qwen3_moe": 151669, "gpt_oss": 200019}


def internvl_added_tokens(architecture: str = "qwen3") -> dict[str, int]:
    """InternVL's added tokens and their ids for a language model of `architecture`."""
    first = FIRST_ADDED_TOKEN_ID[architecture]
    return {token: first + i for i, token in enumerate(INTERNVL_TOKENS)}


INTERNVL_ADDED_TOKENS: dict[str, int] = internvl_added_tokens("qwen3")

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

    def num_parameters(self) -> int:
        C, norm = self.hidden_size, (2 if self.norm_type == "layer_norm" else 1) * self.hidden_size
        embeddings = C + C * (3 * self.patch_size**2 + 1) + (self.num_patches + 1) * C  # CLS, patch conv, positions
        layer = 2 * C + 2 * norm  # layer scales ls1 / ls2, norm1 / norm2
        layer += 3 * C * C + (3 * C if self.qkv_bias else 0) + (2 * C if self.qk_normalization else 0)
        layer += C * C + C + 2 * C * self.intermediate_size + self.intermediate_size + C  # proj, fc1, fc2
        return embeddings + self.num_layers * layer


Architecture = Literal["qwen3", "qwen3_moe", "gpt_oss"]  # the language model's `model_type`


@dataclass(frozen=True)
class ExpertsConfig:
    """A mixture-of-experts MLP: a router picks `experts_per_token` of `num_experts` experts per token (Qwen3-MoE
    and GPT-OSS have no shared expert)."""

    num_experts: int
    experts_per_token: int  # top-k
    intermediate_size: int  # of one expert
    normalize_top_k: bool = True  # Qwen3-MoE's `norm_topk_prob`; GPT-OSS always softmaxes over the top k


@dataclass(frozen=True)
class YarnRope:
    """GPT-OSS's YaRN rotary scaling (`rope_scaling` / `rope_parameters`)."""

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False


@dataclass(frozen=True)
class LanguageConfig:
    """The language model: Qwen3 (dense), Qwen3-MoE, or GPT-OSS (MoE with attention sinks, biases and a sliding
    window on every other layer)."""

    architecture: Architecture = "qwen3"
    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072  # the dense MLP's; Qwen3-MoE configs carry one too, unused by any layer
    experts: ExpertsConfig | None = None
    vocab_size: int = 151936
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rope_scaling: YarnRope | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    sliding_window: int | None = None  # GPT-OSS: on layers 0, 2, 4, ...; full attention on the others
    swiglu_limit: float | None = None  # GPT-OSS: the clamp of its experts' gate and up projections

    def __post_init__(self):
        if (self.architecture == "qwen3") != (self.experts is None):
            raise ValueError(f"a {self.architecture} language model {'has no' if self.experts is None else 'has'} "
                             "experts; qwen3 is dense, qwen3_moe and gpt_oss are mixtures of experts")

    @property
    def attention_sinks(self) -> bool:
        return self.architecture == "gpt_oss"

    @property
    def attention_bias(self) -> bool:
        return self.architecture == "gpt_oss"

    @property
    def qk_norm(self) -> bool:
        return self.architecture != "gpt_oss"

    def attention_parameters(self) -> int:
        """Weights (and biases) of one layer's attention, its norms included."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weights = 2 * self.hidden_size * q + 2 * self.hidden_size * kv
        if self.attention_bias:
            weights += q + 2 * kv + self.hidden_size  # q, k, v and o biases
        if self.attention_sinks:
            weights += self.num_heads
        if self.qk_norm:
            weights += 2 * self.head_dim
        return weights + 2 * self.hidden_size  # input and post-attention RMSNorms

    def mlp_parameters(self, active: bool = False) -> int:
        """One layer's MLP: all experts, or with `active` only the `experts_per_token` a token runs."""
        H = self.hidden_size
        if self.experts is None:
            return 3 * H * self.intermediate_size
        e = self.experts
        per_expert = 3 * H * e.intermediate_size
        router = e.num_experts * H
        if self.architecture == "gpt_oss":  # biases on the router and on every expert's projections
            per_expert += 2 * e.intermediate_size + H  # gate-up and down biases
            router += e.num_experts
        return router + (e.experts_per_token if active else e.num_experts) * per_expert

    def num_parameters(self, active: bool = False) -> int:
        """All weights of the language model (with `active`: those one token runs through)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        layer = self.attention_parameters() + self.mlp_parameters(active)
        return self.num_layers * layer + embeddings + self.hidden_size  # + the final norm


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

    def projector_parameters(self) -> int:
        """`mlp1`: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)."""
        C4, H = self.projector_input_size, self.language.hidden_size
        return 2 * C4 + C4 * H + H + H * H + H

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
TINY_VIT = replace(INTERNVIT_300M, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
INTERNVIT_6B = VisionConfig(  # InternViT-6B-448px-V2.5 as used by InternVL3.5-38B (45 layers kept)
    hidden_size=3200,
    num_layers=45,
    num_heads=25,
    intermediate_size=12800,
    norm_type="rms_norm",
    qkv_bias=False,
    qk_normalization=True,
)

INTERNVL_GPT_OSS_VOCAB = FIRST_ADDED_TOKEN_ID["gpt_oss"] + len(INTERNVL_TOKENS)
GPT_OSS_20B = LanguageConfig(
    architecture="gpt_oss",
    hidden_size=2880,
    num_layers=24,
    num_heads=64,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=2880,
    experts=ExpertsConfig(num_experts=32, experts_per_token=4, intermediate_size=2880),
    vocab_size=201088,
    tie_word_embeddings=False,
    rope_theta=150_000.0,
    rope_scaling=YarnRope(),
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    sliding_window=128,
    swiglu_limit=7.0,
)

# Where each number comes from: docs/models.md (the model card's sizes, and the public configs of the Qwen3,
# Qwen3-MoE and GPT-OSS language models each release starts from). InternVL3.5 unties the output head even where
# its Qwen3 base ties it: the card's LLM sizes (0.75B for 1B, 2.03B for 2B, 4.41B for 4B) count it twice.
PRESETS: dict[str, ModelConfig] = {
    # CPU-fast, real tile geometry (448 px, patch 14, 1024 patches, 256 tokens per tile); head_dim 32
    # because vLLM's CPU attention supports nothing smaller. One per language family.
    "tiny": ModelConfig(vision=TINY_VIT, language=LanguageConfig(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)),
    # Experts' sizes are multiples of 32, as vLLM's CPU MoE kernel needs; the expert width differs from the
    # hidden size so that a transposed expert weight cannot pass unnoticed.
    "tiny-moe": ModelConfig(vision=TINY_VIT, language=LanguageConfig(
        architecture="qwen3_moe", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=128, experts=ExpertsConfig(num_experts=8, experts_per_token=2, intermediate_size=96),
        tie_word_embeddings=False)),
    # Its vocabulary is padded to a multiple of 64 so that the HF format's <video> token (200028) has a row.
    "tiny-gpt-oss": ModelConfig(vision=TINY_VIT, language=replace(
        GPT_OSS_20B, vocab_size=200064, hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=96, experts=ExpertsConfig(num_experts=4, experts_per_token=2, intermediate_size=96))),
    "1b": ModelConfig(vision=INTERNVIT_300M, language=LanguageConfig(tie_word_embeddings=False)),  # Qwen3-0.6B
    "2b": ModelConfig(  # Qwen3-1.7B
        vision=INTERNVIT_300M,
        language=LanguageConfig(hidden_size=2048, intermediate_size=6144, tie_word_embeddings=False),
    ),
    "4b": ModelConfig(
        vision=INTERNVIT_300M,
        language=LanguageConfig(  # Qwen3-4B
            hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=9728,
            tie_word_embeddings=False,
        ),
    ),
    "8b": ModelConfig(
        vision=INTERNVIT_300M,
        language=LanguageConfig(  # Qwen3-8B
            hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=12288,
            tie_word_embeddings=False,
        ),
    ),
    "14b": ModelConfig(
        vision=INTERNVIT_300M,
        language=LanguageConfig(  # Qwen3-14B
            hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, intermediate_size=17408,
            tie_word_embeddings=False,
        ),
    ),
    "38b": ModelConfig(
        vision=INTERNVIT_6B,
        language=LanguageConfig(  # Qwen3-32B
            hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8, intermediate_size=25600,
            tie_word_embeddings=False,
        ),
    ),
    # gpt-oss-20b with its embeddings resized to the tokenizer plus InternVL's tokens (200028 rows), as InternVL's
    # training code resizes them: the card's 21.23B total holds for 200028 rows, not for gpt-oss's 201088 (21.24B).
    "20b-a4b": ModelConfig(vision=INTERNVIT_300M, language=replace(GPT_OSS_20B, vocab_size=INTERNVL_GPT_OSS_VOCAB)),
    "30b-a3b": ModelConfig(  # Qwen3-30B-A3B
        vision=INTERNVIT_300M,
        language=LanguageConfig(
            architecture="qwen3_moe", hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
            intermediate_size=6144, experts=ExpertsConfig(num_experts=128, experts_per_token=8, intermediate_size=768),
            tie_word_embeddings=False,
        ),
    ),
    "241b-a28b": ModelConfig(  # InternViT-6B + Qwen3-235B-A22B
        vision=INTERNVIT_6B,
        language=LanguageConfig(
            architecture="qwen3_moe", hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4,
            intermediate_size=12288,
            experts=ExpertsConfig(num_experts=128, experts_per_token=8, intermediate_size=1536),
            tie_word_embeddings=False,
        ),
    ),
}
