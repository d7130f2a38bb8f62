"""Prometheus metrics of the language server."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

FEATURES_RECEIVED = Counter("dvd_language_features_received", "Image feature messages accepted")
FEATURE_BYTES = Counter("dvd_language_feature_bytes_received", "Feature payload bytes accepted")
FEATURES_DROPPED = Counter(
    "dvd_language_features_dropped", "Feature messages dropped, by reason", ["reason"]
)
FEATURES_PENDING_BYTES = Gauge("dvd_language_features_pending_bytes", "Feature bytes waiting for Generate")
FEATURES_PENDING_REQUESTS = Gauge("dvd_language_features_pending_requests", "Requests with features held")
FEATURE_WAIT = Histogram(
    "dvd_language_feature_wait_seconds", "Generate arrival to all features present", buckets=LATENCY_BUCKETS
)
FEATURE_TRANSFER = Histogram(
    "dvd_language_feature_transfer_seconds", "Vision server send to arrival, per image (synced clocks)",
    buckets=LATENCY_BUCKETS,
)
PREFILL = Histogram("dvd_language_prefill_seconds", "All features present to first token", buckets=LATENCY_BUCKETS)
DECODE = Histogram("dvd_language_decode_seconds", "First token to last token", buckets=LATENCY_BUCKETS)
TTFT = Histogram("dvd_language_ttft_seconds", "Generate arrival to first token", buckets=LATENCY_BUCKETS)
TPOT = Histogram("dvd_language_tpot_seconds", "Time per output token after the first", buckets=LATENCY_BUCKETS)
E2E = Histogram("dvd_language_request_seconds", "Generate arrival to last token", buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("dvd_language_requests_in_flight", "Generate calls in progress")
# High-water marks: a scrape every few seconds misses a moment over a cap; these keep it.
IN_FLIGHT_PEAK = Gauge("dvd_language_requests_in_flight_peak", "The most Generate calls in progress at once so far")
FEATURES_PENDING_BYTES_PEAK = Gauge("dvd_language_features_pending_bytes_peak",
                                    "The most feature bytes waiting for Generate at once so far")
REQUESTS = Counter("dvd_language_requests", "Finished Generate calls, by outcome", ["outcome"])
FEATURE_CACHE = Counter("dvd_language_feature_cache_images", "Images looked up by content key, by result",
                        ["result"])
FEATURE_CACHE_BYTES_SAVED = Counter("dvd_language_feature_cache_bytes_saved",
                                    "Feature bytes served from the cache instead of the wire")
FEATURE_CACHE_BYTES = Gauge("dvd_language_feature_cache_bytes", "Feature bytes held in the feature cache")
PROMPT_TOKENS = Counter("dvd_language_prompt_tokens", "Prompt tokens of finished requests")
CACHED_PROMPT_TOKENS = Counter("dvd_language_cached_prompt_tokens",
                               "Prompt tokens whose KV came from vLLM's prefix cache")

# Label values known in advance exist from the start at zero: otherwise a series appears at its first event, which
# Prometheus's rate() and increase() miss (a first burst of errors or drops would alert late).
for _outcome in ("ok", "error", "cancelled"):
    REQUESTS.labels(_outcome)
for _result in ("hit", "miss"):
    FEATURE_CACHE.labels(_result)
for _reason in ("late", "duplicate", "not_needed", "over_capacity", "expired", "image_count_mismatch"):
    FEATURES_DROPPED.labels(_reason)
