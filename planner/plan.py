"""A plan: every vision:language split of the GPU budget simulated against coupled serving on the same GPUs."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from planner.profiles import StageProfiles
from planner.simulate import Result, pool_loads, simulate_coupled, simulate_dvd
from planner.workload import Workload

SLO_ATTAINMENT = 0.9  # a rate is sustainable when this share of requests meets both SLOs


class Summary(BaseModel):
    """One system on one split: what an operator compares."""

    system: str  # "dvd" or "coupled"
    vision_gpus: int
    language_gpus: int
    throughput_rps: float  # completed requests / (last finish - first arrival), as a benchmark client reports it
    goodput_rps: float  # throughput x SLO attainment
    slo_attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    output_tokens_per_s: float
    max_slo_rate_rps: float | None = None  # highest Poisson rate still meeting SLOs (SLO_ATTAINMENT)
    loads: dict[str, float] = {}  # pool -> demand / best-case capacity at the achieved throughput
    busy_share: dict[str, float] = {}  # pool -> share of the run its devices (or links) were working
    bottleneck: str = ""

    @property
    def label(self) -> str:
        if self.system == "dvd":
            return f"{self.vision_gpus}V:{self.language_gpus}L"
        return f"coupled x{self.language_gpus}"


class Plan(BaseModel):
    workload: Workload
    device: str
    geometry: str
    provenance: str
    coupled_costs: str  # "measured" or "derived from the vision and language profiles"
    dvd: list[Summary]
    coupled: Summary
    best: Summary | None  # the split with the highest max SLO rate (or goodput when not searched)

    @property
    def gain(self) -> float | None:
        """DvD's best split over coupled, by max SLO rate when searched, else by goodput."""
        if self.best is None:
            return None
        if self.best.max_slo_rate_rps is not None:
            ours, theirs = self.best.max_slo_rate_rps, self.coupled.max_slo_rate_rps
        else:
            ours, theirs = self.best.goodput_rps, self.coupled.goodput_rps
        return ours / theirs if theirs else None


def summarize(result: Result, workload: Workload, profiles: StageProfiles) -> Summary:
    done = [r for r in result.requests if r.finish is not None]
    duration = max(r.finish for r in done) - min(r.arrival for r in result.requests)
    ttft = np.array([r.ttft for r in done])
    tpot = np.array([r.tpot for r in done])
    throughput = len(done) / duration
    attainment = sum(r.ttft <= workload.ttft_slo_s and r.tpot <= workload.tpot_slo_s for r in done) / len(done)
    summary = Summary(
        system=result.system, vision_gpus=result.vision_servers, language_gpus=result.language_servers,
        throughput_rps=throughput, goodput_rps=throughput * attainment, slo_attainment=attainment,
        ttft_p50_s=float(np.percentile(ttft, 50)), ttft_p90_s=float(np.percentile(ttft, 90)),
        ttft_p99_s=float(np.percentile(ttft, 99)), tpot_p50_s=float(np.percentile(tpot, 50)),
        tpot_p90_s=float(np.percentile(tpot, 90)),
        output_tokens_per_s=sum(r.output_tokens for r in done) / duration,
    )
    servers = {"vision": result.vision_servers, "wire": result.language_servers, "language": result.language_servers}
    summary.busy_share = {pool: seconds / (duration * servers[pool]) for pool, seconds in result.busy_s.items()}
    if result.system == "dvd":
        summary.loads = pool_loads(profiles, workload, throughput, result.vision_servers, result.language_servers)
        summary.bottleneck = max(summary.loads, key=summary.loads.get)
    else:
        summary.bottleneck = "engine (encoder + language in one step)"
    return summary


def run(profiles: StageProfiles, workload: Workload, vision_gpus: int, language_gpus: int,
        devices: list[int] | None = None) -> Summary:
    """One system at the workload's own arrival: `vision_gpus` 0 means coupled on `language_gpus` devices.
    `devices` places DvD's servers on shared devices (see `simulate_dvd`); by default each has its own."""
    if vision_gpus:
        result = simulate_dvd(profiles, workload, vision_gpus, language_gpus, devices)
    else:
        result = simulate_coupled(profiles, workload, language_gpus)
    return summarize(result, workload, profiles)


def max_slo_rate(profiles: StageProfiles, workload: Workload, vision_gpus: int, language_gpus: int,
                 *, steps: int = 7) -> float:
    """Highest Poisson arrival rate at which SLO_ATTAINMENT of requests meet both SLOs (bisection)."""
    def meets(rate: float) -> bool:
        trial = workload.model_copy(update={"arrival_rate": rate, "concurrency": None})
        return run(profiles, trial, vision_gpus, language_gpus).slo_attainment >= SLO_ATTAINMENT

    low, high = 0.0, 1.0
    while meets(high):  # grow until the SLOs break
        low, high = high, high * 2
        if high > 1e6:
            return high
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if meets(mid) else (low, mid)
    return low


def make_plan(profiles: StageProfiles, workload: Workload, *, search: bool = True) -> Plan:
    """Every split from 1 vision GPU to gpus-1, and coupled data-parallel serving on all `gpus`."""
    if workload.gpus < 2:
        raise ValueError(f"DvD needs at least 2 GPUs (one vision, one language); the budget is {workload.gpus}")
    splits = [(v, workload.gpus - v) for v in range(1, workload.gpus)]
    dvd = [run(profiles, workload, v, lang) for v, lang in splits]
    coupled = run(profiles, workload, 0, workload.gpus)
    if search:
        for summary, (v, lang) in zip(dvd, splits):
            summary.max_slo_rate_rps = max_slo_rate(profiles, workload, v, lang)
        coupled.max_slo_rate_rps = max_slo_rate(profiles, workload, 0, workload.gpus)
    key = (lambda s: (s.max_slo_rate_rps, s.goodput_rps)) if search else (lambda s: (s.goodput_rps, -s.ttft_p90_s))
    return Plan(workload=workload, device=profiles.device, geometry=profiles.geometry.name,
                provenance=profiles.provenance,
                coupled_costs="measured" if profiles.coupled else "derived from the vision and language profiles",
                dvd=dvd, coupled=coupled, best=max(dvd, key=key))
