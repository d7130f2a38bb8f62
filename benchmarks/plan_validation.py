"""Stage profiles of this machine, then the planner's predictions against measured runs, back to back.

    python -m benchmarks.plan_validation                  # profiles + validation (about 12 min on 2 quiet cores)
    python -m benchmarks.plan_validation --profile-only   # just benchmarks/results/profiles/<name>.json

Profiles come from the project's own parts: the vision model's batch sweep (benchmarks/vision.py), a
real vision server's per-image host costs (its EncodeTimings), a ZeroMQ loopback through
transport.tcp, and a real language server's Generate fed features over TCP from this process (no
vision): prefill by batch and context, decode step time by batch and context; and coupled `vllm serve`
fed pixels: the encoder's cost inside its step and its API server's image work. Validation then starts
each configuration as local processes (vision servers, language servers, a gateway; and coupled
`vllm serve`), drives it with `dvd bench` (closed loop: all requests queued, a concurrency cap), and
compares throughput and TTFT p50/p90 with the simulation of the same workload on the fresh profiles,
recording the cores each process kept busy during the run.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import grpc
import httpx
import numpy as np
import psutil
import torch
import typer

from benchmarks.loadgen import LoadPoint
from benchmarks.run import RunOptions, bench
from benchmarks.servers import coupled_command
from benchmarks.vision import build_model, time_batches
from benchmarks.workload import RequestBatches, synthetic
from checkpoint.generate import write_checkpoint
from checkpoint.geometry import ModelConfig
from language_server.engine import CPU_DEFAULTS
from launcher import Servers, free_port, http_ready
from planner.plan import run as predict
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
from planner.workload import Workload
from proto import dvd_pb2, dvd_pb2_grpc
from transport.frames import ImageFeatures
from transport.tcp import TcpFeatureReceiver, TcpFeatureSender
from vision_server.settings import VisionServerSettings

HOST = "127.0.0.1"
RESULTS = Path(__file__).parent / "results"
IMAGE_SIZE = (896, 448)  # a 2x1 grid + thumbnail = 3 tiles
IMAGE_TILES = 3
WARMUP = 4
INPUT_WORDS = 4  # random words of text beside the image(s)
# The vision server's defaults, but two preprocessing threads, stated: pinned to one core, the server's own
# default (the cores it may use) would be one.
VISION = VisionServerSettings(model="unused", preprocess_workers=2)
# Linux (EEVDF) gives a runnable thread a base slice of 0.75 ms x (1 + log2 cores) before another may run:
# 1.5 ms on 2 cores; the simulation shares a core among threads and processes in slices of this length.
TIMESLICE_S = 0.00075 * (1 + int(np.log2(os.cpu_count() or 1)))


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} cores)"


def png(seed: int) -> bytes:
    import io

    from PIL import Image

    width, height = IMAGE_SIZE
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dvd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvd.cli", *args]


# One core stands for one device: the vision server (one torch thread) on VISION_CORE, each language
# server (all its processes) on its own core. On this 2-core host only 1+1 gets a core per server; in
# the others two servers share a core, and the simulation is told which (`cores`). The gateway and the
# benchmark client are not pinned.
VISION_CORE = 1


def cores(vision: int, language: int) -> list[int]:
    """The core each server of a V+L configuration is pinned to, vision servers first."""
    count = os.cpu_count() or 1
    return [(VISION_CORE + i) % count for i in range(vision)] + [i % count for i in range(language)]


def vision_command(*args: str, core: int = VISION_CORE) -> list[str]:
    return ["taskset", "-c", str(core), "env", "OMP_NUM_THREADS=1",
            f"DVD_VISION_PREPROCESS_WORKERS={VISION.preprocess_workers}", *dvd("vision-server", *args)]


def language_command(*args: str, core: int = 0) -> list[str]:
    """The whole language server on `core`: its front end and vLLM's engine-core process too, not only the
    worker that vLLM's CPU binding pins (the engine core alone keeps about half a core busy)."""
    return ["taskset", "-c", str(core), "env", f"VLLM_CPU_OMP_THREADS_BIND={core}", *dvd("language-server", *args)]


def answers_health(address: str, stub_class) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            return stub_class(channel).Health(dvd_pb2.HealthRequest(), timeout=2).ready
    except grpc.RpcError:
        return False


def all_answer_health(servers: list[tuple[str, type]]):
    """Readiness of gRPC servers: every (address, stub class) answers Health as ready."""
    return lambda: all(answers_health(address, stub) for address, stub in servers)


# ---------------------------------------------------------------- profiles


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
    command = vision_command("--model", str(checkpoint), "--port", str(port))
    with Servers({"vision-profile": command}, log_dir=log_dir).running(
            all_answer_health([(f"{HOST}:{port}", dvd_pb2_grpc.VisionServiceStub)]), what="the vision server is up"):
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
                images = [dvd_pb2.ImageInput(data=png(i))]
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
    port, feature_port = free_port(), free_port()
    command = language_command("--model", str(checkpoint), "--port", str(port),
                               "--feature-bind", f"tcp://{HOST}:{feature_port}")
    ready = all_answer_health([(f"{HOST}:{port}", dvd_pb2_grpc.LanguageServiceStub)])
    with Servers({"language-profile": command}, log_dir=log_dir).running(ready, what="the language server is up"):
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


WORDS = "apple river stone cloud green house light music paper table water window".split()


def profile_coupled(checkpoint: Path, log_dir: Path, repeats: int = 8) -> CoupledProfile:
    """The coupled engine's own costs, from `vllm serve` fed pixels, one request at a time: requests with
    one image against text-only requests of the same prompt length. The difference in vLLM's own prefill
    time (scheduled -> first token, which holds the encoder) is the encoder in the step; the rest of the
    difference in latency is the API server's image work (decode, HF processor)."""
    with coupled_server(checkpoint, log_dir) as (url, _):
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

        def prefill_totals() -> tuple[float, float]:
            totals = {"_sum": 0.0, "_count": 0.0}
            for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
                name, _, value = line.partition(" ")
                for suffix in totals:
                    if name.split("{")[0] == f"vllm:request_prefill_time_seconds{suffix}":
                        totals[suffix] += float(value)
            return totals["_sum"], totals["_count"]

        def series(content, count: int) -> tuple[float, float, int]:
            """Median latency, mean engine prefill time and prompt tokens of `count` sequential requests."""
            sum0, count0 = prefill_totals()
            latencies, tokens = [], 0
            for i in range(count):
                body = {"model": model, "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "user", "content": content(i)}]}
                begin = time.perf_counter()
                reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
                reply.raise_for_status()
                latencies.append(time.perf_counter() - begin)
                tokens = reply.json()["usage"]["prompt_tokens"]
            sum1, count1 = prefill_totals()
            return statistics.median(latencies), (sum1 - sum0) / (count1 - count0), tokens

        def with_image(i: int) -> list[dict]:  # a fresh image and a fresh first word: no cache of any kind hits
            data = base64.b64encode(png(10_000 + i)).decode()
            return [{"type": "text", "text": f"{i} Describe the image."},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]

        def text(words: int, offset: int):
            return lambda i: f"{offset + i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))

        series(with_image, 2)  # warm-up
        image_latency, image_prefill, image_tokens = series(with_image, repeats)
        _, _, tokens = series(text(image_tokens, 500), 1)  # about a token a word: calibrate once
        words = image_tokens + image_tokens - tokens
        text_latency, text_prefill, text_tokens = series(text(words, 600), repeats)
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


# ---------------------------------------------------------------- validation


@dataclasses.dataclass
class Measured:
    throughput_rps: float
    ttft_p50_s: float
    ttft_p90_s: float
    errors: int
    cores_busy: dict[str, float] = dataclasses.field(default_factory=dict)  # process -> cores used during the run


def cpu_seconds(processes: dict) -> dict[str, float]:
    """CPU seconds used so far by each server's processes (vLLM's engine core and worker by name) and by this
    one, the benchmark client: which processes compete for the cores, and how much."""
    used = {"client": sum(psutil.Process().cpu_times()[:2])}
    for name, process in processes.items():
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(process.pid)
            for member in [parent, *parent.children(recursive=True)]:
                role = name if member is parent else f"{name}/{member.name().removeprefix('VLLM::')}"
                used[role] = used.get(role, 0.0) + sum(member.cpu_times()[:2])
    return used


def drive(base_url: str, requests: int, concurrency: int, max_tokens: int, images_per_request: int = 1,
          processes: dict | None = None, repeats: int = 1) -> list[Measured]:
    """`dvd bench`, `repeats` times: fresh synthetic requests (new images each time, so no cache hits), all
    queued at once under a concurrency cap (a closed loop); with `processes`, also the cores each of them
    (and the client) kept busy meanwhile."""
    return [_drive_once(base_url, requests, concurrency, max_tokens, images_per_request, processes or {}, seed)
            for seed in range(repeats)]


def _drive_once(base_url: str, requests: int, concurrency: int, max_tokens: int, images_per_request: int,
                processes: dict, seed: int) -> Measured:
    generated = synthetic(WARMUP + requests, [IMAGE_SIZE], images_per_request, INPUT_WORDS, max_tokens, seed=seed)
    workload = RequestBatches.fresh(generated, WARMUP, 1, {"source": "synthetic"})
    options = RunOptions(points=[LoadPoint(max_concurrency=concurrency)], ignore_eos=True,
                         sampling={"temperature": 0}, percentiles=[50.0, 90.0], progress=False)
    before, began = cpu_seconds(processes), time.perf_counter()
    point = asyncio.run(bench(base_url, workload, options))["points"][0]
    after, wall = cpu_seconds(processes), time.perf_counter() - began  # warm-up included: 4 of 64 requests
    cores = {role: round((after[role] - before.get(role, 0.0)) / wall, 2) for role in after}
    return Measured(point["request_throughput"], point["p50_ttft_ms"] / 1e3, point["p90_ttft_ms"] / 1e3,
                    point["failed"], cores)


def measure_dvd(checkpoint: Path, vision: int, language: int, log_dir: Path, **load_args) -> list[Measured]:
    servers, ready = {}, []
    vision_addresses, language_addresses = [], []
    placement = cores(vision, language)
    for i in range(vision):
        port = free_port()
        servers[f"vision-{i}"] = vision_command("--model", str(checkpoint), "--port", str(port), core=placement[i])
        vision_addresses.append(f"{HOST}:{port}")
        ready.append((vision_addresses[-1], dvd_pb2_grpc.VisionServiceStub))
    for i in range(language):
        port, feature_port = free_port(), free_port()
        servers[f"language-{i}"] = language_command("--model", str(checkpoint), "--port", str(port),
                                                    "--feature-bind", f"tcp://{HOST}:{feature_port}",
                                                    core=placement[vision + i])
        language_addresses.append(f"{HOST}:{port}")
        ready.append((language_addresses[-1], dvd_pb2_grpc.LanguageServiceStub))
    gateway_port = free_port()
    servers["gateway"] = dvd("gateway", "--port", str(gateway_port), "--served-model-name", "tiny",
                             *[arg for a in vision_addresses for arg in ("--vision-server", a)],
                             *[arg for a in language_addresses for arg in ("--language-server", a)])
    url = f"http://{HOST}:{gateway_port}"
    gateway_sees_all = {"vision_servers_up": vision, "language_servers_up": language}
    launched = Servers(servers, log_dir=log_dir)
    with launched.running(lambda: all_answer_health(ready)() and http_ready(url, health=gateway_sees_all)(),
                          what="every server answers Health and the gateway sees them all"):
        return drive(url, processes=launched.processes, **load_args)


@contextlib.contextmanager
def coupled_server(checkpoint: Path, log_dir: Path):
    """`vllm serve` of the HF-format checkpoint fed pixels (as `dvd bench compare` starts it), all of it on
    core 0 like one language server; yields its URL and processes once healthy."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = ["taskset", "-c", "0", "env", "VLLM_CPU_OMP_THREADS_BIND=0", *coupled_command(str(checkpoint), port)]
    launched = Servers({"coupled": command}, log_dir=log_dir,
                       env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    with launched.running(http_ready(url), what=f"vllm serve answers at {url}"):
        yield url, launched.processes


def measure_coupled(checkpoint: Path, log_dir: Path, **load_args) -> list[Measured]:
    """One coupled replica driven like the DvD configurations."""
    with coupled_server(checkpoint, log_dir) as (url, processes):
        return drive(url, processes=processes, **load_args)


FIGURES = ("throughput_rps", "ttft_p50_s", "ttft_p90_s")


def measured_figures(runs: list[Measured]) -> dict:
    """A configuration's measured runs: each run's figures, their means (compared with the prediction) and
    the cores each process kept busy, averaged."""
    each = [{key: round(getattr(run, key), 4) for key in FIGURES} | {"errors": run.errors} for run in runs]
    roles = {role for run in runs for role in run.cores_busy}
    return {"measured": {key: round(statistics.mean(r[key] for r in each), 4) for key in FIGURES}
            | {"errors": sum(r["errors"] for r in each)},
            "measured_runs": each,
            "cores_busy": {role: round(statistics.mean(run.cores_busy.get(role, 0.0) for run in runs), 2)
                           for role in sorted(roles)}}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["config"] for row in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, FIGURES, ("throughput (req/s)", "TTFT p50 (s)", "TTFT p90 (s)")):
        means = np.array([row["measured"][key] for row in rows])
        runs = [[run[key] for run in row.get("measured_runs", [row["measured"]])] for row in rows]
        spread = [means - [min(r) for r in runs], [max(r) for r in runs] - means]  # the runs' range
        ax.bar(x - 0.2, means, 0.4, yerr=spread, capsize=3, label="measured (mean, range of runs)")
        ax.bar(x + 0.2, [row["predicted"][key] for row in rows], 0.4, label="predicted")
        ax.set_xticks(x, labels, fontsize=8, rotation=20)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("Planner: predicted vs measured (CPU, tiny checkpoint)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


REPLICATIONS = 10  # simulated runs per configuration (seeds of the service-time spread), averaged


def add_prediction(row: dict, profiles: StageProfiles, requests: int, concurrency: int, max_tokens: int) -> None:
    """The simulation of `row`'s configuration and workload on `profiles` (the mean of REPLICATIONS runs with
    different seeds, as one measured run is one draw), and its error against the measurement."""
    servers, _, images = row["pair"].partition("x")
    vision, language = (int(n) for n in servers.split("+"))
    text_tokens = profiles.language.prefill[0].context_tokens - profiles.geometry.tokens_per_tile - 2
    runs = []
    for seed in range(REPLICATIONS):
        workload = Workload(name="validation", images_per_request=int(images or 1), tiles_per_image=IMAGE_TILES,
                            text_tokens=text_tokens, output_tokens=max_tokens, concurrency=concurrency,
                            requests=requests, ttft_slo_s=10, tpot_slo_s=1, gpus=max(2, vision + language), seed=seed)
        runs.append(predict(profiles, workload, vision, language, cores(vision, language) if vision else None))
    row["predicted"] = {key: round(statistics.mean(getattr(run, key) for run in runs), 4) for key in FIGURES}
    row["predicted"]["bottleneck"] = statistics.mode(run.bottleneck for run in runs)
    row["error_pct"] = {key: round(100 * (row["predicted"][key] - row["measured"][key]) / row["measured"][key], 1)
                        for key in FIGURES}


def repredict(name: str) -> None:
    """Recompute the predictions of a results file from its own profile file (after a change to the model)."""
    path = RESULTS / f"plan_validation_{name}.json"
    result = json.loads(path.read_text())
    profiles = StageProfiles.load(RESULTS.parent.parent / result["profiles"])
    w = result["workload"]
    for row in result["rows"]:
        if "measured" in row:
            add_prediction(row, profiles, w["requests"], w["concurrency"], w["max_tokens"])
            print(json.dumps(row), flush=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot([row for row in result["rows"] if "measured" in row], RESULTS / f"plan_validation_{name}.png")


def main(
    name: Annotated[str, typer.Option(help="Result name: profiles/<name>.json, plan_validation_<name>.*")] = "cpu_tiny",
    profile_only: bool = False,
    predict_only: Annotated[bool, typer.Option(
        help="Only recompute the predictions of an existing results file from its profile file")] = False,
    configs: Annotated[str, typer.Option(
        help="V+L[xK]: V vision and L language servers, K images per request (default 1); 0+1 is coupled vllm serve"
    )] = "1+1,1+1x2,0+1,1+2,2+1",
    requests: int = 60,
    concurrency: int = 8,
    max_tokens: int = 16,
    repeats: Annotated[int, typer.Option(help="Measured runs per configuration (fresh images each), averaged")] = 3,
) -> None:
    if predict_only:
        return repredict(name)
    log_dir = Path(tempfile.mkdtemp(prefix="plan-validation-"))
    root = Path(tempfile.mkdtemp(prefix="plan-checkpoints-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the generated checkpoints; server logs stay
    checkpoints = {fmt: write_checkpoint(root / fmt, "tiny", fmt, seed=0) for fmt in ("custom", "hf")}
    profile_path = RESULTS / "profiles" / f"{name}.json"
    print(f"profiling ({load()}); server logs in {log_dir}", flush=True)
    profiles = profile("tiny", profile_path, log_dir, checkpoints)
    print(f"wrote {profile_path}", flush=True)
    if profile_only:
        return
    rows = []
    load_args = {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "repeats": repeats}
    for pair in configs.split(","):
        servers, _, images = pair.partition("x")
        vision, language = (int(n) for n in servers.split("+"))
        load_args["images_per_request"] = int(images or 1)
        began = load()
        try:
            logs = log_dir / pair  # each configuration's server logs apart: names repeat across them
            logs.mkdir(exist_ok=True)
            runs = (measure_dvd(checkpoints["custom"], vision, language, logs, **load_args) if vision
                    else measure_coupled(checkpoints["hf"], logs, **load_args))
        except (RuntimeError, TimeoutError) as exc:
            print(f"{pair}: not measured: {exc}", flush=True)
            rows.append({"config": pair, "error": str(exc)})
            continue
        row = {"pair": pair, "config": (f"{vision}V+{language}L" if vision else f"coupled x{language}")
               + (f", {images} images" if images else ""), "load": f"start: {began}; end: {load()}",
               **measured_figures(runs)}
        add_prediction(row, profiles, requests, concurrency, max_tokens)
        print(json.dumps(row), flush=True)
        rows.append(row)
    measured_rows = [row for row in rows if "measured" in row]
    result = {"profiles": str(profile_path.relative_to(RESULTS.parent.parent)), "device": profiles.device,
              "workload": {"image": list(IMAGE_SIZE), "tiles_per_image": IMAGE_TILES, "requests": requests,
                           "concurrency": concurrency, "max_tokens": max_tokens, "repeats": repeats},
              "replications": REPLICATIONS,
              "command": "python -m benchmarks.plan_validation", "rows": rows,
              "cores": "a core per server where the host has one: vision servers pinned with one torch thread, "
                       "each language server (all its processes) and coupled vllm serve pinned with taskset; with "
                       "three servers on two cores (1+2, 2+1) two share a core, and the simulation places them on "
                       "one device; the gateway and the client are not pinned",
              "coupled_profile": "derived from the vision and language profiles" if profiles.coupled is None else
              "measured"}
    out = RESULTS / f"plan_validation_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if measured_rows:
        plot(measured_rows, RESULTS / f"plan_validation_{name}.png")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    typer.run(main)
