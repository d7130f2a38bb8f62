"""Multi-turn chats that resend their images on every turn, as OpenAI-style clients do.

Runs the same seeded conversations against several OpenAI-compatible servers and reports time to first
token per turn (turn 1 vs turns 2+) and, for DvD, how many images and tiles the vision server encoded.
With `--model` it starts each server itself, one after the other: DvD with its feature cache, DvD with
the gateway's feature cache off, and coupled `vllm serve` of the same checkpoint:

    python -m benchmarks.multiturn --model checkpoints/tiny --out benchmarks/results/multiturn_cpu_tiny.json

or runs against servers already up: `--target NAME=URL [--vision-metrics NAME=URL]` (repeatable).
Each target gets one warm-up conversation first.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import openai
import typer

from benchmarks.toolkit import prometheus, servers
from benchmarks.toolkit.documents import command_line, write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.machine import load_average, machine

VISION_COUNTERS = {"images": "dvd_vision_images_total", "tiles": "dvd_vision_tiles_total",
                   "dedup_images": "dvd_vision_dedup_images_total"}
QUESTIONS = ["Describe the pictures.", "What differs between them?", "Which one is brighter?",
             "Name three colours you see.", "Summarise our conversation.", "Anything else of note?"]


def vision_counters(url: str | None) -> dict[str, float]:
    if not url:
        return {}
    totals = prometheus.counters(url)
    return {name: totals.get(sample, 0.0) for name, sample in VISION_COUNTERS.items()}


async def conversation(client: openai.AsyncOpenAI, model: str, images: list[str], turns: int,
                       max_tokens: int) -> list[dict]:
    """One chat; every turn resends all images. Returns per-turn TTFT, latency and token counts."""
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    messages, results = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": QUESTIONS[turn % 6]}]})
        start = time.perf_counter()
        ttft, text, usage = None, [], None
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        end = time.perf_counter() - start
        messages.append({"role": "assistant", "content": "".join(text)})
        results.append({"turn": turn + 1, "ttft_s": ttft if ttft is not None else end, "latency_s": end,
                        "prompt_tokens": usage.prompt_tokens if usage else None,
                        "cached_tokens": getattr(usage.prompt_tokens_details, "cached_tokens", None)
                        if usage and usage.prompt_tokens_details else None})
    return results


def summary(values: list[float]) -> dict[str, float]:
    array = np.array(values) * 1e3
    return {"mean_ms": float(array.mean()), "p50_ms": float(np.percentile(array, 50)),
            "p90_ms": float(np.percentile(array, 90)), "count": len(values)}


async def run_target(url: str, metrics_url: str | None, conversations: list[list[str]], turns: int,
                     max_tokens: int, concurrency: int, warmup: list[str]) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await conversation(client, model, warmup, 2, max_tokens)
    before = vision_counters(metrics_url)
    limit = asyncio.Semaphore(concurrency)

    async def one(images):
        async with limit:
            return await conversation(client, model, images, turns, max_tokens)

    start = time.perf_counter()
    chats = await asyncio.gather(*(one(images) for images in conversations))
    elapsed = time.perf_counter() - start
    after = vision_counters(metrics_url)
    turns_flat = [t for chat in chats for t in chat]
    return {
        "url": url, "model": model, "elapsed_s": elapsed,
        "turn1_ttft": summary([t["ttft_s"] for t in turns_flat if t["turn"] == 1]),
        "later_ttft": summary([t["ttft_s"] for t in turns_flat if t["turn"] > 1]),
        "later_latency": summary([t["latency_s"] for t in turns_flat if t["turn"] > 1]),
        "cached_prompt_tokens": sum(t["cached_tokens"] or 0 for t in turns_flat),
        "prompt_tokens": sum(t["prompt_tokens"] or 0 for t in turns_flat),
        "vision": {name: after[name] - before[name] for name in after},
        "turns": chats,
    }


def started_targets(model: str, log_dir: Path):
    """(name, context manager yielding a running `benchmarks.toolkit.servers.Target`) for each server to start."""
    return [("dvd", lambda: servers.dvd(model, log_dir)),
            ("dvd-no-cache", lambda: servers.dvd(model, log_dir, env={"DVD_GATEWAY_FEATURE_CACHE": "false"})),
            ("coupled", lambda: servers.coupled(model, log_dir))]


def print_table(results: dict[str, dict]) -> None:
    print("| target | turn-1 TTFT p50 ms | turn-2+ TTFT p50 / p90 ms | images encoded | tiles encoded |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        vision = r["vision"]
        print(f"| {name} | {r['turn1_ttft']['p50_ms']:.0f} | {r['later_ttft']['p50_ms']:.0f} / "
              f"{r['later_ttft']['p90_ms']:.0f} | {vision.get('images', '-')} | {vision.get('tiles', '-')} |")


def main(
    model: Annotated[str | None, typer.Option(
        help="Checkpoint: start DvD, DvD without feature cache and coupled vllm serve, one after the other")] = None,
    target: Annotated[list[str] | None, typer.Option(
        help="NAME=URL of a running OpenAI-compatible server (repeatable)")] = None,
    vision_metrics: Annotated[list[str] | None, typer.Option(
        help="NAME=URL of the vision server's metrics page for target NAME (repeatable)")] = None,
    conversations: Annotated[int, typer.Option(help="Conversations per target")] = 6,
    turns: int = 4,
    images: Annotated[int, typer.Option(help="Images per conversation, resent on every turn")] = 2,
    width: int = 896,
    height: int = 448,
    max_tokens: int = 16,
    concurrency: Annotated[int, typer.Option(help="Conversations in progress at once")] = 2,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="JSON results file")] = None,
) -> None:
    chats = [[image_url(width, height, seed * 1000 + c * 10 + i) for i in range(images)]
             for c in range(conversations)]
    warmup = [image_url(width, height, seed * 1000 + 999)]

    def run(url: str, metrics_url: str | None) -> dict:
        return asyncio.run(run_target(url, metrics_url, chats, turns, max_tokens, concurrency, warmup))

    results = {}
    if model:
        with tempfile.TemporaryDirectory(prefix="multiturn-") as log_dir:
            for name, server in started_targets(model, Path(log_dir)):
                with server() as running:
                    results[name] = run(running.base_url, running.metrics_pages.get("vision"))
    metrics_pages = dict(item.split("=", 1) for item in vision_metrics or [])
    for name, url in (item.split("=", 1) for item in target or []):
        results[name] = run(url, metrics_pages.get(name))
    print_table(results)
    if out:
        record = {"command": command_line(), "machine": machine()["cpu"], "cpus": os.cpu_count(),
                  "load_average": load_average(),
                  "workload": {"conversations": conversations, "turns": turns, "images": images,
                               "width": width, "height": height, "max_tokens": max_tokens,
                               "concurrency": concurrency, "seed": seed},
                  "results": results}
        write(record, out)


if __name__ == "__main__":
    typer.run(main)
