"""`dvd bench`: load-test any OpenAI-compatible server, and compare DvD with coupled serving."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Throughput benchmarks with `vllm bench serve`'s metric definitions.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

JsonlOption = Annotated[Path | None, typer.Option(
    help="Requests from a JSONL file (vLLM's custom_image format: prompt, image_files, output_tokens)")]
FolderOption = Annotated[Path | None, typer.Option(help="Requests over the images of this folder")]
RequestsOption = Annotated[int, typer.Option(help="Requests per load point (synthetic or folder workloads)")]
SizeOption = Annotated[list[str] | None, typer.Option(
    "--image-size", help="Synthetic image WIDTHxHEIGHT (repeatable; drawn uniformly per image)")]
ImagesOption = Annotated[int, typer.Option(help="Images per request")]
WordsOption = Annotated[int, typer.Option(help="Words of random text per prompt (about one token each)")]
OutputOption = Annotated[int | None, typer.Option(
    help="Output tokens per request (default 32; for --jsonl, each line's output_tokens)")]
SeedOption = Annotated[int, typer.Option(help="Seed of the synthetic workload and of the arrival times")]


def load_workload(jsonl: Path | None, image_dir: Path | None, num_requests: int, image_size: list[str] | None,
                  images_per_request: int, input_words: int, output_len: int | None, seed: int):
    """The requests and a description of them for the results file."""
    from benchmarks import workload as w

    if jsonl and image_dir:
        raise typer.BadParameter("give --jsonl or --image-dir, not both")
    if jsonl:
        requests = w.read_jsonl(jsonl, output_len)
        return requests, {"source": f"jsonl:{jsonl}", "num_requests": len(requests), "output_len": output_len}
    described = {"num_requests": num_requests, "images_per_request": images_per_request,
                 "input_words": input_words, "output_len": output_len or 32, "seed": seed}
    if image_dir:
        requests = w.from_folder(image_dir, num_requests, images_per_request, input_words, output_len or 32, seed)
        return requests, {"source": f"folder:{image_dir}", **described}
    sizes = [w.parse_size(s) for s in image_size or ["896x448"]]
    requests = w.synthetic(num_requests, sizes, images_per_request, input_words, output_len or 32, seed)
    return requests, {"source": "synthetic", "image_sizes": [f"{a}x{b}" for a, b in sizes], **described}


def load_points(request_rate: list[float] | None, concurrency: list[int] | None):
    from benchmarks.loadgen import LoadPoint

    if any(c < 1 for c in concurrency or []):
        raise typer.BadParameter("concurrency must be at least 1", param_hint="--concurrency")
    if any(r <= 0 for r in request_rate or []):
        raise typer.BadParameter("request rates must be positive (inf: all at once)", param_hint="--request-rate")
    return [LoadPoint(r, c) for r, c in itertools.product(request_rate or [math.inf], concurrency or [None])]


def parse_slos(goodput: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in goodput or []:
        name, _, value = item.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not METRIC:MILLISECONDS, e.g. ttft:500",
                                     param_hint="--goodput") from None
    return slos


@app.command()
def run(
    base_url: Annotated[str, typer.Option(help="Server root; requests go to BASE_URL/v1/chat/completions")] = (
        "http://127.0.0.1:8000"),
    model: Annotated[str | None, typer.Option(help="Model name (default: the first the server lists)")] = None,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key")] = "unused",
    jsonl: JsonlOption = None,
    image_dir: FolderOption = None,
    num_requests: RequestsOption = 20,
    image_size: SizeOption = None,
    images_per_request: ImagesOption = 1,
    input_words: WordsOption = 32,
    output_len: OutputOption = None,
    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly the output length (vLLM's ignore_eos)")] = True,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the server's)")] = None,
    request_rate: Annotated[list[float] | None, typer.Option(
        help="Requests per second, Poisson arrivals; repeat for a sweep (default: inf, all at once)")] = None,
    concurrency: Annotated[list[int] | None, typer.Option(
        help="Most requests in flight; repeat for a sweep")] = None,
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the arrival gaps; 1 = Poisson")] = 1.0,
    warmup: Annotated[int, typer.Option(help="Requests sent (and not counted) before the first point")] = 2,
    seed: SeedOption = 0,
    percentiles: Annotated[str, typer.Option(help="Comma-separated percentiles to report")] = "50,90,99",
    goodput: Annotated[list[str] | None, typer.Option(
        help="SLO for goodput, METRIC:MS with METRIC ttft, tpot or e2el (repeatable)")] = None,
    vision_metrics: Annotated[str | None, typer.Option(
        help="DvD vision server's Prometheus URL, for the per-stage breakdown")] = None,
    language_metrics: Annotated[str | None, typer.Option(
        help="DvD language server's Prometheus URL, for the per-stage breakdown")] = None,
    out: Annotated[Path, typer.Option(help="Results JSON; a CSV of the same name is written beside it")] = Path(
        "benchmarks/results/bench.json"),
    progress: Annotated[bool, typer.Option(help="Live progress bar")] = True,
) -> None:
    """Benchmark one server over a sweep of load points; writes JSON + CSV results."""
    from benchmarks.run import RunOptions, bench, print_summary, write_results
    from benchmarks.workload import WorkloadError

    try:
        requests, described = load_workload(jsonl, image_dir, num_requests, image_size, images_per_request,
                                            input_words, output_len, seed)
    except WorkloadError as exc:
        raise typer.BadParameter(str(exc)) from None
    pages = {kind: url for kind, url in (("vision", vision_metrics), ("language", language_metrics)) if url}
    options = RunOptions(points=load_points(request_rate, concurrency), burstiness=burstiness, warmup=warmup,
                         seed=seed, ignore_eos=ignore_eos,
                         sampling={} if temperature is None else {"temperature": temperature},
                         percentiles=[float(p) for p in percentiles.split(",")], slos_ms=parse_slos(goodput),
                         metrics_pages=pages, progress=progress)
    try:
        document = asyncio.run(bench(base_url, requests, options, described, model=model, api_key=api_key))
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"dvd bench: {exc}", err=True)
        raise typer.Exit(1) from None
    csv_path = write_results(document, out)
    print_summary(document)
    typer.echo(f"results: {out} and {csv_path}")


@app.command()
def workload(
    out: Annotated[Path, typer.Argument(help="JSONL file to write (vLLM's custom_image format, images inline)")],
    image_dir: FolderOption = None,
    num_requests: RequestsOption = 20,
    image_size: SizeOption = None,
    images_per_request: ImagesOption = 1,
    input_words: WordsOption = 32,
    output_len: OutputOption = None,
    seed: SeedOption = 0,
) -> None:
    """Write a workload as JSONL, to replay it with `dvd bench run --jsonl` or `vllm bench serve`."""
    from benchmarks.workload import WorkloadError, write_jsonl

    try:
        requests, _ = load_workload(None, image_dir, num_requests, image_size, images_per_request, input_words,
                                    output_len, seed)
    except WorkloadError as exc:
        raise typer.BadParameter(str(exc)) from None
    write_jsonl(requests, out)
    typer.echo(f"wrote {len(requests)} requests to {out}")
