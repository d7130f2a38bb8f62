"""Is a run at one arrival rate sustained, and within its SLOs at a stated percentile?

The one criterion behind every sustained-goodput figure, simulated or measured: it takes plain per-request
records, so a benchmark can judge a measured run with it as the planner judges a simulated one.

- **Within SLO** at percentile p: the p-th percentile of TTFT is at most the TTFT SLO and the p-th percentile
  of TPOT at most the TPOT SLO (each metric on its own, as `vllm bench serve` reports P99 TTFT and P99 TPOT),
  and every request finished.
- **Sustained**: the queue is not growing. Requests are split into thirds by arrival; a run whose last third's
  median TTFT is more than `growth` times its first third's, and more than `floor` of the TTFT SLO above it, is
  a run past its capacity whose queue had not yet broken the SLO when it ended. A short run cannot tell the two
  apart by percentiles alone; this test can, given a run that lasts several times the service time.

Sustained goodput is the highest arrival rate whose run passes both. `rate_search` finds it, the one search for
every such figure: the planner drives it with simulated runs (`planner.plan.sustained_goodput`), the benchmarks
with measured ones (`benchmarks.toolkit.search`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILES = (90.0, 99.0)  # the two every report states


@dataclass(frozen=True)
class Record:
    """One request as a client saw it; `ttft_s` and `tpot_s` are None when it did not finish."""

    arrival_s: float
    ttft_s: float | None
    tpot_s: float | None


@dataclass(frozen=True)
class Criterion:
    ttft_slo_s: float
    tpot_slo_s: float
    growth: float = 1.5  # last third's median TTFT over the first third's
    floor: float = 0.1  # ... and at least this share of the TTFT SLO above it


@dataclass(frozen=True)
class Verdict:
    percentile: float
    ttft_s: float  # at the percentile (inf when a request did not finish)
    tpot_s: float
    ttft_growth: float  # last third's median TTFT / first third's
    sustained: bool
    within_slo: bool

    @property
    def passed(self) -> bool:
        return self.sustained and self.within_slo

    @property
    def reason(self) -> str:
        if self.passed:
            return "sustained, within SLO"
        return ", ".join(part for part, bad in (("queue growing", not self.sustained),
                                                ("SLO missed", not self.within_slo)) if bad)


def judge(records: Sequence[Record], criterion: Criterion, percentile: float) -> Verdict:
    """The verdict on one run (see the module's docstring)."""
    if len(records) < 3:
        raise ValueError(f"a run needs at least 3 requests to judge its queue, got {len(records)}")
    ordered = sorted(records, key=lambda r: r.arrival_s)
    unfinished = any(r.ttft_s is None or r.tpot_s is None for r in ordered)
    ttft = np.array([np.inf if r.ttft_s is None else r.ttft_s for r in ordered])
    tpot = np.array([np.inf if r.tpot_s is None else r.tpot_s for r in ordered])
    third = len(ordered) // 3
    first, last = float(np.median(ttft[:third])), float(np.median(ttft[-third:]))
    growth = last / first if first > 0 else (1.0 if last == first else np.inf)
    sustained = not (last > criterion.growth * first and last - first > criterion.floor * criterion.ttft_slo_s)
    ttft_p, tpot_p = _percentile(ttft, percentile), _percentile(tpot, percentile)
    within = not unfinished and ttft_p <= criterion.ttft_slo_s and tpot_p <= criterion.tpot_slo_s
    return Verdict(percentile, ttft_p, tpot_p, growth, sustained, within)


def _percentile(values: np.ndarray, percentile: float) -> float:
    """numpy's linear percentile; inf where it falls on or next to a request that did not finish (inf)."""
    with np.errstate(invalid="ignore"):  # inf - inf between two unfinished requests: nan, read as inf
        value = float(np.percentile(values, percentile))
    return math.inf if math.isnan(value) else value


Verdicts = dict[float, bool]  # percentile -> did the run pass at it
Search = Generator[float, Verdicts, dict[float, float]]


def rate_search(percentiles: Sequence[float] = PERCENTILES, *, precision: float = 0.03, start: float = 1.0,
                step: float = 2.0, lowest: float = 1e-3, highest: float = 1e5) -> Search:
    """For each percentile, the highest arrival rate whose run passes: from `start`, up by factors of `step`
    while runs pass (down while they fail) to bracket it, then bisection on the rate's logarithm until the
    bracket is within `precision`. The laxest percentile is searched first; its answer bounds the stricter ones
    from above, and a rate's run serves every percentile.

    A generator, so that a caller runs each rate its own way (a simulation, or real requests with `await`): it
    yields the next rate to run, is sent that run's verdicts (`{percentile: passed}`), and returns
    `{percentile: sustained goodput}`, 0 where even `lowest` fails. `drive` runs it with a plain function."""
    tried: dict[float, Verdicts] = {}

    def passes(rate: float, percentile: float) -> Generator[float, Verdicts, bool]:
        if rate not in tried:
            tried[rate] = yield rate
        return tried[rate][percentile]

    found: dict[float, float] = {}
    for percentile in sorted(percentiles):
        ceiling = min(found.values(), default=None)
        if ceiling is not None and (ceiling == 0.0 or (yield from passes(ceiling, percentile))):
            found[percentile] = ceiling
            continue
        low, high = yield from _bracket(lambda rate, p=percentile: passes(rate, p), ceiling, start, step, lowest,
                                        highest)
        while low and high / low > 1 + precision:
            mid = math.sqrt(low * high)
            low, high = (mid, high) if (yield from passes(mid, percentile)) else (low, mid)
        found[percentile] = low
    return found


def _bracket(passes: Callable[[float], Generator[float, Verdicts, bool]], failing: float | None, start: float,
             step: float, lowest: float, highest: float) -> Generator[float, Verdicts, tuple[float, float]]:
    """(a passing rate, a failing one `step` times higher), from `start` or below a rate known to fail; (0, x)
    when even `lowest` fails."""
    if failing is None:
        rate = start
        if (yield from passes(rate)):
            while (yield from passes(rate * step)):
                rate *= step
                if rate > highest:
                    raise ValueError(f"no arrival rate up to {highest:g} req/s breaks the SLOs")
            return rate, rate * step
        failing = rate
    rate = failing / step
    while not (yield from passes(rate)):
        failing, rate = rate, rate / step
        if rate < lowest:
            return 0.0, failing
    return rate, failing


def drive(search: Search, run: Callable[[float], Verdicts]) -> dict[float, float]:
    """`rate_search`'s answer, each rate's verdicts from `run(rate)`."""
    try:
        rate = next(search)
        while True:
            rate = search.send(run(rate))
    except StopIteration as done:
        return done.value
