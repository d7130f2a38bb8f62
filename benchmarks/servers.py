"""Local servers to benchmark: a DvD stack (`dvd up`'s launcher) or coupled `vllm serve` of the same checkpoint.

Both get the same language-model settings (context length, eager mode, whole-prompt prefill and a 1 GiB KV
cache on CPU), so a comparison differs only in where the vision encoder runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import launcher
from launcher import free_port


@dataclass
class Target:
    """A running server: its root URL and, for DvD, the servers' Prometheus pages and processes."""

    base_url: str
    metrics_pages: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # server name -> its process


def coupled_command(model: str, port: int, max_model_len: int = 8192) -> list[str]:
    """`vllm serve` with the vision tower, configured as DvD's language server configures vLLM."""
    from vllm.platforms import current_platform

    command = [sys.executable, "-m", "benchmarks.vllm_cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", Path(model).name, "--trust-remote-code",
               "--max-model-len", str(max_model_len), "--enforce-eager"]
    if current_platform.is_cpu():  # see language_server/engine.py: no chunked prefill on CPU, small fraction
        command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 2048)),
                    "--gpu-memory-utilization", "0.2"]
    return command


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that the servers started here are stopped on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def coupled(model: str, log_dir: Path, timeout_s: float = 600.0) -> Iterator[Target]:
    """`vllm serve` of `model` on a free port, stopped on exit; its log goes to `log_dir/coupled.log`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = launcher.Servers({"coupled": coupled_command(model, port)}, log_dir=log_dir,
                              env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    with server.running(launcher.http_ready(url), timeout_s, f"vllm serve answers at {url}"):
        yield Target(url)


@contextlib.contextmanager
def dvd(model: str, log_dir: Path, timeout_s: float = 600.0, env: dict[str, str] | None = None) -> Iterator[Target]:
    """A DvD stack (vision server, language server, gateway) of `model` on free ports, stopped on exit; `env`
    adds settings for the servers (e.g. `DVD_GATEWAY_FEATURE_CACHE`)."""
    stack = launcher.Stack(model=model, gateway_port=free_port(), vision_port=free_port(),
                           language_port=free_port(), feature_port=free_port(), vision_metrics_port=free_port(),
                           language_metrics_port=free_port())
    with stack.servers(log_dir, env).running(stack.ready(), timeout_s, "the gateway reports both servers up") as up:
        yield Target(stack.gateway_url, {
            "vision": f"http://{stack.host}:{stack.vision_metrics_port}/metrics",
            "language": f"http://{stack.host}:{stack.language_metrics_port}/metrics"}, up.processes)
