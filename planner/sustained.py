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

Sustained goodput is the highest arrival rate whose run passes both (`planner.plan.sustained_goodput`).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    ttft_p, tpot_p = float(np.percentile(ttft, percentile)), float(np.percentile(tpot, percentile))
    within = not unfinished and ttft_p <= criterion.ttft_slo_s and tpot_p <= criterion.tpot_slo_s
    return Verdict(percentile, ttft_p, tpot_p, growth, sustained, within)
