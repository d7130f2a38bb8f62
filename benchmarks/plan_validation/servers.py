"""How plan validation starts servers: one core stands for one device.

The vision server (one torch thread) runs on VISION_CORE, each language server (all its processes) on a core of its
own, pinned through `benchmarks.toolkit.placement.pin`. On a 2-core host only 1+1 gets a core per server; in the
other configurations two servers share a core, and the simulation is told which (`cores`). The gateway and the
benchmark client are not pinned. Coupled `vllm serve` runs, all of it, on core 0 like one language server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from benchmarks.toolkit import servers
from benchmarks.toolkit.placement import pin
from launcher import Servers, command_lines, free_port, http_ready
from proto import dvd_pb2, dvd_pb2_grpc
from vision_server.settings import VisionServerSettings

HOST = "127.0.0.1"
VISION_CORE = 1
# The vision server's defaults, but two preprocessing threads, stated: pinned to one core, the server's own
# default (the cores it may use) would be one.
VISION = VisionServerSettings(model="unused", preprocess_workers=2)


def cores(vision: int, language: int) -> list[int]:
    """The core each server of a V+L configuration is pinned to, vision servers first."""
    count = os.cpu_count() or 1
    return [(VISION_CORE + i) % count for i in range(vision)] + [i % count for i in range(language)]


def vision_command(checkpoint: Path, port: int, core: int = VISION_CORE) -> list[str]:
    return pin(command_lines.vision_server(str(checkpoint), port=port), [core],
               env={"DVD_VISION_PREPROCESS_WORKERS": str(VISION.preprocess_workers)})


def language_command(checkpoint: Path, port: int, feature_port: int, core: int = 0) -> list[str]:
    """The whole language server on `core`: its front end and vLLM's engine-core process too, not only the worker
    that vLLM's CPU binding pins (the engine core alone keeps about half a core busy)."""
    return pin(command_lines.language_server(str(checkpoint), port=port, feature_bind=f"tcp://{HOST}:{feature_port}"),
               [core])


def answers_health(address: str, stub_class) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            return stub_class(channel).Health(dvd_pb2.HealthRequest(), timeout=2).ready
    except grpc.RpcError:
        return False


def all_answer_health(addresses: list[tuple[str, type]]) -> Callable[[], bool]:
    """Readiness of gRPC servers: every (address, stub class) answers Health as ready."""
    return lambda: all(answers_health(address, stub) for address, stub in addresses)


@contextlib.contextmanager
def one_server(name: str, command: list[str], port: int, stub_class, log_dir: Path) -> Iterator[None]:
    """One gRPC server, ready inside the block, stopped after it."""
    ready = all_answer_health([(f"{HOST}:{port}", stub_class)])
    with Servers({name: command}, log_dir=log_dir).running(ready, what=f"{name} answers Health"):
        yield


def configuration(checkpoint: Path, vision: int, language: int, log_dir: Path) -> tuple[Servers, Callable, str]:
    """V vision servers, L language servers and a gateway in front of them (not started yet), each server on its
    core (`cores`); their readiness probe, and the gateway's URL."""
    commands, ready, on = {}, [], cores(vision, language)
    vision_addresses, language_addresses = [], []
    for i in range(vision):
        port = free_port()
        commands[f"vision-{i}"] = vision_command(checkpoint, port, core=on[i])
        vision_addresses.append(f"{HOST}:{port}")
        ready.append((vision_addresses[-1], dvd_pb2_grpc.VisionServiceStub))
    for i in range(language):
        port = free_port()
        commands[f"language-{i}"] = language_command(checkpoint, port, free_port(), core=on[vision + i])
        language_addresses.append(f"{HOST}:{port}")
        ready.append((language_addresses[-1], dvd_pb2_grpc.LanguageServiceStub))
    gateway_port = free_port()
    commands["gateway"] = command_lines.gateway(vision_addresses, language_addresses, port=gateway_port,
                                                served_model_name="tiny")
    url = f"http://{HOST}:{gateway_port}"
    gateway_sees_all = http_ready(url, health={"vision_servers_up": vision, "language_servers_up": language})
    return Servers(commands, log_dir=log_dir), lambda: all_answer_health(ready)() and gateway_sees_all(), url


def coupled(checkpoint: Path, log_dir: Path) -> contextlib.AbstractContextManager[servers.Target]:
    """`vllm serve` of the HF-format checkpoint fed pixels (as `dvd bench compare` starts it), all of it on core 0
    like one language server; running inside the block."""
    return servers.coupled_replicas(str(checkpoint), log_dir, [(0,)])
