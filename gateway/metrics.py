"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("dvd_gateway_requests", "Chat completions, by HTTP status", ["status"])
IN_FLIGHT = Gauge("dvd_gateway_requests_in_flight", "Chat completions in progress")
TTFT = Histogram("dvd_gateway_ttft_seconds", "Request arrival to first output", buckets=LATENCY_BUCKETS)
E2E = Histogram("dvd_gateway_request_seconds", "Request arrival to last output", buckets=LATENCY_BUCKETS)
