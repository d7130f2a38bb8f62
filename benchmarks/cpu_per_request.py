"""Host CPU seconds per request of each DvD server, and of coupled `vllm serve` given the same prompt length as text.

Starts a DvD stack (`servers.dvd`), sends sequential streamed chat completions with one fresh image each, and
reads every server's CPU time (user + system, its own process and its children: vLLM's engine core) before
and after; then does the same with coupled `vllm serve` (`servers.coupled`) and text-only requests whose prompt
is as many tokens as the DvD language server's prompt (the usage's `prompt_tokens`), so the two language
sides do the same engine work. Each server's idle CPU rate, measured without requests just before, times
the requests' duration, is taken off:

    python -m benchmarks.cpu_per_request --model checkpoints/tiny --requests 30 --out /tmp/cpu_per_request.json

Every request has `ignore_eos`, so both produce `max_tokens` tokens, and starts with its own number (four
digits, four tokens), so no two prompts share a prefix beyond the chat template's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import openai
import psutil
import typer

from benchmarks import servers
from benchmarks.request_latency import image_url
from benchmarks.run import machine, print_and_write

SETTLE_S = 2.0  # after the warm-up, before the idle window: spinning threads go quiet
FILLER = " the"  # one token per repetition in Qwen3's tokenizer (checked: the prompt is measured, not assumed)


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process ("own") and of its living descendants ("children": vLLM's engine)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"own": 0.0, "children": 0.0}
    total = {"own": 0.0, "children": 0.0}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total["own" if process.pid == pid else "children"] += times.user + times.system
    return total


def measure(target: servers.Target, send: Callable[[int], dict], requests: int, warmup: int,
            idle_s: float) -> dict:
    """Per server: CPU seconds per request beyond idle, from `requests` sequential `send(i)` calls; the idle rate
    is measured over `idle_s` without requests, after the warm-up has settled."""
    pids = {name: process.pid for name, process in target.processes.items()}

    def read() -> dict[str, dict[str, float]]:
        return {name: cpu_seconds(pid) for name, pid in pids.items()}

    for i in range(warmup):
        send(i)
    time.sleep(SETTLE_S)
    idle0, idle_start = read(), time.perf_counter()
    time.sleep(idle_s)
    idle1, idle_wall = read(), time.perf_counter() - idle_start
    busy0, start = read(), time.perf_counter()
    usages = [send(warmup + i) for i in range(requests)]
    busy1, wall_s = read(), time.perf_counter() - start
    per_server = {}
    for name in pids:
        parts = {}
        for part in ("own", "children"):
            idle_rate = (idle1[name][part] - idle0[name][part]) / idle_wall
            parts[part] = (busy1[name][part] - busy0[name][part] - idle_rate * wall_s) / requests
        per_server[name] = {"cpu_s_per_request": round(sum(parts.values()), 4),
                            **{f"{part}_cpu_s_per_request": round(value, 4) for part, value in parts.items()},
                            "idle_cores": round(sum(idle1[name][p] - idle0[name][p] for p in parts) / idle_wall, 3)}
    return {"wall_s": round(wall_s, 2), "prompt_tokens": sorted({u["prompt_tokens"] for u in usages}),
            "completion_tokens": sorted({u["completion_tokens"] for u in usages}), "servers": per_server}


def chat(client: openai.OpenAI, model: str, content, max_tokens: int) -> dict:
    """One streamed chat completion, read to the end; its usage."""
    usage = None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        usage = chunk.usage or usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def text_like(client: openai.OpenAI, model: str, prompt_tokens: int, max_tokens: int) -> Callable[[int], str]:
    """Request i's text prompt, `prompt_tokens` long under the server's chat template."""
    fillers = 0
    for _ in range(4):  # the filler count converges in one or two probes
        got = chat(client, model, f"{9999:04d}" + FILLER * fillers, 1)["prompt_tokens"]
        if got == prompt_tokens:
            return lambda i: f"{i % 10000:04d}" + FILLER * fillers
        fillers += prompt_tokens - got
        if fillers < 0:
            raise RuntimeError(f"the chat template alone is {got} tokens, more than {prompt_tokens}")
    raise RuntimeError(f"no text prompt of {prompt_tokens} tokens found")


def main(model: Annotated[str, typer.Option(help="Checkpoint")] = "checkpoints/tiny",
         requests: Annotated[int, typer.Option(help="Sequential requests measured per server")] = 30,
         warmup: int = 3, width: int = 896, height: int = 448, max_tokens: int = 16,
         idle_s: Annotated[float, typer.Option(help="Seconds without requests for each server's idle rate")] = 5.0,
         coupled: Annotated[bool, typer.Option(help="Also measure coupled vllm serve")] = True,
         out: Annotated[Path | None, typer.Option(help="Write the result JSON here")] = None) -> None:
    servers.stop_on_sigterm()
    document = {"command": "python -m benchmarks.cpu_per_request " + " ".join(sys.argv[1:]),
                "machine": machine() | {"load_before": [round(v, 2) for v in os.getloadavg()]},
                "model": model, "image": [width, height], "requests": requests, "max_tokens": max_tokens,
                "rule": "CPU seconds (user + system; own: the server's process, children: its child processes) "
                        "during the requests, minus the server's idle rate (measured before them) times their "
                        "duration, divided by the requests"}
    with tempfile.TemporaryDirectory(prefix="cpu_per_request-") as logs:
        for name in ("dvd", "coupled"):
            (Path(logs) / name).mkdir()
        with servers.dvd(model, Path(logs) / "dvd") as target:
            client = openai.OpenAI(base_url=f"{target.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
            served = client.models.list().data[0].id

            def dvd_request(i: int) -> dict:
                return chat(client, served, [
                    {"type": "text", "text": f"{i % 10000:04d} Describe the image."},
                    {"type": "image_url", "image_url": {"url": image_url(width, height, 1000 + i)}}], max_tokens)

            document["dvd"] = measure(target, dvd_request, requests, warmup, idle_s)
        document["machine"]["load_after_dvd"] = [round(v, 2) for v in os.getloadavg()]
        if coupled:
            prompt_tokens = document["dvd"]["prompt_tokens"][0]
            with servers.coupled(model, Path(logs) / "coupled") as target:
                client = openai.OpenAI(base_url=f"{target.base_url}/v1", api_key="unused", max_retries=0,
                                       timeout=300)
                served = client.models.list().data[0].id
                text = text_like(client, served, prompt_tokens, max_tokens)
                document["coupled_text"] = measure(target, lambda i: chat(client, served, text(i), max_tokens),
                                                   requests, warmup, idle_s)
            language = document["dvd"]["servers"]["language-server"]["cpu_s_per_request"]
            document["language_vs_coupled"] = round(
                language / document["coupled_text"]["servers"]["coupled"]["cpu_s_per_request"], 3)
            document["machine"]["load_after_coupled"] = [round(v, 2) for v in os.getloadavg()]
    print_and_write(document, out)


if __name__ == "__main__":
    typer.run(main)
