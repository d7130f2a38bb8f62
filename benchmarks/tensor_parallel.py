"""Tensor parallelism through vLLM's engine arguments: time to ready and time per output token of a language
server of one rank and of two, each behind `dvd up` (vision server, language server, gateway).

    python -m benchmarks.tensor_parallel --model checkpoints/tiny --out benchmarks/results/tensor_parallel_cpu_tiny.json

Time to ready: from `dvd up`'s start until the gateway reports both servers up (the three start together; the
language engine is the slow one). Time per output token: streamed greedy completions with `ignore_eos`, (last
token's arrival - first's) / (tokens - 1), one after another, text only and with one image. On CPU each rank
gets a core of its own (`VLLM_CPU_OMP_THREADS_BIND`, "0|1" for two), and vLLM's engine queue stays on loopback
(`VLLM_HOST_IP`). The load average is recorded before and after each size: the machine may be shared.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Annotated

import openai
import typer

from benchmarks.toolkit.documents import command_line, print_and_write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.machine import load_average, machine, versions
from launcher import Servers, Stack, free_port


def _time_per_token(client: openai.OpenAI, model: str, content, max_tokens: int) -> tuple[float, float]:
    """(time to first token, mean time per output token after it), in seconds, of one streamed completion."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices:
            now = time.perf_counter()
            first = first or (now if chunk.choices[0].delta.content else None)
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"{tokens} tokens came back for {max_tokens}")
    return first - start, (last - first) / (tokens - 1)


def measure(model: str, ranks: int, requests: int, max_tokens: int, log_dir: Path | None) -> dict:
    cores = os.cpu_count() or 1
    env = {"VLLM_HOST_IP": "127.0.0.1"}
    engine_args: tuple[str, ...] = ()
    if ranks > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core % cores) for core in range(ranks))
        engine_args = ("--tensor-parallel-size", str(ranks))
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), engine_args=engine_args)
    load_before = load_average()
    started = time.perf_counter()
    with Servers({"dvd up": stack.up_command()}, log_dir=log_dir, env=env, stop_timeout_s=60).running(
            stack.ready(), timeout_s=900):
        ready_s = time.perf_counter() - started
        client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
        served = client.models.list().data[0].id
        contents = {"text": "Write a long story.",
                    "one_image": [{"type": "text", "text": "Describe the picture."},
                                  {"type": "image_url", "image_url": {"url": image_url(448, 448, 0)}}]}
        _time_per_token(client, served, contents["text"], 4)  # warm-up
        result = {}
        for name, content in contents.items():
            samples = [_time_per_token(client, served, content, max_tokens) for _ in range(requests)]
            result[name] = {"ttft_ms": [round(t * 1e3, 1) for t, _ in samples],
                            "tpot_ms": [round(t * 1e3, 2) for _, t in samples],
                            "median_tpot_ms": round(statistics.median(t for _, t in samples) * 1e3, 2),
                            "median_ttft_ms": round(statistics.median(t for t, _ in samples) * 1e3, 1)}
    return {"tensor_parallel_size": ranks, "engine_args": list(engine_args), "environment": env,
            "time_to_ready_s": round(ready_s, 1), **result, "load_average_before": load_before,
            "load_average_after": load_average()}


def main(
    model: Annotated[str, typer.Option(help="Checkpoint folder (the tiny one: dvd checkpoint --preset tiny)")],
    sizes: Annotated[str, typer.Option(help="Tensor-parallel sizes to measure, comma-separated")] = "1,2",
    requests: Annotated[int, typer.Option(help="Completions per size and content")] = 5,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per completion (ignore_eos)")] = 64,
    log_dir: Annotated[Path | None, typer.Option(help="Keep the servers' logs here")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the result JSON here")] = None,
) -> None:
    runs = []
    for ranks in (int(s) for s in sizes.split(",")):
        logs = log_dir / f"tp{ranks}" if log_dir else None
        if logs:
            logs.mkdir(parents=True, exist_ok=True)
        runs.append(measure(model, ranks, requests, max_tokens, logs))
    print_and_write({"benchmark": "tensor_parallel", "command": command_line(), "model": model, "requests": requests,
                     "max_tokens": max_tokens, "machine": machine(), "versions": versions(), "runs": runs}, out)


if __name__ == "__main__":
    typer.run(main)
