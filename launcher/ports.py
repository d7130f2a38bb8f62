"""Ports for servers started here: free now, outside the kernel's ephemeral range, never handed out twice."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ports_outside_ephemeral_range() -> range:
    """Ports the kernel never picks by itself: below (or, failing that, above) the ephemeral range."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(max(1024, low - 12000), low) if low > 13024 else range(high + 1, 65536)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and outside the ephemeral range, never handed out twice by this process.

    A port from `bind(0)` is ephemeral: while a server is still starting (a vLLM engine takes a minute), the
    kernel may give the same port to any outgoing connection or `bind(0)`, and the server's own bind then fails.
    """
    candidates = _ports_outside_ephemeral_range()
    for _ in range(1000):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in {candidates}")
