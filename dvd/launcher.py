"""`dvd up`: the three servers as local processes, wired together, stopped together."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
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


def _own_session() -> None:
    """Child set-up: Ctrl-C in the terminal reaches only `dvd up`, which stops the servers in order;
    and on Linux a server gets SIGTERM if `dvd up` itself dies."""
    os.setsid()
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(stack: Stack, log_dir: Path | None = None) -> dict[str, subprocess.Popen]:
    """Start every server; with `log_dir`, each one's output goes to `<name>.log` there."""
    env = {**os.environ, **OFFLINE_ENV}
    secret = getattr(stack, "internal_secret", None)  # any object with `commands()` may be started
    if secret:
        env.update({f"DVD_{role}_INTERNAL_SECRET": secret for role in ("VISION", "LANGUAGE", "GATEWAY")})
    processes = {}
    for name, command in stack.commands().items():
        output = open(log_dir / f"{name}.log", "wb") if log_dir else None  # noqa: SIM115 (owned by the child)
        stderr = subprocess.STDOUT if output else None
        processes[name] = subprocess.Popen(command, env=env, stdout=output, stderr=stderr, preexec_fn=_own_session)
    return processes


def wait_ready(stack: Stack, processes: dict[str, subprocess.Popen], timeout_s: float = 300.0) -> None:
    """Return once the gateway reports both servers up; raise if a server exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode} during start-up")
        try:
            if httpx.get(f"{stack.gateway_url}/health", timeout=2).status_code == 200:
                httpx.get(f"{stack.gateway_url}/v1/models", timeout=5).raise_for_status()
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the stack was not ready within {timeout_s:.0f} s")


def stop(processes: dict[str, subprocess.Popen], timeout_s: float = 15.0) -> None:
    """SIGTERM every server, then SIGKILL whatever is left after `timeout_s`."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    processes = start(stack)
    try:
        wait_ready(stack, processes)
        model = httpx.get(f"{stack.gateway_url}/v1/models", timeout=5).json()["data"][0]["id"]
        print(_examples(stack, model), flush=True)
        while True:
            for name, process in processes.items():
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
        stop(processes)
