"""One request's latency split into stages, measured on a running DvD stack.

Sends sequential chat completions with one image through the gateway (official `openai` client) and
reads the servers' Prometheus histograms before and after, so each stage's mean comes from the
servers themselves:

    dvd up --vision-metrics-port 9101 --language-metrics-port 9102 &
    python -m benchmarks.request_latency --requests 20 --width 896 --height 448
    python -m benchmarks.request_latency --model checkpoints/tiny --image photo   # starts a stack of its own

Stages: preprocess (decode + tiling), vision queue (queued -> first tile in a batch), encode (queued ->
last tile through ViT + projector: the queue included), send (hand-off to ZeroMQ), transfer
(vision send -> language receive), feature wait (Generate arrival -> all features present; overlaps
the stages before it), prefill (features present -> first token), decode (first -> last token).

The hop overhead is what the client waits for beyond the stages on the critical path: client TTFT minus
(preprocess + encode [queue included] + send + transfer + prefill [the first decode step included]): the
gateway's parsing, image decoding and gRPC calls, the servers' hand-offs, and the way back to the client.
The server-side hop overhead starts the clock at the gateway instead (its TTFT histogram: request arrival to
first output), leaving out the client's own JSON encoding and the upload.

`--image noise` sends uniform random pixels as PNG (about 1.2 MB for 896x448, the worst case for the gateway's
base64 decoding and the gRPC hop); `--image photo` a smooth JPEG photo of the same size (tens of kB).
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import openai
import typer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

STAGES = {
    "preprocess": ("vision", "dvd_vision_preprocess_seconds"),
    "vision_queue": ("vision", "dvd_vision_queue_seconds"),
    "encode": ("vision", "dvd_vision_encode_seconds"),
    "send": ("vision", "dvd_vision_send_seconds"),
    "transfer": ("language", "dvd_language_feature_transfer_seconds"),
    "feature_wait": ("language", "dvd_language_feature_wait_seconds"),
    "prefill": ("language", "dvd_language_prefill_seconds"),
    "decode": ("language", "dvd_language_decode_seconds"),
    "gateway_ttft": ("gateway", "dvd_gateway_ttft_seconds"),
}
HOP_STAGES = ("preprocess", "encode", "send", "transfer", "prefill")


def histogram_totals(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of every histogram on a Prometheus page."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if family.type != "histogram":
            continue
        entry = totals.setdefault(family.name, [0.0, 0.0])
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                entry[0] += sample.value
            elif sample.name.endswith("_count"):
                entry[1] += sample.value
    return {name: (s, c) for name, (s, c) in totals.items()}


def image_url(width: int, height: int, seed: int, kind: str = "noise") -> str:
    if kind == "photo":
        from benchmarks.preprocess import smooth_photo

        return "data:image/jpeg;base64," + base64.b64encode(smooth_photo(width, height, seed)).decode()
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


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
    out: Annotated[Path | None, typer.Option(help="Write the result JSON here")] = None,
) -> None:
    if model:
        import tempfile

        from benchmarks import servers

        servers.stop_on_sigterm()
        with tempfile.TemporaryDirectory(prefix="request-latency-") as logs, servers.dvd(model, Path(logs)) as target:
            return measure(target.base_url, target.metrics_pages["vision"], target.metrics_pages["language"],
                           requests, width, height, image, max_tokens, warmup, out)
    return measure(gateway, vision_metrics, language_metrics, requests, width, height, image, max_tokens, warmup,
                   out)


def measure(gateway: str, vision_metrics: str, language_metrics: str, requests: int, width: int, height: int,
            image: str, max_tokens: int, warmup: int, out: Path | None) -> None:
    from benchmarks.run import machine, print_and_write  # not at the top: benchmarks.run imports this module's stages

    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    pages = {"vision": vision_metrics, "language": language_metrics, "gateway": f"{gateway}/metrics"}
    if image not in ("noise", "photo"):
        raise typer.BadParameter("noise or photo", param_hint="--image")

    def ask(seed: int) -> tuple[float, float]:
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "Describe the image."},
            {"type": "image_url", "image_url": {"url": image_url(width, height, seed, image)}}]}]
        start = time.perf_counter()
        first = None
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        end = time.perf_counter()
        return (first or end) - start, end - start

    load_before = os.getloadavg()[0]
    for seed in range(warmup):
        ask(seed)
    before = {kind: histogram_totals(url) for kind, url in pages.items()}
    client_times = [ask(warmup + i) for i in range(requests)]
    after = {kind: histogram_totals(url) for kind, url in pages.items()}

    result = {"model": model, "image": [width, height], "image_kind": image, "requests": requests,
              "max_tokens": max_tokens,
              "machine": machine() | {"load_1m_before": round(load_before, 2),
                                          "load_1m_after": round(os.getloadavg()[0], 2)},
              "command": "python -m benchmarks.request_latency " + " ".join(sys.argv[1:]), "stages_ms": {}}
    for stage, (kind, name) in STAGES.items():
        s0, c0 = before[kind].get(name, (0.0, 0.0))
        s1, c1 = after[kind].get(name, (0.0, 0.0))
        result["stages_ms"][stage] = round((s1 - s0) / (c1 - c0) * 1e3, 2) if c1 > c0 else None
    ttft, e2e = zip(*client_times)
    result["client_ttft_ms"] = round(float(np.mean(ttft)) * 1e3, 2)
    result["client_e2e_ms"] = round(float(np.mean(e2e)) * 1e3, 2)
    stages = [result["stages_ms"][stage] for stage in HOP_STAGES]
    if None not in stages:
        result["hop_overhead_ms"] = round(result["client_ttft_ms"] - sum(stages), 2)
        result["hop_overhead_rule"] = "client TTFT - (" + " + ".join(HOP_STAGES) + ")"
        if result["stages_ms"]["gateway_ttft"] is not None:
            result["server_hop_overhead_ms"] = round(result["stages_ms"]["gateway_ttft"] - sum(stages), 2)
    print_and_write(result, out)


if __name__ == "__main__":
    typer.run(main)
