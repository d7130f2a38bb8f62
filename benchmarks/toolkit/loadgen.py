"""Sends a workload to an OpenAI-compatible server with the official `openai` client, timing each stream.

Arrivals follow `vllm bench serve`: gaps drawn from a gamma distribution (burstiness 1 = Poisson), scaled
so the last request is sent at `requests / rate`; `inf` sends everything at once; an optional
concurrency cap holds requests back client-side. A request counts as successful when at least one
chunk carrying `choices` arrived and the stream ended without an error. Against several replicas of one
server (coupled data-parallel serving), each request goes to the replica with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

import httpx
import numpy as np
import openai
from tqdm.asyncio import tqdm

from benchmarks.toolkit.metrics import RequestResult
from benchmarks.toolkit.workload import BenchRequest


@dataclass(frozen=True)
class LoadPoint:
    """One load level: a request rate (req/s, `inf` = all at once) and an optional concurrency cap."""

    request_rate: float = math.inf
    max_concurrency: int | None = None

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"rate {rate}" + (f", concurrency {self.max_concurrency}" if self.max_concurrency else "")


def arrival_times(count: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send offsets in seconds from the start of the run, as vLLM's benchmark computes them."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * count
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=count)
    offsets = np.cumsum(gaps)
    return list(offsets * (count / request_rate) / offsets[-1])


def _reason(exc: BaseException) -> str:
    """A short failure reason that groups alike failures (status and message, no request ids)."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"[:200]
    if isinstance(exc, openai.APIError):
        return f"{type(exc).__name__}: {exc.message}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


async def send(client: openai.AsyncOpenAI, model: str, request: BenchRequest, ignore_eos: bool,
               sampling: dict) -> RequestResult:
    """One streamed chat completion, timed chunk by chunk."""
    result = RequestResult()
    extra_body = {"ignore_eos": True} if ignore_eos else None
    result.start_time = last = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=request.messages(), max_completion_tokens=request.output_len, stream=True,
            stream_options={"include_usage": True}, extra_body=extra_body, **sampling)
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices:
                    if result.ttft == 0.0:
                        result.ttft = now - result.start_time
                    else:
                        result.itl.append(now - last)
                    last = now
                elif chunk.usage is not None:
                    result.output_tokens = chunk.usage.completion_tokens
                    result.prompt_tokens = chunk.usage.prompt_tokens
    except (openai.OpenAIError, httpx.HTTPError, OSError) as exc:
        result.error = _reason(exc)
        return result
    if result.ttft == 0.0:
        result.error = "no chunk with choices arrived"
    elif result.output_tokens == 0:
        result.error = "no usage in the stream (stream_options.include_usage ignored)"
    else:
        result.success = True
        result.latency = last - result.start_time
    return result


class Balancer:
    """Replicas of one server: each request goes to the one with the fewest requests in flight when it is
    sent; ties go to the replica after the last one chosen (round-robin among equals). One event loop, no
    locks: choosing and counting happen between awaits."""

    def __init__(self, clients: list[openai.AsyncOpenAI]):
        if not clients:
            raise ValueError("no replica to send to")
        self.clients = list(clients)
        self.outstanding = [0] * len(clients)
        self.sent = [0] * len(clients)  # requests sent to each replica, warm-up included
        self._after = len(clients) - 1  # the last replica chosen

    def choose(self) -> int:
        n = len(self.clients)
        return min(range(n), key=lambda i: (self.outstanding[i], (i - self._after - 1) % n))

    @contextlib.asynccontextmanager
    async def client(self):
        """The chosen replica's client, counted as busy inside the block."""
        i = self._after = self.choose()
        self.outstanding[i] += 1
        self.sent[i] += 1
        try:
            yield self.clients[i]
        finally:
            self.outstanding[i] -= 1

    async def send(self, model: str, request: BenchRequest, ignore_eos: bool, sampling: dict) -> RequestResult:
        async with self.client() as client:
            return await send(client, model, request, ignore_eos, sampling)


async def run_point(targets: openai.AsyncOpenAI | Balancer, model: str, requests: list[BenchRequest],
                    point: LoadPoint, burstiness: float, seed: int, ignore_eos: bool, sampling: dict,
                    progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every request at `point`'s load to `targets` (one server, or replicas balanced); returns the results
    (in workload order) and the run's duration."""
    balancer = targets if isinstance(targets, Balancer) else Balancer([targets])
    offsets = arrival_times(len(requests), point.request_rate, burstiness, np.random.default_rng(seed))
    limit = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc=point.label, disable=not progress, unit="req")

    async def one(request: BenchRequest, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with limit:
            result = await balancer.send(model, request, ignore_eos, sampling)
        bar.update(1)
        return result

    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    finally:
        bar.close()
    return list(results), time.perf_counter() - start
