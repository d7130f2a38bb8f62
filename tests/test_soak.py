"""A bounded soak at saturation: more clients than the gateway admits, a mix of good, bad, streamed, large
and abandoned requests. Every request gets a result or a clear error; in-flight requests and pending
features stay under their caps; afterwards vLLM holds no request and no server holds more file
descriptors or threads than after the warm-up.

`DVD_SOAK_SECONDS` sets the measured part (default 90 s; a longer soak: e.g. DVD_SOAK_SECONDS=3600);
`DVD_SOAK_RESULTS=path.json` writes what was measured there.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest

from conftest import data_url, make_image, metric, png_bytes, sse_lines
from hardened import MAX_IN_FLIGHT, MAX_PENDING_FEATURE_BYTES, MODEL
from launcher import wait_until

pytestmark = pytest.mark.slow
SOAK_SECONDS = float(os.environ.get("DVD_SOAK_SECONDS", "90"))
WARM_UP_SECONDS = 20
CLIENTS = MAX_IN_FLIGHT + 4  # saturation: some requests must be turned away with 429

SMALL = [data_url(make_image(48, 48, i)) for i in range(8)]
BIG = data_url(make_image(896, 672, 9))  # 13 tiles
TRUNCATED = "data:image/png;base64," + __import__("base64").b64encode(png_bytes(make_image(64, 64, 1))[:100]).decode()


def body(rng: random.Random, kind: str) -> dict:
    images = {"one image": [rng.choice(SMALL)], "two images": rng.sample(SMALL, 2), "13 tiles": [BIG],
              "text": [], "bad image": [TRUNCATED], "hang up": [rng.choice(SMALL)]}[kind]
    parts = [{"type": "text", "text": "Describe."}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    request = {"model": MODEL, "max_tokens": rng.randint(1, 24), "messages": [{"role": "user", "content": parts}],
               "stream": kind in ("two images", "hang up") or rng.random() < 0.3}
    if kind == "hang up":
        request["max_tokens"] = 500
    if kind == "text" and rng.random() < 0.5:
        request.update(n=2, temperature=1.0)
    return request


KINDS = ["one image"] * 6 + ["two images"] * 2 + ["13 tiles", "text", "text", "bad image", "hang up"]


@dataclass
class Load:
    """CLIENTS threads sending requests until `stop` is set; every answer is checked and counted."""

    url: str
    headers: dict
    outcomes: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def one(self, rng: random.Random) -> str:
        kind = rng.choice(KINDS)
        request = body(rng, kind)
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=request, headers=self.headers,
                          timeout=httpx.Timeout(120, connect=10)) as reply:
            if reply.status_code == 429:
                assert reply.headers["retry-after"] and "retry later" in json.loads(reply.read())["error"]["message"]
                time.sleep(0.2)
                return "429"
            if kind == "bad image":
                error = json.loads(reply.read())["error"]
                assert reply.status_code == 400 and "image 0: corrupt or truncated" in error["message"], error
                return "400 (bad image)"
            assert reply.status_code == 200, (reply.status_code, reply.read()[:300])
            if kind == "hang up":
                next(sse_lines(reply))
                return "client hung up"
            if not request["stream"]:
                completion = json.loads(reply.read())
                assert completion["usage"]["completion_tokens"] <= request["max_tokens"] * request.get("n", 1)
                return "200"
            lines = [line for line in sse_lines(reply) if line]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            return "200 streamed"

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                self.outcomes[self.one(rng)] += 1
            except Exception as exc:  # noqa: BLE001 (recorded; the test fails on it)
                self.failures.append(repr(exc)[:300])

    def run(self, seconds: float, seed: int, on_tick) -> None:
        self.stop.clear()
        threads = [threading.Thread(target=self.client, args=(seed * 1000 + i,), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            on_tick()
            time.sleep(1)
        self.stop.set()
        for thread in threads:
            thread.join(150)
        assert not any(t.is_alive() for t in threads), "a client hung"


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (vLLM's engine process under the language server)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def resources(pid: int) -> tuple[int, int]:
    """Open file descriptors and threads of a server and its children."""
    fds = threads = 0
    for member in process_tree(pid):
        try:
            fds += len(os.listdir(f"/proc/{member}/fd"))
            threads += int(next(line.split()[1] for line in open(f"/proc/{member}/status")
                                if line.startswith("Threads:")))
        except (OSError, StopIteration):
            continue
    return fds, threads


def sample_peaks(urls: dict[str, str], peaks: Counter) -> None:
    """Raise each gauge's peak in `peaks` to its value now."""
    gauges = {
        "gateway in flight": metric(urls["gateway"], "dvd_gateway_requests_in_flight"),
        "language in flight": metric(urls["language-server"], "dvd_language_requests_in_flight"),
        "pending feature bytes": metric(urls["language-server"], "dvd_language_features_pending_bytes"),
        "vLLM running": metric(urls["language-server"], "vllm:num_requests_running"),
        "vision queued tiles": metric(urls["vision-server"], "dvd_vision_queue_tiles"),
    }
    for name, value in gauges.items():
        peaks[name] = max(peaks[name], value)


def write_results(path: Path, load: Load, soaked: int, peaks: Counter, baseline: dict, after: dict) -> None:
    """The soak's outcome as JSON, for a results file (`DVD_SOAK_RESULTS`)."""
    path.write_text(json.dumps({
        "soak_seconds": SOAK_SECONDS, "warm_up_seconds": WARM_UP_SECONDS, "clients": CLIENTS,
        "max_in_flight": MAX_IN_FLIGHT, "requests_measured": soaked, "outcomes_with_warm_up": load.outcomes,
        "failures": load.failures, "peaks": peaks, "fds_threads_after_warm_up": baseline,
        "fds_threads_after_soak": after, "load_average": os.getloadavg(), "cpus": os.cpu_count()}, indent=2))


def test_soak_at_saturation_answers_everything_stays_under_caps_and_leaks_nothing(hardened_stack):
    stack = hardened_stack
    urls = stack.metrics_urls
    load = Load(stack.gateway_url, stack.headers)
    peaks = Counter()
    sample = partial(sample_peaks, urls, peaks)

    def idle() -> dict[str, tuple[int, int]]:
        """Wait until nothing is in flight anywhere, then read each server's descriptors and threads."""
        wait_until(lambda: not (metric(urls["gateway"], "dvd_gateway_requests_in_flight")
                                or metric(urls["language-server"], "dvd_language_requests_in_flight")
                                or metric(urls["language-server"], "vllm:num_requests_running")
                                or metric(urls["language-server"], "vllm:num_requests_waiting")),
                   60, "no request in flight anywhere after the load stopped", interval_s=0.5)
        time.sleep(2)  # closed connections' descriptors go
        return {name: resources(process.pid) for name, process in stack.processes.items()}

    load.run(WARM_UP_SECONDS, seed=1, on_tick=sample)
    baseline = idle()
    requests_before = sum(load.outcomes.values())
    load.run(SOAK_SECONDS, seed=2, on_tick=sample)
    after = idle()
    soaked = sum(load.outcomes.values()) - requests_before
    print(f"soak of {SOAK_SECONDS:g} s ({soaked} requests): outcomes {dict(load.outcomes)}, peaks {dict(peaks)}, "
          f"(fds, threads) after warm-up {baseline}, after the soak {after}")
    if os.environ.get("DVD_SOAK_RESULTS"):
        write_results(Path(os.environ["DVD_SOAK_RESULTS"]), load, soaked, peaks, baseline, after)

    assert load.failures == [], load.failures[:10]
    assert load.outcomes["200"] + load.outcomes["200 streamed"] >= 20
    assert load.outcomes["429"] >= 1  # it ran at saturation
    assert peaks["gateway in flight"] <= MAX_IN_FLIGHT
    assert peaks["language in flight"] <= MAX_IN_FLIGHT
    assert peaks["pending feature bytes"] <= MAX_PENDING_FEATURE_BYTES
    assert metric(urls["language-server"], "dvd_language_features_pending_bytes") == 0
    assert metric(urls["gateway"], "dvd_gateway_requests_total", status="500") == 0
    # Hundreds of requests later: a leak per request would show; a bounded pool (asyncio's default executor,
    # gRPC's) may still start a thread or two it had not needed during the warm-up.
    for name, (fds, threads) in after.items():
        assert fds <= baseline[name][0] + 4, (name, baseline[name], after[name])
        assert threads <= baseline[name][1] + 4, (name, baseline[name], after[name])
    assert httpx.get(f"{stack.gateway_url}/health", timeout=10).status_code == 200
