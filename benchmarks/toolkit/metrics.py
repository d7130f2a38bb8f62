"""Serving metrics with `vllm bench serve`'s definitions, so numbers from either tool mean the same.

Per request (client side, streamed): TTFT = send -> first chunk carrying `choices`; ITL = the gaps
between later `choices` chunks; end-to-end latency = send -> last `choices` chunk; output tokens =
the usage's `completion_tokens`. TPOT = (latency - TTFT) / (output tokens - 1), over requests with more
than one output token (0 for the others when judging goodput). Throughputs divide by the wall time
of the whole run. Percentiles are numpy's linear ones; names follow vLLM's result JSON
(`mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds."""

    success: bool = False
    start_time: float = 0.0  # perf_counter at send
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def percentile_name(p: float) -> str:
    """`99` -> "p99", `99.9` -> "p99.9", as vLLM names its result keys."""
    return f"p{int(p) if int(p) == p else p}"


def _describe(name: str, seconds: list[float], percentiles: list[float]) -> dict[str, float]:
    values = np.asarray(seconds or [0.0]) * 1000
    described = {f"mean_{name}_ms": float(np.mean(values)), f"median_{name}_ms": float(np.median(values)),
                 f"std_{name}_ms": float(np.std(values))}
    for p in percentiles:
        described[f"{percentile_name(p)}_{name}_ms"] = float(np.percentile(values, p))
    return described


def summarize(results: list[RequestResult], duration_s: float, percentiles: list[float],
              slos_ms: dict[str, float] | None = None) -> dict:
    """Aggregate metrics of one run: counts, throughputs, goodput, latency statistics, failure reasons."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    unknown = set(slos_ms or {}) - set(SLO_METRICS)
    if unknown:
        raise ValueError(f"SLOs can be set on {', '.join(SLO_METRICS)}; not on {', '.join(sorted(unknown))}")
    done = [r for r in results if r.success]
    ttfts = [r.ttft for r in done]
    e2els = [r.latency for r in done]
    itls = [gap for r in done for gap in r.itl]
    all_tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in done]
    tpots = [t for r, t in zip(done, all_tpots) if r.output_tokens > 1]
    per_request = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
    good = sum(all(per_request[m][i] * 1000 <= slo for m, slo in (slos_ms or {}).items())
               for i in range(len(done))) if slos_ms else 0
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    summary = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": good / duration_s if slos_ms else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "failure_reasons": dict(Counter(r.error for r in results if not r.success)),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        summary |= _describe(name, values, percentiles)
    return summary
