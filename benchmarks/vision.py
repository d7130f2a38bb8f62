"""Vision server throughput: tiles/s against batch size and client concurrency, and the pipeline's overlap.

    python benchmarks/vision.py --preset tiny                       # CPU, tiny checkpoint geometry
    python benchmarks/vision.py --preset 1b --device cuda --dtype bfloat16 --peak-tflops 989

Three measurements, all on random weights of the preset's real geometry:
- batch sweep: the model alone (ViT + projector) at each batch size; tiles/s, achieved TFLOP/s and,
  with --peak-tflops, MFU; with --transformers, the same batches through transformers'
  InternVLModel.get_image_features for the ratio;
- concurrency sweep: N clients each encoding single images through `VisionEngine` (the scheduler
  batches across them); the speed-up of concurrency 16 over 1 is what cross-request batching buys;
- pipeline: the share of batch k's copy-back that ran while batch k+1 computed (engine trace; the
  first spans are kept in the result as a trace).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from benchmarks.toolkit.documents import print_and_write
from benchmarks.toolkit.encoder import build_model, covered_share, stage_spans, time_batches
from checkpoint.geometry import ModelConfig
from vision_server.engine import VisionEngine


def tile_flops(config: ModelConfig) -> float:
    """Multiply-adds x 2 of one tile through InternViT and `mlp1` (attention scores included)."""
    v, n = config.vision, config.vision.num_patches + 1
    c, i = v.hidden_size, v.intermediate_size
    per_layer = 2 * n * (3 * c * c + c * c + 2 * c * i) + 2 * 2 * n * n * c
    patch_embed = 2 * v.num_patches * 3 * v.patch_size**2 * c
    projector = 2 * config.tokens_per_tile * (config.projector_input_size + config.language.hidden_size) * (
        config.language.hidden_size)
    return v.num_layers * per_layer + patch_embed + projector


def transformers_encoder(config: ModelConfig, device, dtype):
    """transformers' InternVL vision tower + projector, random weights of the same geometry, for the ratio."""
    from language_server import torch_compat

    torch_compat.apply()  # before transformers imports torchvision
    import transformers

    v = config.vision
    hf_config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                           image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
                           norm_type=v.norm_type, layer_norm_eps=v.norm_eps, attention_bias=v.qkv_bias,
                           use_qk_norm=v.qk_normalization),
        text_config=dict(model_type="qwen3", hidden_size=config.language.hidden_size, vocab_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         intermediate_size=64),
        downsample_ratio=config.downsample_ratio, vision_feature_layer=-1,
    )
    hf = transformers.InternVLModel(hf_config).to(device, dtype).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.02)

    def run(pixels):
        with torch.inference_mode():
            return hf.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                         vision_feature_select_strategy="default").pooler_output

    return run


async def concurrency_run(engine: VisionEngine, pixels: torch.Tensor, clients: int, images_per_client: int) -> float:
    async def client(c: int):
        for i in range(images_per_client):
            await engine.encode(f"c{c}-{i}", 0, pixels)

    start = time.perf_counter()
    await asyncio.gather(*[client(c) for c in range(clients)])
    return clients * images_per_client * pixels.shape[0] / (time.perf_counter() - start)


def overlap_share(trace) -> float | None:
    """Share of copy-back time (batch k) that overlapped some compute span (batch k+1)."""
    return covered_share(stage_spans(trace, "copy"), stage_spans(trace, "compute"))


def batch_sweep(model, config: ModelConfig, device: torch.device, dtype: torch.dtype, batch_sizes: list[int],
                repeats: int, peak_tflops: float | None, reference=None) -> list[dict]:
    """The model alone at each batch size: tiles/s, TFLOP/s, MFU; and transformers' speed where given."""
    flops, rows = tile_flops(config), []
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, 448, 448, device=device, dtype=dtype)
        seconds = time_batches(model, pixels, device, repeats)
        row = {"batch_tiles": batch, "tiles_per_s": round(batch / seconds, 2),
               "tflops": round(batch * flops / seconds / 1e12, 3)}
        if peak_tflops:
            row["mfu"] = round(row["tflops"] / peak_tflops, 3)
        if reference is not None:
            ref_seconds = time_batches(reference, pixels, device, repeats)
            row["transformers_tiles_per_s"] = round(batch / ref_seconds, 2)
            row["speedup_vs_transformers"] = round(ref_seconds / seconds, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def concurrency_sweep(model, device: torch.device, dtype: torch.dtype, client_counts: list[int],
                      images_per_client: int) -> list[dict]:
    """N clients encoding one-tile images through one engine (batching helps most there), as the vision server
    gives it them: uint8 tiles on the host, normalised on the device."""
    pixels = torch.randint(0, 256, (1, 448, 448, 3), dtype=torch.uint8)
    rows = []
    for clients in client_counts:
        engine = VisionEngine(model, device=device, dtype=dtype, feature_dtype=torch.bfloat16, max_batch_tiles=32,
                              max_wait_s=0.002, trace_spans=10_000)
        try:
            asyncio.run(concurrency_run(engine, pixels, clients, 1))  # warm-up
            tiles_per_s = asyncio.run(concurrency_run(engine, pixels, clients, images_per_client))
            batches = stage_spans(engine.trace, "compute")
            rows.append({"clients": clients, "tiles_per_s": round(tiles_per_s, 2),
                         "mean_batch_tiles": round(clients * (images_per_client + 1) / max(1, len(batches)), 2),
                         "copy_overlapped_with_compute": overlap_share(list(engine.trace))})
        finally:
            engine.close()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def pipeline(model, device: torch.device, dtype: torch.dtype, images_per_client: int) -> dict:
    """Multi-tile images from 8 clients under a small batch budget keep batches queued back to back, so batch k's
    copy-back and scatter can run while batch k+1 computes."""
    engine = VisionEngine(model, device=device, dtype=dtype, feature_dtype=torch.bfloat16, max_batch_tiles=8,
                          max_wait_s=0.002, trace_spans=10_000)
    try:
        tiles_per_s = asyncio.run(concurrency_run(
            engine, torch.randint(0, 256, (3, 448, 448, 3), dtype=torch.uint8), 8, images_per_client))
        spans = list(engine.trace)
    finally:
        engine.close()
    return {"clients": 8, "tiles_per_image": 3, "max_batch_tiles": 8, "tiles_per_s": round(tiles_per_s, 2),
            "batches": len(stage_spans(spans, "compute")),
            "copy_overlapped_with_compute": round(overlap_share(spans) or 0.0, 3),
            "trace": [[stage, n, round(s, 5), round(e, 5)] for stage, n, s, e in spans[:40]]}


def main(
    preset: str = "tiny",
    device: str = "cpu",
    dtype: str = "float32",
    batch_sizes: str = "1,2,4,8,16,32",
    concurrency: str = "1,4,16",
    images_per_client: int = 4,
    repeats: int = 3,
    peak_tflops: Annotated[float | None, typer.Option(help="bf16 dense peak of the device, for MFU")] = None,
    transformers: Annotated[bool, typer.Option(help="Also time transformers' InternVL on the same batches")] = False,
    out: Path | None = None,
) -> None:
    config = ModelConfig.from_name(preset)
    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    model = build_model(config, torch_device, torch_dtype)
    reference = transformers_encoder(config, torch_device, torch_dtype) if transformers else None
    result = {
        "preset": preset, "device": torch.cuda.get_device_name() if torch_device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": dtype, "gflop_per_tile": round(tile_flops(config) / 1e9, 3),
        "batch_sweep": batch_sweep(model, config, torch_device, torch_dtype, [int(b) for b in batch_sizes.split(",")],
                                   repeats, peak_tflops, reference),
        "concurrency_sweep": concurrency_sweep(model, torch_device, torch_dtype,
                                               [int(c) for c in concurrency.split(",")], images_per_client),
        "torch": torch.__version__,
    }
    result["pipeline"] = pipeline(model, torch_device, torch_dtype, images_per_client)
    print(json.dumps({k: v for k, v in result["pipeline"].items() if k != "trace"}), flush=True)
    rates = {row["clients"]: row["tiles_per_s"] for row in result["concurrency_sweep"]}
    if 1 in rates and 16 in rates:
        result["batching_speedup_16_vs_1"] = round(rates[16] / rates[1], 2)
    result["config"] = dataclasses.asdict(config.vision)
    print_and_write(result, out)


if __name__ == "__main__":
    typer.run(main)
