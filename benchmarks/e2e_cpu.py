"""A preset served end to end on this machine: peak memory of each server and time per stage.

For each checkpoint format: write a random-weight checkpoint of the preset (`dvd checkpoint`), start a DvD
stack on it with `dvd up`'s settings (`benchmarks.toolkit.servers.dvd`), send one-image then two-image chats one at
a time (official `openai` client, greedy, `ignore_eos`), and record

- stage means from the servers' Prometheus histograms (`benchmarks.toolkit.stages`) and the client's TTFT / latency,
  per kind of chat (`benchmarks.toolkit.sweep.bench`, one load point each, fresh images, so no cache hits);
- memory per server: each process's high-water mark (`VmHWM`, start-up included) and the largest sum of
  resident memory over the server's process tree sampled every 0.5 s while the chats ran. vLLM's engine
  core and worker are children of the language server; their resident sets share library pages, so the
  sums over a tree are upper bounds.

    python -m benchmarks.e2e_cpu --preset 1b --out benchmarks/results/e2e_cpu_1b.json
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import psutil
import typer

from benchmarks.toolkit import processes, servers
from benchmarks.toolkit.documents import command_line, write
from benchmarks.toolkit.loadgen import LoadPoint
from benchmarks.toolkit.machine import isa, machine, versions
from benchmarks.toolkit.sweep import RunOptions, bench
from benchmarks.toolkit.workload import RequestBatches, parse_size, synthetic
from checkpoint.generate import write_checkpoint
from checkpoint.geometry import ModelConfig

SERVER_SETTINGS = ("dvd up's defaults: vision model fp32 on CPU, bf16 features over ZeroMQ, language model dtype "
                   "auto (bf16 on CPU), 1 GiB KV cache")
KEPT = ("completed", "failed", "total_input_tokens", "total_output_tokens", "mean_ttft_ms", "median_ttft_ms",
        "mean_tpot_ms", "mean_e2el_ms", "median_e2el_ms", "stages_ms")


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def _rounded(value):
    """Milliseconds to 0.1 ms, recursively."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 1) if isinstance(value, float) else value


def high_water_marks(processes: dict) -> dict[str, float]:
    """VmHWM (peak resident memory since the process started) in MiB of every process of every server."""
    marks: dict[str, float] = {}
    for server, process in processes.items():
        for member in processes.tree(process.pid):
            with contextlib.suppress(OSError, psutil.Error):
                status = Path(f"/proc/{member.pid}/status").read_text()
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
                marks[processes.role(server, member, process.pid)] = _mib(kib * 1024)
    return marks


class TreeSampler:
    """The largest sum of resident memory over each server's process tree, sampled in a thread."""

    def __init__(self, processes: dict, interval_s: float = 0.5):
        self.processes, self.interval_s = processes, interval_s
        self.peak = dict.fromkeys(processes, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for server, process in self.processes.items():
                rss = 0
                for member in processes.tree(process.pid):
                    with contextlib.suppress(psutil.Error):
                        rss += member.memory_info().rss
                self.peak[server] = max(self.peak[server], rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def workload(requests: int, size: tuple[int, int], max_tokens: int) -> RequestBatches:
    """One warm-up chat, then `requests` one-image and `requests` two-image chats, every image fresh."""
    one = synthetic(1 + requests, [size], 1, 8, max_tokens, seed=1)
    two = synthetic(requests, [size], 2, 8, max_tokens, seed=2)
    return RequestBatches(one[:1], [one[1:], two], {"source": "synthetic", "image_size": list(size), "input_words": 8,
                                              "images_per_request": [1, 2], "output_len": max_tokens})


def serve_and_measure(checkpoint: Path, log_dir: Path, requests: int, size: tuple[int, int],
                      max_tokens: int) -> dict:
    began = time.perf_counter()
    with servers.dvd(str(checkpoint), log_dir, timeout_s=900) as target:
        ready_s = time.perf_counter() - began
        options = RunOptions(points=[LoadPoint(max_concurrency=1)] * 2, sampling={"temperature": 0},
                             percentiles=[50.0], metrics_pages=target.metrics_pages, progress=False)
        with TreeSampler(target.processes) as sampler:
            document = asyncio.run(bench(target.base_url, workload(requests, size, max_tokens), options))
        marks = high_water_marks(target.processes)
    return {
        "ready_s": round(ready_s, 1),
        "memory_mib": {
            server: {"tree_rss_peak_while_serving": _mib(sampler.peak[server]),
                     "vm_hwm": {name: mark for name, mark in marks.items() if name.split("/")[0] == server}}
            for server in target.processes},
        "chats": {kind: _rounded({key: point[key] for key in KEPT if key in point})
                  for kind, point in zip(("one image", "two images"), document["points"])},
        "load_avg": {"before": document["load_avg_before"], "after": document["load_avg_after"]},
    }


def main(
    preset: Annotated[str, typer.Option(help="Model geometry (checkpoint/geometry.py)")] = "1b",
    formats: Annotated[list[str], typer.Option("--format", help="Checkpoint formats to serve in turn")] = [  # noqa: B006
        "custom", "hf"],
    requests: Annotated[int, typer.Option(help="Chats of each kind (one image, two images)")] = 3,
    image_size: Annotated[str, typer.Option(help="WIDTHxHEIGHT of every image; 448x448 is one tile")] = "448x448",
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per chat (EOS ignored)")] = 16,
    checkpoints: Annotated[Path | None, typer.Option(help="Folder of the checkpoints (default: a temp dir)")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Keep the servers' logs here (default: a temp dir)")] = None,
    out: Annotated[Path, typer.Option(help="Results file (JSON)")] = Path("benchmarks/results/e2e_cpu_1b.json"),
) -> None:
    servers.stop_on_sigterm()
    ModelConfig.from_name(preset)  # an unknown preset fails here, before anything is written
    width, height = parse_size(image_size)
    result = {"preset": preset, "command": command_line(),
              "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
              "machine": machine() | {"isa": isa()}, "versions": versions(),
              "settings": {"requests_per_kind": requests, "image_size": [width, height], "max_tokens": max_tokens,
                           "concurrency": 1, "servers": SERVER_SETTINGS},
              "formats": {}}
    with tempfile.TemporaryDirectory(prefix=f"e2e-{preset}-") as tmp:
        root = checkpoints or Path(tmp)
        for fmt in formats:
            path, write_s = root / f"{preset}-{fmt}", None
            if not (path / "config.json").exists():
                began = time.perf_counter()
                write_checkpoint(path, preset, fmt, seed=0)
                write_s = round(time.perf_counter() - began, 1)
            entry = {"checkpoint_write_s": write_s, "checkpoint_bytes": sum(f.stat().st_size for f in path.iterdir())}
            logs = (log_dir or Path(tmp)) / f"logs-{preset}-{fmt}"
            logs.mkdir(parents=True, exist_ok=True)
            entry |= serve_and_measure(path, logs, requests, (width, height), max_tokens)
            result["formats"][fmt] = entry
            print(json.dumps({fmt: entry}, indent=2), flush=True)
    write(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
