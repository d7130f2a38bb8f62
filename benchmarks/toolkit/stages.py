"""A DvD request's stages, each timed by a server's own Prometheus histogram, and their means over a run: the
difference of the histograms' (sum, count) before and after it.

Stages: preprocess (decode + tiling), vision queue (queued -> first tile in a batch), encode (queued -> last tile
through ViT + projector: the queue included), send (hand-off to ZeroMQ), transfer (vision send -> language
receive), feature wait (Generate arrival -> all features present; overlaps the stages before it), prefill
(features present -> first token), decode (first -> last token); and the gateway's TTFT (request arrival -> first
output) where the gateway's page is read too.
"""

from __future__ import annotations

import asyncio

from benchmarks.toolkit.prometheus import histogram_totals

STAGES = {  # stage -> (the server kind whose page has it, its histogram)
    "preprocess": ("vision", "dvd_vision_preprocess_seconds"),
    "vision_queue": ("vision", "dvd_vision_queue_seconds"),
    "encode": ("vision", "dvd_vision_encode_seconds"),
    "send": ("vision", "dvd_vision_send_seconds"),
    "transfer": ("language", "dvd_language_feature_transfer_seconds"),
    "feature_wait": ("language", "dvd_language_feature_wait_seconds"),
    "prefill": ("language", "dvd_language_prefill_seconds"),
    "decode": ("language", "dvd_language_decode_seconds"),
    "gateway_ttft": ("gateway", "dvd_gateway_ttft_seconds"),
}

Totals = dict[str, dict[str, tuple[float, float]]]


def read(pages: dict[str, str]) -> Totals:
    """Histogram (sum, count) pairs of each server kind ("vision", "language", "gateway") whose page is given."""
    return {kind: histogram_totals(url) for kind, url in pages.items()}


async def snapshot(pages: dict[str, str]) -> Totals:
    """`read`, off the event loop."""
    return await asyncio.to_thread(read, pages)


def stage_means_ms(before: Totals, after: Totals) -> dict[str, float | None]:
    """Mean milliseconds per event of each stage between two snapshots (None: no event); stages whose page was
    not read are left out."""
    means: dict[str, float | None] = {}
    for stage, (kind, name) in STAGES.items():
        if kind not in before or kind not in after:
            continue
        s0, c0 = before[kind].get(name, (0.0, 0.0))
        s1, c1 = after[kind].get(name, (0.0, 0.0))
        means[stage] = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else None
    return means
