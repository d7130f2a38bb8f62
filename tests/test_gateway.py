"""The gateway on its own: OpenAI-shaped errors when its servers are missing."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from conftest import free_port


@pytest.fixture(scope="module")
def lonely_gateway():
    """A gateway whose vision and language servers do not exist."""
    port = free_port()
    command = [sys.executable, "-m", "dvd.cli", "gateway", "--port", str(port),
               "--vision-server", f"127.0.0.1:{free_port()}", "--language-server", f"127.0.0.1:{free_port()}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None:
                pytest.fail(f"gateway exited with {process.returncode}")
            __import__("time").sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


def test_health_is_503_without_servers(lonely_gateway):
    reply = httpx.get(f"{lonely_gateway}/health", timeout=10)
    assert reply.status_code == 503
    assert reply.json() == {"vision_servers_up": 0, "language_servers_up": 0}


def test_chat_without_servers_is_a_503_in_openai_error_format(lonely_gateway):
    client = openai.OpenAI(base_url=f"{lonely_gateway}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 503
    assert error.value.body["message"] == "no language server is available"
    assert error.value.body["type"] == "service_unavailable"


def test_invalid_json_is_a_400(lonely_gateway):
    reply = httpx.post(f"{lonely_gateway}/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
