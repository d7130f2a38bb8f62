"""`dvd plan`: size the vision:language GPU split from stage profiles and a workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from planner.files import ProfileError
from planner.profiles import StageProfiles
from planner.workload import Workload

app = typer.Typer(help="Capacity planning: the best vision:language GPU split, from measured stage costs.",
                  no_args_is_help=True)


@app.command("run")
def run_plan(
    profiles: Annotated[Path, typer.Option(help="Stage profiles (JSON), e.g. benchmarks/results/profiles/*.json")],
    workload: Annotated[Path, typer.Option(help="Workload (JSON): request shapes, arrival, SLOs, GPU budget")],
    out: Annotated[Path, typer.Option(help="Folder for plan.md, plan.json and the PNG plots")] = Path("plan"),
    gpus: Annotated[int | None, typer.Option(help="Override the workload's GPU budget")] = None,
    arrival_rate: Annotated[float | None, typer.Option(help="Override: Poisson arrivals, requests/s")] = None,
    search: Annotated[bool, typer.Option(help="Also find each split's sustained goodput (p90 and p99)")] = True,
    min_run_s: Annotated[float, typer.Option(
        help="Each searched run's length in seconds of arrivals (long enough to show a growing queue)")] = 60.0,
    api_server_count: Annotated[int | None, typer.Option(
        help="Coupled serving as one data-parallel `vllm serve` with this many API servers (vLLM 0.32's default: "
             "one per GPU); default: the profile's")] = None,
) -> None:
    """Simulate every vision:language split of the GPU budget against coupled serving; table + plots."""
    from planner.plan import make_plan
    from planner.report import markdown, plots

    try:
        stage_profiles = StageProfiles.load(profiles)
        load = Workload.load(workload)
        overrides = {"gpus": gpus} if gpus else {}
        if arrival_rate:
            overrides |= {"arrival_rate": arrival_rate, "concurrency": None}
        load = Workload.model_validate(load.model_dump() | overrides)
        plan = make_plan(stage_profiles, load, search=search, api_servers=api_server_count,
                         search_options={"min_run_s": min_run_s})
    except (ProfileError, ValueError) as exc:
        typer.echo(f"dvd plan: {exc}", err=True)
        raise typer.Exit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(plan)
    (out / "plan.md").write_text(table)
    (out / "plan.json").write_text(json.dumps(plan.model_dump(mode="json") | {"gain": plan.gain}, indent=2) + "\n")
    images = plots(plan, out)
    typer.echo(table)
    typer.echo(f"wrote {out / 'plan.md'}, {out / 'plan.json'}, " + ", ".join(str(p) for p in images))


@app.command("derive")
def derive_profile(
    out: Annotated[Path, typer.Argument(help="Profile file to write")],
    host_profile: Annotated[Path, typer.Option(help="Measured profile whose host-side costs are reused")],
    preset: Annotated[str, typer.Option(
        help="Model geometry: an InternVL3.5 preset (1b, 2b, 4b, 8b, 38b, ...), qwen3-vl-4b, or a JSON file")] = "8b",
    accelerator: Annotated[str | None, typer.Option(
        help="A data-sheet accelerator (a100-80gb, h100-sxm, h200); overrides the figures below")] = None,
    device: Annotated[str, typer.Option(help="Device name written into the profile")] = "NVIDIA H100 SXM (derived)",
    peak_tflops: Annotated[float, typer.Option(help="Dense bf16 peak, TFLOP/s")] = 989.0,
    hbm_gb_s: Annotated[float, typer.Option(help="Memory bandwidth, GB/s")] = 3350.0,
    memory_gib: Annotated[float, typer.Option(help="Device memory, GiB")] = 80.0,
    nvlink_gb_s: Annotated[float, typer.Option(help="NVLink bandwidth per GPU and direction, GB/s")] = 450.0,
    tensor_parallel_size: Annotated[int, typer.Option(
        help="Devices per language engine: weights and FLOPs split over them, two all-reduces per layer")] = 1,
    mfu: Annotated[float | None, typer.Option(help="Share of peak reached by matrix multiplies (default 0.7)")] = None,
    enforce_eager: Annotated[bool, typer.Option(help="Language engines without CUDA graphs")] = False,
    link_gb_s: Annotated[float, typer.Option(help="Feature link bandwidth, GB/s")] = 25.0,
    api_server_costs: Annotated[Path | None, typer.Option(
        help="vLLM API-server CPU costs (benchmarks/mm_processor.py's result file)")] = Path(
        "benchmarks/results/mm_processor_cpu.json"),
) -> None:
    """Write a profile DERIVED from FLOP and byte counts (labelled so), for sizing before a GPU run."""
    from planner.derive import api_server_costs as measured_api_server
    from planner.derive import derive
    from planner.geometry import geometry
    from planner.hardware import accelerator as data_sheet
    from planner.roofline import Efficiency

    try:
        host = StageProfiles.load(host_profile)
        model = geometry(preset)
        if accelerator:
            sheet = data_sheet(accelerator)
            device, peak_tflops, hbm_gb_s = sheet.name + " (derived)", sheet.bf16_tflops, sheet.hbm_gb_s
            memory_gib, nvlink_gb_s = sheet.memory_gib, sheet.nvlink_gb_s
        efficiency = Efficiency() if mfu is None else Efficiency(gemm=mfu)
        api = measured_api_server(model, api_server_costs) if api_server_costs else None
        profile = derive(model, host, device=device, peak_tflops=peak_tflops, hbm_gb_s=hbm_gb_s,
                         memory_gib=memory_gib, nvlink_gb_s=nvlink_gb_s, tensor_parallel=tensor_parallel_size,
                         efficiency=efficiency, cuda_graphs=not enforce_eager, link_gb_s=link_gb_s, api_server=api)
        profile.roofline.kv_capacity_tokens()  # refuses a model that does not fit its devices
    except (ProfileError, ValueError) as exc:
        typer.echo(f"dvd plan derive: {exc}", err=True)
        raise typer.Exit(2) from None
    profile.save(out)
    typer.echo(f"wrote derived (not measured) {model.name} profile for {profile.device} to {out}")


RESULTS = Path("benchmarks/results")
API_COSTS = RESULTS / "mm_processor_cpu.json"
# vLLM 0.12's API server: the release current at the anchor's post (vLLM 0.12.0, 2025-12-03; the post 2025-12-15)
ANCHOR_API_COSTS = RESULTS / "mm_processor_cpu_vllm_0.12.json"
HOST_PROFILE = RESULTS / "profiles" / "cpu_tiny_2026_12.json"


@app.command("anchor")
def anchor_command(
    out: Annotated[Path, typer.Option(help="Result files' stem (.json, .md)")] = RESULTS / "plan_anchor_a100_qwen3vl4b",
    host_profile: Annotated[Path, typer.Option(help="Measured CPU profile (DvD's host costs)")] = HOST_PROFILE,
    api_server_costs: Annotated[Path, typer.Option(
        help="vLLM API-server costs (mm_processor); default: vLLM 0.12's, the release the post's time ran")] = (
        ANCHOR_API_COSTS),
) -> None:
    """Predict the published GPU anchor (vLLM's encoder-disaggregation post): DP4 against 1E3PD, every point."""
    from planner import anchor

    profiles = anchor.profile(StageProfiles.load(host_profile), str(api_server_costs))
    rows = []
    for point in anchor.PUBLISHED:
        rows.append(anchor.predict(profiles, point))
        typer.echo(rows[-1].model_dump_json())
    table = anchor.table(rows)
    Path(f"{out}.md").write_text(table)  # not with_suffix: a stem may hold a dot (..._vllm_0.32)
    Path(f"{out}.json").write_text(json.dumps(
        {"command": "dvd plan anchor" + (f" --api-server-costs {api_server_costs} --out {out}"
                                         if api_server_costs != ANCHOR_API_COSTS else ""),
         "profile": profiles.model_dump(mode="json"),
         "rows": [r.model_dump() | {"coupled_ratio": r.coupled_ratio, "decoupled_ratio": r.decoupled_ratio,
                                    "direction_right": r.direction_right} for r in rows]}, indent=2) + "\n")
    typer.echo(table)


@app.command("verdicts")
def verdicts_command(
    out: Annotated[Path, typer.Option(help="Folder for the plans and the summary")] = (
        RESULTS / "plan_verdicts_internvl35"),
    host_profile: Annotated[Path, typer.Option(help="Measured CPU profile (DvD's host costs)")] = HOST_PROFILE,
    api_server_costs: Annotated[Path, typer.Option(help="vLLM API-server costs (mm_processor)")] = API_COSTS,
    cases: Annotated[str, typer.Option(help="Which: all, or preset:accelerator, e.g. 8b:h100-sxm")] = "all",
    techniques: Annotated[bool, typer.Option(help="Also rank the techniques beyond 2x on H100")] = True,
    technique_presets: Annotated[str, typer.Option(help="Presets whose techniques are ranked")] = "8b",
) -> None:
    """InternVL3.5 8B and 38B on H100 and H200, with and without ViR; the techniques ranked."""
    from planner import verdicts
    from planner.report import markdown

    host = StageProfiles.load(host_profile)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in verdicts.CASES if cases == "all" or f"{c[0]}:{c[1]}" in cases.split(",")]
    summary = []
    for preset, accelerator, tp in chosen:
        for vir in (False, True):
            v = verdicts.verdict(preset, accelerator, tp, vir, host, api_server_costs)
            name = f"{preset}_{accelerator}{'_vir' if vir else ''}"
            (out / f"{name}.md").write_text(markdown(v.plan))
            best = v.plan.best
            summary.append({"case": name, "best": best.label, "best_p90": best.sustained_p90_rps,
                            "best_p99": best.sustained_p99_rps, "coupled_p90": v.plan.coupled.sustained_p90_rps,
                            "coupled_p99": v.plan.coupled.sustained_p99_rps, "gain_p90": v.plan.gain_at(90),
                            "gain_p99": v.plan.gain_at(99), "bottleneck": best.bottleneck,
                            "coupled_bottleneck": v.plan.coupled.bottleneck})
            typer.echo(json.dumps(summary[-1]))
            if techniques and not vir and accelerator == "h100-sxm" and preset in technique_presets.split(","):
                ranked = verdicts.techniques(preset, accelerator, tp, host, api_server_costs,
                                             (best.vision_gpus, best.language_gpus))
                summary[-1]["techniques"] = [t.model_dump() | {"gain": t.gain} for t in ranked]
                typer.echo(json.dumps(summary[-1]["techniques"]))
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
