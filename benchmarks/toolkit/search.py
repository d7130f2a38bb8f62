"""Sustained goodput of a running server: the planner's rate search (`planner.sustained.rate_search`) over measured
runs, each judged by `planner.sustained.judge` on its requests as the client saw them.

A rate's run sends Poisson arrivals of fresh requests (drawn for that run only: no request or image was sent
before, so no server cache can serve one) and lasts at least `least_requests` requests *and* `least_seconds` of
arrivals, so that a queue that grows shows within the run (its last third's median TTFT well above its first
third's) even before it breaks the SLO. The run passes at percentile p when every request finished, the p-th
percentile TTFT and TPOT are within their SLOs and the queue is not growing. The search brackets the answer from
`start` by factors of `step`, then bisects to `precision`; p90 and p99 share the runs. Every run draws its
arrival times from the same seed (the pattern scaled to the rate), as the planner's simulated runs do.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from benchmarks.toolkit.loadgen import LoadPoint
from benchmarks.toolkit.metrics import RequestResult, percentile_name
from benchmarks.toolkit.workload import BenchRequest
from planner.sustained import PERCENTILES, Criterion, Record, Verdict, judge, rate_search


@dataclass(frozen=True)
class GoodputSearch:
    """The SLOs, how long each rate's run lasts, and how the rate is searched; recorded in the results."""

    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.03
    start: float = 1.0  # req/s of the first run: near the answer saves runs
    step: float = 1.4  # factor between rates while bracketing: two bisections then reach 10%
    precision: float = 0.1  # bisection stops when the bracket's high end is within this share of its low end
    least_requests: int = 200
    least_seconds: float = 60.0
    percentiles: tuple[float, ...] = PERCENTILES
    range_factor: float = 64.0  # rates searched: start / range_factor (below it: 0) to start x range_factor

    def __post_init__(self):
        if min(self.ttft_slo_s, self.tpot_slo_s, self.start, self.precision, self.least_seconds) <= 0:
            raise ValueError("the SLOs, the start rate, the precision and the seconds per run must be positive")
        if self.step <= 1 or self.range_factor <= 1:
            raise ValueError(f"the search's step and range factor must be above 1, got {self.step} and "
                             f"{self.range_factor}")
        if self.least_requests < 3:
            raise ValueError(f"a run needs at least 3 requests to judge its queue, got {self.least_requests}")

    def slos_ms(self) -> dict[str, float]:
        return {"ttft": self.ttft_slo_s * 1e3, "tpot": self.tpot_slo_s * 1e3}

    @property
    def criterion(self) -> Criterion:
        return Criterion(self.ttft_slo_s, self.tpot_slo_s)

    def requests_at(self, rate: float) -> int:
        """A run's length: at least `least_requests`, and at least `least_seconds` of arrivals at `rate`."""
        return max(self.least_requests, math.ceil(rate * self.least_seconds))

    def described(self) -> dict:
        c = self.criterion
        return asdict(self) | {"criterion": {"ttft_slo_s": c.ttft_slo_s, "tpot_slo_s": c.tpot_slo_s,
                                             "ttft_growth": c.growth, "growth_floor_of_ttft_slo": c.floor},
                               "run_length": f"max({self.least_requests} requests, {self.least_seconds:g} s x rate)"}


def records(results: list[RequestResult]) -> list[Record]:
    """The client's view of each request as the criterion takes it: sent, TTFT and TPOT (`vllm bench serve`'s,
    0 for a one-token reply); None for a request that failed."""
    return [Record(r.start_time, r.ttft if r.success else None,
                   ((r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0) if r.success
                   else None) for r in results]


RunAt = Callable[[LoadPoint, list[BenchRequest]], Awaitable[tuple[dict, list[RequestResult]]]]


async def search(settings: GoodputSearch, draw: Callable[[int, int], list[BenchRequest]],
                 run_at: RunAt) -> tuple[list[dict], dict]:
    """Each rate the search asks for: `draw(count, run)` fresh requests sent by `run_at` (a results row and the
    requests' results), judged at every percentile. Returns the rows (each with its verdicts under `search`, in
    the order run) and the answer: sustained goodput at each percentile, with the settings."""
    rates = rate_search(settings.percentiles, precision=settings.precision, start=settings.start,
                        step=settings.step, lowest=settings.start / settings.range_factor,
                        highest=settings.start * settings.range_factor)
    rows: list[dict] = []
    try:
        rate = next(rates)
        while True:
            row, results = await run_at(LoadPoint(rate), draw(settings.requests_at(rate), len(rows)))
            verdicts = {p: judge(records(results), settings.criterion, p) for p in settings.percentiles}
            row["search"] = {"run": len(rows), "verdicts": {percentile_name(p): _described(v)
                                                            for p, v in verdicts.items()}}
            rows.append(row)
            rate = rates.send({p: v.passed for p, v in verdicts.items()})
    except StopIteration as done:
        found = done.value
    answer = {f"{percentile_name(p)}_rps": rate for p, rate in found.items()}
    return rows, answer | {"runs": len(rows), "settings": settings.described()}


def _described(verdict: Verdict) -> dict:
    """A verdict for the results file: figures a request that never finished made infinite (or undefined) as
    None."""
    fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(verdict).items()}
    return fields | {"passed": verdict.passed, "reason": verdict.reason}


def passed(row: dict, percentile: float) -> bool | None:
    """Did a search run pass at `percentile` (None: the row is a sweep point)?"""
    verdict = row.get("search", {}).get("verdicts", {}).get(percentile_name(percentile))
    return None if verdict is None else verdict["passed"]
