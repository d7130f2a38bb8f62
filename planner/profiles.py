"""Stage profiles: what one device costs per stage, measured (or, when labelled, derived), saved as JSON.

One file holds one device and model geometry: the vision server's tiles/s by batch size, the language
server's prefill and decode step times by batch size and context length, the transport's bandwidth and
latency, and, where it could be measured, the coupled baseline's own costs. The simulator reads only
this file, so a GPU profile drops in where a CPU one was.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from planner.engine import SchedulerConfig
from planner.files import load_model
from planner.roofline import Roofline


class Geometry(BaseModel):
    """The model shape the costs belong to (a checkpoint preset or a published model)."""

    name: str
    vision_hidden_size: int = Field(gt=0)
    language_hidden_size: int = Field(gt=0)
    tokens_per_tile: int = Field(256, gt=0)
    compressed_tokens_per_tile: int = Field(64, gt=0)  # ViR's 64-token tiles


class VisionPoint(BaseModel):
    batch_tiles: int = Field(gt=0)
    tiles_per_s: float = Field(gt=0)


class VisionProfile(BaseModel):
    """One vision server on one device: model throughput by batch size plus per-image host work."""

    batch_sweep: list[VisionPoint] = Field(min_length=1)
    preprocess_s_per_tile: float = Field(0.0, ge=0)  # decode + tiling on the host, per tile
    preprocess_parallelism: int = Field(1, gt=0)  # images one server (or coupled API server) preprocesses at once
    preprocess_on_device: bool = False  # decode and tiling compete with the encoder (a vision server on CPU cores)
    overhead_s_per_request: float = Field(0.0, ge=0)  # gRPC, scheduling, send hand-off
    max_batch_tiles: int = Field(32, gt=0)
    max_batch_wait_s: float = Field(0.005, ge=0)

    @model_validator(mode="after")
    def _sorted_unique(self) -> VisionProfile:
        sizes = [p.batch_tiles for p in self.batch_sweep]
        if sizes != sorted(set(sizes)):
            raise ValueError(f"vision.batch_sweep batch sizes must be increasing and unique, got {sizes}")
        return self

    def batch_seconds(self, tiles: int) -> float:
        """Seconds to encode one batch of `tiles`, interpolating tiles/s between measured batch sizes."""
        return tiles / _interpolate([(p.batch_tiles, p.tiles_per_s) for p in self.batch_sweep], tiles)


class PrefillPoint(BaseModel):
    batch: int = Field(gt=0)
    context_tokens: int = Field(gt=0)
    seconds: float = Field(gt=0)  # features present -> first token of every request of the batch


class DecodePoint(BaseModel):
    batch: int = Field(gt=0)
    context_tokens: int = Field(gt=0)
    step_seconds: float = Field(gt=0)  # one decode step of the whole batch


class LanguageProfile(BaseModel):
    """One language server on one device."""

    prefill: list[PrefillPoint] = Field(min_length=1)
    decode: list[DecodePoint] = Field(min_length=1)
    max_num_seqs: int = Field(64, gt=0)
    max_batched_tokens: int | None = Field(None, gt=0)  # prompt tokens one step may prefill (None: no cap)
    overhead_s_per_request: float = Field(0.0, ge=0)  # gRPC + prompt rendering, outside the engine

    def prefill_seconds(self, prompt_tokens: list[int]) -> float:
        """Seconds of one engine step that prefills these prompts together.

        Cost per token is read at the batch's mean prompt length; batching prompts shares the fixed
        per-step cost, which the measured batch sizes carry.
        """
        if not prompt_tokens:
            return 0.0
        total = sum(prompt_tokens)
        mean = total / len(prompt_tokens)
        per_token = _interpolate_2d([(p.batch, p.context_tokens, p.seconds / (p.batch * p.context_tokens))
                                     for p in self.prefill], len(prompt_tokens), mean, grow=False)
        return per_token * total

    def decode_step_seconds(self, batch: int, mean_context: float) -> float:
        return _interpolate_2d([(p.batch, p.context_tokens, p.step_seconds) for p in self.decode], batch, mean_context,
                                grow=True)


class TransportProfile(BaseModel):
    """Feature transfer, vision server -> language server (one link per language server)."""

    backend: str = "tcp"
    bandwidth_gb_s: float = Field(gt=0)
    latency_s: float = Field(ge=0)
    source: str = ""  # where the figures came from

    def seconds(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / (self.bandwidth_gb_s * 1e9)


class CoupledProfile(BaseModel):
    """The coupled baseline (vision and language in one engine) where it could be measured.

    Absent, the simulator runs the coupled engine on the vision and language profiles with the encoder
    in the engine's step (that is how vLLM serves InternVL), and the report says the costs are derived.
    """

    vision_seconds_per_tile: float = Field(gt=0)  # the encoder inside the coupled engine's step
    preprocess_s_per_tile: float = Field(0.0, ge=0)  # image decode + processor in the API server, off the step
    preprocess_on_device: bool = False  # the API server shares the engine's device (a CPU replica on one core)
    preprocess_parallelism: int = Field(1, gt=0)  # vLLM's renderer processes images on one worker thread
    overhead_s_per_request: float = Field(0.0, ge=0)  # API server and scheduling, outside prefill
    source: str = ""


class FrontendCosts(BaseModel):
    """Host CPU work of one front-end process: vLLM's API server, DvD's gateway or a language server's front end.

    The process's threads share one core (Python's GIL hands it over every `slice_s`): its event loop parses
    requests, renders and tokenises them, and streams every output token; its multimodal work (image decoding and
    the HF processor) runs on one worker thread, first come first served (vLLM 0.32:
    `vllm/renderers/base.py`, `_mm_executor = ThreadPoolExecutor(max_workers=1)`).
    """

    # processes sharing the traffic (vLLM: `--api-server-count`); None: one per GPU, vLLM 0.32's default for a
    # data-parallel `vllm serve` (`vllm/entrypoints/cli/serve.py`; it was 1 before January 2026)
    processes: int | None = Field(None, gt=0)
    request_s: float = Field(0.0, ge=0)  # per request, on the event loop
    image_s: float = Field(0.0, ge=0)  # per image, on the multimodal worker
    tile_s: float = Field(0.0, ge=0)  # per encoder sequence (InternVL's processor works tile by tile)
    text_token_s: float = Field(0.0, ge=0)  # per prompt text token, on the multimodal worker when there are images
    # per image and prompt text token, on the multimodal worker: vLLM 0.12 looks for each image's placeholder by
    # scanning the prompt's tokens in Python (`vllm/multimodal/processing.py`: `_find_matches`,
    # `iter_token_matches`), so a long prompt makes every image dearer
    image_text_token_s: float = Field(0.0, ge=0)
    output_token_s: float = Field(0.0, ge=0)  # per streamed output token, on the event loop
    slice_s: float = Field(0.005, gt=0)  # `sys.getswitchinterval()`'s default
    source: str = ""


class StageProfiles(BaseModel):
    """Everything the planner knows about one device type and one model geometry."""

    schema_version: Literal[1] = 1
    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "CPU (x86_64, 2 threads)"
    geometry: Geometry
    provenance: Literal["measured", "derived"] = "measured"
    notes: str = ""
    measured_at: str = ""
    machine_load: str = ""  # `uptime` while measuring
    command: str = ""  # the one command that re-measures this file
    vision: VisionProfile
    language: LanguageProfile
    transport: TransportProfile
    coupled: CoupledProfile | None = None
    # How jobs share one device (a server's threads, or servers placed together): None, each runs whole in
    # turn; a number, round robin in slices of that many seconds, as Linux shares a CPU core among threads.
    timeslice_s: float | None = Field(None, gt=0)
    # Spread of repeated identical service times (standard deviation / mean), as measured; 0: noiseless.
    service_time_cv: float = Field(0.0, ge=0, le=2)
    # Derived profiles: step costs computed from what each step holds (`planner.roofline`), vLLM's scheduler
    # settings, and the host work of the front ends. Absent (measured CPU profiles): the tables above, and the
    # language profile's batch limits with chunked prefill off (as DvD runs vLLM on CPU).
    roofline: Roofline | None = None
    scheduler: SchedulerConfig | None = None
    api_server: FrontendCosts | None = None  # coupled vLLM's API server
    gateway: FrontendCosts | None = None  # DvD's gateway (processes None: one per language server)
    language_frontend: FrontendCosts | None = None  # a DvD language server's front end (gRPC Generate)

    def feature_bytes(self, tokens: int) -> int:
        return tokens * self.geometry.language_hidden_size * 2  # BF16 on the wire

    def engine_scheduler(self) -> SchedulerConfig:
        """vLLM's scheduler settings for the language engines."""
        if self.scheduler:
            return self.scheduler
        return SchedulerConfig(max_num_batched_tokens=self.language.max_batched_tokens or 1 << 30,
                               max_num_seqs=self.language.max_num_seqs, enable_chunked_prefill=False,
                               async_scheduling=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StageProfiles:
        return load_model(cls, path, "profile")


def _interpolate(points: list[tuple[float, float]], x: float, *, grow: bool = False) -> float:
    """Piecewise-linear y(x) through sorted points, flat below the first one.

    Beyond the last point y stays flat (a throughput: no speed-up is invented) or, with `grow`, follows
    the last segment's slope when it rises (a cost: a bigger batch or context never gets cheaper).
    """
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        if not grow or len(points) == 1:
            return points[-1][1]
        (x0, y0), (x1, y1) = points[-2], points[-1]
        return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x1)
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _interpolate_2d(points: list[tuple[float, float, float]], a: float, b: float, *, grow: bool) -> float:
    """z(a, b) on a grid that need not be full: interpolate in b within each measured a, then in a."""
    by_a: dict[float, list[tuple[float, float]]] = {}
    for pa, pb, z in points:
        by_a.setdefault(pa, []).append((pb, z))
    rows = [(pa, _interpolate(sorted(row), b, grow=grow)) for pa, row in sorted(by_a.items())]
    return _interpolate(rows, a, grow=grow)
