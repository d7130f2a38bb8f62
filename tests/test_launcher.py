"""`dvd.launcher.free_port`: the ports test stacks and benchmarks start servers on."""

from __future__ import annotations

import socket
from pathlib import Path

from dvd.launcher import free_port


def test_free_ports_are_distinct_bindable_and_never_ephemeral():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports)  # the kernel never hands these to bind(0) or connect()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))

