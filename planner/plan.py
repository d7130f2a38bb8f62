"""A plan: every vision:language split of the GPU budget simulated against coupled serving on the same GPUs.

The headline figure of each system is its **sustained goodput**: the highest Poisson arrival rate whose run is
sustained (no growing queue) and within the SLOs at a stated percentile (`planner.sustained`), p90 and p99.
Goodput at the workload's own rate (throughput x the share of requests meeting both SLOs) stays beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel

from planner.profiles import StageProfiles
from planner.simulate import Result, pool_loads, simulate_coupled, simulate_dvd
from planner.sustained import PERCENTILES, Criterion, Record, drive, judge, rate_search
from planner.workload import Workload

MIN_RUN_S = 60.0  # a searched run lasts at least this long at its arrival rate (more requests at higher rates)
MAX_RUN_REQUESTS = 4000


class Summary(BaseModel):
    """One system on one split: what an operator compares."""

    system: str  # "dvd", "coupled" or "epd"
    vision_gpus: int
    language_gpus: int
    tensor_parallel: int = 1  # GPUs per language engine
    throughput_rps: float  # completed requests / (last finish - first arrival), as a benchmark client reports it
    goodput_rps: float  # throughput x the share of requests meeting both SLOs, at the workload's rate
    slo_attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float = 0.0
    output_tokens_per_s: float
    sustained_p90_rps: float | None = None  # sustained goodput, SLOs at p90
    sustained_p99_rps: float | None = None  # ... at p99
    loads: dict[str, float] = {}  # DvD pool -> demand / best-case capacity at the achieved throughput
    busy_share: dict[str, float] = {}  # pool -> share of the run its devices (or processes) were working
    bottleneck: str = ""

    @property
    def label(self) -> str:
        tp = f" (TP{self.tensor_parallel})" if self.tensor_parallel > 1 else ""
        if self.system == "dvd":
            return f"{self.vision_gpus}V:{self.language_gpus}L{tp}"
        if self.system == "epd":
            return f"{self.vision_gpus}E{self.language_gpus}PD"
        return f"coupled x{self.language_gpus}{tp}"

    def sustained(self, percentile: float) -> float | None:
        return self.sustained_p90_rps if percentile == 90 else self.sustained_p99_rps


class Plan(BaseModel):
    workload: Workload
    device: str
    geometry: str
    provenance: str
    coupled_costs: str  # "measured" or "derived from the vision and language profiles"
    dvd: list[Summary]
    coupled: Summary
    best: Summary | None  # the split with the highest sustained goodput (or goodput when not searched)

    def gain_at(self, percentile: float) -> float | None:
        if self.best is None:
            return None
        ours, theirs = self.best.sustained(percentile), self.coupled.sustained(percentile)
        if ours is None:
            ours, theirs = self.best.goodput_rps, self.coupled.goodput_rps
        return ours / theirs if theirs else None

    @property
    def gain(self) -> float | None:
        """DvD's best split over coupled: sustained goodput at p90 when searched, else goodput."""
        return self.gain_at(90)


def records(result: Result) -> list[Record]:
    return [Record(r.arrival, r.ttft if r.finish is not None else None, r.tpot if r.finish is not None else None)
            for r in result.requests]


def summarize(result: Result, workload: Workload, profiles: StageProfiles) -> Summary:
    done = [r for r in result.requests if r.finish is not None]
    duration = max(r.finish for r in done) - min(r.arrival for r in result.requests)
    ttft = np.array([r.ttft for r in done])
    tpot = np.array([r.tpot for r in done])
    throughput = len(done) / duration
    attainment = sum(r.ttft <= workload.ttft_slo_s and r.tpot <= workload.tpot_slo_s for r in done) / len(done)
    tp = tensor_parallel(profiles) if result.system != "epd" else 1
    summary = Summary(
        system=result.system, vision_gpus=result.vision_servers, language_gpus=result.language_servers * tp,
        tensor_parallel=tp,
        throughput_rps=throughput, goodput_rps=throughput * attainment, slo_attainment=attainment,
        ttft_p50_s=float(np.percentile(ttft, 50)), ttft_p90_s=float(np.percentile(ttft, 90)),
        ttft_p99_s=float(np.percentile(ttft, 99)), tpot_p50_s=float(np.percentile(tpot, 50)),
        tpot_p90_s=float(np.percentile(tpot, 90)), tpot_p99_s=float(np.percentile(tpot, 99)),
        output_tokens_per_s=sum(r.output_tokens for r in done) / duration,
    )
    counts = result.servers or {"vision": result.vision_servers, "wire": result.language_servers,
                                "language": result.language_servers}
    summary.busy_share = {pool: seconds / (duration * counts[pool]) for pool, seconds in result.busy_s.items()
                          if counts.get(pool)}
    if result.system == "dvd" and profiles.roofline is None:
        summary.loads = pool_loads(profiles, workload, throughput, result.vision_servers, result.language_servers)
        summary.bottleneck = max(summary.loads, key=summary.loads.get)
    elif summary.busy_share:
        # A language engine decodes whenever a request runs, so its device is near fully busy long before it is
        # the limit; a front end's process or a vision server is the limit once it is nearly always busy.
        others = {pool: share for pool, share in summary.busy_share.items() if pool != "language"}
        busiest = max(others, key=others.get, default=None)
        summary.bottleneck = busiest if busiest and others[busiest] >= 0.9 else "language"
    if result.system == "coupled" and summary.bottleneck == "language":
        summary.bottleneck = "engine (encoder + language in one step)"
    return summary


def tensor_parallel(profiles: StageProfiles) -> int:
    return profiles.roofline.tensor_parallel if profiles.roofline else 1


def simulate(profiles: StageProfiles, workload: Workload, vision_gpus: int, language_gpus: int,
             devices: list[int] | None = None, api_servers: int | None = None, **techniques) -> Result:
    """One run: `vision_gpus` 0 means coupled serving on `language_gpus` devices. Under tensor parallelism each
    language engine (DvD's language server, a coupled replica) takes that many of the language GPUs.
    `techniques`: `simulate_dvd`'s options."""
    tp = tensor_parallel(profiles)
    if language_gpus % tp:
        raise ValueError(f"{language_gpus} language GPUs do not split into engines of tensor parallelism {tp}")
    if vision_gpus:
        return simulate_dvd(profiles, workload, vision_gpus, language_gpus // tp, devices, **techniques)
    return simulate_coupled(profiles, workload, language_gpus // tp, api_servers)


def run(profiles: StageProfiles, workload: Workload, vision_gpus: int, language_gpus: int,
        devices: list[int] | None = None, api_servers: int | None = None, **techniques) -> Summary:
    """One system at the workload's own arrival: `vision_gpus` 0 means coupled on `language_gpus` devices.
    `devices` places DvD's servers on shared devices (see `simulate_dvd`); by default each has its own."""
    result = simulate(profiles, workload, vision_gpus, language_gpus, devices, api_servers, **techniques)
    return summarize(result, workload, profiles)


def sustained_goodput(simulate_at: Callable[[Workload], Result], workload: Workload,
                      percentiles: tuple[float, ...] = PERCENTILES, *, precision: float = 0.03,
                      min_run_s: float = MIN_RUN_S) -> dict[float, float]:
    """For each percentile, the highest Poisson rate whose simulated run `planner.sustained.judge` passes
    (`planner.sustained.rate_search`: doubling from 1 req/s, then bisection to `precision`). Each run lasts at
    least `min_run_s` at its rate; runs are shared between percentiles and seeded alike (common random numbers)."""
    criterion = Criterion(workload.ttft_slo_s, workload.tpot_slo_s)

    def run_at(rate: float) -> dict[float, bool]:
        count = min(MAX_RUN_REQUESTS, max(workload.requests, math.ceil(rate * min_run_s)))
        trial = workload.model_copy(update={"arrival_rate": rate, "concurrency": None, "requests": count})
        result = simulate_at(trial)
        return {p: judge(records(result), criterion, p).passed for p in percentiles}

    return drive(rate_search(percentiles, precision=precision), run_at)


def sustained(profiles: StageProfiles, workload: Workload, vision_gpus: int, language_gpus: int,
              api_servers: int | None = None, techniques: dict | None = None, **options) -> dict[float, float]:
    """Sustained goodput of one system (see `sustained_goodput`)."""
    return sustained_goodput(
        lambda trial: simulate(profiles, trial, vision_gpus, language_gpus, api_servers=api_servers,
                               **(techniques or {})), workload, **options)


def screen(profiles: StageProfiles, workload: Workload, splits: list[tuple[int, int]], keep: int) -> set:
    """The `keep` splits with the most closed-loop throughput (many requests in flight, SLOs aside): a cheap
    ranking, so that only the likely best are searched."""
    def capacity(split: tuple[int, int]) -> float:
        clients = 32 * split[1]
        trial = workload.model_copy(update={"arrival_rate": None, "concurrency": clients, "requests": 4 * clients})
        return run(profiles, trial, *split).throughput_rps
    return set(sorted(splits, key=capacity, reverse=True)[:keep])


def make_plan(profiles: StageProfiles, workload: Workload, *, search: bool = True,
              api_servers: int | None = None, search_options: dict | None = None,
              search_top: int | None = None) -> Plan:
    """Every split from 1 vision GPU to gpus-1 (language GPUs in whole tensor-parallel engines), and coupled
    data-parallel serving on all `gpus`. `search_top`: search only the splits `screen` ranks first."""
    tp = tensor_parallel(profiles)
    if workload.gpus < 1 + tp or workload.gpus % tp:
        raise ValueError(f"DvD needs at least one vision GPU and one language engine of {tp} GPUs, and coupled "
                         f"serving whole engines: the budget is {workload.gpus} GPUs")
    splits = [(v, workload.gpus - v) for v in range(1, workload.gpus) if (workload.gpus - v) % tp == 0]
    dvd = [run(profiles, workload, v, lang) for v, lang in splits]
    coupled = run(profiles, workload, 0, workload.gpus, api_servers=api_servers)
    if search:
        chosen = screen(profiles, workload, splits, search_top) if search_top else set(splits)
        for summary, (v, lang) in [*zip(dvd, splits), (coupled, (0, workload.gpus))]:
            if v and (v, lang) not in chosen:
                continue
            rates = sustained(profiles, workload, v, lang, api_servers=api_servers if not v else None,
                              **(search_options or {}))
            summary.sustained_p90_rps, summary.sustained_p99_rps = rates[90.0], rates[99.0]
            if rates[90.0]:  # where the capacity went: busy shares and bottleneck at the sustained rate
                at = workload.model_copy(update={"arrival_rate": rates[90.0], "concurrency": None,
                                                 "requests": max(workload.requests, int(rates[90.0] * 40))})
                there = run(profiles, at, v, lang, api_servers=api_servers if not v else None)
                summary.busy_share, summary.bottleneck = there.busy_share, there.bottleneck
    key = ((lambda s: (s.sustained_p90_rps or -1.0, s.sustained_p99_rps or -1.0, s.goodput_rps)) if search
           else (lambda s: (s.goodput_rps, -s.ttft_p90_s)))
    return Plan(workload=workload, device=profiles.device, geometry=profiles.geometry.name,
                provenance=profiles.provenance,
                coupled_costs="measured" if profiles.coupled or profiles.api_server
                else "derived from the vision and language profiles",
                dvd=dvd, coupled=coupled, best=max(dvd, key=key))
