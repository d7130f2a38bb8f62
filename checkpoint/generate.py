"""Write random-weight InternVL3.5 checkpoints in the custom (GitHub) or the HF on-disk format.

Every tensor is drawn from its own generator, seeded by (seed, custom-format name), so both formats
hold the same weights for the same seed and each tensor can be made just before its shard is written.

    dvd checkpoint checkpoints/tiny-hf --preset tiny --format hf
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint.config_files import INITIALIZER_RANGE, custom_config, hf_config, hf_processor_files, token_ids
from checkpoint.formats import IMAGE_PLACEHOLDER, Format
from checkpoint.geometry import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    LanguageConfig,
    ModelConfig,
    internvl_added_tokens,
)
from checkpoint.tokenizer_families import FAMILIES, build_tokenizer, family_of

VIDEO_TOKEN = "<video>"  # the HF processor's video placeholder, added after InternVL's tokens


def video_token_id(architecture: str) -> int:
    return max(internvl_added_tokens(architecture).values()) + 1

# With tied embeddings a random model's residual stream stays close to the last token's own embedding, so
# greedy decoding repeats that token whatever the image. Small text embeddings (RMS 0.005) and a large
# projector output (features RMS ~0.12) let the image-dependent attention output decide the tokens instead.
EMBED_STD = 0.005
PROJECTOR_OUT_STD = 0.1
ROUTER_STD = 0.5
# A wide MoE router spreads its logits, so that the top-k experts are far apart from the rest for most tokens.
ROUTER_INIT_STD = 0.5
SINK_STD = 1.0  # sink logits of the order of attention scores, so that the sinks take a real share
# GPT-OSS clamps its experts' gate and up projections at `swiglu_limit` (7.0; vLLM's CPU kernel hard-codes it).
# Wide gate-up weights take a share of a random model's activations past it, so that the clamp is exercised.
GATE_UP_STD = 0.5
DOWN_STD = 0.002  # and narrow down projections keep the experts from drowning out the image features
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9

REMOTE_CODE = ("configuration_intern_vit.py", "configuration_internvl_chat.py")


@dataclass(frozen=True)
class TensorSpec:
    """One weight under its custom-format name: normal(0, std) when std > 0, else filled with `fill`."""

    name: str
    shape: tuple[int, ...]
    std: float = 0.0
    fill: float = 0.0


def _norm(name: str, size: int, layer_norm: bool = True) -> list[TensorSpec]:
    """A LayerNorm (weight and bias) or, with `layer_norm=False`, an RMSNorm (weight)."""
    bias = [TensorSpec(f"{name}.bias", (size,))] if layer_norm else []
    return [TensorSpec(f"{name}.weight", (size,), fill=1.0), *bias]


def _linear(name: str, n_out: int, n_in: int, bias: bool = True, std: float = INITIALIZER_RANGE) -> list[TensorSpec]:
    weight = TensorSpec(f"{name}.weight", (n_out, n_in), std)
    return [weight, TensorSpec(f"{name}.bias", (n_out,), INITIALIZER_RANGE)] if bias else [weight]


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All weights of the model, custom-format names, in checkpoint order."""
    H = cfg.language.hidden_size
    specs = vit_specs(cfg)
    specs += [  # mlp1 = LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H)
        *_norm("mlp1.0", cfg.projector_input_size),
        *_linear("mlp1.1", H, cfg.projector_input_size),
        *_linear("mlp1.3", H, H, std=PROJECTOR_OUT_STD),
    ]
    if cfg.flash:
        specs += vir_specs(cfg)
    return specs + llm_specs(cfg)


def vit_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """InternViT's weights: `vision_model.*`."""
    v = cfg.vision
    C = v.hidden_size
    specs = [
        TensorSpec("vision_model.embeddings.class_embedding", (1, 1, C), INITIALIZER_RANGE),
        TensorSpec(
            "vision_model.embeddings.patch_embedding.weight", (C, 3, v.patch_size, v.patch_size), INITIALIZER_RANGE
        ),
        TensorSpec("vision_model.embeddings.patch_embedding.bias", (C,), INITIALIZER_RANGE),
        TensorSpec("vision_model.embeddings.position_embedding", (1, v.num_patches + 1, C), INITIALIZER_RANGE),
    ]
    layer_norm = v.norm_type == "layer_norm"
    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}"
        specs += [
            TensorSpec(f"{p}.ls1", (C,), fill=v.layer_scale_init),
            TensorSpec(f"{p}.ls2", (C,), fill=v.layer_scale_init),
            *_norm(f"{p}.norm1", C, layer_norm),
            *_linear(f"{p}.attn.qkv", 3 * C, C, bias=v.qkv_bias),  # rows: q, k, v
        ]
        if v.qk_normalization:
            specs += _norm(f"{p}.attn.q_norm", C, False) + _norm(f"{p}.attn.k_norm", C, False)
        specs += [
            *_linear(f"{p}.attn.proj", C, C),
            *_norm(f"{p}.norm2", C, layer_norm),
            *_linear(f"{p}.mlp.fc1", v.intermediate_size, C),
            *_linear(f"{p}.mlp.fc2", C, v.intermediate_size),
        ]
    return specs


def llm_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The language model's weights: `language_model.*`, named as the family's published checkpoints name them."""
    t = cfg.language
    H = t.hidden_size
    specs = [TensorSpec("language_model.model.embed_tokens.weight", (t.vocab_size, H), EMBED_STD)]
    for i in range(t.num_layers):
        p = f"language_model.model.layers.{i}"
        specs += [*_norm(f"{p}.input_layernorm", H, False), *_attention_specs(t, f"{p}.self_attn")]
        specs += [*_norm(f"{p}.post_attention_layernorm", H, False), *_mlp_specs(t, f"{p}.mlp")]
    specs += _norm("language_model.model.norm", H, False)
    if not t.tie_word_embeddings:
        specs.append(TensorSpec("language_model.lm_head.weight", (t.vocab_size, H), INITIALIZER_RANGE))
    return specs


def _attention_specs(t: LanguageConfig, p: str) -> list[TensorSpec]:
    """Qwen3: no biases, RMSNorm on each head's q and k. GPT-OSS: biases and one learned sink logit per head."""
    q, kv, bias = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.attention_bias
    specs = [
        *_linear(f"{p}.q_proj", q, t.hidden_size, bias=bias),
        *_linear(f"{p}.k_proj", kv, t.hidden_size, bias=bias),
        *_linear(f"{p}.v_proj", kv, t.hidden_size, bias=bias),
        *_linear(f"{p}.o_proj", t.hidden_size, q, bias=bias),
    ]
    if t.qk_norm:
        specs += [*_norm(f"{p}.q_norm", t.head_dim, False), *_norm(f"{p}.k_norm", t.head_dim, False)]
    if t.attention_sinks:
        specs.append(TensorSpec(f"{p}.sinks", (t.num_heads,), SINK_STD))
    return specs


def _mlp_specs(t: LanguageConfig, p: str) -> list[TensorSpec]:
    H = t.hidden_size
    if t.experts is None:  # SwiGLU
        return [*_linear(f"{p}.gate_proj", t.intermediate_size, H, bias=False),
                *_linear(f"{p}.up_proj", t.intermediate_size, H, bias=False),
                *_linear(f"{p}.down_proj", H, t.intermediate_size, bias=False)]
    E, F = t.experts.num_experts, t.experts.intermediate_size  # F: one expert's width
    if t.architecture == "qwen3_moe":  # a router, then one SwiGLU per expert
        specs = _linear(f"{p}.gate", E, H, bias=False, std=ROUTER_INIT_STD)
        for e in range(E):
            specs += [*_linear(f"{p}.experts.{e}.gate_proj", F, H, bias=False),
                      *_linear(f"{p}.experts.{e}.up_proj", F, H, bias=False),
                      *_linear(f"{p}.experts.{e}.down_proj", H, F, bias=False)]
        return specs
    # GPT-OSS: a biased router; the experts stacked, gate and up interleaved in one [E, H, 2F] projection
    return [*_linear(f"{p}.router", E, H, std=ROUTER_INIT_STD),
            TensorSpec(f"{p}.experts.gate_up_proj", (E, H, 2 * F), GATE_UP_STD),
            TensorSpec(f"{p}.experts.gate_up_proj_bias", (E, 2 * F), INITIALIZER_RANGE),
            TensorSpec(f"{p}.experts.down_proj", (E, F, H), DOWN_STD),
            TensorSpec(f"{p}.experts.down_proj_bias", (E, H), INITIALIZER_RANGE)]


def vir_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """InternVL3.5-Flash's ViR weights under the reference names: `mlp2`, `pooling_before_gating`, `gating`."""
    C, H, C16 = cfg.vision.hidden_size, cfg.language.hidden_size, cfg.compressed_projector_input_size
    specs = [  # mlp2 = LayerNorm(16C) -> Linear(16C, 2H) -> GELU -> Linear(2H, 2H) -> GELU -> Linear(2H, H)
        *_norm("mlp2.0", C16),
        *_linear("mlp2.1", 2 * H, C16),
        *_linear("mlp2.4", 2 * H, 2 * H),
        *_linear("mlp2.7", H, 2 * H, std=PROJECTOR_OUT_STD),
        TensorSpec("pooling_before_gating.query_token", (1, C), INITIALIZER_RANGE),
    ]
    for i in range(1, 5):
        p = f"pooling_before_gating.attn{i}"
        specs += [
            TensorSpec(f"{p}.in_proj_weight", (3 * C, C), INITIALIZER_RANGE),
            TensorSpec(f"{p}.in_proj_bias", (3 * C,), INITIALIZER_RANGE),
            *_linear(f"{p}.out_proj", C, C),
            *_norm(f"pooling_before_gating.norm{i}", C),
        ]
    for i in range(1, 5):  # residual blocks: Linear(C, 4C) -> GELU -> Linear(4C, C) -> LayerNorm(C)
        specs += [*_linear(f"gating.block{i}.0", 4 * C, C), *_linear(f"gating.block{i}.3", C, 4 * C),
                  *_norm(f"gating.block{i}.5", C)]
    # A wide router head spreads p0 across tiles, so that a tiny random model routes some tiles each way.
    return specs + [*_norm("gating.gate.0", C), *_linear("gating.gate.1", 2, C, std=ROUTER_STD)]


def make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor for `spec`; depends only on (seed, spec), never on which other tensors were made."""
    if spec.std <= 0:
        return torch.full(spec.shape, spec.fill, dtype=dtype)
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return (torch.randn(spec.shape, generator=generator) * spec.std).to(dtype)


# Custom name prefix -> HF name prefix (transformers' InternVLForConditionalGeneration, as published).
_HF_PREFIXES = (
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        "vision_model.embeddings.patch_embedding.",
        "model.vision_tower.embeddings.patch_embeddings.projection.",
    ),
    ("mlp1.0.", "model.multi_modal_projector.layer_norm."),
    ("mlp1.1.", "model.multi_modal_projector.linear_1."),
    ("mlp1.3.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# Inside one ViT layer.
_HF_VIT_LAYER = (
    ("ls1", "lambda_1"),
    ("ls2", "lambda_2"),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("mlp.", "mlp."),
)


def hf_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The HF-format name(s) and tensor(s) for one custom-format tensor; the fused qkv splits into q/k/v."""
    if m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", name):
        layer, rest = m.groups()
        prefix = f"model.vision_tower.encoder.layer.{layer}."
        if rest.startswith("attn.qkv."):
            kind = rest.removeprefix("attn.qkv.")
            return [(f"{prefix}attention.{p}_proj.{kind}", x.clone()) for p, x in zip("qkv", tensor.chunk(3))]
        for old, new in _HF_VIT_LAYER:
            if rest.startswith(old):
                return [(prefix + new + rest.removeprefix(old), tensor)]
    for old, new in _HF_PREFIXES:
        if name.startswith(old):
            return [(new + name.removeprefix(old), tensor)]
    raise ValueError(f"no HF name for tensor {name!r}")


def plan_shards(
    specs: list[TensorSpec], bytes_per_element: int, max_shard_bytes: int
) -> list[list[TensorSpec]]:
    """Group consecutive tensors into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = bytes_per_element * torch.Size(spec.shape).numel()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _shards(cfg: ModelConfig, max_shard_bytes: int) -> list[tuple[str, list[TensorSpec]]]:
    """The shard files' names and the tensors each holds."""
    shards = plan_shards(tensor_specs(cfg), getattr(torch, cfg.dtype).itemsize, max_shard_bytes)
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards)]


def _named(specs: list[TensorSpec], fmt: Format, make) -> dict[str, torch.Tensor]:
    tensors = {}
    for spec in specs:
        tensor = make(spec)
        tensors.update(hf_tensors(spec.name, tensor) if fmt == "hf" else [(spec.name, tensor)])
    return tensors


def shard_index(cfg: ModelConfig, fmt: Format, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """`model.safetensors.index.json` of the checkpoint `write_weights` would write, computed without weights."""
    dtype = getattr(torch, cfg.dtype)
    weight_map, total_size = {}, 0
    for filename, specs in _shards(cfg, max_shard_bytes):
        for name, tensor in _named(specs, fmt, lambda s: torch.empty(s.shape, dtype=dtype, device="meta")).items():
            weight_map[name] = filename
            total_size += tensor.numel() * tensor.element_size()
    return {"metadata": {"total_size": total_size}, "weight_map": weight_map}


def write_weights(out_dir: Path, cfg: ModelConfig, fmt: Format, seed: int, max_shard_bytes: int) -> None:
    """Write safetensors shard by shard, making each shard's tensors only when it is written."""
    dtype = getattr(torch, cfg.dtype)
    shards = _shards(cfg, max_shard_bytes)
    for stale in out_dir.glob("model*.safetensors*"):  # an earlier write's shards would shadow this one's
        stale.unlink()
    for filename, specs in shards:
        save_file(_named(specs, fmt, lambda s: make_tensor(s, seed, dtype)), str(out_dir / filename),
                  metadata={"format": "pt"})
        (out_dir / filename).chmod(0o644)  # safetensors creates owner-only files; servers may run as others
    if len(shards) > 1:
        _write_json(out_dir / "model.safetensors.index.json", shard_index(cfg, fmt, max_shard_bytes))


def chat_template(fmt: Format, architecture: str = "qwen3") -> str:
    """The chat template of `architecture`'s InternVL3.5 release with `fmt`'s image placeholder filled in."""
    name = FAMILIES[family_of(architecture)].template
    template = (files("checkpoint") / "templates" / name).read_text()
    return template.replace("__IMAGE_PLACEHOLDER__", IMAGE_PLACEHOLDER[fmt])


def write_tokenizer(out_dir: Path, fmt: Format, architecture: str = "qwen3") -> None:
    """The language model's tokenizer plus InternVL's added tokens at their real ids, the chat template and the
    generation config."""
    extra = {VIDEO_TOKEN: video_token_id(architecture)} if fmt == "hf" else {}
    tokenizer, config = build_tokenizer(architecture, extra)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    template = chat_template(fmt, architecture)
    config["chat_template"] = template
    config["model_max_length"] = 40960
    if fmt == "hf":  # InternVLProcessor reads these named tokens from the tokenizer
        config["extra_special_tokens"] = {
            "start_image_token": IMG_START_TOKEN,
            "end_image_token": IMG_END_TOKEN,
            "context_image_token": IMG_CONTEXT_TOKEN,
            "video_token": VIDEO_TOKEN,
        }
    _write_json(out_dir / "tokenizer_config.json", config)
    (out_dir / "chat_template.jinja").write_text(template)
    family, ids = FAMILIES[family_of(architecture)], token_ids(architecture)
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids[family.bos or family.pad],
        "eos_token_id": [ids[token] for token in family.stop],
        "pad_token_id": ids[family.pad],
    })


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_checkpoint(
    out_dir: str | Path,
    preset: str | ModelConfig,
    fmt: Format,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dry_run: bool = False,
) -> Path:
    """Write a random-weight checkpoint of `preset` in format `fmt` ('hf' or 'custom') to `out_dir`.

    With `dry_run`, only its configs and the shard index (`model.safetensors.index.json`, even for one shard):
    the layout of a checkpoint too big to write, without a tokenizer or weights."""
    cfg = ModelConfig.from_name(preset) if isinstance(preset, str) else preset
    if fmt not in ("hf", "custom"):
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'hf' or 'custom'")
    if cfg.flash and fmt != "custom":
        raise ValueError("Flash (ViR) checkpoints are written in the custom format only, as published")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "custom":
        _write_json(out_dir / "config.json", custom_config(cfg))
        for name in REMOTE_CODE:
            shutil.copyfile(files("checkpoint") / "remote_code" / name, out_dir / name)
    else:
        _write_json(out_dir / "config.json", hf_config(cfg))
        for name, data in hf_processor_files(cfg).items():
            _write_json(out_dir / name, data)
    if dry_run:
        _write_json(out_dir / "model.safetensors.index.json", shard_index(cfg, fmt, max_shard_bytes))
        return out_dir
    write_tokenizer(out_dir, fmt, cfg.language.architecture)
    write_weights(out_dir, cfg, fmt, seed, max_shard_bytes)
    return out_dir
