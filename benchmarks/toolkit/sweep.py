"""A benchmark sweep: warm-up, the sustained-goodput search if asked (`benchmarks.toolkit.search`), every load point
in turn against one server (or replicas of it), and the results file (JSON + CSV)."""

from __future__ import annotations

import csv
import datetime
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import openai

from benchmarks.toolkit import stages
from benchmarks.toolkit.documents import command_line, write
from benchmarks.toolkit.loadgen import Balancer, LoadPoint, run_point
from benchmarks.toolkit.machine import load_average, machine, versions
from benchmarks.toolkit.metrics import RequestResult, summarize
from benchmarks.toolkit.search import GoodputSearch, search
from benchmarks.toolkit.workload import RequestBatches


@dataclass
class RunOptions:
    """How to send the workload; recorded in the results file."""

    points: list[LoadPoint]
    burstiness: float = 1.0
    seed: int = 0
    ignore_eos: bool = True
    sampling: dict = field(default_factory=dict)  # e.g. {"temperature": 0}
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    slos_ms: dict[str, float] = field(default_factory=dict)  # goodput: metric -> limit
    metrics_pages: dict[str, str] = field(default_factory=dict)  # "vision"/"language" -> Prometheus URL
    progress: bool = True
    search: GoodputSearch | None = None  # search sustained goodput before the load points


def _rate(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


async def first_model(client: openai.AsyncOpenAI) -> str:
    models = await client.models.list()
    if not models.data:
        raise RuntimeError("the server lists no model")
    return models.data[0].id


def _document(urls: list[str], model: str, workload: RequestBatches, options: RunOptions) -> dict:
    """A sweep's results document before its points: what was run, where, with what, under which load."""
    target = {"base_url": urls[0], "model": model}
    if len(urls) > 1:
        target |= {"base_urls": urls, "balancing": "least outstanding requests"}
    return {
        "tool": "dvd bench", "command": command_line(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": target, "versions": versions(), "machine": machine(),
        "load_avg_before": load_average(), "workload": workload.described,
        "settings": {"burstiness": options.burstiness, "warmup": len(workload.warmup), "seed": options.seed,
                     "ignore_eos": options.ignore_eos, "sampling": options.sampling,
                     "percentiles": options.percentiles, "goodput_slos_ms": options.slos_ms},
        "points": [],
    }


async def _warm_up(balancer: Balancer, model: str, requests: list, options: RunOptions) -> None:
    """The first request alone (does the server answer at all?), the rest at once, balanced."""
    if not requests:
        return
    first = await balancer.send(model, requests[0], options.ignore_eos, options.sampling)
    if not first.success:
        raise RuntimeError(f"the first warm-up request failed: {first.error}")
    await run_point(balancer, model, requests[1:], LoadPoint(), 1.0, options.seed, options.ignore_eos,
                    options.sampling, progress=False)


async def _point(balancer: Balancer, model: str, point: LoadPoint, requests: list,
                 options: RunOptions) -> tuple[dict, list[RequestResult]]:
    """One load point's row (its load, `vllm bench serve`'s figures and, given metrics pages, DvD's stage means),
    and its requests' results."""
    before = await stages.snapshot(options.metrics_pages)
    results, duration = await run_point(balancer, model, requests, point, options.burstiness, options.seed,
                                        options.ignore_eos, options.sampling, options.progress)
    after = await stages.snapshot(options.metrics_pages)
    summary = summarize(results, duration, options.percentiles, options.slos_ms or None)
    row = {"request_rate": _rate(point.request_rate), "max_concurrency": point.max_concurrency, **summary}
    if options.metrics_pages:
        row["stages_ms"] = stages.stage_means_ms(before, after)
    return row, results


async def bench(base_url: str | list[str], workload: RequestBatches, options: RunOptions, model: str | None = None,
                api_key: str = "unused") -> dict:
    """Run the sweep against `base_url` (its `/v1` API) and return the results document: after the warm-up, the
    sustained-goodput search's runs (given `options.search`), then the load points. Several URLs are
    replicas of one server (coupled data-parallel serving): each request goes to the one with the fewest requests
    in flight; the document is still one result, with the replicas and what each was sent under `target`."""
    if len(workload.batches) != len(options.points):
        raise ValueError(f"{len(workload.batches)} request batches for {len(options.points)} load points")
    if options.search and workload.draw is None:
        raise ValueError("the sustained-goodput search needs fresh requests at every rate: a synthetic or folder "
                         "workload, not a fixed request set (JSONL)")
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    balancer = Balancer([openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key, max_retries=0,
                                            timeout=openai.Timeout(900.0, connect=30.0)) for url in urls])
    try:
        model = model or await first_model(balancer.clients[0])
        for url, other in zip(urls[1:], balancer.clients[1:]):
            if model not in {m.id for m in (await other.models.list()).data}:
                raise RuntimeError(f"the replica at {url} does not serve {model}")
        document = _document(urls, model, workload, options)
        await _warm_up(balancer, model, workload.warmup, options)
        if options.search:
            run_at = functools.partial(_point, balancer, model, options=options)
            rows, document["sustained_goodput"] = await search(options.search, workload.draw, run_at)
            document["points"] += rows
        for point, requests in zip(options.points, workload.batches):
            document["points"].append((await _point(balancer, model, point, requests, options))[0])
        if len(urls) > 1:
            document["target"]["requests_sent"] = balancer.sent  # per replica, warm-up included
        document["load_avg_after"] = load_average()
        return document
    finally:
        for each in balancer.clients:
            await each.close()


def write_results(document: dict, json_path: Path) -> Path:
    """Write the document as JSON and its points as CSV (same name, `.csv`); returns the CSV path."""
    write(document, json_path)
    rows = []
    for point in document["points"]:
        row = {k: v for k, v in point.items() if not isinstance(v, dict)}
        row |= {f"{stage}_ms": v for stage, v in point.get("stages_ms", {}).items()}
        row["failure_reasons"] = "; ".join(f"{n}x {r}" for r, n in point["failure_reasons"].items())
        if "search" in point:
            row |= {"search_run": point["search"]["run"]}
            row |= {f"passed_{name}": v["passed"] for name, v in point["search"]["verdicts"].items()}
        rows.append(row)
    csv_path = json_path.with_suffix(".csv")
    with csv_path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def print_summary(document: dict) -> None:
    """One line per load point (search runs marked with their verdicts): the numbers people look at first; then
    the sustained goodput found."""
    for p in document["points"]:
        cap = f" c={p['max_concurrency']}" if p["max_concurrency"] else ""
        verdicts = (" [search: " + ", ".join(f"{name} {'pass' if v['passed'] else 'fail: ' + v['reason']}"
                                              for name, v in p["search"]["verdicts"].items()) + "]"
                    if "search" in p else "")
        rate = p["request_rate"] if isinstance(p["request_rate"], str) else f"{p['request_rate']:.3g}"
        print(f"rate={rate}{cap}{verdicts}: {p['completed']} ok, {p['failed']} failed, "
              f"{p['request_throughput']:.2f} req/s, {p['output_throughput']:.1f} out tok/s, "
              f"TTFT mean {p['mean_ttft_ms']:.0f} / p99 {p.get('p99_ttft_ms', float('nan')):.0f} ms, "
              f"TPOT mean {p['mean_tpot_ms']:.1f} ms, E2EL mean {p['mean_e2el_ms']:.0f} ms")
        for reason, count in p["failure_reasons"].items():
            print(f"    {count}x {reason}")
    if found := document.get("sustained_goodput"):
        print("sustained goodput: " + ", ".join(f"{key.removesuffix('_rps')} {value:.3g} req/s"
                                                for key, value in found.items() if key.endswith("_rps"))
              + f" ({found['runs']} runs)")


def sweep_points(document: dict) -> list[dict]:
    """The document's load points proper: its rows less the search's runs."""
    return [p for p in document["points"] if "search" not in p]
