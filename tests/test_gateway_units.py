"""Gateway pieces on their own: the thinking splitter, image checks, SSRF address rules, settings sources, and the
app in-process against fake servers."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from conftest import data_url, make_image
from gateway.app import create_app
from gateway.errors import APIError
from gateway.images import ImageFetcher, decode_data_url, image_format
from gateway.pools import LATE_CHECKS_TO_EJECT, VisionPool
from gateway.settings import GatewaySettings, load_settings
from proto import dvd_pb2, dvd_pb2_grpc


def encoded(fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    make_image(40, 30, 0).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_image_formats_are_recognised_by_their_bytes(fmt):
    assert image_format(encoded(fmt)) == fmt
    assert Image.open(io.BytesIO(encoded(fmt))).format == fmt


def test_data_urls_that_are_not_images_are_refused():
    import base64

    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    with pytest.raises(APIError, match="image 3: not a JPEG, PNG"):
        decode_data_url(svg, max_bytes=1 << 20, index=3)
    with pytest.raises(APIError, match="larger than the 100-byte limit"):
        decode_data_url("data:image/png;base64," + base64.b64encode(encoded("PNG")).decode(), max_bytes=100, index=0)
    with pytest.raises(APIError, match="holds no bytes"):
        decode_data_url("data:image/png;base64,", max_bytes=100, index=0)


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("172.16.5.5", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
])
def test_only_public_addresses_may_be_fetched_by_default(address, allowed):
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=[])
    assert fetcher.allowed(address) is allowed


def test_allowed_networks_open_private_addresses():
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=["10.1.0.0/16", "::1/128"])
    assert fetcher.allowed("10.1.200.3") and fetcher.allowed("::1")
    assert not fetcher.allowed("10.2.0.1") and not fetcher.allowed("127.0.0.1")


def test_a_dns_entry_stands_for_every_address_of_its_name():
    async def run():
        pool = VisionPool(["dns:localhost:50999", "127.0.0.2:50998"])
        assert [b.address for b in pool.backends] == ["127.0.0.2:50998"]
        await pool.resolve()
        addresses = {b.address for b in pool.backends}
        await pool.close()
        return addresses

    addresses = asyncio.run(run())
    assert {"127.0.0.1:50999", "127.0.0.2:50998"} <= addresses


def test_the_vision_pool_names_the_weights_its_healthy_servers_encode_with():
    """Part of every content key: a rollout that mixes two sets of weights keys with both; a server that
    is down does not count."""
    async def run():
        pool = VisionPool(["127.0.0.2:50997", "127.0.0.2:50996", "127.0.0.2:50995"])
        for backend, weights in zip(pool.backends, ("old", "new", "")):  # the third not checked yet
            backend.weights = weights
        mixed = pool.weights
        pool.backends[0].mark_down("test")
        rolled = pool.weights
        await pool.close()
        return mixed, rolled

    assert asyncio.run(run()) == ("new+old", "new")


def test_malformed_dns_entry_fails_at_start():
    with pytest.raises(ValueError, match="dns:NAME:PORT"):
        VisionPool(["dns:no-port"])


def test_settings_come_from_flags_then_env_then_file(tmp_path, monkeypatch):
    (tmp_path / "gateway.toml").write_text('port = 9001\nmax_n = 3\napi_keys = ["k1"]\n'
                                           'vision_servers = ["10.0.0.1:1", "10.0.0.2:1"]\n')
    (tmp_path / "gateway.json").write_text(json.dumps({"max_in_flight": 7}))
    monkeypatch.setenv("DVD_GATEWAY_MAX_N", "5")
    loaded = load_settings(tmp_path / "gateway.toml", port=9002)
    assert (loaded.port, loaded.max_n, loaded.api_keys) == (9002, 5, [SecretStr("k1")])
    assert loaded.vision_servers == ["10.0.0.1:1", "10.0.0.2:1"]
    assert load_settings(tmp_path / "gateway.json").max_in_flight == 7
    (tmp_path / "typo.toml").write_text("max_in_flite = 3\n")
    with pytest.raises(ValueError, match="max_in_flite"):
        load_settings(tmp_path / "typo.toml")
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


class SlowHealth(dvd_pb2_grpc.VisionServiceServicer):
    """A vision server whose Health answers after `delay_s` (a server busy on a loaded host)."""

    delay_s = 0.0

    async def Health(self, request, context):  # noqa: N802
        await asyncio.sleep(self.delay_s)
        return dvd_pb2.HealthResponse(ready=True, model="tiny", weights="w")


def test_a_server_answering_health_checks_late_is_ejected_only_after_three_in_a_row_and_a_gone_one_at_once():
    async def run():
        servicer = SlowHealth()
        server = grpc.aio.server()
        dvd_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = VisionPool([f"127.0.0.1:{port}"])
        backend = pool.backends[0]
        seen = []
        try:
            servicer.delay_s = 1.0
            for _ in range(LATE_CHECKS_TO_EJECT):
                seen.append((await pool.check(timeout_s=0.2), backend.up))
            servicer.delay_s = 0.0
            seen.append((await pool.check(timeout_s=5), backend.up))  # answers in time again: re-admitted
            servicer.delay_s = 1.0
            seen.append((await pool.check(timeout_s=0.2), backend.up))  # the count of late answers starts anew
            await server.stop(None)
            seen.append((await pool.check(timeout_s=5), backend.up))  # gone: refused at once
        finally:
            await server.stop(None)
            await pool.close()
        return seen

    late_but_kept = [(1, True)] * (LATE_CHECKS_TO_EJECT - 1)
    assert asyncio.run(run()) == [*late_but_kept, (0, False), (1, True), (1, True), (0, False)]


class FakeVision(dvd_pb2_grpc.VisionServiceServicer):
    async def Health(self, request, context):  # noqa: N802
        return dvd_pb2.HealthResponse(ready=True, model="tiny", weights="w")


class FakeLanguage(dvd_pb2_grpc.LanguageServiceServicer):
    """A language server that advertises `max_images` and answers every Generate with "ok"."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.image_counts: list[int] = []  # of the Generate calls it got

    async def Health(self, request, context):  # noqa: N802
        return dvd_pb2.HealthResponse(ready=True, model="tiny")

    async def Describe(self, request, context):  # noqa: N802
        return dvd_pb2.ModelDescription(model="/checkpoints/tiny", hidden_size=64, max_model_len=4096,
                                        feature_endpoint="tcp://127.0.0.1:9", max_images_per_request=self.max_images)

    async def Generate(self, request, context):  # noqa: N802
        self.image_counts.append(request.image_count)
        yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages())  # holds them all: nothing to encode
        yield dvd_pb2.GenerateResponse(text="ok", finish_reason="stop",
                                       usage=dvd_pb2.Usage(prompt_tokens=3, completion_tokens=1))


def test_the_gateway_takes_the_image_limit_the_language_server_advertises():
    language = FakeLanguage(max_images=2)
    pictures = [{"type": "image_url", "image_url": {"url": data_url(make_image(16, 16, seed))}} for seed in range(3)]

    def chat(images: int) -> dict:
        return {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": pictures[:images]}]}

    async def run():
        servers = []
        for add, servicer in ((dvd_pb2_grpc.add_VisionServiceServicer_to_server, FakeVision()),
                              (dvd_pb2_grpc.add_LanguageServiceServicer_to_server, language)):
            server = grpc.aio.server()
            add(servicer, server)
            servers.append((server, server.add_insecure_port("127.0.0.1:0")))
            await server.start()
        (_, vision_port), (_, language_port) = servers
        app = create_app(GatewaySettings(vision_servers=[f"127.0.0.1:{vision_port}"],
                                         language_servers=[f"127.0.0.1:{language_port}"]))
        try:
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
                too_many = await client.post("/v1/chat/completions", json=chat(3))
                allowed = await client.post("/v1/chat/completions", json=chat(2))
        finally:
            for server, _ in servers:
                await server.stop(None)
        return too_many, allowed

    too_many, allowed = asyncio.run(run())
    assert too_many.status_code == 400
    assert "3 images in one request; the language server takes at most 2" in too_many.json()["error"]["message"]
    assert allowed.status_code == 200 and allowed.json()["choices"][0]["message"]["content"] == "ok"
    assert language.image_counts == [2]  # the refused request never reached it
