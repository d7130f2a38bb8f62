"""Recognise an InternVL3.5 checkpoint's on-disk format and read its geometry back into a `ModelConfig`.

Two formats exist: the GitHub/custom one (`InternVLChatModel`, `model_type: internvl_chat`, remote code)
and the transformers one (`InternVLForConditionalGeneration`, `model_type: internvl`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from checkpoint.geometry import ExpertsConfig, LanguageConfig, ModelConfig, VisionConfig, YarnRope

Format = Literal["hf", "custom"]

# The text vLLM 0.32.0 expects in a prompt where one image goes; it expands it to
# `<img>` + `<IMG_CONTEXT>` x tokens + `</img>` (internvl.py / interns1.py `get_placeholder_str`).
IMAGE_PLACEHOLDER: dict[str, str] = {"custom": "<image>", "hf": "<IMG_CONTEXT>"}
# InternVL3.5-Flash's Visual Resolution Router tensors (custom format): read by the vision server only.
VIR_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")

_MODEL_TYPES: dict[str, Format] = {"internvl_chat": "custom", "internvl": "hf"}
_ARCHITECTURES: dict[str, Format] = {"InternVLChatModel": "custom", "InternVLForConditionalGeneration": "hf"}


class CheckpointConfigError(ValueError):
    """A checkpoint's config files are missing, unreadable or not an InternVL3.5 model."""


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointConfigError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointConfigError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(d: dict, key: str, where: str):
    if key not in d:
        raise CheckpointConfigError(f"{where}: missing key {key!r}")
    return d[key]


def _format_of(config: dict, where: str) -> Format:
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    for arch in config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise CheckpointConfigError(
        f"{where}: not an InternVL checkpoint (model_type={model_type!r}, "
        f"architectures={config.get('architectures')!r}); expected model_type 'internvl_chat' or 'internvl'"
    )


def detect_format(path: str | Path) -> Format:
    """'custom' for the GitHub format (InternVLChatModel), 'hf' for transformers' InternVLForConditionalGeneration."""
    config_path = Path(path) / "config.json"
    return _format_of(_load_json(config_path), str(config_path))


def _scalar(value) -> int:
    # HF configs store image_size / patch_size as [h, w]; only square tiles exist.
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square size {value!r}")
        return int(value[0])
    return int(value)


LANGUAGE_MODEL_TYPES = ("qwen3", "qwen3_moe", "gpt_oss")


def _experts(text: dict, architecture: str, where: str) -> ExpertsConfig | None:
    if architecture == "qwen3":
        return None
    if architecture == "qwen3_moe":
        return ExpertsConfig(num_experts=_require(text, "num_experts", where),
                             experts_per_token=_require(text, "num_experts_per_tok", where),
                             intermediate_size=_require(text, "moe_intermediate_size", where),
                             normalize_top_k=text.get("norm_topk_prob", True))
    top_k = text.get("num_experts_per_tok") or _require(text, "experts_per_token", where)
    return ExpertsConfig(num_experts=_require(text, "num_local_experts", where), experts_per_token=top_k,  # GPT-OSS
                         intermediate_size=_require(text, "intermediate_size", where))


def _rope(text: dict) -> tuple[float, YarnRope | None]:
    """rope_theta and YaRN scaling, spelled as transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)
    writes them."""
    parameters = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or parameters
    theta = float(text.get("rope_theta") or parameters.get("rope_theta") or 1e6)
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return theta, None
    return theta, YarnRope(factor=float(scaling["factor"]),
                           original_max_position_embeddings=scaling["original_max_position_embeddings"],
                           beta_fast=float(scaling.get("beta_fast", 32.0)),
                           beta_slow=float(scaling.get("beta_slow", 1.0)),
                           truncate=scaling.get("truncate", True))


def _language_config(text: dict, where: str) -> LanguageConfig:
    architecture = text.get("model_type", "qwen3")
    if architecture not in LANGUAGE_MODEL_TYPES:
        raise CheckpointConfigError(f"{where}: language model type {architecture!r} is not one of InternVL3.5's "
                                    f"({', '.join(LANGUAGE_MODEL_TYPES)})")
    hidden_size = _require(text, "hidden_size", where)
    num_heads = _require(text, "num_attention_heads", where)
    rope_theta, rope_scaling = _rope(text)
    gpt_oss = architecture == "gpt_oss"
    return LanguageConfig(
        architecture=architecture,
        hidden_size=hidden_size,
        num_layers=_require(text, "num_hidden_layers", where),
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads", num_heads),
        head_dim=text.get("head_dim") or hidden_size // num_heads,
        intermediate_size=_require(text, "intermediate_size", where),
        experts=_experts(text, architecture, where),
        vocab_size=_require(text, "vocab_size", where),
        tie_word_embeddings=text.get("tie_word_embeddings", LanguageConfig.tie_word_embeddings),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=text.get("rms_norm_eps", LanguageConfig.rms_norm_eps),
        max_position_embeddings=text.get("max_position_embeddings", LanguageConfig.max_position_embeddings),
        sliding_window=text.get("sliding_window") if gpt_oss else None,
        swiglu_limit=text.get("swiglu_limit") if gpt_oss else None,
    )


def _dtype(config: dict) -> str:
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if dtype not in ("bfloat16", "float32"):
        raise CheckpointConfigError(f"unsupported dtype {dtype!r}; expected 'bfloat16' or 'float32'")
    return dtype


def _read_custom(config: dict, where: str) -> ModelConfig:
    vision = _require(config, "vision_config", where)
    text = _require(config, "llm_config", where)
    vwhere, twhere = f"{where} vision_config", f"{where} llm_config"
    vision_config = VisionConfig(
        hidden_size=_require(vision, "hidden_size", vwhere),
        num_layers=_require(vision, "num_hidden_layers", vwhere),
        num_heads=_require(vision, "num_attention_heads", vwhere),
        intermediate_size=_require(vision, "intermediate_size", vwhere),
        norm_type=vision.get("norm_type", "rms_norm"),
        norm_eps=vision.get("layer_norm_eps", 1e-6),
        qkv_bias=vision.get("qkv_bias", False),
        qk_normalization=vision.get("qk_normalization", False),
        image_size=_scalar(config.get("force_image_size") or _require(vision, "image_size", vwhere)),
        patch_size=_scalar(vision.get("patch_size", 14)),
        layer_scale_init=vision.get("initializer_factor", VisionConfig.layer_scale_init),
    )
    return ModelConfig(
        vision=vision_config,
        language=_language_config(text, twhere),
        downsample_ratio=config.get("downsample_ratio", 0.5),
        select_layer=config.get("select_layer", -1),
        max_dynamic_patch=config.get("max_dynamic_patch", ModelConfig.max_dynamic_patch),
        min_dynamic_patch=config.get("min_dynamic_patch", ModelConfig.min_dynamic_patch),
        use_thumbnail=config.get("use_thumbnail", ModelConfig.use_thumbnail),
        dtype=_dtype(config),
        flash=bool(config.get("flash_mode", False)),
        vir_relative_threshold=config.get("flash_relative_threshold", ModelConfig.vir_relative_threshold),
        vir_absolute_threshold=config.get("flash_absolute_threshold", ModelConfig.vir_absolute_threshold),
    )


def _read_hf(config: dict, where: str, preprocessor: dict) -> ModelConfig:
    vision = _require(config, "vision_config", where)
    text = _require(config, "text_config", where)
    vwhere, twhere = f"{where} vision_config", f"{where} text_config"
    vision_config = VisionConfig(
        hidden_size=_require(vision, "hidden_size", vwhere),
        num_layers=_require(vision, "num_hidden_layers", vwhere),
        num_heads=_require(vision, "num_attention_heads", vwhere),
        intermediate_size=_require(vision, "intermediate_size", vwhere),
        norm_type=vision.get("norm_type", "layer_norm"),
        norm_eps=vision.get("layer_norm_eps", 1e-6),
        qkv_bias=vision.get("attention_bias", False),
        qk_normalization=vision.get("use_qk_norm", False),
        image_size=_scalar(vision.get("image_size", 448)),
        patch_size=_scalar(vision.get("patch_size", 14)),
        layer_scale_init=vision.get("layer_scale_init_value", VisionConfig.layer_scale_init),
    )
    # Tied embeddings live at the top level of an HF config; the text config may repeat them.
    text = {"tie_word_embeddings": config.get("tie_word_embeddings", True), **text}
    select_layer = config.get("vision_feature_layer", -1)
    if not isinstance(select_layer, int):
        raise CheckpointConfigError(
            f"{where}: vision_feature_layer {select_layer!r} is not a single layer index"
        )
    return ModelConfig(
        vision=vision_config,
        language=_language_config(text, twhere),
        downsample_ratio=config.get("downsample_ratio", 0.5),
        select_layer=select_layer,
        # The tiling limits of the HF format live in preprocessor_config.json.
        max_dynamic_patch=preprocessor.get("max_patches", ModelConfig.max_dynamic_patch),
        min_dynamic_patch=preprocessor.get("min_patches", ModelConfig.min_dynamic_patch),
        use_thumbnail=True,
        dtype=_dtype(config),
    )


def read_model_config(path: str | Path) -> ModelConfig:
    """Parse either format's `config.json` (and, for HF, `preprocessor_config.json`) into a `ModelConfig`."""
    path = Path(path)
    config_path = path / "config.json"
    config = _load_json(config_path)
    where = str(config_path)
    try:
        if _format_of(config, where) == "custom":
            return _read_custom(config, where)
        preprocessor_path = path / "preprocessor_config.json"
        preprocessor = _load_json(preprocessor_path) if preprocessor_path.exists() else {}
        return _read_hf(config, where, preprocessor)
    except CheckpointConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointConfigError(f"{where}: malformed value ({e})") from None
