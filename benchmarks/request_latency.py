"""One request's latency split into stages, measured on a running DvD stack.

Sends sequential chat completions with one image through the gateway (official `openai` client) and
reads the servers' Prometheus histograms before and after, so each stage's mean comes from the
servers themselves:

    dvd up --vision-metrics-port 9101 --language-metrics-port 9102 &
    python -m benchmarks.request_latency --requests 20 --width 896 --height 448
    python -m benchmarks.request_latency --model checkpoints/tiny --image photo   # starts a stack of its own

The stages are `benchmarks/toolkit/stages.py`'s.

The hop overhead is what the client waits for beyond the stages on the critical path: client TTFT minus
(preprocess + encode [queue included] + send + transfer + prefill [the first decode step included]): the
gateway's parsing, image decoding and gRPC calls, the servers' hand-offs, and the way back to the client.
The server-side hop overhead starts the clock at the gateway instead (its TTFT histogram: request arrival to
first output), leaving out the client's own JSON encoding and the upload.

`--image noise` sends uniform random pixels as PNG (about 1.2 MB for 896x448, the worst case for the gateway's
base64 decoding and the gRPC hop); `--image photo` a smooth JPEG photo of the same size (tens of kB).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import openai
import typer

from benchmarks.toolkit import servers, stages
from benchmarks.toolkit.chat import Reply, image_part, served_model, stream_chat, user
from benchmarks.toolkit.documents import command_line, print_and_write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.machine import load_average, machine
from benchmarks.toolkit.options import OutOption

HOP_STAGES = ("preprocess", "encode", "send", "transfer", "prefill")


def main(
    model: Annotated[str | None, typer.Option(
        help="Start a fresh DvD stack of this checkpoint (all floating) instead of using --gateway")] = None,
    gateway: str = "http://127.0.0.1:8000",
    vision_metrics: str = "http://127.0.0.1:9101/metrics",
    language_metrics: str = "http://127.0.0.1:9102/metrics",
    requests: Annotated[int, typer.Option(help="Sequential requests to average over")] = 20,
    width: int = 896,
    height: int = 448,
    image: Annotated[str, typer.Option(help="noise (random-pixel PNG) or photo (smooth JPEG)")] = "noise",
    max_tokens: int = 16,
    warmup: int = 2,
    out: OutOption = None,
) -> None:
    if image not in ("noise", "photo"):
        raise typer.BadParameter("noise or photo", param_hint="--image")
    if model:
        servers.stop_on_sigterm()
        with tempfile.TemporaryDirectory(prefix="request-latency-") as logs, servers.dvd(model, Path(logs)) as target:
            pages = target.metrics_pages
            result = measure(target.base_url, pages["vision"], pages["language"], requests, (width, height), image,
                             max_tokens, warmup)
    else:
        result = measure(gateway, vision_metrics, language_metrics, requests, (width, height), image, max_tokens,
                         warmup)
    print_and_write(result, out)


def measure(gateway: str, vision_metrics: str, language_metrics: str, requests: int, size: tuple[int, int],
            image: str, max_tokens: int, warmup: int) -> dict:
    """`requests` sequential one-image chats: each stage's mean, the client's TTFT and latency, the hop overhead."""
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    model = served_model(client)
    pages = {"vision": vision_metrics, "language": language_metrics, "gateway": f"{gateway}/metrics"}

    def ask(seed: int) -> Reply:
        messages = user("Describe the image.", image_part(image_url(*size, seed, image)))
        return stream_chat(client, model, messages, max_tokens)

    load_before = load_average()[0]
    for seed in range(warmup):
        ask(seed)
    before = stages.read(pages)
    replies = [ask(warmup + i) for i in range(requests)]
    means = stages.stage_means_ms(before, stages.read(pages))
    result = {"model": model, "image": list(size), "image_kind": image, "requests": requests,
              "max_tokens": max_tokens,
              "machine": machine() | {"load_1m_before": load_before, "load_1m_after": load_average()[0]},
              "command": command_line(),
              "stages_ms": {stage: None if ms is None else round(ms, 2) for stage, ms in means.items()},
              "client_ttft_ms": round(float(np.mean([r.ttft_s for r in replies])) * 1e3, 2),
              "client_e2e_ms": round(float(np.mean([r.latency_s for r in replies])) * 1e3, 2)}
    on_the_path = [result["stages_ms"][stage] for stage in HOP_STAGES]
    if None not in on_the_path:
        result["hop_overhead_ms"] = round(result["client_ttft_ms"] - sum(on_the_path), 2)
        result["hop_overhead_rule"] = "client TTFT - (" + " + ".join(HOP_STAGES) + ")"
        if result["stages_ms"]["gateway_ttft"] is not None:
            result["server_hop_overhead_ms"] = round(result["stages_ms"]["gateway_ttft"] - sum(on_the_path), 2)
    return result


if __name__ == "__main__":
    typer.run(main)
