"""Named server processes started together, waited for with one readiness probe, stopped together."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from launcher.waiting import wait_until

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


# On Linux a server gets SIGTERM if the process that started it dies: util-linux's `setpriv` sets that signal and
# execs the server (it survives exec). No Python code runs in the forked child, so the child is made with vfork:
# in a multi-threaded parent (a test run with gRPC's threads, whose fork handlers start a poller in a forked
# child) a full fork could abort the child before exec.
_SETPRIV = shutil.which("setpriv") if sys.platform == "linux" else None


def _with_parent_death_signal(command: list[str]) -> list[str]:
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *command] if _SETPRIV else list(command)


def http_ready(url: str, headers: dict[str, str] | None = None, health: dict | None = None) -> Callable[[], bool]:
    """Readiness of a gateway (or `vllm serve`) at `url`: /health answers 200, with the body `health` when
    given, and /v1/models answers 200."""

    def probe() -> bool:
        reply = httpx.get(f"{url}/health", headers=headers, timeout=5)
        if reply.status_code != 200 or (health is not None and reply.json() != health):
            return False
        return httpx.get(f"{url}/v1/models", headers=headers, timeout=5).status_code == 200

    return probe


class Servers:
    """Named server processes started together, waited for with one readiness probe, stopped together: the one
    way `dvd up`, the tests and the benchmarks start servers.

    Each runs in a process group of its own: Ctrl-C in the terminal reaches only `dvd up`, which stops the servers
    in order, and a signal to the group reaches the server's children (vLLM's engine) too. A process group, not
    a session: Linux schedules each session as one group (autogroup), and a vLLM engine on CPU busy-waits
    between its two processes; with the servers in sessions of their own, that starved every other session on
    a 2-core host for up to 10 s at a time (the gateway, the vision server, the client)."""

    def __init__(self, commands: dict[str, list[str]], *, log_dir: Path | None = None,
                 env: dict[str, str] | None = None, stop_timeout_s: float = 15.0):
        self.commands = dict(commands)
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self.env = {**OFFLINE_ENV, **(env or {})}  # on top of this process's environment
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, *names: str) -> Servers:
        """Start the named servers (all by default); a restarted server's earlier log is kept beside its new one."""
        env = {**os.environ, **self.env}
        for name in names or self.commands:
            output = None
            if self.log_dir:
                log = self.log_dir / f"{name}.log"
                if log.exists():
                    log.rename(self.log_dir / f"{name}.{time.monotonic_ns()}.log")
                output = open(log, "wb")  # noqa: SIM115 (owned by the child)
            self.processes[name] = subprocess.Popen(_with_parent_death_signal(self.commands[name]), env=env,
                                                    stdout=output, stderr=subprocess.STDOUT if output else None,
                                                    process_group=0)
            if output:
                output.close()
        return self

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace") if self.log_dir else ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str = "the servers are ready") -> None:
        """Poll `ready` (an HTTP or gRPC error while polling counts as not yet) until it holds; raise
        RuntimeError if a server exits meanwhile, TimeoutError after `timeout_s`."""

        def ready_while_running() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode} while waiting until {what}"
                                       + (f"; its log ends:\n{self.log(name)[-3000:]}" if self.log_dir else ""))
            return ready()

        where = f"; logs in {self.log_dir}" if self.log_dir else ""
        wait_until(ready_while_running, timeout_s, what + where, interval_s=0.5)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal a server's whole process group (a crashed container) and wait for the server to exit."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        process.wait(30)

    def stop(self, *names: str) -> None:
        """SIGTERM the named servers (all by default), SIGKILL whatever of their process groups is left after
        `stop_timeout_s`; never blocks much longer, whatever a server is waiting for."""
        processes = [self.processes[n] for n in names or list(self.processes) if n in self.processes]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the server or its leftover children
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @contextlib.contextmanager
    def running(self, ready: Callable[[], bool], timeout_s: float = 600.0,
                what: str = "the servers are ready") -> Iterator[Servers]:
        """Started and ready inside the block, stopped after it (also when start-up fails)."""
        try:
            self.start()
            self.wait_until(ready, timeout_s, what)
            yield self
        finally:
            self.stop()
