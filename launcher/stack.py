"""`dvd up`'s stack: a vision server, a language server and the gateway as local processes, wired together."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from launcher import command_lines
from launcher.processes import Servers, http_ready


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
    dtype: str = "auto"  # the language model's (vLLM's --dtype)
    vision_dtype: str | None = None  # the vision encoder's compute dtype; None: the server's (bf16 CUDA, fp32 CPU)
    feature_dtype: str = "bfloat16"
    max_model_len: int = 8192
    engine_args: tuple[str, ...] = ()  # more of the language server's vLLM engine arguments, e.g. ("-tp", "2")
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
        return command_lines.up(self.model, port=self.gateway_port, vision_port=self.vision_port,
                           language_port=self.language_port, feature_port=self.feature_port,
                           vision_metrics_port=self.vision_metrics_port,
                           language_metrics_port=self.language_metrics_port, engine_args=self.engine_args)

    def commands(self) -> dict[str, list[str]]:
        vision, language = f"{self.host}:{self.vision_port}", f"{self.host}:{self.language_port}"
        return {
            "vision-server": command_lines.vision_server(
                self.model, host=self.host, port=self.vision_port, feature_dtype=self.feature_dtype,
                dtype=self.vision_dtype, metrics_port=self.vision_metrics_port),
            "language-server": command_lines.language_server(
                self.model, host=self.host, port=self.language_port, dtype=self.dtype,
                max_model_len=self.max_model_len, feature_bind=f"tcp://{self.host}:{self.feature_port}",
                metrics_port=self.language_metrics_port, engine_args=self.engine_args),
            "gateway": command_lines.gateway([vision], [language], host=self.host, port=self.gateway_port),
        }


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
