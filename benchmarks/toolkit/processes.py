"""A server's process tree (the server and what it started: vLLM's engine core and worker), read through psutil:
its members by role, the CPU seconds they used, the cores they may run on."""

from __future__ import annotations

import contextlib

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process and its living descendants; empty when it has exited."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def role(server: str, member: psutil.Process, root_pid: int) -> str:
    """`server` for the server's own process, `server/NAME` for a child (`language-server/EngineCore_DP0`)."""
    return server if member.pid == root_pid else f"{server}/{member.name().removeprefix('VLLM::')}"


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process ("own") and of its living descendants ("children")."""
    total = {"own": 0.0, "children": 0.0}
    for member in tree(pid):
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            times = member.cpu_times()
            total["own" if member.pid == pid else "children"] += times.user + times.system
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and everything below it, so far."""
    return sum(cpu_seconds(pid).values())


def cpu_seconds_by_role(servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each process of each server (server name -> pid), by `role`, and by this
    process, the benchmark client ("client"): which processes compete for the cores, and how much."""
    used = {"client": sum(psutil.Process().cpu_times()[:2])}
    for server, pid in servers.items():
        for member in tree(pid):
            with contextlib.suppress(psutil.Error):
                name = role(server, member, pid)
                used[name] = used.get(name, 0.0) + sum(member.cpu_times()[:2])
    return used


def cores(pid: int) -> list[int]:
    """The cores a process and every process below it may run on (the union of their affinities; empty when the
    process is gone)."""
    found: set[int] = set()
    for member in tree(pid):
        with contextlib.suppress(psutil.Error):
            found |= set(member.cpu_affinity())
    return sorted(found)
