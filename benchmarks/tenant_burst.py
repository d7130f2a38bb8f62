"""One key's burst beside another key's steady traffic: is the steady key still served?

One vision and one language server; two gateways in front of them with keys A and B and the same gateway-wide
`max_in_flight`: `fair` (A may have `--tenant-limit` requests in progress; B the gateway's whole cap) and
`unfair` (no per-tenant limit: the gateway's cap only, as before tenants). Three runs, in this order:

- `alone`: B alone through the fair gateway;
- `fair`: B, while A sends `--burst` requests at once every `--burst-every-s` (several times its limit);
- `unfair`: the same through the unfair gateway.

B sends `--requests` streamed requests at `--rate` req/s (Poisson arrivals, seeded), each a fresh one-tile image
and a question, `--output-tokens` tokens with `ignore_eos`; A's requests are alike but longer
(`--burst-output-tokens`), so that they hold their slots. Reported per run: B's success
rate, TTFT percentiles and failure reasons, what A got (200s, 429s), and the load average before and after
(the machine may be shared: other work shows there):

    python -m benchmarks.tenant_burst --model checkpoints/tiny --out benchmarks/results/tenant_burst_cpu_tiny.json
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import openai
import typer

from benchmarks.toolkit.chat import served_model_at
from benchmarks.toolkit.documents import command_line, print_and_write
from benchmarks.toolkit.images import image_url
from benchmarks.toolkit.loadgen import arrival_times, send
from benchmarks.toolkit.machine import load_average, machine, versions
from benchmarks.toolkit.metrics import summarize
from benchmarks.toolkit.options import CheckpointOption, OutOption
from benchmarks.toolkit.workload import BenchRequest
from launcher import Servers, Stack, command_lines, free_port, http_ready

KEY_A, KEY_B = "sk-bench-burst-a-51c0", "sk-bench-steady-b-8e2d"
QUESTION = "Describe the picture in one line."


def settings_file(path: Path, gateway_cap: int, a_limit: int) -> str:
    """Keys A (limited to `a_limit` requests in progress; 0: no own limit) and B (the gateway's whole cap)."""
    path.write_text(f"max_in_flight = {gateway_cap}\n\n"
                    f'[[tenants]]\nname = "a"\nkey = "{KEY_A}"\nmax_in_flight = {a_limit}\n\n'
                    f'[[tenants]]\nname = "b"\nkey = "{KEY_B}"\nmax_in_flight = 0\n')
    return str(path)


def two_gateways(model: str, config_dir: Path, gateway_cap: int, a_limit: int) -> tuple[Servers, dict[str, str]]:
    """The servers (not started yet) and the two gateways' URLs."""
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port())
    unfair_port = free_port()
    commands = stack.commands()
    commands["gateway"] += ["--config", settings_file(config_dir / "fair.toml", gateway_cap, a_limit)]
    commands["unfair"] = command_lines.gateway(
        [f"127.0.0.1:{stack.vision_port}"], [f"127.0.0.1:{stack.language_port}"], port=unfair_port,
        config=settings_file(config_dir / "unfair.toml", gateway_cap, 0))
    return Servers(commands, log_dir=config_dir), {"fair": stack.gateway_url, "unfair": f"http://127.0.0.1:{unfair_port}"}


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


class Requests:
    """Fresh requests (a new image each: no cache serves any), numbered across the whole benchmark."""

    def __init__(self):
        self.seed = 0

    def next(self, output_tokens: int) -> BenchRequest:
        self.seed += 1
        return BenchRequest(QUESTION, (image_url(448, 448, self.seed, "photo"),), output_tokens)


async def steady(b: openai.AsyncOpenAI, model: str, requests: Requests, count: int, rate: float, seed: int,
                 output_tokens: int):
    """B's requests at `rate` (Poisson); its results and the run's duration."""
    offsets = arrival_times(count, rate, 1.0, np.random.default_rng(seed))
    start = time.perf_counter()

    async def one(offset: float):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await send(b, model, requests.next(output_tokens), True, {"temperature": 0})

    results = await asyncio.gather(*(one(offset) for offset in offsets))
    return results, time.perf_counter() - start


async def bursts(a: openai.AsyncOpenAI, model: str, requests: Requests, burst: int, every_s: float,
                 output_tokens: int, until: asyncio.Event) -> Counter:
    """A's bursts, `burst` requests at once every `every_s`, until `until` is set; what A got, by outcome."""
    outcomes: Counter = Counter()
    waves = []
    while not until.is_set():
        waves.append(asyncio.gather(*(send(a, model, requests.next(output_tokens), True, {"temperature": 0})
                                      for _ in range(burst))))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(until.wait(), every_s)
    for result in [r for wave in await asyncio.gather(*waves) for r in wave]:
        outcomes["200" if result.success else "429" if "HTTP 429" in result.error else result.error] += 1
    return outcomes


async def one_run(url: str, with_burst: bool, model: str, requests: Requests, options: dict) -> dict:
    b, a = client(url, KEY_B), client(url, KEY_A)
    load_before = load_average()
    done = asyncio.Event()
    burst = asyncio.ensure_future(bursts(a, model, requests, options["burst"], options["burst_every_s"],
                                         options["burst_output_tokens"], done)) if with_burst else None
    results, duration = await steady(b, model, requests, options["requests"], options["rate"], options["seed"],
                                     options["output_tokens"])
    done.set()
    a_outcomes = await burst if burst else Counter()
    await asyncio.gather(a.close(), b.close())
    summary = summarize(results, duration, [50, 90, 99])
    return {"b_success_rate": summary["completed"] / len(results), "b_completed": summary["completed"],
            "b_failed": summary["failed"], "b_failure_reasons": summary["failure_reasons"],
            **{f"b_{k}": round(summary[k], 1) for k in ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
                                                        "mean_e2el_ms")},
            "a_outcomes": dict(a_outcomes), "duration_s": round(duration, 1),
            "load_average_before": load_before, "load_average_after": load_average()}


def main(model: CheckpointOption = "checkpoints/tiny",
         requests: Annotated[int, typer.Option(help="B's requests per run")] = 40,
         rate: Annotated[float, typer.Option(help="B's requests per second")] = 1.0,
         burst: Annotated[int, typer.Option(help="A's requests sent at once in each burst")] = 12,
         burst_every_s: Annotated[float, typer.Option(help="Seconds between A's bursts")] = 1.0,
         burst_output_tokens: Annotated[int, typer.Option(help="Output tokens of A's requests")] = 64,
         tenant_limit: Annotated[int, typer.Option(help="A's own in-flight limit on the fair gateway")] = 2,
         gateway_cap: Annotated[int, typer.Option(help="The gateways' max_in_flight")] = 6,
         output_tokens: int = 8, seed: int = 0, out: OutOption = None) -> None:
    options = {"requests": requests, "rate": rate, "burst": burst, "burst_every_s": burst_every_s, "seed": seed,
               "output_tokens": output_tokens, "burst_output_tokens": burst_output_tokens}
    with tempfile.TemporaryDirectory(prefix="dvd-tenant-burst-") as folder:
        launched, urls = two_gateways(model, Path(folder), gateway_cap, tenant_limit)
        ready = [http_ready(url, headers={"authorization": f"Bearer {KEY_B}"}) for url in urls.values()]
        with launched.running(lambda: all(check() for check in ready)):
            served = served_model_at(urls["fair"], KEY_B)
            fresh = Requests()
            asyncio.run(one_run(urls["fair"], False, served, fresh, {**options, "requests": 4}))  # warm-up
            runs = {name: asyncio.run(one_run(urls[gateway], with_burst, served, fresh, options))
                    for name, gateway, with_burst in (("alone", "fair", False), ("fair", "fair", True),
                                                      ("unfair", "unfair", True))}
    document = {"command": command_line(), "machine": machine(), "versions": versions(),
                "note": "the machine is shared with other work: see each run's load average",
                "settings": {"gateway_max_in_flight": gateway_cap, "a_max_in_flight_fair": tenant_limit,
                             "a_max_in_flight_unfair": 0, "b_max_in_flight": 0, "b_requests": requests,
                             "b_rate_per_s": rate, "a_burst": burst, "a_burst_every_s": burst_every_s,
                             "image": "448x448 JPEG, fresh each request (1 tile)",
                             "b_output_tokens": output_tokens, "a_output_tokens": burst_output_tokens},
                "runs": runs}
    print_and_write(document, out)


if __name__ == "__main__":
    typer.run(main)
