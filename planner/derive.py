"""A *derived* GPU profile: stage costs computed from a model's FLOPs and bytes and a device's data sheet.

For sizing before any GPU run exists. Every figure is a roofline with stated efficiencies, so the file
is marked `provenance: derived` and the report says so; a measured GPU profile replaces it as is.
Host-side costs (image decoding and tiling, per-request RPC) are copied from a measured profile.

- vision: one batch of b tiles takes `step_overhead + b * flop_per_tile / (peak * mfu)`;
- prefill: `2 * params * tokens` plus causal attention `2 * layers * ctx^2 * heads * head_dim`, at `mfu`;
- decode step: weights plus the batch's KV cache read once from HBM at `hbm_efficiency`, plus the step overhead;
- transport: the link's line rate and latency as given.
"""

from __future__ import annotations

from checkpoint.geometry import LanguageConfig, ModelConfig
from planner.profiles import (
    DecodePoint,
    Geometry,
    LanguageProfile,
    PrefillPoint,
    StageProfiles,
    TransportProfile,
    VisionPoint,
    VisionProfile,
)


def language_params(config: LanguageConfig) -> int:
    """Weights touched per token: attention and MLP of every layer plus the output head."""
    attention = config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_layers * (attention + mlp) + config.vocab_size * config.hidden_size


def vision_flop_per_tile(config: ModelConfig) -> float:
    """InternViT on one tile (1025 tokens) plus `mlp1`: 2 x multiply-adds, attention scores included."""
    v, n = config.vision, config.vision.num_patches + 1
    per_layer = 2 * n * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n * n * v.hidden_size
    projector = 2 * config.tokens_per_tile * (config.projector_input_size + config.language.hidden_size) * (
        config.language.hidden_size)
    return v.num_layers * per_layer + projector


def derive(preset: str, host: StageProfiles, *, device: str, peak_tflops: float, hbm_gb_s: float,
           mfu: float = 0.5, hbm_efficiency: float = 0.7, step_overhead_s: float = 0.003,
           link_gb_s: float = 25.0, link_latency_s: float = 2e-5, max_num_seqs: int = 256) -> StageProfiles:
    config = ModelConfig.from_name(preset)
    lang = config.language
    flops = peak_tflops * 1e12 * mfu
    tile = vision_flop_per_tile(config)
    sweep = [VisionPoint(batch_tiles=b, tiles_per_s=round(b / (step_overhead_s + b * tile / flops), 2))
             for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    params = language_params(lang)
    kv_bytes_per_token = 2 * lang.num_layers * lang.num_kv_heads * lang.head_dim * 2  # K and V, bf16

    def prefill_s(batch: int, ctx: int) -> float:
        attention = 2 * lang.num_layers * ctx * ctx * lang.num_heads * lang.head_dim
        return step_overhead_s + batch * (2 * params * ctx + attention) / flops

    def decode_s(batch: int, ctx: int) -> float:
        read = 2 * params + batch * ctx * kv_bytes_per_token
        return step_overhead_s + read / (hbm_gb_s * 1e9 * hbm_efficiency)

    contexts = (512, 2048, 8192, 16384)
    batches = (1, 8, 32, 128, 256)
    return StageProfiles(
        device=device,
        geometry=Geometry(name=preset, vision_hidden_size=config.vision.hidden_size,
                          language_hidden_size=lang.hidden_size, tokens_per_tile=config.tokens_per_tile,
                          compressed_tokens_per_tile=config.compressed_tokens_per_tile),
        provenance="derived",
        notes=(f"DERIVED, NOT MEASURED: roofline from FLOPs and bytes ({tile / 1e12:.2f} TFLOP per tile, "
               f"{params / 1e9:.2f} B language parameters per token), peak {peak_tflops:g} TFLOP/s at MFU {mfu:g}, "
               f"HBM {hbm_gb_s:g} GB/s at {hbm_efficiency:g}, {step_overhead_s * 1e3:g} ms per engine step, "
               f"link {link_gb_s:g} GB/s + {link_latency_s * 1e6:g} us; host costs from the '{host.device}' profile. "
               "Illustrative until replaced by a measured GPU profile."),
        command=f"dvd plan derive --preset {preset} --host-profile HOST.json --device '{device}' "
                f"--peak-tflops {peak_tflops:g} --hbm-gb-s {hbm_gb_s:g}",
        vision=VisionProfile(batch_sweep=sweep, preprocess_s_per_tile=host.vision.preprocess_s_per_tile,
                             overhead_s_per_request=host.vision.overhead_s_per_request, max_batch_tiles=64,
                             preprocess_parallelism=16),
        language=LanguageProfile(
            prefill=[PrefillPoint(batch=b, context_tokens=c, seconds=round(prefill_s(b, c), 6))
                     for b in (1, 8) for c in contexts],
            decode=[DecodePoint(batch=b, context_tokens=c, step_seconds=round(decode_s(b, c), 6))
                    for b in batches for c in contexts],
            max_num_seqs=max_num_seqs, max_batched_tokens=8192,
            overhead_s_per_request=host.language.overhead_s_per_request),
        transport=TransportProfile(backend="rdma", bandwidth_gb_s=link_gb_s, latency_s=link_latency_s,
                                   source="assumed line rate, not measured"),
    )
