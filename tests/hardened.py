"""A stack configured as a production operator would: internal secret, API key, small caps; shared by the
reliability tests (bad input, security, faults, soak), which run next to each other (see conftest)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import openai

from conftest import free_port
from launcher import Servers, Stack, http_ready

MODEL = "tiny"
MAX_BODY_BYTES = 8 << 20
MAX_IMAGE_BYTES = 2 << 20
MAX_IN_FLIGHT = 8
MAX_PENDING_FEATURE_BYTES = 4 << 20
FEATURE_TTL_S = 5
MAX_MODEL_LEN = 4096
MAX_VIDEO_DECODED_PIXELS = 6 * 96 * 64  # six frames of conftest's make_video


@dataclass
class HardenedStack(Stack):
    api_key: str = field(default_factory=lambda: "sk-" + secrets.token_urlsafe(24))
    logs: Path | None = None
    launched: Servers | None = None

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
                "DVD_LANGUAGE_FEATURE_TTL_S": str(FEATURE_TTL_S),
                "DVD_VISION_MAX_VIDEO_DECODED_PIXELS": str(MAX_VIDEO_DECODED_PIXELS)}

    def start(self) -> None:
        (self.logs / "gateway.toml").write_text(self.config())
        self.launched = self.servers(self.logs, env=self.environment()).start()
        self.launched.wait_until(http_ready(self.gateway_url, headers=self.headers), timeout_s=600,
                                 what="the gateway sees both servers and serves the model list (with the API key)")

    def stop(self) -> None:
        if self.launched is not None:
            self.launched.stop()
            self.launched = None

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        return self.launched.processes if self.launched else {}

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
        return self.launched.log(name)


def plan(model: str, logs: Path) -> HardenedStack:
    return HardenedStack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                         feature_port=free_port(), vision_metrics_port=free_port(), language_metrics_port=free_port(),
                         max_model_len=MAX_MODEL_LEN, internal_secret=secrets.token_urlsafe(32), logs=logs)


def dvd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvd.cli", *args]
