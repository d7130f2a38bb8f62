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


def make_requests(image_dir: Path | None, count: int, image_size: list[str] | None, images_per_request: int,
                  input_words: int, output_len: int | None, seed: int):
    """`count` synthetic or folder requests, and their description for the results file."""
    from benchmarks import workload as w

    described = {"images_per_request": images_per_request, "input_words": input_words,
                 "output_len": output_len or 32, "seed": seed}
    if image_dir:
        requests = w.from_folder(image_dir, count, images_per_request, input_words, output_len or 32, seed)
        return requests, {"source": f"folder:{image_dir}", **described}
    sizes = [w.parse_size(s) for s in image_size or ["896x448"]]
    requests = w.synthetic(count, sizes, images_per_request, input_words, output_len or 32, seed)
    return requests, {"source": "synthetic", "image_sizes": [f"{a}x{b}" for a, b in sizes], **described}


def load_workload(jsonl: Path | None, image_dir: Path | None, num_requests: int, image_size: list[str] | None,
                  images_per_request: int, input_words: int, output_len: int | None, seed: int, warmup: int,
                  points: int):
    """Warm-up and per-point requests: fresh ones for every point, or a JSONL file's, whole, at every point."""
    from benchmarks import workload as w

    if jsonl and image_dir:
        raise typer.BadParameter("give --jsonl or --image-dir, not both")
    if jsonl:
        requests = w.read_jsonl(jsonl, output_len)
        described = {"source": f"jsonl:{jsonl}", "num_requests": len(requests), "output_len": output_len}
        return w.RequestBatches.repeated(requests, warmup, points, described)
    requests, described = make_requests(image_dir, warmup + num_requests * points, image_size, images_per_request,
                                        input_words, output_len, seed)
    return w.RequestBatches.fresh(requests, warmup, points, {**described, "num_requests": num_requests})


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


def run_options(request_rate, concurrency, burstiness, seed, ignore_eos, temperature, percentiles, goodput, pages,
                progress):
    from benchmarks.run import RunOptions

    return RunOptions(points=load_points(request_rate, concurrency), burstiness=burstiness, seed=seed,
                      ignore_eos=ignore_eos, sampling={} if temperature is None else {"temperature": temperature},
                      percentiles=[float(p) for p in percentiles.split(",")], slos_ms=parse_slos(goodput),
                      metrics_pages=pages, progress=progress)


def or_exit(make, *args):
    """`make(*args)`, with a workload error shown as a bad parameter."""
    from benchmarks.workload import WorkloadError

    try:
        return make(*args)
    except WorkloadError as exc:
        raise typer.BadParameter(str(exc)) from None


def bench_or_exit(base_url: str | list[str], workload, options, model: str | None, api_key: str) -> dict:
    from benchmarks.run import bench

    try:
        return asyncio.run(bench(base_url, workload, options, model=model, api_key=api_key))
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"dvd bench: {exc}", err=True)
        raise typer.Exit(1) from None


ApiKeyOption = Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key")]
IgnoreEosOption = Annotated[bool, typer.Option(help="Generate exactly the output length (vLLM's ignore_eos)")]
TemperatureOption = Annotated[float | None, typer.Option(help="Sampling temperature (default: the server's)")]
RateOption = Annotated[list[float] | None, typer.Option(
    help="Requests per second, Poisson arrivals; repeat for a sweep (default: inf, all at once)")]
ConcurrencyOption = Annotated[list[int] | None, typer.Option(help="Most requests in flight; repeat for a sweep")]
BurstinessOption = Annotated[float, typer.Option(help="Gamma shape of the arrival gaps; 1 = Poisson")]
WarmupOption = Annotated[int, typer.Option(help="Requests sent (and not counted) before the first point")]
PercentilesOption = Annotated[str, typer.Option(help="Comma-separated percentiles to report")]
GoodputOption = Annotated[list[str] | None, typer.Option(
    help="SLO for goodput, METRIC:MS with METRIC ttft, tpot or e2el (repeatable)")]
ProgressOption = Annotated[bool, typer.Option(help="Live progress bar")]


@app.command()
def run(
    base_url: Annotated[str, typer.Option(help="Server root; requests go to BASE_URL/v1/chat/completions")] = (
        "http://127.0.0.1:8000"),
    model: Annotated[str | None, typer.Option(help="Model name (default: the first the server lists)")] = None,
    api_key: ApiKeyOption = "unused",
    jsonl: JsonlOption = None,
    image_dir: FolderOption = None,
    num_requests: RequestsOption = 20,
    image_size: SizeOption = None,
    images_per_request: ImagesOption = 1,
    input_words: WordsOption = 32,
    output_len: OutputOption = None,
    ignore_eos: IgnoreEosOption = True,
    temperature: TemperatureOption = None,
    request_rate: RateOption = None,
    concurrency: ConcurrencyOption = None,
    burstiness: BurstinessOption = 1.0,
    warmup: WarmupOption = 2,
    seed: SeedOption = 0,
    percentiles: PercentilesOption = "50,90,99",
    goodput: GoodputOption = None,
    vision_metrics: Annotated[str | None, typer.Option(
        help="DvD vision server's Prometheus URL, for the per-stage breakdown")] = None,
    language_metrics: Annotated[str | None, typer.Option(
        help="DvD language server's Prometheus URL, for the per-stage breakdown")] = None,
    out: Annotated[Path, typer.Option(help="Results JSON; a CSV of the same name is written beside it")] = Path(
        "benchmarks/results/bench.json"),
    progress: ProgressOption = True,
) -> None:
    """Benchmark one server over a sweep of load points; writes JSON + CSV results."""
    from benchmarks.run import print_summary, write_results

    pages = {kind: url for kind, url in (("vision", vision_metrics), ("language", language_metrics)) if url}
    options = run_options(request_rate, concurrency, burstiness, seed, ignore_eos, temperature, percentiles, goodput,
                          pages, progress)
    workload = or_exit(load_workload, jsonl, image_dir, num_requests, image_size, images_per_request, input_words,
                       output_len, seed, warmup, len(options.points))
    document = bench_or_exit(base_url, workload, options, model, api_key)
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
    from benchmarks.workload import write_jsonl

    requests, _ = or_exit(make_requests, image_dir, num_requests, image_size, images_per_request, input_words,
                          output_len, seed)
    write_jsonl(requests, out)
    typer.echo(f"wrote {len(requests)} requests to {out}")


@app.command()
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
    jsonl: JsonlOption = None,
    image_dir: FolderOption = None,
    num_requests: RequestsOption = 20,
    image_size: SizeOption = None,
    images_per_request: ImagesOption = 1,
    input_words: WordsOption = 32,
    output_len: OutputOption = None,
    ignore_eos: IgnoreEosOption = True,
    temperature: TemperatureOption = None,
    request_rate: RateOption = None,
    concurrency: ConcurrencyOption = None,
    burstiness: BurstinessOption = 1.0,
    warmup: WarmupOption = 2,
    seed: SeedOption = 0,
    percentiles: PercentilesOption = "50,90,99",
    goodput: GoodputOption = None,
    progress: ProgressOption = True,
) -> None:
    """The same sweep against DvD and coupled `vllm serve`: both results, a Markdown table and PNG plots."""
    import contextlib
    import json
    import tempfile

    from benchmarks import servers
    from benchmarks.placement import Placement
    from benchmarks.report import write_comparison
    from benchmarks.run import print_summary, write_results

    try:
        where = Placement.choose(placement, vision_cores, dtype)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--placement / --vision-cores") from None
    servers.stop_on_sigterm()
    paths = {"DvD": out_dir / f"bench_{name}.json", "coupled": out_dir / f"coupled_{name}.json"}
    given = {"DvD": (dvd_results, dvd_url), "coupled": (coupled_results, coupled_url)}
    documents = {}
    for system, (results, url) in given.items():
        if results:
            documents[system] = json.loads(results.read_text())
            continue
        if not url and not model:
            raise typer.BadParameter(f"give --model, or a URL or results file for {system}")
        options = run_options(request_rate, concurrency, burstiness, seed, ignore_eos, temperature, percentiles,
                              goodput, {}, progress)
        workload = or_exit(load_workload, jsonl, image_dir, num_requests, image_size, images_per_request,
                           input_words, output_len, seed, warmup, len(options.points))
        with contextlib.ExitStack() as stack:
            if url:
                target = servers.Target([url] if isinstance(url, str) else url)
            else:
                if log_dir:
                    logs_here = log_dir / system
                    logs_here.mkdir(parents=True, exist_ok=True)
                else:
                    logs_here = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"dvd-bench-{system}-")))
                start = servers.dvd if system == "DvD" else servers.coupled
                typer.echo(f"starting {system} ({model}, placement {where.mode}); logs in {logs_here}")
                try:
                    target = stack.enter_context(start(str(model), logs_here, placement=where))
                except (RuntimeError, TimeoutError) as exc:
                    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs_here.glob("*.log"))
                    typer.echo(f"dvd bench: {system} did not start: {exc}\n{logs}", err=True)
                    raise typer.Exit(1) from None
            options.metrics_pages = target.metrics_pages
            cores = target.cores()  # read while the servers run, before the sweep
            documents[system] = bench_or_exit(target.urls, workload, options, None, api_key)
            documents[system]["placement"] = (
                where.described(system, cores) if target.processes else {"mode": "external", "urls": target.urls})
        write_results(documents[system], paths[system])
        typer.echo(f"{system}:")
        print_summary(documents[system])
    try:
        table = write_comparison(documents, out_dir / f"bench_{name}_compare")
    except ValueError as exc:
        typer.echo(f"dvd bench: {exc}", err=True)
        raise typer.Exit(1) from None
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
    import contextlib
    import json
    import tempfile

    from benchmarks import servers
    from benchmarks.crosscheck import crosscheck as run_crosscheck
    from benchmarks.crosscheck import markdown
    from benchmarks.loadgen import LoadPoint
    from benchmarks.run import first_model_sync
    from benchmarks.workload import write_jsonl

    if bool(model) == bool(base_url):
        raise typer.BadParameter("give --model or --base-url")
    servers.stop_on_sigterm()
    if not (tokenizer or model):
        raise typer.BadParameter("--tokenizer is needed with --base-url", param_hint="--tokenizer")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvd-crosscheck-")))
        if jsonl:
            files, described = [(jsonl, jsonl)] * rounds, {"source": f"jsonl:{jsonl}"}
        else:  # a fresh file per run, so that no run meets requests the server has cached
            paths = [tmp / f"run{i}.jsonl" for i in range(2 * rounds)]  # vllm, dvd, vllm, dvd, ...
            for i, path in enumerate(paths):
                requests, described = or_exit(make_requests, None, num_requests, image_size, images_per_request,
                                              input_words, output_len, seed + i)
                write_jsonl(requests, path)
            files = list(zip(paths[::2], paths[1::2]))
            described |= {"num_requests": num_requests, "seed": f"{seed} + run index"}
        if model:
            typer.echo(f"starting DvD ({model}); logs in {tmp}")
            base_url = stack.enter_context(servers.dvd(str(model), tmp)).base_url
        served = first_model_sync(base_url)
        point = LoadPoint(request_rate, concurrency)
        try:
            document = asyncio.run(run_crosscheck(base_url, served, tokenizer or str(model), files, output_len, point,
                                                  seed, warmup, described))
        except RuntimeError as exc:
            typer.echo(f"dvd bench: {exc}", err=True)
            raise typer.Exit(1) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(document))
    typer.echo(markdown(document))
