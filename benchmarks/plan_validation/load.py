"""Plan validation's load: `dvd bench` against a running configuration in a closed loop (all requests queued, a
concurrency cap), fresh images every run, and the cores each server process and the client kept busy meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from pathlib import Path

from benchmarks.plan_validation import IMAGE_SIZE, INPUT_WORDS, WARMUP
from benchmarks.plan_validation import servers as configurations
from benchmarks.toolkit.loadgen import LoadPoint
from benchmarks.toolkit.processes import cpu_seconds_by_role
from benchmarks.toolkit.sweep import RunOptions, bench
from benchmarks.toolkit.workload import RequestBatches, synthetic

FIGURES = ("throughput_rps", "ttft_p50_s", "ttft_p90_s")


@dataclasses.dataclass
class Measured:
    throughput_rps: float
    ttft_p50_s: float
    ttft_p90_s: float
    errors: int
    cores_busy: dict[str, float] = dataclasses.field(default_factory=dict)  # process -> cores used during the run


def drive(base_url: str, requests: int, concurrency: int, max_tokens: int, images_per_request: int = 1,
          processes: dict | None = None, repeats: int = 1) -> list[Measured]:
    """`dvd bench`, `repeats` times: fresh synthetic requests (new images each time, so no cache hits), all
    queued at once under a concurrency cap (a closed loop); with `processes`, also the cores each of them
    (and the client) kept busy meanwhile."""
    pids = {name: process.pid for name, process in (processes or {}).items()}
    return [_drive_once(base_url, requests, concurrency, max_tokens, images_per_request, pids, seed)
            for seed in range(repeats)]


def _drive_once(base_url: str, requests: int, concurrency: int, max_tokens: int, images_per_request: int,
                pids: dict[str, int], seed: int) -> Measured:
    generated = synthetic(WARMUP + requests, [IMAGE_SIZE], images_per_request, INPUT_WORDS, max_tokens, seed=seed)
    workload = RequestBatches.fresh(generated, WARMUP, 1, {"source": "synthetic"})
    options = RunOptions(points=[LoadPoint(max_concurrency=concurrency)], ignore_eos=True,
                         sampling={"temperature": 0}, percentiles=[50.0, 90.0], progress=False)
    before, began = cpu_seconds_by_role(pids), time.perf_counter()
    point = asyncio.run(bench(base_url, workload, options))["points"][0]
    after, wall = cpu_seconds_by_role(pids), time.perf_counter() - began  # warm-up included: 4 of 64 requests
    cores = {role: round((after[role] - before.get(role, 0.0)) / wall, 2) for role in after}
    return Measured(point["request_throughput"], point["p50_ttft_ms"] / 1e3, point["p90_ttft_ms"] / 1e3,
                    point["failed"], cores)


def measure_dvd(checkpoint: Path, vision: int, language: int, log_dir: Path, **load_args) -> list[Measured]:
    """V vision and L language servers behind a gateway (`servers.configuration`), driven."""
    launched, ready, url = configurations.configuration(checkpoint, vision, language, log_dir)
    with launched.running(ready, what="every server answers Health and the gateway sees them all"):
        return drive(url, processes=launched.processes, **load_args)


def measure_coupled(checkpoint: Path, log_dir: Path, **load_args) -> list[Measured]:
    """One coupled replica driven like the DvD configurations."""
    with configurations.coupled(checkpoint, log_dir) as target:
        return drive(target.base_url, processes=target.processes, **load_args)


def measured_figures(runs: list[Measured]) -> dict:
    """A configuration's measured runs: each run's figures, their means (compared with the prediction) and
    the cores each process kept busy, averaged."""
    each = [{key: round(getattr(run, key), 4) for key in FIGURES} | {"errors": run.errors} for run in runs]
    roles = {role for run in runs for role in run.cores_busy}
    return {"measured": {key: round(statistics.mean(r[key] for r in each), 4) for key in FIGURES}
            | {"errors": sum(r["errors"] for r in each)},
            "measured_runs": each,
            "cores_busy": {role: round(statistics.mean(run.cores_busy.get(role, 0.0) for run in runs), 2)
                           for role in sorted(roles)}}
