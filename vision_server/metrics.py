"""Prometheus metrics of the vision server."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("dvd_vision_requests", "Encode calls, by outcome", ["outcome"])
IMAGES = Counter("dvd_vision_images", "Images encoded")
TILES = Counter("dvd_vision_tiles", "Tiles encoded")
FEATURE_BYTES = Counter("dvd_vision_feature_bytes_sent", "Feature payload bytes sent")
QUEUE_DEPTH = Gauge("dvd_vision_queue_depth", "Images waiting for the encoder")
PREPROCESS = Histogram("dvd_vision_preprocess_seconds", "Decode + tiling per request", buckets=LATENCY_BUCKETS)
ENCODE = Histogram("dvd_vision_encode_seconds", "Encoder forward per image", buckets=LATENCY_BUCKETS)
SEND = Histogram("dvd_vision_send_seconds", "Handing one image's features to the transport",
                 buckets=LATENCY_BUCKETS)
