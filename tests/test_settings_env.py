"""Settings precedence, the same for every server: flags given on the command line, then `DVD_<ROLE>_*`
environment variables, then defaults. A stack whose servers get (almost) nothing but environment variables."""

from __future__ import annotations

import json
import socket
import sys

import grpc
import httpx
import openai
import pytest

from conftest import data_url, free_port, make_image, metric
from launcher import Servers, http_ready
from proto import dvd_pb2, dvd_pb2_grpc

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"
MAX_BATCH_TILES = 2  # the default is 32
MAX_MODEL_LEN = 3072  # the default is 8192


def dvd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvd.cli", *args]


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    ports = {name: free_port() for name in ("vision", "vision-decoy", "vision-metrics", "language", "features",
                                            "gateway")}
    model = str(tiny_checkpoints["custom"])
    env = {
        "DVD_VISION_MODEL": model, "DVD_VISION_PORT": str(ports["vision-decoy"]),
        "DVD_VISION_METRICS_PORT": str(ports["vision-metrics"]), "DVD_VISION_MAX_BATCH_TILES": str(MAX_BATCH_TILES),
        "DVD_LANGUAGE_MODEL": model, "DVD_LANGUAGE_PORT": str(ports["language"]),
        "DVD_LANGUAGE_FEATURE_BIND": f"tcp://{HOST}:{ports['features']}",
        "DVD_LANGUAGE_ENGINE_ARGS": f"--max-model-len {MAX_MODEL_LEN}",  # vLLM's engine arguments, as flags
        "DVD_GATEWAY_PORT": str(ports["gateway"]), "DVD_GATEWAY_SERVED_MODEL_NAME": "from-env",
        "DVD_GATEWAY_VISION_SERVERS": json.dumps([f"{HOST}:{ports['vision']}"]),
        "DVD_GATEWAY_LANGUAGE_SERVERS": json.dumps([f"{HOST}:{ports['language']}"]),
    }
    # The vision server's --port beats DVD_VISION_PORT; everything else comes from the environment.
    commands = {"vision-server": dvd("vision-server", "--port", str(ports["vision"])),
                "language-server": dvd("language-server"), "gateway": dvd("gateway")}
    url = f"http://{HOST}:{ports['gateway']}"
    with Servers(commands, log_dir=tmp_path_factory.mktemp("settings-env-logs"), env=env).running(http_ready(url)):
        yield ports, url


def test_every_server_takes_its_settings_from_the_environment_when_no_flag_gives_them(stack):
    ports, url = stack
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["from-env"]  # DVD_GATEWAY_SERVED_MODEL_NAME
    picture = {"type": "image_url", "image_url": {"url": data_url(make_image(1344, 896, 5))}}  # 3x2 + thumbnail
    reply = client.chat.completions.create(model="from-env", max_tokens=2, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": [picture]}])
    assert reply.usage.prompt_tokens_details.image_tokens == 7 * 256  # both servers found on env-only addresses
    vision_metrics = f"http://{HOST}:{ports['vision-metrics']}/metrics"  # DVD_VISION_METRICS_PORT
    batches = metric(vision_metrics, "dvd_vision_batch_tiles_count")
    assert batches >= 7 / MAX_BATCH_TILES  # DVD_VISION_MAX_BATCH_TILES: no batch above it
    assert metric(vision_metrics, "dvd_vision_batch_tiles_bucket", le=f"{MAX_BATCH_TILES:.1f}") == batches
    with grpc.insecure_channel(f"{HOST}:{ports['language']}") as channel:  # DVD_LANGUAGE_PORT
        description = dvd_pb2_grpc.LanguageServiceStub(channel).Describe(dvd_pb2.DescribeRequest(), timeout=30)
    assert description.max_model_len == MAX_MODEL_LEN  # DVD_LANGUAGE_ENGINE_ARGS
    assert description.feature_endpoint == f"tcp://{HOST}:{ports['features']}"  # DVD_LANGUAGE_FEATURE_BIND


def test_a_flag_given_beats_the_environment(stack):
    ports, _ = stack
    with grpc.insecure_channel(f"{HOST}:{ports['vision']}") as channel:  # --port
        assert dvd_pb2_grpc.VisionServiceStub(channel).Health(dvd_pb2.HealthRequest(), timeout=30).ready
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):  # DVD_VISION_PORT: nobody listens
        probe.connect((HOST, ports["vision-decoy"]))
    assert httpx.get(f"http://{HOST}:{ports['gateway']}/health", timeout=10).status_code == 200
