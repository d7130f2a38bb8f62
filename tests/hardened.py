"""A stack configured as a production operator would: internal secret, API key, small caps; shared by the
reliability tests (bad input, security, faults, soak), which run next to each other (see conftest)."""

from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from conftest import free_port
from dvd.launcher import Stack, start, stop

MODEL = "tiny"
MAX_BODY_BYTES = 8 << 20
MAX_IMAGE_BYTES = 2 << 20
MAX_IN_FLIGHT = 8
MAX_PENDING_FEATURE_BYTES = 4 << 20
FEATURE_TTL_S = 5
MAX_MODEL_LEN = 4096


@dataclass
class HardenedStack(Stack):
    api_key: str = field(default_factory=lambda: "sk-" + secrets.token_urlsafe(24))
    logs: Path | None = None
    processes: dict = field(default_factory=dict)

    def config(self) -> str:
        return (f'api_keys = ["{self.api_key}"]\nserved_model_name = "{MODEL}"\nmax_body_bytes = {MAX_BODY_BYTES}\n'
                f"max_image_bytes = {MAX_IMAGE_BYTES}\nmax_in_flight = {MAX_IN_FLIGHT}\nhealth_interval_s = 1\n"
                "request_timeout_s = 120\n")

    def commands(self) -> dict[str, list[str]]:
        commands = super().commands()
        commands["gateway"] += ["--config", str(self.logs / "gateway.toml")]
        return commands

    def environment(self) -> dict[str, str]:
        return {"DVD_LANGUAGE_MAX_PENDING_FEATURE_BYTES": str(MAX_PENDING_FEATURE_BYTES),
                "DVD_LANGUAGE_FEATURE_TTL_S": str(FEATURE_TTL_S)}

    def start(self) -> None:
        (self.logs / "gateway.toml").write_text(self.config())
        saved = dict(os.environ)
        os.environ.update(self.environment())  # inherited by the servers only while they start
        try:
            self.processes = start(self, log_dir=self.logs)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.wait_ready(timeout_s=600)

    def wait_ready(self, timeout_s: float) -> None:
        """Until the gateway sees both servers and serves the model list (with the API key)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode}:\n{self.log(name)[-3000:]}")
            try:
                if httpx.get(f"{self.gateway_url}/health", timeout=5).status_code == 200 and httpx.get(
                        f"{self.gateway_url}/v1/models", headers=self.headers, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the hardened stack was not ready within {timeout_s:.0f} s; logs in {self.logs}")

    def stop(self) -> None:
        if self.processes:
            stop(self.processes)
            self.processes = {}

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key=kwargs.pop("api_key", self.api_key),
                             max_retries=0, timeout=120, **kwargs)

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    @property
    def metrics_urls(self) -> dict[str, str]:
        return {"gateway": f"{self.gateway_url}/metrics",
                "vision-server": f"http://{self.host}:{self.vision_metrics_port}/metrics",
                "language-server": f"http://{self.host}:{self.language_metrics_port}/metrics"}

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def plan(model: str, logs: Path) -> HardenedStack:
    return HardenedStack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                         feature_port=free_port(), vision_metrics_port=free_port(), language_metrics_port=free_port(),
                         max_model_len=MAX_MODEL_LEN, internal_secret=secrets.token_urlsafe(32), logs=logs)


def dvd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvd.cli", *args]
