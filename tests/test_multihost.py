"""Vision and language servers on two "hosts": network namespaces joined by a veth pair under `tc netem`.

Namespace V holds the vision server and the gateway (10.77.0.1), namespace L the language server
(10.77.0.2); features and the gateway's Generate calls cross the shaped link (`tc netem` rate and delay
where the kernel has netem, else a `tbf` token bucket: rate only). Only loopback and the
namespaces' own addresses are used; the test talks to the gateway from a thread that entered V. Cutting
the link while an image's features are on the wire fails that request with a clear error within the
feature timeout's reach, and requests succeed again once the link is back.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import zmq

from conftest import data_url, make_image
from launcher import Servers, http_ready, wait_until
from transport.frames import ImageFeatures, encode_frames

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

VISION_ADDRESS, LANGUAGE_ADDRESS = "10.77.0.1", "10.77.0.2"
FEATURE_TIMEOUT_S = 6.0
CLONE_NEWNET = 0x40000000
# The link in normal service, and a slow one that holds a 13-tile tiny image (416 KiB of features) on the
# wire for about 8 s. netem when the kernel has it; else a token bucket (rate only, no added delay).
SHAPED = {"netem": "netem rate 20mbit delay 5ms", "tbf": "tbf rate 20mbit burst 64kb limit 2mb"}
SLOW = {"netem": "netem rate 400kbit delay 5ms", "tbf": "tbf rate 400kbit burst 16kb limit 2mb"}


def why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns / tc"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if probe.returncode != 0:
        return f"ip netns unavailable: {probe.stderr.decode().strip()}"
    return None


pytestmark.append(pytest.mark.skipif(why_not_runnable() is not None, reason=str(why_not_runnable())))


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def in_namespace(name: str) -> ThreadPoolExecutor:
    """Worker threads whose sockets live in namespace `name` (a network namespace is per thread)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        finally:
            os.close(fd)

    return ThreadPoolExecutor(max_workers=2, initializer=enter)


class Hosts:
    def __init__(self, tag: str, log_dir: Path):
        self.vision_ns, self.language_ns = f"dvd-v-{tag}", f"dvd-l-{tag}"
        self.vision_if, self.language_if = f"dvdv{tag}"[:15], f"dvdl{tag}"[:15]
        self.log_dir = log_dir
        self.servers = Servers({}, log_dir=log_dir, env={"DVD_LANGUAGE_FEATURE_TIMEOUT_S": str(FEATURE_TIMEOUT_S)})

    def create(self) -> None:
        for ns in (self.vision_ns, self.language_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.vision_if, "netns", self.vision_ns, "type", "veth",
           "peer", "name", self.language_if, "netns", self.language_ns)
        for ns, interface, address in ((self.vision_ns, self.vision_if, VISION_ADDRESS),
                                       (self.language_ns, self.language_if, LANGUAGE_ADDRESS)):
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", interface)
            sh("ip", "-n", ns, "link", "set", interface, "up")
        probe = subprocess.run(["ip", "netns", "exec", self.vision_ns, "tc", "qdisc", "add", "dev", "lo", "root",
                                "netem", "delay", "1ms"], capture_output=True)
        self.qdisc = "netem" if probe.returncode == 0 else "tbf"
        subprocess.run(["ip", "netns", "exec", self.vision_ns, "tc", "qdisc", "del", "dev", "lo", "root"],
                       capture_output=True)
        self.shape(SHAPED)

    def shape(self, qdiscs: dict[str, str]) -> None:
        for ns, interface in ((self.vision_ns, self.vision_if), (self.language_ns, self.language_if)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", interface, "root",
               *qdiscs[self.qdisc].split())

    def link(self, up: bool) -> None:
        sh("ip", "-n", self.vision_ns, "link", "set", self.vision_if, "up" if up else "down")

    def start(self, name: str, ns: str, *args: str) -> None:
        self.servers.commands[name] = ["ip", "netns", "exec", ns, sys.executable, "-m", "dvd.cli", *args]
        self.servers.start(name)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.log_dir.glob("*.log"))

    def destroy(self) -> None:
        self.servers.stop()
        for ns in (self.vision_ns, self.language_ns):  # removing a namespace removes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def hosts(tiny_checkpoints, tmp_path_factory):
    tag = str(os.getpid() % 100000)
    hosts = Hosts(tag, tmp_path_factory.mktemp("multihost-logs"))
    try:
        hosts.create()
        model = str(tiny_checkpoints["custom"])
        hosts.start("language-server", hosts.language_ns, "language-server", "--model", model,
                    "--host", LANGUAGE_ADDRESS, "--port", "50061", "--metrics-port", "9102",
                    "--feature-bind", f"tcp://{LANGUAGE_ADDRESS}:5600")
        hosts.start("vision-server", hosts.vision_ns, "vision-server", "--model", model,
                    "--host", "127.0.0.1", "--port", "50051", "--metrics-port", "9101")
        hosts.start("gateway", hosts.vision_ns, "gateway", "--host", "127.0.0.1", "--port", "8000",
                    "--vision-server", "127.0.0.1:50051", "--language-server", f"{LANGUAGE_ADDRESS}:50061",
                    "--request-timeout-s", "30", "--health-interval-s", "1")
        with in_namespace(hosts.vision_ns) as vision_host:
            ready = http_ready("http://127.0.0.1:8000")  # polled from inside namespace V
            vision_host.submit(hosts.servers.wait_until, ready, 240, "the two-host stack serves").result()
            hosts.vision_host = vision_host
            yield hosts
    except BaseException:
        print(hosts.logs())
        raise
    finally:
        hosts.destroy()


def chat(image_size: tuple[int, int]) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0, timeout=90)
    model = client.models.list().data[0].id
    image = make_image(*image_size, seed=7)
    content = [{"type": "text", "text": "Describe the image."},
               {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return client.chat.completions.create(model=model, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                                          messages=[{"role": "user", "content": content}])


def assert_answered(reply) -> None:
    """Exactly the four tokens asked for (ignore_eos): the language server generated the whole answer."""
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4, reply


def metric(url: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(url, timeout=5).text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_a_chat_completion_with_an_image_crosses_the_shaped_link(hosts):
    reply = hosts.vision_host.submit(chat, (896, 448)).result(timeout=120)
    assert_answered(reply)
    assert reply.usage.prompt_tokens > 3 * 256  # 2x1 tiles + thumbnail reached the language model
    received = hosts.vision_host.submit(
        metric, f"http://{LANGUAGE_ADDRESS}:9102/metrics", "dvd_language_features_received_total").result(30)
    assert received >= 1


def send_bad_feature_messages() -> None:
    """Features of the wrong width and a one-frame message, from a peer without a request to match."""
    context = zmq.Context()  # created in a thread inside namespace V: its I/O thread lives there too
    sock = context.socket(zmq.PUSH)
    try:
        sock.connect(f"tcp://{LANGUAGE_ADDRESS}:5600")
        wide = ImageFeatures(uuid.uuid4().hex, 0, 1, [4], torch.zeros(4, 128, dtype=torch.bfloat16))
        sock.send_multipart(list(encode_frames(wide)))
        sock.send_multipart([b"one frame"])
    finally:
        sock.close(linger=5000)  # let both messages out before the context ends
        context.term()


def test_the_language_server_drops_and_counts_bad_feature_messages_by_reason(hosts):
    dropped = f"http://{LANGUAGE_ADDRESS}:9102/metrics"

    def count(reason: str) -> float:
        name = f'dvd_language_features_dropped_total{{reason="{reason}"}}'
        return hosts.vision_host.submit(metric, dropped, name).result(30)

    before = {reason: count(reason) for reason in ("hidden_size", "frame_count")}
    hosts.vision_host.submit(send_bad_feature_messages).result(30)
    wait_until(lambda: all(count(reason) > before[reason] for reason in before), 30,
               "the language server counts the dropped messages by reason")
    reply = hosts.vision_host.submit(chat, (448, 448)).result(timeout=120)  # and it keeps serving
    assert_answered(reply)


def test_cutting_the_link_mid_transfer_fails_the_request_in_flight_and_service_resumes(hosts):
    vision_metrics = "http://127.0.0.1:9101/metrics"
    images_before = hosts.vision_host.submit(metric, vision_metrics, "dvd_vision_images_total").result(30)
    hosts.shape(SLOW)
    try:
        in_flight = hosts.vision_host.submit(chat, (448 * 4, 448 * 3))  # 12 tiles + thumbnail

        def features_handed_over() -> bool:
            if hosts.vision_host.submit(metric, vision_metrics, "dvd_vision_images_total").result(30) > images_before:
                return True
            assert not in_flight.done(), "the request finished before its features were on the wire"
            return False

        wait_until(features_handed_over, 60, "the vision server sends the features", interval_s=0.05)
        hosts.link(up=False)  # the features are trickling through the slow link: cut it
        time.sleep(FEATURE_TIMEOUT_S + 2)
        assert not in_flight.done() or in_flight.exception() is not None
    finally:
        hosts.link(up=True)
        hosts.shape(SHAPED)

    with pytest.raises(openai.APIStatusError) as failed:
        in_flight.result(timeout=60)  # bounded: the language server gave up at its feature timeout
    assert failed.value.status_code == 504
    assert "images' features arrived within" in str(failed.value)

    def served() -> openai.types.chat.ChatCompletion | None:
        try:
            return hosts.vision_host.submit(chat, (896, 448)).result(timeout=120)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, f"service did not resume: {exc}"
            return None

    # The gateway re-admits the language server at its next health check.
    reply = wait_until(served, 60, "service resumes once the link is back", interval_s=1)
    assert_answered(reply)
