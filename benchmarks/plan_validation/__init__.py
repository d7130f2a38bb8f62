"""Stage profiles of this machine, then the planner's predictions against measured runs, back to back.

    python -m benchmarks.plan_validation                  # profiles + validation (about 12 min on 2 quiet cores)
    python -m benchmarks.plan_validation --profile-only   # just benchmarks/results/profiles/<name>.json

`stage_profiles` measures the planner's stage profiles with the project's own parts: the vision model's batch sweep,
a real vision server's per-image host costs (its EncodeTimings), a ZeroMQ loopback through transport.tcp, a real
language server's Generate fed features over TCP from this process (no vision): prefill by batch and context,
decode step time by batch and context; and coupled `vllm serve` fed pixels: the encoder's cost inside its step and
its API server's image work. Validation then starts each configuration as local processes (`servers`: vision
servers, language servers, a gateway; and coupled `vllm serve`, a core standing for a device), drives it with
`dvd bench` (`load`: closed loop, all requests queued, a concurrency cap, recording the cores each process kept
busy), and compares throughput and TTFT p50/p90 with the simulation of the same workload on the fresh profiles
(`prediction`), drawn side by side (`plot`).
"""

from pathlib import Path

RESULTS = Path(__file__).parent.parent / "results"
# The workload every part measures: one 896x448 image (a 2x1 grid + thumbnail = 3 tiles) and a few words per request.
IMAGE_SIZE = (896, 448)
IMAGE_TILES = 3
INPUT_WORDS = 4
WARMUP = 4  # requests before each measured run
