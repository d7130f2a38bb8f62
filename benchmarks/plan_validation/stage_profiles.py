"""The planner's stage profiles of this machine (`planner.profiles.StageProfiles`), measured with the project's
own parts: see the package's docstring. `profile` measures all four stages and writes the profile file."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import grpc
import httpx
import numpy as np
import torch

from benchmarks.plan_validation import IMAGE_SIZE, IMAGE_TILES
from benchmarks.plan_validation.servers import (
    HOST,
    VISION,
    VISION_CORE,
    coupled,
    language_command,
    one_server,
    vision_command,
)
from benchmarks.toolkit.encoder import build_model, time_batches
from benchmarks.toolkit.images import data_url, noise
from benchmarks.toolkit.machine import load_average
from benchmarks.toolkit.prometheus import histogram_totals
from checkpoint.geometry import ModelConfig
from language_server.engine import CPU_DEFAULTS
from launcher import free_port
from planner.profiles import (
    CoupledProfile,
    DecodePoint,
    Geometry,
    LanguageProfile,
    PrefillPoint,
    StageProfiles,
    TransportProfile,
    VisionPoint,
    VisionProfile,
)
from proto import dvd_pb2, dvd_pb2_grpc
from transport.frames import ImageFeatures
from transport.tcp import TcpFeatureReceiver, TcpFeatureSender

# Linux (EEVDF) gives a runnable thread a base slice of 0.75 ms x (1 + log2 cores) before another may run:
# 1.5 ms on 2 cores; the simulation shares a core among threads and processes in slices of this length.
TIMESLICE_S = 0.00075 * (1 + int(np.log2(os.cpu_count() or 1)))
WORDS = "apple river stone cloud green house light music paper table water window".split()


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in load_average()) + f" ({os.cpu_count()} cores)"


def relative_spread(groups: list[list[float]]) -> float:
    """Standard deviation / mean of repeated identical measurements, pooled over groups of them."""
    ratios = [x / statistics.mean(group) for group in groups if len(group) > 1 for x in group]
    return statistics.pstdev(ratios) if ratios else 0.0


def profile_vision(config: ModelConfig, checkpoint: Path, log_dir: Path) -> tuple[VisionProfile, list[list[float]]]:
    """The vision profile, and its repeated identical measurements (for the spread of service times)."""
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {VISION_CORE})  # measured as the vision server runs: one thread on its core
    torch.set_num_threads(1)
    try:
        model = build_model(config, torch.device("cpu"), torch.float32)
        sweep = []
        for batch in (1, 2, 4, 8, 16, 32):
            seconds = time_batches(model, torch.randn(batch, 3, 448, 448), torch.device("cpu"), repeats=3)
            sweep.append(VisionPoint(batch_tiles=batch, tiles_per_s=round(batch / seconds, 3)))
        del model
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    # one pinned core: the server's preprocessing threads and the encoder take turns on it
    profile = VisionProfile(batch_sweep=sweep, preprocess_parallelism=VISION.preprocess_workers,
                            preprocess_on_device=True)
    # Host work per image, from a real vision server's own timings: decode + tiling, and what is left
    # of the client's latency after preprocessing and the model (gRPC, scheduling, sending).
    port = free_port()
    with one_server("vision-profile", vision_command(checkpoint, port), port, dvd_pb2_grpc.VisionServiceStub, log_dir):
        timings = asyncio.run(_encode_sequentially(port, 16))
    timings = timings[2:]  # warm-up
    preprocess = statistics.median(t["preprocess_s"] for t in timings)
    latency = statistics.median(t["latency_s"] for t in timings)
    model_s = profile.batch_seconds(IMAGE_TILES)
    profile.preprocess_s_per_tile = round(preprocess / IMAGE_TILES, 6)
    profile.overhead_s_per_request = round(max(0.0, latency - preprocess - model_s - profile.max_batch_wait_s), 6)
    return profile, [[t["latency_s"] for t in timings], [t["preprocess_s"] for t in timings]]


async def _encode_sequentially(port: int, count: int) -> list[dict]:
    received = []
    receiver = TcpFeatureReceiver(f"tcp://{HOST}:*", received.append, max_payload_bytes=1 << 28)
    task = asyncio.create_task(receiver.run())
    out = []
    try:
        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
            stub = dvd_pb2_grpc.VisionServiceStub(channel)
            for i in range(count):
                images = [dvd_pb2.ImageInput(data=noise(*IMAGE_SIZE, i))]
                begin = time.perf_counter()
                reply = await stub.Encode(dvd_pb2.EncodeRequest(request_id=uuid.uuid4().hex, images=images,
                                                                feature_endpoint=receiver.endpoint), timeout=60)
                out.append({"latency_s": time.perf_counter() - begin,
                            "preprocess_s": reply.timings.preprocess_ms / 1e3,
                            "tiles": reply.images[0].num_tiles})
    finally:  # an unclosed ZeroMQ socket would block the context's teardown
        task.cancel()
        receiver.close()
    return out


def profile_transport(hidden_size: int) -> TransportProfile:
    """ZeroMQ loopback through transport.tcp: one-way latency of one small message, GB/s of a stream."""

    async def run() -> tuple[float, float]:
        got: asyncio.Queue = asyncio.Queue()
        receiver = TcpFeatureReceiver(f"tcp://{HOST}:*", got.put_nowait, max_payload_bytes=1 << 30)
        sender = TcpFeatureSender()
        task = asyncio.create_task(receiver.run())
        try:
            small = ImageFeatures("x", 0, 1, [1], torch.zeros(1, hidden_size, dtype=torch.bfloat16))
            latencies = []
            for _ in range(50):
                await sender.send(receiver.endpoint, small)
                item = await asyncio.wait_for(got.get(), 10)
                latencies.append((item.received_unix_ns - item.sent_unix_ns) / 1e9)
            tokens = 16 * 1024 * 1024 // (2 * hidden_size)  # 16 MiB messages
            big = ImageFeatures("x", 0, 1, [tokens], torch.zeros(tokens, hidden_size, dtype=torch.bfloat16))
            count = 40
            begin = time.perf_counter()
            for _ in range(count):
                await sender.send(receiver.endpoint, big)
            for _ in range(count):
                await asyncio.wait_for(got.get(), 30)
            return statistics.median(latencies[5:]), count * big.num_bytes / (time.perf_counter() - begin) / 1e9
        finally:
            task.cancel()
            receiver.close()
            sender.close()

    latency, bandwidth = asyncio.run(run())
    return TransportProfile(backend="tcp", bandwidth_gb_s=round(bandwidth, 3), latency_s=round(latency, 6),
                            source="ZeroMQ loopback on this host through transport.tcp (one link, 16 MiB messages)")


def profile_language(checkpoint: Path, log_dir: Path) -> tuple[LanguageProfile, list[list[float]]]:
    """The language profile, and its repeated identical measurements (for the spread of service times)."""
    port = free_port()
    command = language_command(checkpoint, port, free_port())
    with one_server("language-profile", command, port, dvd_pb2_grpc.LanguageServiceStub, log_dir):
        return asyncio.run(_language_sweeps(port))


async def _generate(stub, sender: TcpFeatureSender, endpoint: str, hidden: int, tiles: int, max_tokens: int) -> dict:
    """One request whose one image's features are sent from here before Generate; server-side timings back."""
    rid = uuid.uuid4().hex
    features = torch.randn(tiles * 256, hidden).to(torch.bfloat16)
    await sender.send(endpoint, ImageFeatures(rid, 0, 1, [256] * tiles, features))
    message = dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(text="Describe the image."),
                                                         dvd_pb2.ContentPart(image=True)])
    sampling = dvd_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    begin = time.perf_counter()
    first = None
    timings = usage = None
    async for response in stub.Generate(dvd_pb2.GenerateRequest(request_id=rid, messages=[message], sampling=sampling,
                                                                image_count=1), timeout=120):
        if first is None and response.token_ids:
            first = time.perf_counter()
        if response.HasField("timings"):
            timings = response.timings
        if response.HasField("usage"):
            usage = response.usage
    return {"client_ttft_s": first - begin, "prefill_s": timings.prefill_ms / 1e3,
            "feature_wait_s": timings.feature_wait_ms / 1e3, "decode_s": timings.decode_ms / 1e3,
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


async def _language_sweeps(port: int) -> tuple[LanguageProfile, list[list[float]]]:
    sender = TcpFeatureSender()
    try:
        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
            stub = dvd_pb2_grpc.LanguageServiceStub(channel)
            description = await stub.Describe(dvd_pb2.DescribeRequest())
            endpoint, hidden = description.feature_endpoint, description.hidden_size

            async def batch_of(batch: int, tiles: int, max_tokens: int) -> list[dict]:
                return await asyncio.gather(*[_generate(stub, sender, endpoint, hidden, tiles, max_tokens)
                                              for _ in range(batch)])

            await batch_of(2, 1, 4)  # warm-up
            prefill, overheads, repeated = [], [], []
            for tiles in (1, 4, 12):
                for batch in (1, 4):
                    runs = [await batch_of(batch, tiles, 1) for _ in range(5)]
                    repeated.append([max(r["prefill_s"] for r in rs) for rs in runs])
                    seconds = statistics.median(repeated[-1])
                    prefill.append(PrefillPoint(batch=batch, context_tokens=runs[0][0]["prompt_tokens"],
                                                seconds=round(seconds, 6)))
                    if batch == 1:
                        overheads += [r["client_ttft_s"] - r["prefill_s"] - r["feature_wait_s"] for rs in runs
                                      for r in rs]
            decode = []
            for tiles in (1, 12):
                for batch in (1, 4, 16, 32):
                    results = await batch_of(batch, tiles, 24)
                    step = statistics.median(r["decode_s"] / (r["completion_tokens"] - 1) for r in results)
                    decode.append(DecodePoint(batch=batch, context_tokens=results[0]["prompt_tokens"] + 12,
                                              step_seconds=round(step, 6)))
    finally:
        sender.close()
    profile = LanguageProfile(prefill=prefill, decode=decode, max_num_seqs=CPU_DEFAULTS["max_num_seqs"],
                              max_batched_tokens=max(CPU_DEFAULTS["max_model_len"], 2048),  # whole prompts on CPU
                              overhead_s_per_request=round(max(0.0, statistics.median(overheads)), 6))
    return profile, repeated


def _engine_prefill(url: str) -> tuple[float, float]:
    """(sum, count) of vLLM's own prefill time (scheduled -> first token) so far."""
    return histogram_totals(f"{url}/metrics").get("vllm:request_prefill_time_seconds", (0.0, 0.0))


def _series(url: str, model: str, content, count: int) -> tuple[float, float, int]:
    """Median latency, mean engine prefill time and prompt tokens of `count` sequential requests, request i's
    user content `content(i)`."""
    sum0, count0 = _engine_prefill(url)
    latencies, tokens = [], 0
    for i in range(count):
        body = {"model": model, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": content(i)}]}
        begin = time.perf_counter()
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        reply.raise_for_status()
        latencies.append(time.perf_counter() - begin)
        tokens = reply.json()["usage"]["prompt_tokens"]
    sum1, count1 = _engine_prefill(url)
    return statistics.median(latencies), (sum1 - sum0) / (count1 - count0), tokens


def _with_image(i: int) -> list[dict]:
    """A fresh image and a fresh first word: no cache of any kind hits."""
    return [{"type": "text", "text": f"{i} Describe the image."},
            {"type": "image_url", "image_url": {"url": data_url(noise(*IMAGE_SIZE, 10_000 + i), "image/png")}}]


def _text(words: int, offset: int):
    return lambda i: f"{offset + i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


def profile_coupled(checkpoint: Path, log_dir: Path, repeats: int = 8) -> CoupledProfile:
    """The coupled engine's own costs, from `vllm serve` fed pixels, one request at a time: requests with
    one image against text-only requests of the same prompt length. The difference in vLLM's own prefill
    time (scheduled -> first token, which holds the encoder) is the encoder in the step; the rest of the
    difference in latency is the API server's image work (decode, HF processor)."""
    with coupled(checkpoint, log_dir) as target:
        url = target.base_url
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        _series(url, model, _with_image, 2)  # warm-up
        image_latency, image_prefill, image_tokens = _series(url, model, _with_image, repeats)
        _, _, tokens = _series(url, model, _text(image_tokens, 500), 1)  # about a token a word: calibrate once
        words = image_tokens + image_tokens - tokens
        text_latency, text_prefill, text_tokens = _series(url, model, _text(words, 600), repeats)
    overhead = text_latency - text_prefill  # API server, scheduling, the response
    text_prefill *= image_tokens / text_tokens  # prefill is about linear in prompt length at this size
    return CoupledProfile(
        vision_seconds_per_tile=round(max(1e-6, image_prefill - text_prefill) / IMAGE_TILES, 6),
        preprocess_s_per_tile=round(max(0.0, (image_latency - image_prefill) - overhead) / IMAGE_TILES, 6),
        overhead_s_per_request=round(max(0.0, overhead), 6),
        preprocess_on_device=True,  # the API server runs on the engine's core
        source=f"vllm serve of the HF checkpoint on core 0; {repeats} sequential requests with one "
               f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image ({image_tokens} prompt tokens) against text of "
               f"{text_tokens} tokens; engine prefill from vllm:request_prefill_time_seconds")


def profile(config_name: str, out: Path, log_dir: Path, checkpoints: dict[str, Path]) -> StageProfiles:
    config = ModelConfig.from_name(config_name)
    began = load()
    vision, vision_repeats = profile_vision(config, checkpoints["custom"], log_dir)
    transport = profile_transport(config.language.hidden_size)
    language, language_repeats = profile_language(checkpoints["custom"], log_dir)
    profiles = StageProfiles(
        device=f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared)",
        geometry=Geometry(name=config_name, vision_hidden_size=config.vision.hidden_size,
                          language_hidden_size=config.language.hidden_size, tokens_per_tile=config.tokens_per_tile,
                          compressed_tokens_per_tile=config.compressed_tokens_per_tile),
        provenance="measured", measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine_load=f"start: {began}; end: {load()}",
        command="python -m benchmarks.plan_validation --profile-only",
        notes="vision model fp32 on CPU; language model bf16 (vLLM CPU); features bf16 over ZeroMQ",
        vision=vision, language=language, transport=transport, coupled=profile_coupled(checkpoints["hf"], log_dir),
        timeslice_s=round(TIMESLICE_S, 6),
        service_time_cv=round(relative_spread(vision_repeats + language_repeats), 3))
    profiles.save(out)
    return profiles
