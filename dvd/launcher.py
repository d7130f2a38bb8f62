"""`dvd up`: the three servers as local processes, wired together, stopped together."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

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


def secret_environment(secret: str | None) -> dict[str, str]:
    """The internal secret for all three servers: in their environment, never on a command line."""
    return {f"DVD_{role}_INTERNAL_SECRET": secret for role in ("VISION", "LANGUAGE", "GATEWAY")} if secret else {}


@dataclass
class Stack:
    """Where each server listens; the defaults are what `dvd up` uses."""

    model: str
    host: str = "127.0.0.1"
    gateway_port: int = 8000
    vision_port: int = 50051
    language_port: int = 50061
    feature_port: int = 5600
    vision_metrics_port: int | None = None
    language_metrics_port: int | None = None
    dtype: str = "auto"
    feature_dtype: str = "bfloat16"
    max_model_len: int = 8192
    internal_secret: str | None = None  # given to all three servers (environment, not the command line)

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    def servers(self, log_dir: Path | None = None, env: dict[str, str] | None = None) -> Servers:
        """The stack's servers, not started yet; the internal secret goes to all three through the environment."""
        env = {**secret_environment(self.internal_secret), **(env or {})}
        return Servers(self.commands(), log_dir=log_dir, env=env)

    def ready(self) -> Callable[[], bool]:
        return http_ready(self.gateway_url)

    def up_command(self) -> list[str]:
        """`dvd up` serving this stack (it runs `commands()` itself)."""
        metrics = []
        if self.vision_metrics_port:
            metrics += ["--vision-metrics-port", str(self.vision_metrics_port)]
        if self.language_metrics_port:
            metrics += ["--language-metrics-port", str(self.language_metrics_port)]
        return [sys.executable, "-m", "dvd.cli", "up", "--model", self.model, "--port", str(self.gateway_port),
                "--vision-port", str(self.vision_port), "--language-port", str(self.language_port),
                "--feature-port", str(self.feature_port), *metrics]

    def commands(self) -> dict[str, list[str]]:
        dvd = [sys.executable, "-m", "dvd.cli"]
        vision_metrics = ["--metrics-port", str(self.vision_metrics_port)] if self.vision_metrics_port else []
        language_metrics = ["--metrics-port", str(self.language_metrics_port)] if self.language_metrics_port else []
        return {
            "vision-server": dvd + ["vision-server", "--model", self.model, "--host", self.host,
                                    "--port", str(self.vision_port), "--feature-dtype", self.feature_dtype,
                                    *vision_metrics],
            "language-server": dvd + ["language-server", "--model", self.model, "--host", self.host,
                                      "--port", str(self.language_port), "--dtype", self.dtype,
                                      "--max-model-len", str(self.max_model_len),
                                      "--feature-bind", f"tcp://{self.host}:{self.feature_port}", *language_metrics],
            "gateway": dvd + ["gateway", "--host", self.host, "--port", str(self.gateway_port),
                              "--vision-server", f"{self.host}:{self.vision_port}",
                              "--language-server", f"{self.host}:{self.language_port}"],
        }


def _own_process_group() -> None:
    """Child set-up: Ctrl-C in the terminal reaches only `dvd up`, which stops the servers in order; a signal
    to the group reaches the server's children (vLLM's engine) too; and on Linux a server gets SIGTERM if
    `dvd up` itself dies.

    A process group, not a session: Linux schedules each session as one group (autogroup), and a vLLM engine
    on CPU busy-waits between its two processes; with the servers in sessions of their own, that starved every
    other session on a 2-core host for up to 10 s at a time (the gateway, the vision server, the client)."""
    os.setpgid(0, 0)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
    way `dvd up`, the tests and the benchmarks start servers. Each runs in its own process group (see
    `_own_process_group`), so that a signal to its process group reaches its children (vLLM's engine) too."""

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
            self.processes[name] = subprocess.Popen(self.commands[name], env=env, stdout=output,
                                                    stderr=subprocess.STDOUT if output else None,
                                                    preexec_fn=_own_process_group)
            if output:
                output.close()
        return self

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace") if self.log_dir else ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str = "the servers are ready") -> None:
        """Poll `ready` (an HTTP or gRPC error while polling counts as not yet) until it holds; raise
        RuntimeError if a server exits meanwhile, TimeoutError after `timeout_s`."""
        import grpc

        deadline = time.monotonic() + timeout_s
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode} while waiting until {what}"
                                       + (f"; its log ends:\n{self.log(name)[-3000:]}" if self.log_dir else ""))
            try:
                if ready():
                    return
            except (httpx.HTTPError, grpc.RpcError, ValueError, OSError):
                pass
            if time.monotonic() > deadline:
                where = f"; logs in {self.log_dir}" if self.log_dir else ""
                raise TimeoutError(f"not within {timeout_s:.0f} s: {what}{where}")
            time.sleep(0.5)

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


def _examples(stack: Stack, model: str) -> str:
    return f"""
DvD is serving {model} at {stack.gateway_url}  (Ctrl-C stops every server)

  curl {stack.gateway_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{
    "model": "{model}", "max_tokens": 32,
    "messages": [{{"role": "user", "content": [
      {{"type": "text", "text": "Describe this image."}},
      {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,'$(base64 -w0 YOUR_IMAGE.png)'"}}}}]}}]}}'

  python - <<'EOF'
  import base64, openai
  client = openai.OpenAI(base_url="{stack.gateway_url}/v1", api_key="unused")
  image = base64.b64encode(open("YOUR_IMAGE.png", "rb").read()).decode()
  reply = client.chat.completions.create(model="{model}", max_tokens=32, messages=[{{"role": "user", "content": [
      {{"type": "text", "text": "Describe this image."}},
      {{"type": "image_url", "image_url": {{"url": f"data:image/png;base64,{{image}}"}}}}]}}])
  print(reply.choices[0].message.content)
  EOF
"""


def run_stack(stack: Stack) -> int:
    """Run until Ctrl-C / SIGTERM (exit 0) or until a server dies or fails to start (exit 1)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    servers = stack.servers()
    try:
        servers.start()
        servers.wait_until(stack.ready(), timeout_s=300, what="the gateway reports both servers up")
        model = httpx.get(f"{stack.gateway_url}/v1/models", timeout=5).json()["data"][0]["id"]
        print(_examples(stack, model), flush=True)
        while True:
            for name, process in servers.processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with code {process.returncode}; stopping the stack", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"dvd up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        servers.stop()
