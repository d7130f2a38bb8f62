"""Does vision start at once? Request arrival -> Encode arrival at the vision server, and fresh-image TTFT,
with the feature cache on and off, on one stack started here.

One vision server and one language server; two gateways in front of them, one with the feature cache
(the default) and one without. Sequential requests (concurrency 1), each with a fresh image, alternate
between the two gateways, so both see the same machine state. The dispatch time comes from the vision
server's own histogram (`dvd_vision_dispatch_seconds`, read before and after each request: one request's
bucket each), TTFT from the client (first streamed token):

    python -m benchmarks.dispatch --model checkpoints/tiny --requests 20 --out benchmarks/results/dispatch_cpu.json
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import openai
import typer
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.request_latency import image_url
from benchmarks.run import machine, print_and_write
from launcher import Servers, Stack, free_port, http_ready

DISPATCH = "dvd_vision_dispatch_seconds"


def dispatch_buckets(metrics_url: str) -> dict[float, float]:
    """Cumulative bucket counts of the dispatch histogram: upper bound -> count."""
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        if family.name == DISPATCH:
            return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
    return {}


def one_observation(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bucket (upper bound, seconds) that one request's observation fell into."""
    grown = [bound for bound in sorted(after) if after[bound] > before.get(bound, 0)]
    return grown[0] if grown else None


def main(model: Annotated[str, typer.Option(help="Checkpoint")] = "checkpoints/tiny",
         requests: Annotated[int, typer.Option(help="Requests per gateway")] = 20,
         width: int = 896, height: int = 448, max_tokens: int = 4, warmup: int = 2,
         out: Annotated[Path | None, typer.Option(help="Write the result JSON here")] = None) -> None:
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), vision_metrics_port=free_port())
    off_port = free_port()
    commands = stack.commands()
    commands["gateway-no-cache"] = [sys.executable, "-m", "dvd.cli", "gateway", "--port", str(off_port),
                                    "--vision-server", f"127.0.0.1:{stack.vision_port}",
                                    "--language-server", f"127.0.0.1:{stack.language_port}", "--no-feature-cache"]
    gateways = {"cache_on": stack.gateway_url, "cache_off": f"http://127.0.0.1:{off_port}"}
    metrics_url = f"http://127.0.0.1:{stack.vision_metrics_port}/metrics"
    ready = [http_ready(url) for url in gateways.values()]
    with Servers(commands).running(lambda: all(check() for check in ready)):
        clients = {name: openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
                   for name, url in gateways.items()}
        served = clients["cache_on"].models.list().data[0].id
        results = {name: {"dispatch_bucket_s": [], "ttft_ms": []} for name in gateways}
        seed = 1000
        for round_number in range(warmup + requests):
            for name, client in clients.items():
                seed += 1
                messages = [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url(width, height, seed)}},
                    {"type": "text", "text": "Describe the image."}]}]
                before = dispatch_buckets(metrics_url)
                start = time.perf_counter()
                first = None
                for chunk in client.chat.completions.create(model=served, messages=messages, max_tokens=max_tokens,
                                                            temperature=0, stream=True,
                                                            extra_body={"ignore_eos": True}):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                if round_number < warmup:
                    continue
                results[name]["ttft_ms"].append(((first or time.perf_counter()) - start) * 1e3)
                results[name]["dispatch_bucket_s"].append(one_observation(before, dispatch_buckets(metrics_url)))
    summary = {name: {"dispatch_p50_bucket_ms": statistics.median(r["dispatch_bucket_s"]) * 1e3,
                      "ttft_p50_ms": round(statistics.median(r["ttft_ms"]), 2),
                      "ttft_mean_ms": round(statistics.fmean(r["ttft_ms"]), 2), **r}
               for name, r in results.items()}
    document = {"command": "python -m benchmarks.dispatch " + " ".join(sys.argv[1:]),
                "machine": machine() | {"load_1m": os.getloadavg()[0]},
                "image": [width, height], "requests_per_gateway": requests, "max_tokens": max_tokens,
                "note": "dispatch = API request arrival at the gateway -> Encode arrival at the vision server, "
                        "as the upper bound of the histogram bucket each request fell into",
                "results": summary}
    print_and_write(document, out)


if __name__ == "__main__":
    typer.run(main)
