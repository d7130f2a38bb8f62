"""The vision model (InternViT + projector) on random weights of a preset's geometry, timed on a device; and the
overlap of an engine trace's spans (copies under compute). What the vision benchmark, the GPU check and the
planner's vision profile measure."""

from __future__ import annotations

import statistics
import time

import torch

from checkpoint.geometry import ModelConfig
from vision_server.vision_model import VisionModel


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> VisionModel:
    torch.manual_seed(0)
    with torch.device(device):  # made on the device: InternViT-6B's 5.9 B parameters initialise in seconds there
        model = VisionModel(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device, dtype).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(fn, pixels: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of fn(pixels) over `repeats` runs, after one warm-up."""
    fn(pixels)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(pixels)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def merged(spans) -> list[list[float]]:
    """(start, end) spans merged where they overlap, in order."""
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def covered(spans, cover) -> float:
    """Time of `spans` that lies under the union of `cover`."""
    cover = merged(cover)
    return sum(max(0.0, min(e, ce) - max(s, cs)) for s, e in spans for cs, ce in cover)


def covered_share(spans, cover) -> float | None:
    """The share of `spans`' time under `cover` (None: no time in `spans`)."""
    total = sum(e - s for s, e in spans)
    return covered(spans, cover) / total if total else None


def stage_spans(trace, stage: str) -> list[tuple[float, float]]:
    """(start, end) of an engine trace's spans of one stage ("compute", "copy")."""
    return [(s, e) for name, _, s, e in trace if name == stage]
