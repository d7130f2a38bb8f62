"""Command-line options that several commands take, each declared once.

Single options are `Annotated` types that a command's parameter takes with a default of its own. Groups of
options are dataclasses whose fields are such options: a command decorated with `@grouped` takes a whole group as
one keyword-only parameter (`*, workload: WorkloadOptions`), typer shows the group's fields as the command's own
options, and a field added to a group reaches every command that takes it. Heavy modules are imported where used:
`dvd` imports this module on every start.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import typing
from pathlib import Path
from typing import Annotated

import typer

# ---------------------------------------------------------------- single options, shared by the tools

CheckpointOption = Annotated[str, typer.Option("--model", help="Checkpoint folder; its servers are started here")]
OutOption = Annotated[Path | None, typer.Option(help="Write the result JSON here")]
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
WarmupOption = Annotated[int, typer.Option(help="Requests sent (and not counted) before the first point")]
ApiKeyOption = Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key")]


def grouped(command):
    """Let `command` take option groups (dataclasses of options) as parameters; see the module's docstring."""
    hints = typing.get_type_hints(command, include_extras=True)
    groups = {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}
    parameters = []
    for parameter in inspect.signature(command).parameters.values():  # all keyword-only: typer passes keywords
        if parameter.name not in groups:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[parameter.name]))
            continue
        fields = typing.get_type_hints(groups[parameter.name], include_extras=True)
        parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=fields[f.name],
                                         default=f.default) for f in dataclasses.fields(groups[parameter.name])]

    @functools.wraps(command)
    def with_groups(**given):
        for name, group in groups.items():
            given[name] = group(**{f.name: given.pop(f.name) for f in dataclasses.fields(group)})
        return command(**given)

    with_groups.__signature__ = inspect.Signature(parameters)
    with_groups.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_groups


def or_bad_parameter(make, *args, **kwargs):
    """`make(...)`, with a workload error shown as a bad parameter."""
    from benchmarks.toolkit.workload import WorkloadError

    try:
        return make(*args, **kwargs)
    except WorkloadError as exc:
        raise typer.BadParameter(str(exc)) from None


# ---------------------------------------------------------------- groups, shared by `dvd bench`'s commands


@dataclasses.dataclass
class RequestOptions:
    """Synthetic requests, or requests over a folder of images."""

    image_dir: FolderOption = None
    num_requests: RequestsOption = 20
    image_size: SizeOption = None
    images_per_request: ImagesOption = 1
    input_words: WordsOption = 32
    output_len: OutputOption = None
    seed: SeedOption = 0

    def make(self, count: int, seed: int | None = None):
        """`count` requests (none: only the description), and their description for the results file."""
        from benchmarks.toolkit import workload as w

        seed = self.seed if seed is None else seed
        output_len = self.output_len or 32
        described = {"images_per_request": self.images_per_request, "input_words": self.input_words,
                     "output_len": output_len, "seed": seed}
        if self.image_dir:
            requests = or_bad_parameter(w.from_folder, self.image_dir, count, self.images_per_request,
                                        self.input_words, output_len, seed) if count else []
            return requests, {"source": f"folder:{self.image_dir}", **described}
        sizes = [or_bad_parameter(w.parse_size, s) for s in self.image_size or ["896x448"]]
        requests = or_bad_parameter(w.synthetic, count, sizes, self.images_per_request, self.input_words, output_len,
                                    seed) if count else []
        return requests, {"source": "synthetic", "image_sizes": [f"{a}x{b}" for a, b in sizes], **described}


@dataclasses.dataclass
class WorkloadOptions(RequestOptions):
    """A sweep's requests: generated (fresh for every load point) or a JSONL file's (whole, at every point)."""

    jsonl: JsonlOption = None
    warmup: WarmupOption = 2

    def batches(self, points: int):
        """Warm-up requests, one batch per load point and, for generated workloads, fresh requests on demand for
        each run of a sustained-goodput search (seeded by the run: `workload.run_seed`)."""
        from benchmarks.toolkit import workload as w

        if self.jsonl and self.image_dir:
            raise typer.BadParameter("give --jsonl or --image-dir, not both")
        if self.jsonl:
            requests = or_bad_parameter(w.read_jsonl, self.jsonl, self.output_len)
            described = {"source": f"jsonl:{self.jsonl}", "num_requests": len(requests), "output_len": self.output_len}
            return w.RequestBatches.repeated(requests, self.warmup, points, described)
        requests, described = self.make(self.warmup + self.num_requests * points)

        def draw(count: int, run: int) -> list:
            return self.make(count, seed=w.run_seed(self.seed, run))[0]

        return w.RequestBatches.fresh(requests, self.warmup, points, {**described, "num_requests": self.num_requests},
                                      draw)


@dataclasses.dataclass
class LoadOptions:
    """How a sweep sends its requests: the load points, arrivals, sampling, and what it reports."""

    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly the output length (vLLM's ignore_eos)")] = True
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the server's)")] = None
    request_rate: Annotated[list[float] | None, typer.Option(
        help="Requests per second, Poisson arrivals; repeat for a sweep (default: inf, all at once)")] = None
    concurrency: Annotated[list[int] | None, typer.Option(help="Most requests in flight; repeat for a sweep")] = None
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the arrival gaps; 1 = Poisson")] = 1.0
    percentiles: Annotated[str, typer.Option(help="Comma-separated percentiles to report")] = "50,90,99"
    goodput: Annotated[list[str] | None, typer.Option(
        help="SLO for goodput, METRIC:MS with METRIC ttft, tpot or e2el (repeatable)")] = None
    progress: Annotated[bool, typer.Option(help="Live progress bar")] = True

    def points(self, sweep_by_default: bool = True):
        """Every (rate, concurrency) pair given, in order; none given: one point at `inf`, or none at all when not
        `sweep_by_default` (a sustained-goodput search chooses its own rates)."""
        from benchmarks.toolkit.loadgen import LoadPoint

        if not (sweep_by_default or self.request_rate or self.concurrency):
            return []
        if any(c < 1 for c in self.concurrency or []):
            raise typer.BadParameter("concurrency must be at least 1", param_hint="--concurrency")
        if any(r <= 0 for r in self.request_rate or []):
            raise typer.BadParameter("request rates must be positive (inf: all at once)", param_hint="--request-rate")
        pairs = itertools.product(self.request_rate or [math.inf], self.concurrency or [None])
        return [LoadPoint(rate, concurrency) for rate, concurrency in pairs]

    def slos_ms(self) -> dict[str, float]:
        slos = {}
        for item in self.goodput or []:
            name, _, value = item.partition(":")
            try:
                slos[name] = float(value)
            except ValueError:
                raise typer.BadParameter(f"{item!r} is not METRIC:MILLISECONDS, e.g. ttft:500",
                                         param_hint="--goodput") from None
        return slos

    def run_options(self, seed: int, metrics_pages: dict[str, str], search=None):
        """The run's options; with `search` (a `GoodputSearch`), the sustained-goodput search runs first, the load
        points only when given, and single-rate goodput takes the search's SLOs unless `--goodput` gives others."""
        from benchmarks.toolkit.sweep import RunOptions

        if search and self.burstiness != 1.0:
            raise typer.BadParameter("sustained goodput is searched under Poisson arrivals (burstiness 1)",
                                     param_hint="--burstiness")
        return RunOptions(points=self.points(sweep_by_default=search is None), burstiness=self.burstiness, seed=seed,
                          ignore_eos=self.ignore_eos,
                          sampling={} if self.temperature is None else {"temperature": self.temperature},
                          percentiles=[float(p) for p in self.percentiles.split(",")],
                          slos_ms=self.slos_ms() or (search.slos_ms() if search else {}),
                          metrics_pages=metrics_pages, progress=self.progress, search=search)


SearchFlag = Annotated[bool, typer.Option(
    "--search-goodput/--no-search-goodput",
    help="Search the sustained goodput (p90 and p99) before any load points: the highest Poisson rate whose run "
         "holds the SLOs with no growing queue (see the --search-* options)")]
SearchStartOption = Annotated[float, typer.Option(
    help="Rate of the sustained-goodput search's first run, req/s; near the answer saves runs")]


@dataclasses.dataclass
class SearchOptions:
    """The sustained-goodput search (`benchmarks.toolkit.search`): the SLOs, each rate's run length, the steps.
    Where it starts is each command's own (a rate given, or a share of a measured capacity)."""

    ttft_slo_ms: Annotated[float, typer.Option(help="Sustained goodput: TTFT SLO (ms) at the percentile")] = 2000.0
    tpot_slo_ms: Annotated[float, typer.Option(help="Sustained goodput: TPOT SLO (ms) at the percentile")] = 30.0
    search_step: Annotated[float, typer.Option(help="Factor between rates while bracketing the answer")] = 1.4
    search_precision: Annotated[float, typer.Option(
        help="Bisect until the passing and failing rates are within this share")] = 0.1
    search_requests: Annotated[int, typer.Option(help="Each rate's run sends at least this many requests")] = 200
    search_seconds: Annotated[float, typer.Option(
        help="... and at least this many seconds of arrivals (rate x seconds requests), to show a growing queue")] = (
        60.0)

    def settings(self, start: float = 1.0):
        """The `GoodputSearch` these options describe, from `start` req/s."""
        from benchmarks.toolkit.search import GoodputSearch

        try:
            return GoodputSearch(ttft_slo_s=self.ttft_slo_ms / 1e3, tpot_slo_s=self.tpot_slo_ms / 1e3, start=start,
                                 step=self.search_step, precision=self.search_precision,
                                 least_requests=self.search_requests, least_seconds=self.search_seconds)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--search-* / --*-slo-ms") from None
