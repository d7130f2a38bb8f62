"""Checks for a lent GPU (driven by benchmarks/gpu_check.sh): the vision tower's CUDA equivalence and a
pipeline trace of the vision engine. `--device cpu` runs the same code on tiny sizes (a dry run).

    python -m benchmarks.gpu_check equivalence --device cuda --out benchmarks/results/gpu_check_<device>
    python -m benchmarks.gpu_check pipeline --device cuda --out benchmarks/results/gpu_check_<device>

equivalence: a generated checkpoint (checkpoint.generate.write_checkpoint, custom format) per vision geometry,
its LLM cut to one layer (the vision side never reads it). `1b`: InternViT-300M, all 24 layers; `38b`:
InternViT-6B's full width and op set (RMSNorm, qk-norm, no qkv bias) with 4 of its 45 layers, so the fp32
reference stays cheap. Inputs are uint8 tiles, as the vision server now gets them from the host. Checked:
- normalisation on the device is bit-equal to the host's (torch.equal); beside it, for information, whether
  the same arithmetic run elementwise on the device would be;
- fp32 on the device (TF32 off) against the fp32 reference on the CPU: relative L2 error < 1e-4;
- bf16 through `VisionEngine` (the server's path: uint8 tiles copied, normalised and encoded on the device)
  against the fp32 reference: relative L2 error < 0.05 (tests/test_vision_model.py's bf16 bound); the
  smallest per-token cosine similarity is reported beside it.

pipeline: 8 clients send multi-tile images to one `VisionEngine` while host threads make their uint8 tiles
(decoded JPEGs when Pillow is installed, else synthetic tiles); torch.profiler records host and device
activity. The summary says how busy the device was, how much of the host-to-device and device-to-host copy
time ran under a kernel (copies and kernels share one stream today, so only host work overlaps device work),
and how much host preprocessing ran while the device computed. The Chrome trace is saved gzipped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.toolkit.encoder import build_model, covered, merged, stage_spans, sync
from checkpoint.geometry import IMAGENET_MEAN, IMAGENET_STD, PRESETS, ModelConfig

L2_FP32 = 1e-4
L2_BF16 = 0.05


def geometry(name: str, device: str) -> ModelConfig:
    """The checkpoint geometry checked; on the CPU (dry run) the tiny preset stands in for both."""
    if device == "cpu":
        return PRESETS["tiny"]
    config = PRESETS[name]
    vision = config.vision if name != "38b" else dataclasses.replace(config.vision, num_layers=4)
    return dataclasses.replace(config, vision=vision, language=dataclasses.replace(config.language, num_layers=1))


def synthetic_tiles(n: int, seed: int) -> torch.Tensor:
    """uint8 tiles [n, 448, 448, 3] that look like photos (smooth fields plus grain), made without Pillow."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 7, 7, generator=g)
    smooth = F.interpolate(coarse, size=(448, 448), mode="bicubic", align_corners=False)
    grain = (torch.rand(n, 3, 448, 448, generator=g) - 0.5) * 0.05
    return ((smooth + grain).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def relative_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference).norm() / reference.norm()).item()


def min_cosine(x: torch.Tensor, reference: torch.Tensor) -> float:
    hidden = x.shape[-1]
    return F.cosine_similarity(x.float().reshape(-1, hidden), reference.reshape(-1, hidden), dim=-1).min().item()


def engine_features(model, tiles: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Features of `tiles` through the vision server's engine, in fp32 on the host."""
    from vision_server.engine import VisionEngine

    async def encode():
        engine = VisionEngine(model, device=device, dtype=dtype, feature_dtype=torch.float32)
        try:
            return await engine.encode("check", 0, tiles)
        finally:
            engine.close()

    return asyncio.run(encode()).features


def equivalence(device: torch.device, out: Path, tiles_per_check: int) -> dict:
    from checkpoint.generate import write_checkpoint
    from vision_server.loader import load_vision_model
    from vision_server.normalize import normalize

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tiles = synthetic_tiles(tiles_per_check, seed=1)
    host = normalize(tiles)
    on_device = tiles.to(device).permute(0, 3, 1, 2).contiguous().float().div_(255)  # the arithmetic, elementwise
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    result = {"normalize_bit_equal_on_device": torch.equal(normalize(tiles.to(device)).cpu(), host),
              # for information: why vision_server/normalize.py looks values up off the CPU
              "elementwise_arithmetic_bit_equal_on_device": torch.equal(on_device.sub_(mean).div_(std).cpu(), host),
              "tolerances": {"fp32_device_vs_cpu_relative_l2": L2_FP32, "bf16_vs_fp32_relative_l2": L2_BF16},
              "tiles": tiles_per_check, "geometries": {}}
    ok = result["normalize_bit_equal_on_device"]
    names = ["1b", "38b"] if device.type != "cpu" else ["tiny"]
    for name in names:
        config = geometry(name, device.type)
        folder = Path(tempfile.mkdtemp(prefix=f"dvd-{name}-"))
        try:
            start = time.perf_counter()
            write_checkpoint(folder, config, "custom", seed=0)
            written_s = time.perf_counter() - start
            reference = load_vision_model(folder)(host)  # fp32 on the CPU, float pixel values: the reference
            fp32 = load_vision_model(folder, device, torch.float32)(tiles.to(device)).cpu()
            bf16_model = load_vision_model(folder, device, torch.bfloat16)
            bf16 = engine_features(bf16_model, tiles, device, torch.bfloat16).reshape(reference.shape)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = {"vision_layers": config.vision.num_layers, "vision_hidden": config.vision.hidden_size,
               "checkpoint_write_s": round(written_s, 1),
               "fp32_device_vs_cpu_relative_l2": relative_l2(fp32, reference),
               "bf16_vs_fp32_relative_l2": relative_l2(bf16, reference),
               "bf16_vs_fp32_min_token_cosine": min_cosine(bf16, reference)}
        row["pass"] = (row["fp32_device_vs_cpu_relative_l2"] < L2_FP32 and row["bf16_vs_fp32_relative_l2"] < L2_BF16)
        ok = ok and row["pass"]
        result["geometries"][name] = row
        print(json.dumps({name: row}), flush=True)
    result["pass"] = bool(ok)
    (out / "equivalence.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _intervals(events, keep) -> list[tuple[float, float]]:
    """(start, end) in microseconds of the device events `keep` accepts (their time range is the device's)."""
    return sorted((e.time_range.start, e.time_range.end) for e in events if keep(e))


def _share(spans, cover) -> float:
    """The share of `spans`' time under `cover` (0 when `spans` hold no time)."""
    return covered(spans, cover) / max(1e-9, sum(e - s for s, e in spans))


def host_tiles(tiles_per_image: int):
    """How the clients' host threads make an image's uint8 tiles, and its description: JPEG decode, resize and
    tiling when Pillow is installed, else synthetic tiles."""
    try:
        from benchmarks.toolkit.images import smooth_photo
        from vision_server.preprocess import preprocess_tiles
    except ImportError:
        return (lambda seed: synthetic_tiles(tiles_per_image, seed)), "synthetic uint8 tiles (no Pillow)"
    photo = smooth_photo(448 * tiles_per_image, 448)  # a strip: exactly `tiles_per_image` tiles + thumbnail
    return (lambda seed: preprocess_tiles(photo, max_tiles=tiles_per_image)), "Pillow: JPEG decode + resize + tiling"


def traced_run(engine, make_tiles, clients: int, images_per_client: int, device: torch.device):
    """Clients encoding images whose tiles host threads make, once to warm up, then under torch.profiler: the
    wall time, the profiler, the engine's spans and the host threads' (start, end) spans."""
    from torch.profiler import ProfilerActivity, profile

    host_spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def preprocess_one(seed: int) -> torch.Tensor:
        start = time.perf_counter()
        tiles = make_tiles(seed)
        with lock:
            host_spans.append((start, time.perf_counter()))
        return tiles

    async def client(c: int):
        loop = asyncio.get_running_loop()
        for i in range(images_per_client):
            await engine.encode(f"c{c}-{i}", 0, await loop.run_in_executor(None, preprocess_one, c * 1000 + i))

    async def run():
        start = time.perf_counter()
        await asyncio.gather(*[client(c) for c in range(clients)])
        return time.perf_counter() - start

    asyncio.run(run())  # warm-up: allocator, kernels, pinned buffers
    engine.trace.clear()
    host_spans.clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_s = asyncio.run(run())
        sync(device)
    return wall_s, prof, list(engine.trace), host_spans


def device_summary(prof) -> dict:
    """How busy the device was, and how much of each copy direction ran under a kernel."""
    is_device = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    kernels = _intervals(is_device, lambda e: "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    h2d = _intervals(is_device, lambda e: "htod" in e.name.lower())
    d2h = _intervals(is_device, lambda e: "dtoh" in e.name.lower())
    summary = {}
    if not kernels:  # the profiler kept no device activity: say so rather than fail the whole check
        summary["device_events"] = "none captured"
        kernels = [(0.0, 0.0)]
    busy = sum(e - s for s, e in merged(kernels))
    start = min(s for s, _ in kernels + h2d + d2h)
    end = max(e for _, e in kernels + h2d + d2h)
    return summary | {
        "device_kernels": len(kernels),
        "device_kernel_busy_share": round(busy / max(1e-9, end - start), 3),
        "h2d_copy_ms": round(sum(e - s for s, e in h2d) / 1e3, 3),
        "d2h_copy_ms": round(sum(e - s for s, e in d2h) / 1e3, 3),
        "h2d_under_kernel_share": round(_share(h2d, kernels), 3),
        "d2h_under_kernel_share": round(_share(d2h, kernels), 3),
    }


def top_ops(prof, device: torch.device, count: int = 12) -> list[dict]:
    """The operators that took the most device time (CPU time on the CPU)."""
    def own_time(a) -> float:
        return a.self_device_time_total if device.type == "cuda" else a.self_cpu_time_total

    return [{"name": a.key, "count": a.count, "self_ms": round(own_time(a) / 1e3, 3)}
            for a in sorted(prof.key_averages(), key=lambda a: -own_time(a))[:count]]


def save_trace(prof, out: Path) -> str:
    """The Chrome trace, gzipped in `out`; returns its file name."""
    trace = out / "pipeline_trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as raw, gzip.open(str(trace) + ".gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    return trace.name + ".gz"


def pipeline(device: torch.device, out: Path, preset: str, clients: int, images_per_client: int,
             tiles_per_image: int, max_batch_tiles: int) -> dict:
    from vision_server.engine import VisionEngine

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(ModelConfig.from_name(preset), device, dtype)
    make_tiles, host_source = host_tiles(tiles_per_image)
    engine = VisionEngine(model, device=device, dtype=dtype, feature_dtype=torch.bfloat16,
                          max_batch_tiles=max_batch_tiles, max_wait_s=0.002, trace_spans=10_000)
    try:
        wall_s, prof, spans, host_spans = traced_run(engine, make_tiles, clients, images_per_client, device)
    finally:
        engine.close()
    tiles = clients * images_per_client * (tiles_per_image + (1 if tiles_per_image > 1 else 0))
    computes, copies = stage_spans(spans, "compute"), stage_spans(spans, "copy")
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "preset": preset, "dtype": str(dtype).replace("torch.", ""), "clients": clients,
               "images_per_client": images_per_client, "tiles": tiles, "max_batch_tiles": max_batch_tiles,
               "host_preprocessing": host_source, "wall_s": round(wall_s, 3),
               "tiles_per_s": round(tiles / wall_s, 1), "batches": len(computes),
               "host_preprocess_s": round(sum(e - s for s, e in host_spans), 3),
               "host_preprocess_under_engine_compute_share": round(_share(host_spans, computes), 3),
               "engine_copy_under_compute_share": round(_share(copies, computes), 3)}
    if device.type == "cuda":
        summary.update(device_summary(prof))
    summary["top_ops"] = top_ops(prof, device)
    summary["chrome_trace"] = save_trace(prof, out)
    summary["engine_spans"] = [[stage, n, round(s, 5), round(e, 5)] for stage, n, s, e in spans[:40]]
    (out / "pipeline.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("engine_spans", "top_ops")}), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["equivalence", "pipeline"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiles", type=int, default=2, help="equivalence: tiles per geometry")
    parser.add_argument("--preset", default="1b", help="pipeline: the model geometry")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images-per-client", type=int, default=4)
    parser.add_argument("--tiles-per-image", type=int, default=6)
    parser.add_argument("--max-batch-tiles", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.check == "equivalence":
        result = equivalence(device, args.out, args.tiles)
        raise SystemExit(0 if result["pass"] else 1)
    pipeline(device, args.out, args.preset, args.clients, args.images_per_client, args.tiles_per_image,
             args.max_batch_tiles)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
