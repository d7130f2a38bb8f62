"""`python -m benchmarks.plan_validation`: stage profiles, then each configuration measured and predicted."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.plan_validation import IMAGE_SIZE, IMAGE_TILES, RESULTS
from benchmarks.plan_validation.load import measure_coupled, measure_dvd, measured_figures
from benchmarks.plan_validation.plot import plot
from benchmarks.plan_validation.prediction import REPLICATIONS, add_prediction, repredict
from benchmarks.plan_validation.stage_profiles import load, profile
from benchmarks.toolkit.documents import write
from checkpoint.generate import write_checkpoint
from planner.profiles import StageProfiles

CORES = ("a core per server where the host has one: vision servers pinned with one torch thread, each language "
         "server (all its processes) and coupled vllm serve pinned with taskset; with three servers on two cores "
         "(1+2, 2+1) two share a core, and the simulation places them on one device; the gateway and the client are "
         "not pinned")


def validated(pair: str, checkpoints: dict[str, Path], log_dir: Path, profiles: StageProfiles,
              load_args: dict) -> dict:
    """One configuration `V+L[xK]` measured and predicted: its results row (an error row when it did not run)."""
    servers, _, images = pair.partition("x")
    vision, language = (int(n) for n in servers.split("+"))
    load_args = load_args | {"images_per_request": int(images or 1)}
    began = load()
    try:
        logs = log_dir / pair  # each configuration's server logs apart: names repeat across them
        logs.mkdir(exist_ok=True)
        runs = (measure_dvd(checkpoints["custom"], vision, language, logs, **load_args) if vision
                else measure_coupled(checkpoints["hf"], logs, **load_args))
    except (RuntimeError, TimeoutError) as exc:
        print(f"{pair}: not measured: {exc}", flush=True)
        return {"config": pair, "error": str(exc)}
    row = {"pair": pair, "config": (f"{vision}V+{language}L" if vision else f"coupled x{language}")
           + (f", {images} images" if images else ""), "load": f"start: {began}; end: {load()}",
           **measured_figures(runs)}
    add_prediction(row, profiles, load_args["requests"], load_args["concurrency"], load_args["max_tokens"])
    print(json.dumps(row), flush=True)
    return row


def main(
    name: Annotated[str, typer.Option(help="Result name: profiles/<name>.json, plan_validation_<name>.*")] = "cpu_tiny",
    profile_only: bool = False,
    predict_only: Annotated[bool, typer.Option(
        help="Only recompute the predictions of an existing results file from its profile file")] = False,
    configs: Annotated[str, typer.Option(
        help="V+L[xK]: V vision and L language servers, K images per request (default 1); 0+1 is coupled vllm serve"
    )] = "1+1,1+1x2,0+1,1+2,2+1",
    requests: int = 60,
    concurrency: int = 8,
    max_tokens: int = 16,
    repeats: Annotated[int, typer.Option(help="Measured runs per configuration (fresh images each), averaged")] = 3,
) -> None:
    if predict_only:
        return repredict(name)
    log_dir = Path(tempfile.mkdtemp(prefix="plan-validation-"))
    root = Path(tempfile.mkdtemp(prefix="plan-checkpoints-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the generated checkpoints; server logs stay
    checkpoints = {fmt: write_checkpoint(root / fmt, "tiny", fmt, seed=0) for fmt in ("custom", "hf")}
    profile_path = RESULTS / "profiles" / f"{name}.json"
    print(f"profiling ({load()}); server logs in {log_dir}", flush=True)
    profiles = profile("tiny", profile_path, log_dir, checkpoints)
    print(f"wrote {profile_path}", flush=True)
    if profile_only:
        return
    load_args = {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "repeats": repeats}
    rows = [validated(pair, checkpoints, log_dir, profiles, load_args) for pair in configs.split(",")]
    out = RESULTS / f"plan_validation_{name}.json"
    write({"profiles": str(profile_path.relative_to(RESULTS.parent.parent)), "device": profiles.device,
           "workload": {"image": list(IMAGE_SIZE), "tiles_per_image": IMAGE_TILES, "requests": requests,
                        "concurrency": concurrency, "max_tokens": max_tokens, "repeats": repeats},
           "replications": REPLICATIONS, "command": "python -m benchmarks.plan_validation", "rows": rows,
           "cores": CORES,
           "coupled_profile": "derived from the vision and language profiles" if profiles.coupled is None else
           "measured"}, out)
    if measured := [row for row in rows if "measured" in row]:
        plot(measured, RESULTS / f"plan_validation_{name}.png")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    typer.run(main)
