"""Prometheus metrics of the gateway, and the per-choice clock that feeds TPOT."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from proto import dvd_pb2

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("dvd_gateway_requests", "Chat completions, by HTTP status (499: client went away)", ["status"])
IN_FLIGHT = Gauge("dvd_gateway_requests_in_flight", "Chat completions in progress")
# A high-water mark: a scrape every few seconds misses a moment over the cap; this keeps it.
IN_FLIGHT_PEAK = Gauge("dvd_gateway_requests_in_flight_peak", "The most chat completions in progress at once so far")
TTFT = Histogram("dvd_gateway_ttft_seconds", "Request arrival to first output", buckets=LATENCY_BUCKETS)
TPOT = Histogram("dvd_gateway_tpot_seconds", "Time per output token after the first, per choice",
                 buckets=TOKEN_BUCKETS)
E2E = Histogram("dvd_gateway_request_seconds", "Request arrival to last output", buckets=LATENCY_BUCKETS)
BACKEND_OUTSTANDING = Gauge("dvd_gateway_backend_outstanding", "Requests outstanding on each server",
                            ["kind", "address"])
BACKEND_REQUESTS = Counter("dvd_gateway_backend_requests", "Calls sent to each server, by outcome",
                           ["kind", "address", "outcome"])
BACKEND_UP = Gauge("dvd_gateway_backend_up", "1 while a server passes health checks, 0 while ejected",
                   ["kind", "address"])
IMAGES = Counter("dvd_gateway_images", "Images of chat completions, by where their features came from "
                 "(vision: encoded and sent; cache: held by the language server, or repeated in the request)",
                 ["source"])
IMAGES_SENT_NEEDLESSLY = Counter("dvd_gateway_images_sent_needlessly",
                                 "Images encoded at once for a language server that turned out to hold them "
                                 "(a misprediction of the affinity map; the server drops the features)")


class TokenClock:
    """One choice's token times, for the TPOT metric."""

    def __init__(self) -> None:
        self.tokens, self.first_at, self.last_at = 0, 0.0, 0.0

    def add(self, response: dvd_pb2.GenerateResponse) -> None:
        now = time.perf_counter()
        if response.token_ids:
            self.first_at = self.first_at or now
            self.last_at = now
            self.tokens += len(response.token_ids)
        if response.finish_reason and self.tokens > 1:
            TPOT.observe((self.last_at - self.first_at) / (self.tokens - 1))
