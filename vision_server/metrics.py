"""Prometheus metrics of the vision server."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("dvd_vision_requests", "Encode calls, by outcome", ["outcome"])
DISPATCH = Histogram("dvd_vision_dispatch_seconds",
                     "API request arrival at the gateway to its Encode arriving here (needs synced clocks)",
                     buckets=(0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.010, 0.012, 0.014,
                              0.016, 0.018, 0.020, 0.025, 0.035, 0.05, 0.1, 0.25, 1))
IMAGES = Counter("dvd_vision_images", "Images encoded and sent")
TILES = Counter("dvd_vision_tiles", "Tiles encoded, by device", ["device"])
FEATURE_BYTES = Counter("dvd_vision_feature_bytes_sent", "Feature payload bytes sent")
FEATURE_INFLIGHT_BYTES = Gauge("dvd_vision_feature_inflight_bytes",
                               "Feature bytes handed to the TCP transport and not yet written out")
QUEUE_DEPTH = Gauge("dvd_vision_queue_tiles", "Tiles waiting for the encoder, by device", ["device"])
BATCH_TILES = Histogram("dvd_vision_batch_tiles", "Tiles per encoder batch",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
VIR_TILES = Counter("dvd_vision_vir_tiles", "Tiles routed by ViR, by outcome (compressed: 64 tokens)", ["route"])
PREPROCESS = Histogram("dvd_vision_preprocess_seconds", "Decode + tiling per request", buckets=LATENCY_BUCKETS)
QUEUE = Histogram("dvd_vision_queue_seconds", "Image queued to its first tile in an encoder batch",
                  buckets=LATENCY_BUCKETS)
ENCODE = Histogram("dvd_vision_encode_seconds", "Image queued to its last tile encoded (queue time included)",
                   buckets=LATENCY_BUCKETS)
SEND = Histogram("dvd_vision_send_seconds", "Handing one image's features to the transport",
                 buckets=LATENCY_BUCKETS)
DEDUP_IMAGES = Counter("dvd_vision_dedup_images", "Images not encoded: identical to one in flight")
DEDUP_TILES = Counter("dvd_vision_dedup_tiles", "Tiles not encoded: their image was identical to one in flight")

# Label values known in advance exist from the start at zero: otherwise a series appears at its first event, which
# Prometheus's rate() and increase() miss (a first burst of errors would alert late).
for _outcome in ("ok", "error"):
    REQUESTS.labels(_outcome)
for _route in ("compressed", "full"):
    VIR_TILES.labels(_route)
