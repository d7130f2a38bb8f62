"""Where DvD wins: DvD against coupled serving over a grid of workloads, tiles per request x output tokens.

    python -m benchmarks.heatmap --model checkpoints/tiny --name cpu_tiny
    python -m benchmarks.heatmap --model checkpoints/tiny-flash --coupled-model checkpoints/tiny \\
        --name cpu_tiny_vir                                    # DvD with ViR (a Flash checkpoint) against coupled

Both systems run pinned (`benchmarks.toolkit.placement`, the CPU stand-in for one GPU per server): DvD's vision server
on one core group and its language server on the other; coupled serving as one `vllm serve` replica per group,
requests balanced. Each is started once and serves the whole grid.

The headline of every grid point is each system's **sustained goodput** (`benchmarks.toolkit.search`): the highest
Poisson rate whose run holds the SLOs at p90 (and, reported beside it, p99) with every request finished and no
growing queue, found by a search over rates. Each rate's run sends fresh requests, at least `--search-requests`
of them and at least `--search-seconds` of arrivals. A system's search starts at `--start-share` of its own
closed-loop capacity at that point (measured first with `--probe-concurrency` requests in flight), steps by
`--search-step` and bisects to `--search-precision`. The planner's prediction of both systems' sustained goodput
(`planner.plan.sustained` on `--profiles`, runs of the same length) sits next to each measurement. Tiles per
request come from whole images: 1 tile is one 448x448 image, 3 one 896x448 (two tiles and the thumbnail), 6, 9
and 12 are two, three and four of those.

The balance of a point is the CPU time DvD's vision server spent over its language server's during its search
(each on cores of its own, so 1.0 means both cores carry the same load). Writes heatmap_NAME.json, .md and
.png under `--out-dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from benchmarks.toolkit import prometheus, servers
from benchmarks.toolkit import workload as bench_workload
from benchmarks.toolkit.documents import command_line
from benchmarks.toolkit.documents import write as write_document
from benchmarks.toolkit.loadgen import LoadPoint
from benchmarks.toolkit.machine import machine, versions
from benchmarks.toolkit.metrics import percentile_name
from benchmarks.toolkit.options import SearchOptions, grouped
from benchmarks.toolkit.placement import Placement
from benchmarks.toolkit.processes import tree_cpu_seconds
from benchmarks.toolkit.search import GoodputSearch
from benchmarks.toolkit.sweep import RunOptions, bench
from planner.plan import sustained
from planner.profiles import StageProfiles
from planner.workload import Workload as PlannerWorkload

RESULTS = Path(__file__).parent / "results"
IMAGES_FOR_TILES = {1: (1, (448, 448)), 3: (1, (896, 448)), 6: (2, (896, 448)), 9: (3, (896, 448)),
                    12: (4, (896, 448))}  # tiles per request -> (images, size)
INPUT_WORDS = 32
TEXT_TOKENS = INPUT_WORDS + 16  # the words plus the chat template's tokens, for the planner
SYSTEMS = {"DvD": (1, 1), "coupled": (0, 2)}  # the planner's (vision, language) devices of each


def planner_workload(tiles: int, output_tokens: int, search: GoodputSearch,
                     vir_compressed_share: float = 0.0) -> PlannerWorkload:
    """The point's workload for the planner; its searched runs as long as the measured ones."""
    images = IMAGES_FOR_TILES[tiles][0]
    return PlannerWorkload(name=f"{tiles}t_{output_tokens}o", images_per_request=images,
                           tiles_per_image=tiles // images, text_tokens=TEXT_TOKENS, output_tokens=output_tokens,
                           arrival_rate=1.0, requests=search.least_requests, ttft_slo_s=search.ttft_slo_s,
                           tpot_slo_s=search.tpot_slo_s, vir_compressed_share=vir_compressed_share, gpus=2)


def predictions(profiles: StageProfiles, point: dict, search: GoodputSearch) -> dict:
    """The planner's sustained goodput of both systems at the point (p90 and p99)."""
    workload = planner_workload(point["tiles"], point["output_tokens"], search, point.get("vir_compressed_share", 0.0))
    predicted = {}
    for system, (vision, language) in SYSTEMS.items():
        rates = sustained(profiles, workload, vision, language, min_run_s=search.least_seconds)
        predicted[system] = {f"sustained_{percentile_name(p)}_rps": round(rate, 3) for p, rate in rates.items()}
    return predicted


def vir_tiles(target: servers.Target) -> dict[str, float]:
    """ViR's routed tiles so far by route (DvD with a Flash checkpoint; empty otherwise)."""
    page = target.metrics_pages.get("vision")
    return prometheus.counter_by(page, "dvd_vision_vir_tiles_total", "route") if page else {}


def requests_for(point: dict, count: int, seed: int) -> list[bench_workload.BenchRequest]:
    images, size = IMAGES_FOR_TILES[point["tiles"]]
    return bench_workload.synthetic(count, [size], images, INPUT_WORDS, point["output_tokens"], seed)


def measure(target: servers.Target, point: dict, options: RunOptions, count: int = 0, seed: int = 0) -> dict:
    """The point's requests against a running system, after 2 warm-up requests: `count` of them at
    `options.points`' one load, or the sustained-goodput search of `options.search` (fresh requests for each of
    its runs, seeded by (seed, run)). The results document, with the CPU seconds each server spent and the share
    of tiles ViR compressed."""
    requests = requests_for(point, count + 2, seed)
    work = bench_workload.RequestBatches(requests[:2], [requests[2:]] if count else [], {"tiles": point["tiles"]},
                                         lambda n, run: requests_for(point, n, bench_workload.run_seed(seed, run)))
    before = {name: tree_cpu_seconds(p.pid) for name, p in target.processes.items()}
    routed_before = vir_tiles(target)
    document = asyncio.run(bench(target.urls, work, options))
    document["cpu_s"] = {name: round(tree_cpu_seconds(p.pid) - before[name], 2)
                         for name, p in target.processes.items()}
    routed = {route: n - routed_before.get(route, 0.0) for route, n in vir_tiles(target).items()}
    if any(routed.values()):
        document["vir_compressed_share"] = round(routed.get("compressed", 0.0) / sum(routed.values()), 3)
    return document


@contextlib.contextmanager
def started(system: str, model: str, placement: Placement, log_dir: Path):
    logs = log_dir / system
    logs.mkdir(parents=True, exist_ok=True)
    typer.echo(f"starting {system} ({model}); logs in {logs}")
    start = servers.dvd if system == "DvD" else servers.coupled
    with start(model, logs, placement=placement) as target:
        yield target


def probe(target: servers.Target, system: str, point: dict, index: int, concurrency: int, count: int) -> float:
    """The point's closed-loop capacity on `system`: completed requests/s with `concurrency` in flight."""
    options = RunOptions(points=[LoadPoint(math.inf, concurrency)], metrics_pages=target.metrics_pages,
                         progress=False, seed=1000 + index)
    measured = measure(target, point, options, count, seed=1000 + index)
    capacity = round(measured["points"][0]["request_throughput"], 3)
    point.setdefault("capacity_rps", {})[system] = capacity
    if "vir_compressed_share" in measured:  # DvD with ViR: the planner's predictions use the share seen
        point["vir_compressed_share"] = measured["vir_compressed_share"]
    typer.echo(f"probe {system} {point['tiles']} tiles, {point['output_tokens']} out: {capacity:.2f} req/s at "
               f"concurrency {concurrency}")
    return capacity


def search_point(target: servers.Target, system: str, point: dict, index: int, search: GoodputSearch,
                 slos_ms: dict[str, float]) -> None:
    """The point's sustained goodput on `system`, from `search.start`; the search's runs go into the point."""
    options = RunOptions(points=[], slos_ms=slos_ms, percentiles=[50.0, 90.0, 99.0],
                         metrics_pages=target.metrics_pages, progress=False, seed=index, search=search)
    document = measure(target, point, options, seed=index)
    found = document["sustained_goodput"]
    point.setdefault("measured", {})[system] = {
        "sustained_p90_rps": found["p90_rps"], "sustained_p99_rps": found["p99_rps"], "start_rps": search.start,
        "runs": document["points"], "cpu_s": document["cpu_s"],
        "load_avg": [document["load_avg_before"], document["load_avg_after"]]}
    point.setdefault("cores", {})[system] = target.cores()
    typer.echo(f"{system} {point['tiles']} tiles, {point['output_tokens']} out: sustained p90 "
               f"{found['p90_rps']:.2f} req/s, p99 {found['p99_rps']:.2f} ({found['runs']} runs), CPU s "
               f"{document['cpu_s']}")


def limit(measured: dict, slos_ms: dict[str, float]) -> str:
    """What broke at the lowest failing rate above the sustained p90 one: the growing queue, failed requests, or
    TTFT or TPOT at p90."""
    above = [r for r in measured["runs"] if not r["search"]["verdicts"]["p90"]["passed"]
             and r["request_rate"] > measured["sustained_p90_rps"]]
    if not above:
        return "-"
    run = min(above, key=lambda r: r["request_rate"])
    verdict = run["search"]["verdicts"]["p90"]

    def over(key: str, slo_ms: float) -> bool:
        return verdict[key] is not None and verdict[key] * 1e3 > slo_ms

    broke = [name for name, bad in (("queue", not verdict["sustained"]), ("failures", run["failed"] > 0),
                                    ("TTFT", over("ttft_s", slos_ms["ttft"])),
                                    ("TPOT", over("tpot_s", slos_ms["tpot"]))) if bad]
    return f"{', '.join(broke)} at {run['request_rate']:.3g}"


def _share(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(point: dict) -> dict:
    """DvD / coupled sustained goodput at p90 and p99, measured and predicted; their closed-loop capacities; and
    DvD's core balance over its search."""
    dvd, coupled = point["measured"]["DvD"], point["measured"]["coupled"]
    pd, pc = point["predicted"]["DvD"], point["predicted"]["coupled"]
    out = {}
    for p in ("p90", "p99"):
        out[f"sustained_{p}"] = _share(dvd[f"sustained_{p}_rps"], coupled[f"sustained_{p}_rps"])
        out[f"predicted_sustained_{p}"] = _share(pd[f"sustained_{p}_rps"], pc[f"sustained_{p}_rps"])
    out["capacity"] = _share(point["capacity_rps"]["DvD"], point["capacity_rps"]["coupled"])
    cpu = dvd["cpu_s"]
    out["vision_over_language_cpu"] = _share(cpu.get("vision-server", 0.0), cpu.get("language-server", 0.0))
    return out


def draw(plan: list[dict], tiles: list[int], outputs: list[int], path: Path, title: str) -> None:
    """Measured DvD/coupled sustained goodput at p90 as a heat map; each cell also shows p99, the planner's ratios
    and DvD's balance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((len(tiles), len(outputs)), np.nan)
    cells = {}
    for point in plan:
        i, j = tiles.index(point["tiles"]), outputs.index(point["output_tokens"])
        r = point["ratios"]
        grid[i, j] = r["sustained_p90"] if r["sustained_p90"] else np.nan  # 0 or none: no colour, the text says
        cells[i, j] = (f"p90 {_num(r['sustained_p90'])}x (plan {_num(r['predicted_sustained_p90'])}x)\n"
                       f"p99 {_num(r['sustained_p99'])}x (plan {_num(r['predicted_sustained_p99'])}x)\n"
                       f"V/L cpu {_num(r['vision_over_language_cpu'])}")
    figure, axes = plt.subplots(figsize=(2.6 * len(outputs) + 2, 1.1 * len(tiles) + 1.6))
    finite = grid[np.isfinite(grid)]
    spread = max(1.5, float(np.max(np.abs(np.log2(finite))))) if finite.size else 1.5
    image = axes.imshow(np.log2(grid), cmap="RdYlGn", vmin=-spread, vmax=spread, origin="lower", aspect="auto")
    for (i, j), text in cells.items():
        axes.text(j, i, text, ha="center", va="center", fontsize=7)
    axes.set_xticks(range(len(outputs)), [str(o) for o in outputs])
    axes.set_yticks(range(len(tiles)), [str(t) for t in tiles])
    axes.set_xlabel("output tokens per request")
    axes.set_ylabel("tiles per request")
    axes.set_title(title, fontsize=9)
    bar = figure.colorbar(image, ax=axes)
    bar.set_label("log2(DvD / coupled, p90)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _num(value: float | None, template: str = "{:.2f}") -> str:
    return "-" if value is None else template.format(value)


def markdown(result: dict) -> str:
    slos, search = result["slos_ms"], result["search"]
    lines = [f"# DvD vs coupled over tiles x output tokens ({result['name']}): sustained goodput", "",
             f"Sustained goodput: the highest Poisson rate whose run holds TTFT <= {slos['ttft']:g} ms and TPOT <= "
             f"{slos['tpot']:g} ms at the percentile, every request finished and no growing queue "
             f"(`planner.sustained`). Each rate's run: {search['run_length']} fresh requests; each system's search "
             f"starts at {result['start_share']:g}x its own closed-loop capacity (`cap`, {result['probe_concurrency']} "
             f"in flight), steps x{search['step']:g} and bisects to {search['precision']:.0%}. Ratios are DvD / "
             "coupled; `plan` is the planner's prediction (runs of the same length); `DvD limit` / `coupled limit` say "
             "what broke at the lowest failing rate above the p90 answer; V/L cpu is DvD's vision-server CPU time "
             "over its language server's during its search (1 = balanced).", "",
             "| tiles | out | cap DvD / coupled | p90 DvD / coupled req/s | p90 ratio (plan) | p99 DvD / coupled "
             "req/s | p99 ratio (plan) | DvD limit | coupled limit | V/L cpu | runs DvD / coupled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        d, c, r, cap = p["measured"]["DvD"], p["measured"]["coupled"], p["ratios"], p["capacity_rps"]
        lines.append(
            f"| {p['tiles']} | {p['output_tokens']} | {cap['DvD']:.2f} / {cap['coupled']:.2f} | "
            f"{d['sustained_p90_rps']:.2f} / {c['sustained_p90_rps']:.2f} | "
            f"**{_num(r['sustained_p90'])}** ({_num(r['predicted_sustained_p90'])}) | "
            f"{d['sustained_p99_rps']:.2f} / {c['sustained_p99_rps']:.2f} | "
            f"{_num(r['sustained_p99'])} ({_num(r['predicted_sustained_p99'])}) | {limit(d, slos)} | "
            f"{limit(c, slos)} | {_num(r['vision_over_language_cpu'])} | {len(d['runs'])} / {len(c['runs'])} |")
    return "\n".join(lines) + "\n"


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_system(system: str, model: str, plan: list[dict], placement: Placement, log_dir: Path,
               search: GoodputSearch, start_share: float, probing: tuple[int, int], save) -> None:
    """`system` started once for the grid: at each point its closed-loop capacity, then its sustained-goodput
    search from `start_share` of that capacity; the results go into the points, `save()` after each.
    `probing`: (concurrency, requests)."""
    slos_ms = {"ttft": search.ttft_slo_s * 1e3, "tpot": search.tpot_slo_s * 1e3}
    with started(system, model, placement, log_dir) as target:
        for index, point in enumerate(plan):
            capacity = probe(target, system, point, index, *probing)
            start = float(f"{start_share * capacity:.3g}") if capacity else search.start
            search_point(target, system, point, index, dataclasses.replace(search, start=start), slos_ms)
            save()


@grouped
def main(
    model: Annotated[Path, typer.Option(help="Checkpoint DvD serves (a Flash one: ViR on)")] = Path("checkpoints/tiny"),
    coupled_model: Annotated[Path | None, typer.Option(
        help="Checkpoint coupled `vllm serve` serves (default: --model)")] = None,
    name: str = "cpu_tiny",
    tiles: Annotated[str, typer.Option(help=f"Tiles per request, of {sorted(IMAGES_FOR_TILES)}")] = "1,3,6,12",
    output_tokens: str = "16,64,256",
    start_share: Annotated[float, typer.Option(
        help="Each search starts at this share of the system's closed-loop capacity at the point")] = 0.8,
    probe_concurrency: Annotated[int, typer.Option(help="Requests in flight in the capacity probes")] = 8,
    probe_requests: int = 16,
    profiles: Annotated[Path, typer.Option(help="Stage profiles for the planner")] = (
        RESULTS / "profiles/cpu_tiny_2026_12.json"),
    dtype: str = "bfloat16",
    out_dir: Path = RESULTS,
    repredict_results: Annotated[Path | None, typer.Option(
        "--repredict", help="Only recompute the predictions of this heatmap JSON on --profiles")] = None,
    *,
    search_options: SearchOptions,
) -> None:
    if repredict_results:
        return repredict(repredict_results, profiles)
    tile_counts, outputs = parse_list(tiles), parse_list(output_tokens)
    if unknown := set(tile_counts) - set(IMAGES_FOR_TILES):
        raise typer.BadParameter(f"tiles per request {sorted(unknown)}: choose from {sorted(IMAGES_FOR_TILES)}")
    search = search_options.settings()  # each system's start: `start_share` of its capacity, at each point
    placement = Placement.choose("pinned", dtype=dtype)
    result = {"name": name, "command": command_line(),
              "machine": machine(), "versions": versions(), "model": str(model),
              "coupled_model": str(coupled_model or model), "profiles": str(profiles),
              "placement": {"language": placement.language, "vision": placement.vision, "dtype": placement.dtype},
              "slos_ms": search.slos_ms(), "start_share": start_share,
              "search": search.described() | {"start": f"{start_share:g} x each system's closed-loop capacity"},
              "probe_concurrency": probe_concurrency, "probe_requests": probe_requests, "tiles": tile_counts,
              "output_tokens": outputs,
              "points": [{"tiles": t, "output_tokens": o} for t in tile_counts for o in outputs],
              "logs": tempfile.mkdtemp(prefix="dvd-heatmap-")}
    partial = out_dir / f"heatmap_{name}.partial.json"
    run_grid(result, placement, search, StageProfiles.load(profiles), lambda: write_document(result, partial))
    write(result, out_dir)
    partial.unlink(missing_ok=True)


def run_grid(result: dict, placement: Placement, search: GoodputSearch, profiles: StageProfiles, save) -> None:
    """Coupled serving, then DvD, over the whole grid (`run_system`; `save()` after each point, so a long run
    that stops keeps what it measured); then the planner's predictions."""
    servers.stop_on_sigterm()
    plan = result["points"]
    for system, checkpoint in (("coupled", result["coupled_model"]), ("DvD", result["model"])):
        run_system(system, checkpoint, plan, placement, Path(result["logs"]), search, result["start_share"],
                   (result["probe_concurrency"], result["probe_requests"]), save)
    for point in plan:
        point["predicted"] = predictions(profiles, point, search)


def write(result: dict, out_dir: Path) -> None:
    """heatmap_NAME.json, .md and .png, ratios (re)computed from the points."""
    for point in result["points"]:
        point["ratios"] = ratios(point)
    name, slos = result["name"], result["slos_ms"]
    write_document(result, out_dir / f"heatmap_{name}.json")
    (out_dir / f"heatmap_{name}.md").write_text(markdown(result))
    draw(result["points"], result["tiles"], result["output_tokens"], out_dir / f"heatmap_{name}.png",
         f"DvD / coupled sustained goodput ({name})\nTTFT<={slos['ttft']:g} ms, TPOT<={slos['tpot']:g} ms")
    typer.echo(markdown(result))


def repredict(results: Path, profiles: Path) -> None:
    """Recompute the planner's predictions of a results file on other stage profiles (e.g. fresher ones)."""
    result = json.loads(results.read_text())
    if "search" not in result:
        raise typer.BadParameter(f"{results} holds single-rate goodput (the heat map before sustained goodput); "
                                 "rerun the heat map to get a file it can repredict", param_hint="--repredict")
    stage_profiles = StageProfiles.load(profiles)
    settings = {k: v for k, v in result["search"].items()
                if k in {f.name for f in dataclasses.fields(GoodputSearch)} - {"start"}}  # start: per system
    search = GoodputSearch(**settings | {"percentiles": tuple(settings["percentiles"])})
    for point in result["points"]:
        point["predicted"] = predictions(stage_profiles, point, search)
    result["profiles"] = str(profiles)
    write(result, results.parent)


if __name__ == "__main__":
    typer.run(main)
