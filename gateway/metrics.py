"""Prometheus metrics of the gateway, and the per-choice clock that feeds TPOT."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from proto import dvd_pb2

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# The tenant label is a key's configured name (key-N without one; "default" without keys; "-" for a request refused
# before its key was checked): as many values as keys in the settings, never the key itself.
REQUESTS = Counter("dvd_gateway_requests", "API requests, by HTTP status (499: client went away) and tenant",
                   ["status", "tenant"])
IN_FLIGHT = Gauge("dvd_gateway_requests_in_flight", "Generation requests in progress, by tenant", ["tenant"])
# A high-water mark over all tenants: a scrape every few seconds misses a moment over the cap; this keeps it.
IN_FLIGHT_PEAK = Gauge("dvd_gateway_requests_in_flight_peak", "The most generation requests in progress at once so far")
TTFT = Histogram("dvd_gateway_ttft_seconds", "Request arrival to first output", ["tenant"], buckets=LATENCY_BUCKETS)
TPOT = Histogram("dvd_gateway_tpot_seconds", "Time per output token after the first, per choice", ["tenant"],
                 buckets=TOKEN_BUCKETS)
E2E = Histogram("dvd_gateway_request_seconds", "Request arrival to last output", ["tenant"],
                buckets=LATENCY_BUCKETS)
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

# The statuses a client meets in normal operation and in overload, whose series exist from the start (see below).
COMMON_STATUSES = ("200", "400", "401", "429", "499", "500", "503", "504")


def start_series(tenants: list[str]) -> None:
    """Create the series of the known label values at zero: a labelled counter's series otherwise appears at its
    first event, which `rate()` and `increase()` then miss (a first burst of 429s or 5xx would alert late)."""
    for tenant in [*tenants, "-"]:
        for status in COMMON_STATUSES:
            REQUESTS.labels(status, tenant)
    for source in ("vision", "cache"):
        IMAGES.labels(source)


class TokenClock:
    """One choice's token times, for the TPOT metric of its tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.tokens, self.first_at, self.last_at = 0, 0.0, 0.0

    def add(self, response: dvd_pb2.GenerateResponse) -> None:
        now = time.perf_counter()
        if response.token_ids:
            self.first_at = self.first_at or now
            self.last_at = now
            self.tokens += len(response.token_ids)
        if response.finish_reason and self.tokens > 1:
            TPOT.labels(self.tenant).observe((self.last_at - self.first_at) / (self.tokens - 1))
