"""`dvd bench`: load-test any OpenAI-compatible server, and compare DvD with coupled serving.

Each command is a thin layer over `benchmarks/toolkit/` (the sweep) and its tool module (`compare`, `crosscheck`);
the options that several commands take are declared once, in `benchmarks/toolkit/options.py`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.toolkit.options import (
    ApiKeyOption,
    ImagesOption,
    JsonlOption,
    LoadOptions,
    RequestOptions,
    RequestsOption,
    SearchFlag,
    SearchOptions,
    SearchStartOption,
    SeedOption,
    SizeOption,
    WarmupOption,
    WordsOption,
    WorkloadOptions,
    grouped,
)

app = typer.Typer(help="Throughput benchmarks with `vllm bench serve`'s metric definitions.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


@contextlib.contextmanager
def reported():
    """A failure of the servers or of the run as one line on stderr and exit status 1, not a traceback."""
    try:
        yield
    except (RuntimeError, TimeoutError, ValueError) as exc:
        typer.echo(f"dvd bench: {exc}", err=True)
        raise typer.Exit(1) from None


def refuse_fixed_requests(search_goodput: bool, workload: WorkloadOptions) -> None:
    """The search draws fresh requests at every rate; a JSONL file is one fixed set."""
    if search_goodput and workload.jsonl:
        raise typer.BadParameter("the sustained-goodput search draws fresh requests at every rate, a JSONL file is "
                                 "one fixed set: give a synthetic or folder workload, or --no-search-goodput",
                                 param_hint="--jsonl")


@app.command()
@grouped
def run(
    base_url: Annotated[str, typer.Option(help="Server root; requests go to BASE_URL/v1/chat/completions")] = (
        "http://127.0.0.1:8000"),
    model: Annotated[str | None, typer.Option(help="Model name (default: the first the server lists)")] = None,
    api_key: ApiKeyOption = "unused",
    vision_metrics: Annotated[str | None, typer.Option(
        help="DvD vision server's Prometheus URL, for the per-stage breakdown")] = None,
    language_metrics: Annotated[str | None, typer.Option(
        help="DvD language server's Prometheus URL, for the per-stage breakdown")] = None,
    out: Annotated[Path, typer.Option(help="Results JSON; a CSV of the same name is written beside it")] = Path(
        "benchmarks/results/bench.json"),
    search_goodput: SearchFlag = False,
    search_start: SearchStartOption = 1.0,
    *,
    workload: WorkloadOptions,
    load: LoadOptions,
    search: SearchOptions,
) -> None:
    """Benchmark one server over a sweep of load points, or search its sustained goodput; writes JSON + CSV."""
    import asyncio

    from benchmarks.toolkit.sweep import bench, print_summary, write_results

    refuse_fixed_requests(search_goodput, workload)
    pages = {kind: url for kind, url in (("vision", vision_metrics), ("language", language_metrics)) if url}
    options = load.run_options(workload.seed, pages, search.settings(search_start) if search_goodput else None)
    batches = workload.batches(len(options.points))
    with reported():
        document = asyncio.run(bench(base_url, batches, options, model=model, api_key=api_key))
    csv_path = write_results(document, out)
    print_summary(document)
    typer.echo(f"results: {out} and {csv_path}")


@app.command("workload")
@grouped
def write_workload(
    out: Annotated[Path, typer.Argument(help="JSONL file to write (vLLM's custom_image format, images inline)")],
    *,
    requests: RequestOptions,
) -> None:
    """Write a workload as JSONL, to replay it with `dvd bench run --jsonl` or `vllm bench serve`."""
    from benchmarks.toolkit.workload import write_jsonl

    if requests.num_requests < 1:
        raise typer.BadParameter("write at least one request", param_hint="--num-requests")
    made, _ = requests.make(requests.num_requests)
    write_jsonl(made, out)
    typer.echo(f"wrote {len(made)} requests to {out}")


@app.command()
@grouped
def compare(
    model: Annotated[Path | None, typer.Option(
        help="Checkpoint: start a DvD stack, then coupled `vllm serve`, one after the other, on free ports")] = None,
    dvd_url: Annotated[str | None, typer.Option(help="A running DvD gateway instead of --model")] = None,
    coupled_url: Annotated[list[str] | None, typer.Option(
        help="A running coupled server instead of --model; repeat for replicas, requests balanced")] = None,
    dvd_results: Annotated[Path | None, typer.Option(help="Read this DvD results JSON instead of running")] = None,
    coupled_results: Annotated[Path | None, typer.Option(help="Read this coupled results JSON instead")] = None,
    name: Annotated[str, typer.Option(help="Results are named bench_NAME*, coupled_NAME*")] = "compare",
    out_dir: Annotated[Path, typer.Option(help="Where results, table and plots go")] = Path("benchmarks/results"),
    log_dir: Annotated[Path | None, typer.Option(
        help="Keep the servers' logs in LOG_DIR/DvD and LOG_DIR/coupled (default: a temporary folder)")] = None,
    placement: Annotated[str, typer.Option(
        help="Servers started here: shared (all float over every core) or pinned (DvD's vision and language "
             "servers each on cores of their own, coupled as one `vllm serve` replica per such core group)")] = (
        "shared"),
    vision_cores: Annotated[int | None, typer.Option(
        help="pinned: cores for the vision side, the highest of this process's (default: half)")] = None,
    dtype: Annotated[str, typer.Option(
        help="Both systems' model dtype (language model and vision encoder; DvD's features too)")] = "bfloat16",
    api_key: ApiKeyOption = "unused",
    search_goodput: SearchFlag = True,
    search_start: SearchStartOption = 1.0,
    *,
    workload: WorkloadOptions,
    load: LoadOptions,
    search: SearchOptions,
) -> None:
    """DvD against coupled `vllm serve`: each one's sustained goodput (the headline; --no-search-goodput skips
    it) and the sweep's load points if given; both results, a Markdown table and PNG plots."""
    from benchmarks.compare import Source, compare_systems
    from benchmarks.toolkit.placement import Placement

    refuse_fixed_requests(search_goodput, workload)
    try:
        where = Placement.choose(placement, vision_cores, dtype)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--placement / --vision-cores") from None
    sources = {"DvD": Source(dvd_results, [dvd_url] if dvd_url else None),
               "coupled": Source(coupled_results, coupled_url)}
    for system, source in sources.items():
        if not (source.results or source.urls or model):
            raise typer.BadParameter(f"give --model, or a URL or results file for {system}")
    with reported():
        table = compare_systems(sources, model, where, workload, load,
                                search.settings(search_start) if search_goodput else None, api_key, out_dir, name,
                                log_dir)
    typer.echo(f"comparison: {table}")


@app.command()
def crosscheck(
    model: Annotated[Path | None, typer.Option(help="Checkpoint: start a DvD stack of it on free ports")] = None,
    base_url: Annotated[str | None, typer.Option(help="A running server instead of --model")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer for vllm bench (default: --model)")] = None,
    jsonl: JsonlOption = None,
    num_requests: RequestsOption = 20,
    image_size: SizeOption = None,
    images_per_request: ImagesOption = 1,
    input_words: WordsOption = 32,
    output_len: Annotated[int, typer.Option(help="Output tokens per request")] = 32,
    request_rate: Annotated[float, typer.Option(help="Requests per second (inf: all at once)")] = float("inf"),
    concurrency: Annotated[int | None, typer.Option(help="Most requests in flight")] = None,
    rounds: Annotated[int, typer.Option(help="Runs of each tool, alternating")] = 2,
    warmup: WarmupOption = 2,
    seed: SeedOption = 0,
    out: Annotated[Path, typer.Option(help="Results JSON; a Markdown table is written beside it")] = Path(
        "benchmarks/results/bench_crosscheck.json"),
) -> None:
    """`vllm bench serve --backend openai-chat` and `dvd bench` on one workload and server: do they agree?"""
    from benchmarks import crosscheck as check
    from benchmarks.toolkit.loadgen import LoadPoint

    if bool(model) == bool(base_url):
        raise typer.BadParameter("give --model or --base-url")
    if not (tokenizer or model):
        raise typer.BadParameter("--tokenizer is needed with --base-url", param_hint="--tokenizer")
    requests = RequestOptions(None, num_requests, image_size, images_per_request, input_words, output_len, seed)
    with reported():
        document = check.started_and_checked(model, base_url, tokenizer or str(model), jsonl, requests, rounds,
                                             LoadPoint(request_rate, concurrency), warmup)
    check.write(document, out)
    typer.echo(check.markdown(document))
