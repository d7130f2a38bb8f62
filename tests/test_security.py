"""Who may call what: the gateway's API keys, the internal gRPC secret, request ids nobody can guess,
image URLs that cannot reach private networks, and no deserializer that runs code on network input."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import data_url, free_port, make_image, png_bytes
from gateway.errors import APIError
from gateway.images import ImageFetcher
from gateway.request_context import new_request_id
from hardened import MODEL, dvd
from launcher import OFFLINE_ENV, wait_until
from proto import dvd_pb2, dvd_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PICTURE = data_url(make_image(32, 32, 5))


def chat_body() -> dict:
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": PICTURE}}]}]}


# ---------------------------------------------------------------- gateway API keys


@pytest.mark.slow
def test_the_gateway_api_key_is_required_on_v1_and_compared_exactly(hardened_stack):
    stack = hardened_stack
    url = f"{stack.gateway_url}/v1/chat/completions"
    key = stack.api_key
    refused = {"no header": {}, "wrong key": {"authorization": "Bearer sk-wrong"},
               "key with a suffix": {"authorization": f"Bearer {key}x"}, "prefix of the key": {
                   "authorization": f"Bearer {key[:-1]}"}, "Basic scheme": {"authorization": f"Basic {key}"},
               "key without scheme": {"authorization": key}, "scheme only": {"authorization": "Bearer"}}
    for name, headers in refused.items():
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            reply = httpx.request(method, f"{stack.gateway_url}{path}", json=chat_body(), headers=headers, timeout=30)
            assert reply.status_code == 401, (name, path, reply.text)
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url, json=chat_body(), headers={"authorization": f"bearer {key}"}, timeout=60).status_code == 200
    # Health and metrics stay open for probes and Prometheus; they carry no request data.
    assert httpx.get(f"{stack.gateway_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{stack.gateway_url}/metrics", timeout=10).status_code == 200


# ---------------------------------------------------------------- the internal gRPC secret


async def internal_calls(stack, metadata) -> dict[str, grpc.StatusCode]:
    """Each protected method called with `metadata`: its status code (OK when the handler ran)."""
    results = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.vision_port}") as vision_channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{stack.language_port}") as language_channel:
        vision = dvd_pb2_grpc.VisionServiceStub(vision_channel)
        language = dvd_pb2_grpc.LanguageServiceStub(language_channel)
        calls = {
            "VisionService/Encode": lambda: vision.Encode(dvd_pb2.EncodeRequest(
                request_id=uuid.uuid4().hex, feature_endpoint="tcp://127.0.0.1:1",
                images=[dvd_pb2.ImageInput(data=b"x")]), metadata=metadata, timeout=10),
            "LanguageService/Describe": lambda: language.Describe(dvd_pb2.DescribeRequest(), metadata=metadata,
                                                                  timeout=10),
            "LanguageService/Abort": lambda: language.Abort(dvd_pb2.AbortRequest(request_id="x"), metadata=metadata,
                                                            timeout=10),
            "VisionService/Health": lambda: vision.Health(dvd_pb2.HealthRequest(), metadata=metadata, timeout=10),
            "LanguageService/Health": lambda: language.Health(dvd_pb2.HealthRequest(), metadata=metadata,
                                                              timeout=10),
        }
        for name, call in calls.items():
            try:
                await call()
                results[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                results[name] = exc.code()
        stream = language.Generate(dvd_pb2.GenerateRequest(request_id=uuid.uuid4().hex, messages=[
            dvd_pb2.ChatMessage(role="user", content=[dvd_pb2.ContentPart(text="hi")])],
            sampling=dvd_pb2.SamplingParams(max_tokens=1)), metadata=metadata, timeout=30)
        try:
            _ = [r async for r in stream]
            results["LanguageService/Generate"] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            results["LanguageService/Generate"] = exc.code()
    return results


@pytest.mark.slow
def test_internal_grpc_calls_need_the_shared_secret_except_health(hardened_stack):
    stack = hardened_stack
    right = (("authorization", f"Bearer {stack.internal_secret}"),)
    wrong_ones = {"none": (), "wrong secret": (("authorization", "Bearer not-the-secret"),),
                  "secret without scheme": (("authorization", stack.internal_secret),)}
    for name, metadata in wrong_ones.items():
        results = asyncio.run(internal_calls(stack, metadata))
        health = {k: v for k, v in results.items() if k.endswith("/Health")}
        assert set(health.values()) == {grpc.StatusCode.OK}, (name, results)
        refused = {k: v for k, v in results.items() if not k.endswith("/Health")}
        assert set(refused.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (name, results)
    results = asyncio.run(internal_calls(stack, right))
    assert results["VisionService/Encode"] == grpc.StatusCode.INVALID_ARGUMENT  # reached the handler: b"x" is no image
    assert {v for k, v in results.items() if k != "VisionService/Encode"} == {grpc.StatusCode.OK}, results


@pytest.mark.slow
def test_a_gateway_without_the_secret_cannot_use_the_servers(hardened_stack, tmp_path):
    stack = hardened_stack
    port = free_port()
    command = dvd("gateway", "--port", str(port), "--served-model-name", MODEL, "--health-interval-s", "1",
                  "--vision-server", f"127.0.0.1:{stack.vision_port}",
                  "--language-server", f"127.0.0.1:{stack.language_port}")
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115
    env = {k: v for k, v in OFFLINE_ENV.items()} | {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def listening() -> bool:
        assert process.poll() is None, (tmp_path / "gateway.log").read_text()
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # any answer will do
        return True

    try:
        wait_until(listening, 60, lambda: "the gateway answers /health; its log:\n"
                   + (tmp_path / "gateway.log").read_text(), interval_s=0.3)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_body(), timeout=60)
        assert reply.status_code == 503 and "no language server is available" in reply.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    assert "UNAUTHENTICATED" in (tmp_path / "gateway.log").read_text()  # the operator sees why


# ---------------------------------------------------------------- request ids


def test_request_ids_are_random_uuid4():
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and len(rid) == 32
    # 122 random bits each: no shared prefix or counter between consecutive ids.
    assert sum(a[:4] == b[:4] for a, b in zip(ids, ids[1:])) < 5


@pytest.mark.slow
def test_the_ids_the_gateway_hands_out_are_uuid4(hardened_stack):
    headers = hardened_stack.headers
    ids = [httpx.post(f"{hardened_stack.gateway_url}/v1/chat/completions", json={}, headers=headers,
                      timeout=10).headers["x-request-id"] for _ in range(20)]
    assert len(set(ids)) == 20 and all(uuid.UUID(hex=rid).version == 4 for rid in ids)


# ---------------------------------------------------------------- SSRF


class Recorder(BaseHTTPRequestHandler):
    """Serves a PNG; `/to?url=X` redirects to X; remembers every path asked for."""

    hits: list[str] = []
    picture = png_bytes(make_image(16, 16, 1))

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        if self.path.startswith("/to?url="):
            self.send_response(302)
            self.send_header("location", self.path.removeprefix("/to?url="))
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-length", str(len(self.picture)))
        self.end_headers()
        self.wfile.write(self.picture)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def ssrf_targets(port: int) -> dict[str, str]:
    return {
        "loopback": f"http://127.0.0.1:{port}/a.png",
        "loopback, other address": f"http://127.0.0.2:{port}/a.png",
        "loopback, short form 127.1": f"http://127.1:{port}/a.png",
        "loopback, decimal 2130706433": f"http://2130706433:{port}/a.png",
        "loopback, hex 0x7f000001": f"http://0x7f000001:{port}/a.png",
        "IPv6 loopback ::1": f"http://[::1]:{port}/a.png",
        "IPv4-mapped IPv6 loopback": f"http://[::ffff:127.0.0.1]:{port}/a.png",
        "DNS name resolving to loopback": f"http://localhost:{port}/a.png",
        "unspecified 0.0.0.0": f"http://0.0.0.0:{port}/a.png",
        "cloud metadata 169.254.169.254": "http://169.254.169.254/latest/meta-data/",
        "private 10.x": "http://10.0.0.1/a.png",
        "private 172.16.x": "http://172.16.0.1/a.png",
        "private 192.168.x": "http://192.168.1.1/a.png",
        "carrier-grade NAT 100.64.x": "http://100.64.0.1/a.png",
        "IPv6 unique local fd00::": "http://[fd00::1]/a.png",
        "IPv6 link-local fe80::": "http://[fe80::1]/a.png",
        "https to loopback": f"https://127.0.0.1:{port}/a.png",
    }


@pytest.mark.parametrize("name", list(ssrf_targets(0)))
def test_image_urls_into_non_public_networks_are_refused_before_any_connection(recorder, name):
    url = ssrf_targets(recorder)[name]
    Recorder.hits.clear()
    fetcher = ImageFetcher(max_bytes=1 << 20, timeout_s=5, max_redirects=3, allowed_networks=[])
    try:
        with pytest.raises(APIError, match="non-public address|cannot resolve") as error:
            asyncio.run(fetcher.fetch(url, index=0))
    finally:
        asyncio.run(fetcher.close())
    assert error.value.status == 400
    assert Recorder.hits == []  # refused before connecting


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/a.png", "http://169.254.169.254/latest/meta-data/",
                                    "http://10.0.0.1/a.png", "http://[::1]:{port}/a.png"])
def test_redirects_into_non_public_networks_are_refused(recorder, target):
    """The first hop is allowed (127.0.0.1 only); where it redirects to is checked again and refused."""
    Recorder.hits.clear()

    async def run():
        fetcher = ImageFetcher(max_bytes=1 << 20, timeout_s=5, max_redirects=3, allowed_networks=["127.0.0.1/32"])
        try:
            assert (await fetcher.fetch(f"http://127.0.0.1:{recorder}/ok.png", index=0)) == Recorder.picture
            with pytest.raises(APIError, match="non-public address"):
                await fetcher.fetch(f"http://127.0.0.1:{recorder}/to?url={target.format(port=recorder)}", index=0)
        finally:
            await fetcher.close()

    asyncio.run(run())
    assert Recorder.hits[0] == "/ok.png" and Recorder.hits[1].startswith("/to?url=") and len(Recorder.hits) == 2


@pytest.mark.slow
def test_private_image_urls_through_the_public_api_are_a_400(hardened_stack, recorder):
    client = hardened_stack.client()
    Recorder.hits.clear()
    for url in (f"http://127.0.0.1:{recorder}/a.png", "http://169.254.169.254/latest/meta-data/",
                f"http://localhost:{recorder}/a.png"):
        reply = httpx.post(f"{hardened_stack.gateway_url}/v1/chat/completions", headers=hardened_stack.headers,
                           json={**chat_body(), "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": url}}]}]}, timeout=30)
        assert reply.status_code == 400 and "non-public address" in reply.json()["error"]["message"], reply.text
    assert Recorder.hits == []
    assert client.models.list().data[0].id == MODEL


# ---------------------------------------------------------------- code that runs on network input

NETWORK_PACKAGES = ("gateway", "vision_server", "language_server", "transport", "proto", "dvd", "checkpoint")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "torch.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "numpy.load",
                "np.load", "pickle.loads", "pickle.load"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def unsafe_uses(source: str) -> list[str]:
    """Imports of code-running deserializers and calls of eval/exec/torch.load/yaml.load (not comments/strings)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in
                      UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and dotted(node.func) in UNSAFE_CALLS:
            found.append(f"line {node.lineno}: {dotted(node.func)}(...)")
    return found


def test_the_checker_finds_what_it_looks_for():
    assert unsafe_uses("import pickle\nfrom marshal import loads\nx = eval('1')\ntorch.load(f)\nyaml.load(s)\n") == [
        "line 1: import pickle", "line 2: from marshal import ...", "line 3: eval(...)", "line 4: torch.load(...)",
        "line 5: yaml.load(...)"]
    assert unsafe_uses("model.eval()\n# pickle\ns = 'torch.load(x)'\nyaml.safe_load(s)\n") == []


def test_no_code_running_deserializer_or_eval_in_the_servers():
    files = [p for package in NETWORK_PACKAGES for p in (ROOT / package).rglob("*.py")
             if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert len(files) > 30
    findings = {str(p.relative_to(ROOT)): found for p in files if (found := unsafe_uses(p.read_text()))}
    assert findings == {}
