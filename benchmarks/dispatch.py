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

import statistics
from typing import Annotated

import openai
import typer

from benchmarks.toolkit import prometheus
from benchmarks.toolkit.chat import image_part, served_model, stream_chat, user
from benchmarks.toolkit.documents import command_line, print_and_write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.machine import load_average, machine
from benchmarks.toolkit.options import CheckpointOption, OutOption
from launcher import Servers, Stack, command_lines, free_port, http_ready

DISPATCH = "dvd_vision_dispatch_seconds"


def one_observation(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bucket (upper bound, seconds) that one request's observation fell into."""
    grown = [bound for bound in sorted(after) if after[bound] > before.get(bound, 0)]
    return grown[0] if grown else None


def two_gateways(model: str) -> tuple[Servers, dict[str, str], str]:
    """One vision and one language server behind two gateways, feature cache on and off (not started yet); the
    gateways' URLs and the vision server's metrics page."""
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), vision_metrics_port=free_port())
    off_port = free_port()
    commands = stack.commands()
    commands["gateway-no-cache"] = command_lines.gateway(
        [f"127.0.0.1:{stack.vision_port}"], [f"127.0.0.1:{stack.language_port}"], port=off_port, feature_cache=False)
    gateways = {"cache_on": stack.gateway_url, "cache_off": f"http://127.0.0.1:{off_port}"}
    return Servers(commands), gateways, f"http://127.0.0.1:{stack.vision_metrics_port}/metrics"


def alternate(gateways: dict[str, str], metrics_url: str, requests: int, size: tuple[int, int], max_tokens: int,
              warmup: int) -> dict[str, dict[str, list]]:
    """Rounds of one fresh-image request to each gateway in turn; each one's dispatch bucket and TTFT."""
    clients = {name: openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
               for name, url in gateways.items()}
    served = served_model(clients["cache_on"])
    results = {name: {"dispatch_bucket_s": [], "ttft_ms": []} for name in gateways}
    seed = 1000
    for round_number in range(warmup + requests):
        for name, client in clients.items():
            seed += 1
            before = prometheus.buckets(metrics_url, DISPATCH)
            reply = stream_chat(client, served, user(image_part(image_url(*size, seed)), "Describe the image."),
                                max_tokens, ignore_eos=True)
            if round_number >= warmup:
                results[name]["ttft_ms"].append(reply.ttft_s * 1e3)
                results[name]["dispatch_bucket_s"].append(
                    one_observation(before, prometheus.buckets(metrics_url, DISPATCH)))
    return results


def main(model: CheckpointOption = "checkpoints/tiny",
         requests: Annotated[int, typer.Option(help="Requests per gateway")] = 20,
         width: int = 896, height: int = 448, max_tokens: int = 4, warmup: int = 2, out: OutOption = None) -> None:
    launched, gateways, metrics_url = two_gateways(model)
    ready = [http_ready(url) for url in gateways.values()]
    with launched.running(lambda: all(check() for check in ready)):
        results = alternate(gateways, metrics_url, requests, (width, height), max_tokens, warmup)
    summary = {name: {"dispatch_p50_bucket_ms": statistics.median(r["dispatch_bucket_s"]) * 1e3,
                      "ttft_p50_ms": round(statistics.median(r["ttft_ms"]), 2),
                      "ttft_mean_ms": round(statistics.fmean(r["ttft_ms"]), 2), **r}
               for name, r in results.items()}
    document = {"command": command_line(), "machine": machine() | {"load_1m": load_average()[0]},
                "image": [width, height], "requests_per_gateway": requests, "max_tokens": max_tokens,
                "note": "dispatch = API request arrival at the gateway -> Encode arrival at the vision server, "
                        "as the upper bound of the histogram bucket each request fell into",
                "results": summary}
    print_and_write(document, out)


if __name__ == "__main__":
    typer.run(main)
