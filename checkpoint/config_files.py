"""The config files of both checkpoint formats: `config.json` (with the language model's family keys as published)
and the HF format's processor configs."""

from __future__ import annotations

from checkpoint.geometry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_CONTEXT_TOKEN,
    LanguageConfig,
    ModelConfig,
    internvl_added_tokens,
)
from checkpoint.tokenizer_families import FAMILIES, family_of

# Published InternVL3.5 configs carry a transformers 4.x version; without one, transformers 5 suspects a
# broken (Mistral) tokenizer regex and warns.
TRANSFORMERS_VERSION = "4.56.0"
INITIALIZER_RANGE = 0.02  # the published configs' `initializer_range`; the generator draws weights with it too
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def token_ids(architecture: str) -> dict[str, int]:
    """The ids of the family's named special tokens (bos, eos, pad, stop)."""
    if family_of(architecture) == "gpt_oss":
        from checkpoint.tokenizer_families import HARMONY_SPECIAL_TOKENS

        return dict(HARMONY_SPECIAL_TOKENS)
    return {"<|endoftext|>": 151643, "<|im_end|>": 151645}


def text_config(cfg: ModelConfig) -> dict:
    """The language model's config, with the keys its family's published `config.json` has."""
    t = cfg.language
    family = FAMILIES[family_of(t.architecture)]
    ids = token_ids(t.architecture)
    common = {
        "architectures": [ARCHITECTURES[t.architecture]],
        "model_type": t.architecture,
        "attention_bias": t.attention_bias,
        "attention_dropout": 0.0,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": cfg.dtype,
        "use_cache": True,
        "vocab_size": t.vocab_size,
        "eos_token_id": ids[family.eos],
    }
    if t.architecture == "gpt_oss":
        return {**common, "pad_token_id": ids[family.pad], **_gpt_oss_keys(t)}
    qwen3 = {
        **common,
        "bos_token_id": ids["<|endoftext|>"],
        "max_window_layers": t.num_layers,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
    }
    return qwen3 if t.architecture == "qwen3" else {**qwen3, **_qwen3_moe_keys(t)}


def _gpt_oss_keys(t: LanguageConfig) -> dict:
    """gpt-oss's own keys: experts, alternating sliding windows, YaRN, the clamped SwiGLU."""
    e, rope = t.experts, t.rope_scaling
    return {
        "experts_per_token": e.experts_per_token,
        "initial_context_length": rope.original_max_position_embeddings,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(t.num_layers)],
        "num_experts_per_tok": e.experts_per_token,
        "num_local_experts": e.num_experts,
        "output_router_logits": False,
        "rope_scaling": {"rope_type": "yarn", "factor": rope.factor, "beta_fast": rope.beta_fast,
                         "beta_slow": rope.beta_slow, "truncate": rope.truncate,
                         "original_max_position_embeddings": rope.original_max_position_embeddings},
        "router_aux_loss_coef": 0.9,
        "sliding_window": t.sliding_window,
        "swiglu_limit": t.swiglu_limit,
    }


def _qwen3_moe_keys(t: LanguageConfig) -> dict:
    """Qwen3-MoE's keys on top of Qwen3's: every layer sparse, top-k of `num_experts`."""
    e = t.experts
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": e.intermediate_size,
        "norm_topk_prob": e.normalize_top_k,
        "num_experts": e.num_experts,
        "num_experts_per_tok": e.experts_per_token,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def custom_config(cfg: ModelConfig) -> dict:
    """config.json of the GitHub format (InternVLChatModel, remote config code via auto_map)."""
    v = cfg.vision
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "model_type": "internvl_chat",
        "downsample_ratio": cfg.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": v.image_size,
        "llm_config": text_config(cfg),
        "max_dynamic_patch": cfg.max_dynamic_patch,
        "min_dynamic_patch": cfg.min_dynamic_patch,
        "ps_version": "v2",
        "select_layer": cfg.select_layer,
        "template": "internvl2_5",
        "torch_dtype": cfg.dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": cfg.use_thumbnail,
        **({"flash_mode": True, "flash_relative_threshold": cfg.vir_relative_threshold,
            "flash_absolute_threshold": cfg.vir_absolute_threshold} if cfg.flash else {}),
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": v.hidden_size,
            "image_size": v.image_size,
            "initializer_factor": v.layer_scale_init,
            "initializer_range": INITIALIZER_RANGE,
            "intermediate_size": v.intermediate_size,
            "layer_norm_eps": v.norm_eps,
            "norm_type": v.norm_type,
            "num_attention_heads": v.num_heads,
            "num_channels": 3,
            "num_hidden_layers": v.num_layers,
            "patch_size": v.patch_size,
            "qk_normalization": v.qk_normalization,
            "qkv_bias": v.qkv_bias,
            "torch_dtype": cfg.dtype,
        },
    }


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of the transformers format (InternVLForConditionalGeneration)."""
    v = cfg.vision
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": cfg.downsample_ratio,
        "image_seq_length": cfg.tokens_per_tile,
        "image_token_id": internvl_added_tokens(cfg.language.architecture)[IMG_CONTEXT_TOKEN],
        "projector_hidden_act": "gelu",
        "text_config": text_config(cfg),
        "tie_word_embeddings": cfg.language.tie_word_embeddings,
        "torch_dtype": cfg.dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "internvl_vision",
            "attention_bias": v.qkv_bias,
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "hidden_size": v.hidden_size,
            "image_size": [v.image_size, v.image_size],
            "initializer_range": INITIALIZER_RANGE,
            "intermediate_size": v.intermediate_size,
            "layer_norm_eps": v.norm_eps,
            "layer_scale_init_value": v.layer_scale_init,
            "norm_type": v.norm_type,
            "num_attention_heads": v.num_heads,
            "num_channels": 3,
            "num_hidden_layers": v.num_layers,
            "patch_size": [v.patch_size, v.patch_size],
            "projection_dropout": 0.0,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
            "use_qk_norm": v.qk_normalization,
        },
        "vision_feature_layer": cfg.select_layer,
        "vision_feature_select_strategy": "default",
    }


def hf_processor_files(cfg: ModelConfig) -> dict[str, dict]:
    """The processor configs transformers' InternVLProcessor (and vLLM on the HF format) loads."""
    size = {"height": cfg.vision.image_size, "width": cfg.vision.image_size}
    pixels = {  # what the image and the video processor share: RGB, bicubic to one tile, ImageNet statistics
        "processor_class": "InternVLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
        "size": size,
    }
    image = {"image_processor_type": "GotOcr2ImageProcessorFast", **pixels, "crop_to_patches": True,
             "max_patches": cfg.max_dynamic_patch, "min_patches": cfg.min_dynamic_patch}
    video = {"video_processor_type": "InternVLVideoProcessor", **pixels}
    return {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": {
            "image_seq_length": cfg.tokens_per_tile,
            "processor_class": "InternVLProcessor",
        },
    }
