"""`launcher`: the ports test stacks and benchmarks start servers on, and `Servers`, which starts, waits for
and stops them (`dvd up`, the tests and the benchmarks)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launcher import Servers, free_port, wait_until, wait_until_async

# A "server" that starts a child of its own (as a language server starts vLLM's engine), says so, and waits.
WITH_CHILD = [sys.executable, "-c", "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(600)']); print(child.pid, flush=True); time.sleep(600)"]


def test_free_ports_are_distinct_bindable_and_never_ephemeral():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports)  # the kernel never hands these to bind(0) or connect()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_servers_get_a_process_group_of_their_own_in_the_launchers_session_and_stop_with_their_children(tmp_path):
    """A process group, so that a kill reaches vLLM's engine processes too; the launcher's session, so that
    Linux's per-session scheduling groups (autogroup) do not let a busy-waiting vLLM engine starve the others."""
    with Servers({"server": WITH_CHILD, "other": WITH_CHILD}, log_dir=tmp_path).start() as servers:
        servers.wait_until(lambda: all(servers.log(name).strip() for name in servers.processes), 60,
                           "each server has started its child")
        children = {name: int(servers.log(name).split()[0]) for name in servers.processes}
        for name, process in servers.processes.items():
            assert os.getpgid(process.pid) == process.pid  # a group of its own
            assert os.getpgid(children[name]) == process.pid  # its child in it
            assert os.getsid(process.pid) == os.getsid(0)  # no session of its own
        servers.kill("server")
        assert servers.processes["server"].returncode == -signal.SIGKILL
        wait_until(lambda: not alive(children["server"]), 30, "the killed server's child is gone")
        assert alive(children["other"])
    assert servers.processes["other"].poll() is not None
    wait_until(lambda: not alive(children["other"]), 30, "the stopped server's child is gone")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="the parent-death signal needs util-linux's setpriv")
def test_a_server_gets_sigterm_when_the_process_that_started_it_dies():
    """`dvd up` killed outright (no chance to stop its servers) still takes them with it."""
    starter = [sys.executable, "-c", "import sys, time; from launcher import Servers; "
               "s = Servers({'server': [sys.executable, '-c', 'import time; time.sleep(600)']}).start(); "
               "print(s.processes['server'].pid, flush=True); time.sleep(600)"]
    parent = subprocess.Popen(starter, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        server = int(parent.stdout.readline())
        assert alive(server)
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not alive(server), 30, "the server of the killed parent is gone")


def test_a_server_that_exits_during_start_up_fails_the_wait_with_its_log(tmp_path):
    failing = [sys.executable, "-c", "import sys; print('no checkpoint at /nowhere'); sys.exit(3)"]
    with Servers({"server": failing}, log_dir=tmp_path).start() as servers, \
            pytest.raises(RuntimeError, match="(?s)server exited with code 3.*no checkpoint at /nowhere"):
        servers.wait_until(lambda: False, 60, "it serves")


def test_wait_until_returns_the_first_true_value_and_counts_connection_errors_as_not_yet():
    replies = iter([ConnectionRefusedError(), httpx.ConnectError("not listening"), None, {"status": "ok"}])

    def probe():
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    assert wait_until(probe, 60, "the probe answers", interval_s=0) == {"status": "ok"}


def test_wait_until_names_what_it_awaited_and_lets_other_errors_through():
    with pytest.raises(TimeoutError, match=r"not within 0.01 s: the queue is empty; 3 left"):
        wait_until(lambda: False, 0.01, lambda: "the queue is empty; 3 left")
    with pytest.raises(KeyError):
        wait_until(lambda: {}["missing"], 60, "never")


def test_wait_until_async_awaits_async_conditions_while_other_tasks_run():
    async def scenario():
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, done.set)

        async def is_done() -> bool:
            return done.is_set()

        assert await wait_until_async(is_done, 60, "the event is set") is True
        with pytest.raises(TimeoutError, match="not within 0.01 s: a task that never runs"):
            await wait_until_async(lambda: False, 0.01, "a task that never runs")

    asyncio.run(scenario())
