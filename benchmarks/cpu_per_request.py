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

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import openai
import typer

from benchmarks.toolkit import servers
from benchmarks.toolkit.chat import Reply, image_part, served_model, stream_chat, user
from benchmarks.toolkit.documents import command_line, print_and_write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.machine import load_average, machine
from benchmarks.toolkit.options import CheckpointOption, OutOption
from benchmarks.toolkit.processes import cpu_seconds

SETTLE_S = 2.0  # after the warm-up, before the idle window: spinning threads go quiet
FILLER = " the"  # one token per repetition in Qwen3's tokenizer (checked: the prompt is measured, not assumed)


def measure(target: servers.Target, send: Callable[[int], Reply], requests: int, warmup: int,
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
    return {"wall_s": round(wall_s, 2), "prompt_tokens": sorted({u.prompt_tokens for u in usages}),
            "completion_tokens": sorted({u.completion_tokens for u in usages}), "servers": per_server}


def text_like(client: openai.OpenAI, model: str, prompt_tokens: int, max_tokens: int) -> Callable[[int], str]:
    """Request i's text prompt, `prompt_tokens` long under the server's chat template."""
    fillers = 0
    for _ in range(4):  # the filler count converges in one or two probes
        got = stream_chat(client, model, user(f"{9999:04d}" + FILLER * fillers), 1).prompt_tokens
        if got == prompt_tokens:
            return lambda i: f"{i % 10000:04d}" + FILLER * fillers
        fillers += prompt_tokens - got
        if fillers < 0:
            raise RuntimeError(f"the chat template alone is {got} tokens, more than {prompt_tokens}")
    raise RuntimeError(f"no text prompt of {prompt_tokens} tokens found")


def _client(target: servers.Target) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=f"{target.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    return client, served_model(client)


def measure_dvd(model: str, logs: Path, requests: int, warmup: int, size: tuple[int, int], max_tokens: int,
                idle_s: float) -> dict:
    """DvD's servers, each request a fresh image."""
    with servers.dvd(model, logs) as target:
        client, served = _client(target)

        def send(i: int) -> Reply:
            return stream_chat(client, served, user(f"{i % 10000:04d} Describe the image.",
                                                    image_part(image_url(*size, 1000 + i))), max_tokens,
                               ignore_eos=True)

        return measure(target, send, requests, warmup, idle_s)


def measure_coupled(model: str, logs: Path, prompt_tokens: int, requests: int, warmup: int, max_tokens: int,
                    idle_s: float) -> dict:
    """Coupled `vllm serve`, each request text of `prompt_tokens` tokens."""
    with servers.coupled(model, logs) as target:
        client, served = _client(target)
        text = text_like(client, served, prompt_tokens, max_tokens)
        return measure(target, lambda i: stream_chat(client, served, user(text(i)), max_tokens, ignore_eos=True),
                       requests, warmup, idle_s)


def main(model: CheckpointOption = "checkpoints/tiny",
         requests: Annotated[int, typer.Option(help="Sequential requests measured per server")] = 30,
         warmup: int = 3, width: int = 896, height: int = 448, max_tokens: int = 16,
         idle_s: Annotated[float, typer.Option(help="Seconds without requests for each server's idle rate")] = 5.0,
         coupled: Annotated[bool, typer.Option(help="Also measure coupled vllm serve")] = True,
         out: OutOption = None) -> None:
    servers.stop_on_sigterm()
    document = {"command": command_line(), "machine": machine() | {"load_before": load_average()},
                "model": model, "image": [width, height], "requests": requests, "max_tokens": max_tokens,
                "rule": "CPU seconds (user + system; own: the server's process, children: its child processes) "
                        "during the requests, minus the server's idle rate (measured before them) times their "
                        "duration, divided by the requests"}
    with tempfile.TemporaryDirectory(prefix="cpu_per_request-") as logs:
        for name in ("dvd", "coupled"):
            (Path(logs) / name).mkdir()
        document["dvd"] = measure_dvd(model, Path(logs) / "dvd", requests, warmup, (width, height), max_tokens,
                                      idle_s)
        document["machine"]["load_after_dvd"] = load_average()
        if coupled:
            prompt_tokens = document["dvd"]["prompt_tokens"][0]
            document["coupled_text"] = measure_coupled(model, Path(logs) / "coupled", prompt_tokens, requests,
                                                       warmup, max_tokens, idle_s)
            language = document["dvd"]["servers"]["language-server"]["cpu_s_per_request"]
            document["language_vs_coupled"] = round(
                language / document["coupled_text"]["servers"]["coupled"]["cpu_s_per_request"], 3)
            document["machine"]["load_after_coupled"] = load_average()
    print_and_write(document, out)


if __name__ == "__main__":
    typer.run(main)
