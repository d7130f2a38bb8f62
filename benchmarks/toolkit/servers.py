"""Local servers to benchmark: a DvD stack (`dvd up`'s launcher) or coupled `vllm serve` of the same checkpoint.

Both get the same language-model settings (context length, eager mode, whole-prompt prefill and a 1 GiB KV
cache on CPU) and, given a `Placement` (benchmarks/toolkit/placement.py; `dvd bench compare` always gives one), the same
dtypes: `Placement.dtype` for the language model and the vision encoder, DvD's features in it too. So a
comparison differs only in where the vision encoder runs. The placement also says where each server runs:
floating, or pinned to cores of its own.
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
from benchmarks.toolkit import processes
from benchmarks.toolkit.placement import Placement, pin
from launcher import free_port


@dataclass
class Target:
    """A running server: its root URL (several: replicas, balanced by the load generator), for DvD the servers'
    Prometheus pages, and the processes started here."""

    urls: list[str]  # more than one: coupled data-parallel replicas
    metrics_pages: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # server name -> its process

    @property
    def base_url(self) -> str:
        return self.urls[0]

    def cores(self) -> dict[str, list[int]]:
        """Server name -> the cores its processes (children included) may run on, read now."""
        return {name: processes.cores(process.pid) for name, process in self.processes.items()}


# This environment's `vllm` command (what its console script runs); dvd/site_hook.py lets it run beside the CPU torch.
VLLM_COMMAND = [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def coupled_command(model: str, port: int, max_model_len: int = 8192, dtype: str = "auto") -> list[str]:
    """`vllm serve` with the vision tower, configured as DvD's language server configures vLLM; `dtype` is the
    whole model's, vision tower included."""
    from vllm.platforms import current_platform

    command = [*VLLM_COMMAND, "serve", model, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", Path(model).name, "--trust-remote-code",
               "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", dtype]
    if current_platform.is_cpu():  # language_server/engine.py's CPU_DEFAULTS: no chunked prefill, small fraction
        command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 2048)),
                    "--gpu-memory-utilization", "0.2"]
    return command


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that the servers started here are stopped on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def coupled(model: str, log_dir: Path, timeout_s: float = 600.0,
            placement: Placement | None = None) -> contextlib.AbstractContextManager[Target]:
    """`vllm serve` of `model` on free ports, one replica per core group of `placement` (shared: one, floating),
    stopped on exit; replica i logs to `log_dir/coupled-i.log` (a single one to `coupled.log`). Without a
    placement: one floating replica in the checkpoint's dtype."""
    if placement is None:
        return coupled_replicas(model, log_dir, [None], timeout_s=timeout_s)
    return coupled_replicas(model, log_dir, placement.coupled_cores(), placement.dtype, timeout_s)


@contextlib.contextmanager
def coupled_replicas(model: str, log_dir: Path, replica_cores: list[tuple[int, ...] | None], dtype: str = "auto",
                     timeout_s: float = 600.0) -> Iterator[Target]:
    """`vllm serve` of `model` in `dtype`, one replica per entry of `replica_cores` (pinned to those cores, or
    floating where None), each on a free port; stopped on exit."""
    names = ["coupled"] if len(replica_cores) == 1 else [f"coupled-{i}" for i in range(len(replica_cores))]
    urls, commands = [], {}
    for name, cores in zip(names, replica_cores):
        port = free_port()
        urls.append(f"http://127.0.0.1:{port}")
        command = coupled_command(model, port, dtype=dtype)
        commands[name] = pin(command, cores) if cores else command
    server = launcher.Servers(commands, log_dir=log_dir,
                              env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    probes = [launcher.http_ready(url) for url in urls]
    with server.running(lambda: all(probe() for probe in probes), timeout_s, f"vllm serve answers at {urls}"):
        yield Target(urls, processes=server.processes)


@contextlib.contextmanager
def dvd(model: str, log_dir: Path, timeout_s: float = 600.0, env: dict[str, str] | None = None,
        placement: Placement | None = None) -> Iterator[Target]:
    """A DvD stack (vision server, language server, gateway) of `model` on free ports, stopped on exit; `env`
    adds settings for the servers (e.g. `DVD_GATEWAY_FEATURE_CACHE`); `placement` says where each runs and in
    which dtypes (without one: all floating, with `dvd up`'s dtypes)."""
    dtypes = {"dtype": placement.dtype, "vision_dtype": placement.dtype,
              "feature_dtype": placement.feature_dtype} if placement else {}
    stack = launcher.Stack(model=model, gateway_port=free_port(), vision_port=free_port(),
                           language_port=free_port(), feature_port=free_port(), vision_metrics_port=free_port(),
                           language_metrics_port=free_port(), **dtypes)
    servers = stack.servers(log_dir, env)
    for name, cores in (placement.dvd_cores() if placement else {}).items():  # the gateway floats
        servers.commands[name] = pin(servers.commands[name], cores)
    with servers.running(stack.ready(), timeout_s, "the gateway reports both servers up") as up:
        yield Target([stack.gateway_url], {
            "vision": f"http://{stack.host}:{stack.vision_metrics_port}/metrics",
            "language": f"http://{stack.host}:{stack.language_metrics_port}/metrics"}, up.processes)
