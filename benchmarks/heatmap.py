"""Where DvD wins: DvD against coupled serving over a grid of workloads, tiles per request x output tokens.

    python -m benchmarks.heatmap --model checkpoints/tiny --name cpu_tiny
    python -m benchmarks.heatmap --model checkpoints/tiny-flash --coupled-model checkpoints/tiny \\
        --name cpu_tiny_vir                                    # DvD with ViR (a Flash checkpoint) against coupled

Both systems run pinned (`benchmarks.toolkit.placement`, the CPU stand-in for one GPU per server): DvD's vision server
on one core group and its language server on the other; coupled serving as one `vllm serve` replica per group,
requests balanced. Each is started once and serves the whole grid.

Every grid point is one Poisson load at one rate, the same for both systems: 0.9 x the higher of the two
systems' capacities, each measured first by a closed-loop probe (`--probe-concurrency` requests in flight), so the
better side nears saturation and the other shows what it gives up there. The planner's prediction of both systems
at that rate (`planner.plan.run` on `--profiles`) sits next to each measurement. Tiles per request come from
whole images: 1 tile is one 448x448 image, 3 one 896x448 (two tiles and the thumbnail), 6, 9 and 12 are two,
three and four of those. Coupled serving is started twice (probes, then the runs at the chosen rates) around DvD.

The balance of a point is the CPU time DvD's vision server spent over its language server's during the run
(each on cores of its own, so 1.0 means both cores carry the same load). Writes heatmap_NAME.json, .md and
.png under `--out-dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from benchmarks.toolkit.placement import Placement
from benchmarks.toolkit.processes import tree_cpu_seconds
from benchmarks.toolkit.sweep import RunOptions, bench
from planner.plan import run as predict
from planner.profiles import StageProfiles
from planner.workload import Workload as PlannerWorkload

RESULTS = Path(__file__).parent / "results"
IMAGES_FOR_TILES = {1: (1, (448, 448)), 3: (1, (896, 448)), 6: (2, (896, 448)), 9: (3, (896, 448)),
                    12: (4, (896, 448))}  # tiles per request -> (images, size)
INPUT_WORDS = 32
TEXT_TOKENS = INPUT_WORDS + 16  # the words plus the chat template's tokens, for the planner
PREDICTED = ("throughput_rps", "goodput_rps", "ttft_p90_s", "tpot_p90_s")


def planner_workload(tiles: int, output_tokens: int, rate: float, slos_ms: dict[str, float],
                     vir_compressed_share: float = 0.0, requests: int = 400) -> PlannerWorkload:
    images = IMAGES_FOR_TILES[tiles][0]
    return PlannerWorkload(name=f"{tiles}t_{output_tokens}o", images_per_request=images,
                           tiles_per_image=tiles // images, text_tokens=TEXT_TOKENS, output_tokens=output_tokens,
                           arrival_rate=rate, requests=requests, ttft_slo_s=slos_ms["ttft"] / 1e3,
                           tpot_slo_s=slos_ms["tpot"] / 1e3, vir_compressed_share=vir_compressed_share, gpus=2)


def predictions(profiles: StageProfiles, point: dict, slos_ms: dict[str, float]) -> dict:
    """The planner's figures for both systems at the point's rate."""
    workload = planner_workload(point["tiles"], point["output_tokens"], point["rate"], slos_ms,
                                point.get("vir_compressed_share", 0.0))
    predicted = {}
    for system, (vision, language) in (("DvD", (1, 1)), ("coupled", (0, 2))):
        summary = predict(profiles, workload, vision, language)
        predicted[system] = {key: round(getattr(summary, key), 4) for key in PREDICTED}
        if summary.loads:
            predicted[system]["loads"] = {pool: round(load, 3) for pool, load in summary.loads.items()}
    return predicted


def vir_tiles(target: servers.Target) -> dict[str, float]:
    """ViR's routed tiles so far by route (DvD with a Flash checkpoint; empty otherwise)."""
    page = target.metrics_pages.get("vision")
    return prometheus.counter_by(page, "dvd_vision_vir_tiles_total", "route") if page else {}


def requests_for(point: dict, count: int, seed: int) -> list[bench_workload.BenchRequest]:
    images, size = IMAGES_FOR_TILES[point["tiles"]]
    return bench_workload.synthetic(count, [size], images, INPUT_WORDS, point["output_tokens"], seed)


def measure(target: servers.Target, point: dict, load: LoadPoint, count: int, slos_ms: dict[str, float],
            seed: int) -> dict:
    """`count` fresh requests of the point at `load` against a running system (after 2 warm-up requests):
    `vllm bench serve`'s figures, and the CPU seconds each of its servers spent."""
    requests = requests_for(point, count + 2, seed)
    work = bench_workload.RequestBatches(requests[:2], [requests[2:]], {"tiles": point["tiles"]})
    options = RunOptions(points=[load], slos_ms=slos_ms, percentiles=[50.0, 90.0, 99.0],
                         metrics_pages=target.metrics_pages, progress=False, seed=seed)
    before = {name: tree_cpu_seconds(p.pid) for name, p in target.processes.items()}
    routed_before = vir_tiles(target)
    document = asyncio.run(bench(target.urls, work, options))
    used = {name: round(tree_cpu_seconds(p.pid) - before[name], 2) for name, p in target.processes.items()}
    routed = {route: n - routed_before.get(route, 0.0) for route, n in vir_tiles(target).items()}
    row = document["points"][0]
    keep = ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
            "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
            "stages_ms")
    extra = {"vir_compressed_share": round(routed.get("compressed", 0.0) / sum(routed.values()), 3)} if any(
        routed.values()) else {}
    return ({key: row[key] for key in keep if key in row} | extra
            | {"cpu_s": used, "load_avg": document["load_avg_after"]})


@contextlib.contextmanager
def started(system: str, model: str, placement: Placement, log_dir: Path):
    logs = log_dir / system
    logs.mkdir(parents=True, exist_ok=True)
    typer.echo(f"starting {system} ({model}); logs in {logs}")
    start = servers.dvd if system == "DvD" else servers.coupled
    with start(model, logs, placement=placement) as target:
        yield target


def probe(target: servers.Target, system: str, plan: list[dict], concurrency: int, count: int) -> None:
    """Each point's capacity on `system`: completed requests/s with `concurrency` in flight (closed loop)."""
    for index, point in enumerate(plan):
        measured = measure(target, point, LoadPoint(math.inf, concurrency), count, {}, seed=1000 + index)
        point.setdefault("capacity_rps", {})[system] = round(measured["request_throughput"], 3)
        if "vir_compressed_share" in measured:  # DvD with ViR: the planner's predictions use the share seen
            point["vir_compressed_share"] = measured["vir_compressed_share"]
        typer.echo(f"probe {system} {point['tiles']} tiles, {point['output_tokens']} out: "
                   f"{measured['request_throughput']:.2f} req/s at concurrency {concurrency}")


def poisson(target: servers.Target, system: str, plan: list[dict], slos_ms: dict[str, float], seconds: float,
            least: int) -> None:
    """Each point at its rate on `system`; the results go into the point."""
    cores = target.cores()
    for index, point in enumerate(plan):
        count = max(least, math.ceil(point["rate"] * seconds))
        measured = measure(target, point, LoadPoint(point["rate"]), count, slos_ms, seed=index)
        point.setdefault("measured", {})[system] = measured
        point.setdefault("cores", {})[system] = cores
        typer.echo(f"{system} {point['tiles']} tiles, {point['output_tokens']} out @ {point['rate']} req/s: "
                   f"{measured['request_throughput']:.2f} req/s, goodput {measured['request_goodput']:.2f}, "
                   f"TTFT p90 {measured['p90_ttft_ms']:.0f} ms, TPOT p90 {measured['p90_tpot_ms']:.1f} ms, "
                   f"CPU s {measured['cpu_s']}")


def ratios(point: dict) -> dict:
    """DvD / coupled for the figures the goals name, measured and predicted; and DvD's core balance."""
    dvd, coupled = point["measured"]["DvD"], point["measured"]["coupled"]

    def share(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    out = {"goodput": share(dvd["request_goodput"], coupled["request_goodput"]),
           "throughput": share(dvd["request_throughput"], coupled["request_throughput"]),
           "tpot_p90": share(dvd["p90_tpot_ms"], coupled["p90_tpot_ms"]),
           "ttft_p90": share(dvd["p90_ttft_ms"], coupled["p90_ttft_ms"])}
    pd, pc = point["predicted"]["DvD"], point["predicted"]["coupled"]
    out["predicted_goodput"] = share(pd["goodput_rps"], pc["goodput_rps"])
    out["predicted_tpot_p90"] = share(pd["tpot_p90_s"], pc["tpot_p90_s"])
    cpu = dvd["cpu_s"]
    out["vision_over_language_cpu"] = share(cpu.get("vision-server", 0.0), cpu.get("language-server", 0.0))
    return out


def draw(plan: list[dict], tiles: list[int], outputs: list[int], path: Path, title: str) -> None:
    """Measured DvD/coupled goodput as a heat map; each cell also shows the planner's ratio and DvD's balance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((len(tiles), len(outputs)), np.nan)
    cells = {}
    for point in plan:
        i, j = tiles.index(point["tiles"]), outputs.index(point["output_tokens"])
        r = point["ratios"]
        grid[i, j] = r["goodput"] if r["goodput"] is not None else np.nan
        cells[i, j] = (f"{_num(r['goodput'])}x\nplan {_num(r['predicted_goodput'])}x\n"
                       f"V/L cpu {_num(r['vision_over_language_cpu'])}")
    figure, axes = plt.subplots(figsize=(1.8 * len(outputs) + 2, 1.1 * len(tiles) + 1.6))
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
    bar.set_label("log2(DvD goodput / coupled goodput)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _num(value: float | None, template: str = "{:.2f}") -> str:
    return "-" if value is None else template.format(value)


def markdown(result: dict) -> str:
    slos = result["slos_ms"]
    lines = [f"# DvD vs coupled over tiles x output tokens ({result['name']})", "",
             f"Goodput SLOs: TTFT <= {slos['ttft']:g} ms, TPOT <= {slos['tpot']:g} ms. Each point at 0.9 x the higher "
             "of the two systems' closed-loop capacities (`cap`). Ratios are DvD / coupled; `plan` is the planner's "
             "prediction; V/L cpu is DvD's vision-server CPU time over its language server's (1 = balanced).", "",
             "| tiles | out | cap DvD / coupled | rate | DvD req/s | coupled req/s | DvD goodput | coupled goodput "
             "| goodput ratio (plan) | TPOT p90 DvD / coupled ms | TPOT p90 ratio (plan) | TTFT p90 DvD / coupled ms "
             "| V/L cpu |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        d, c, r, cap = p["measured"]["DvD"], p["measured"]["coupled"], p["ratios"], p["capacity_rps"]
        lines.append(
            f"| {p['tiles']} | {p['output_tokens']} | {cap['DvD']:.2f} / {cap['coupled']:.2f} | {p['rate']:g} | "
            f"{d['request_throughput']:.2f} | "
            f"{c['request_throughput']:.2f} | {d['request_goodput']:.2f} | {c['request_goodput']:.2f} | "
            f"{_num(r['goodput'])} ({_num(r['predicted_goodput'])}) | "
            f"{d['p90_tpot_ms']:.1f} / {c['p90_tpot_ms']:.1f} | "
            f"{_num(r['tpot_p90'])} ({_num(r['predicted_tpot_p90'])}) | {d['p90_ttft_ms']:.0f} / "
            f"{c['p90_ttft_ms']:.0f} | {_num(r['vision_over_language_cpu'])} |")
    return "\n".join(lines) + "\n"


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_grid(plan: list[dict], models: dict[str, str], placement: Placement, log_dir: Path,
             profiles: StageProfiles, slos_ms: dict[str, float], probing: tuple[int, int],
             running: tuple[float, int]) -> None:
    """Probe both systems' capacities, choose each point's rate and predict it, then run every point on both:
    coupled serving (probes), DvD (probes and runs), coupled again (runs). `probing` is (concurrency, requests),
    `running` (seconds, least requests); the results go into the points."""
    with started("coupled", models["coupled"], placement, log_dir) as target:
        probe(target, "coupled", plan, *probing)
    with started("DvD", models["DvD"], placement, log_dir) as target:
        probe(target, "DvD", plan, *probing)
        for point in plan:
            point["rate"] = round(0.9 * max(point["capacity_rps"].values()), 2)
            point["predicted"] = predictions(profiles, point, slos_ms)
        poisson(target, "DvD", plan, slos_ms, *running)
    with started("coupled", models["coupled"], placement, log_dir) as target:
        poisson(target, "coupled", plan, slos_ms, *running)


def main(
    model: Annotated[Path, typer.Option(help="Checkpoint DvD serves (a Flash one: ViR on)")] = Path("checkpoints/tiny"),
    coupled_model: Annotated[Path | None, typer.Option(
        help="Checkpoint coupled `vllm serve` serves (default: --model)")] = None,
    name: str = "cpu_tiny",
    tiles: Annotated[str, typer.Option(help=f"Tiles per request, of {sorted(IMAGES_FOR_TILES)}")] = "1,3,6,12",
    output_tokens: str = "16,64,256",
    ttft_slo_ms: float = 2000.0,
    tpot_slo_ms: float = 30.0,
    seconds: Annotated[float, typer.Option(help="Each run sends rate x SECONDS requests (at least --least)")] = 15.0,
    least: int = 24,
    probe_concurrency: Annotated[int, typer.Option(help="Requests in flight in the capacity probes")] = 8,
    probe_requests: int = 16,
    profiles: Annotated[Path, typer.Option(help="Stage profiles for the planner")] = (
        RESULTS / "profiles/cpu_tiny_2026_12.json"),
    dtype: str = "bfloat16",
    out_dir: Path = RESULTS,
    repredict_results: Annotated[Path | None, typer.Option(
        "--repredict", help="Only recompute the predictions of this heatmap JSON on --profiles")] = None,
) -> None:
    if repredict_results:
        return repredict(repredict_results, profiles)
    tile_counts, outputs = parse_list(tiles), parse_list(output_tokens)
    if unknown := set(tile_counts) - set(IMAGES_FOR_TILES):
        raise typer.BadParameter(f"tiles per request {sorted(unknown)}: choose from {sorted(IMAGES_FOR_TILES)}")
    slos = {"ttft": ttft_slo_ms, "tpot": tpot_slo_ms}
    plan = [{"tiles": t, "output_tokens": o} for t in tile_counts for o in outputs]
    placement = Placement.choose("pinned", dtype=dtype)
    servers.stop_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="dvd-heatmap-"))
    run_grid(plan, {"DvD": str(model), "coupled": str(coupled_model or model)}, placement, log_dir,
             StageProfiles.load(profiles), slos, (probe_concurrency, probe_requests), (seconds, least))
    result = {"name": name, "command": command_line(),
              "machine": machine(), "versions": versions(), "model": str(model),
              "coupled_model": str(coupled_model or model),
              "placement": {"language": placement.language, "vision": placement.vision, "dtype": placement.dtype},
              "profiles": str(profiles), "slos_ms": slos, "probe_concurrency": probe_concurrency, "seconds": seconds,
              "least": least, "tiles": tile_counts, "output_tokens": outputs, "points": plan, "logs": str(log_dir)}
    write(result, out_dir)


def write(result: dict, out_dir: Path) -> None:
    """heatmap_NAME.json, .md and .png, ratios (re)computed from the points."""
    for point in result["points"]:
        point["ratios"] = ratios(point)
    name, slos = result["name"], result["slos_ms"]
    write_document(result, out_dir / f"heatmap_{name}.json")
    (out_dir / f"heatmap_{name}.md").write_text(markdown(result))
    draw(result["points"], result["tiles"], result["output_tokens"], out_dir / f"heatmap_{name}.png",
         f"DvD / coupled goodput ({name}; TTFT<={slos['ttft']:g} ms, TPOT<={slos['tpot']:g} ms)")
    typer.echo(markdown(result))


def repredict(results: Path, profiles: Path) -> None:
    """Recompute the planner's predictions of a results file on other stage profiles (e.g. fresher ones)."""
    result = json.loads(results.read_text())
    stage_profiles = StageProfiles.load(profiles)
    for point in result["points"]:
        point["predicted"] = predictions(stage_profiles, point, result["slos_ms"])
    result["profiles"] = str(profiles)
    write(result, results.parent)


if __name__ == "__main__":
    typer.run(main)
