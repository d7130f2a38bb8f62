"""Per-stage time of a DvD run, from the difference of the servers' Prometheus histograms before and after.

The stages and the page parsing are `benchmarks/request_latency.py`'s (one definition for both tools).
"""

from __future__ import annotations

import asyncio

from benchmarks.request_latency import STAGES, histogram_totals

Totals = dict[str, dict[str, tuple[float, float]]]


async def snapshot(pages: dict[str, str]) -> Totals:
    """Histogram (sum, count) pairs of each server kind ("vision", "language") whose metrics URL is given."""
    return {kind: await asyncio.to_thread(histogram_totals, url) for kind, url in pages.items()}


def stage_means_ms(before: Totals, after: Totals) -> dict[str, float | None]:
    """Mean milliseconds per event of each stage between two snapshots (None: no event or page not read)."""
    means: dict[str, float | None] = {}
    for stage, (kind, name) in STAGES.items():
        if kind not in before or kind not in after:
            continue
        s0, c0 = before[kind].get(name, (0.0, 0.0))
        s1, c1 = after[kind].get(name, (0.0, 0.0))
        means[stage] = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else None
    return means
