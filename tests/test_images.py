"""The gateway's image loading (gateway/images.py) in-process, against a local HTTP server: data URLs checked,
downloads followed through redirects within their limits (size, time, redirects, addresses), every failure a
400 naming the image and the fact, and the images of a request named by content."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_image, png_bytes
from gateway.errors import APIError
from gateway.images import (
    ImageFetcher,
    check_image_bytes,
    content_keys,
    decode_data_url,
    decode_video_data_url,
    load_images,
)
from gateway.jobs import ImageSource, Job
from gateway.settings import GatewaySettings
from proto import dvd_pb2

PNG = png_bytes(make_image(16, 16, 0))
LIMIT = 4096


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes = b"", **headers) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        Handler.hosts.append(self.headers["host"])
        if self.path == "/cat.png":
            self.send(200, PNG, content_length=str(len(PNG)))
        elif self.path == "/hop":
            self.send(302, location="/cat.png", content_length="0")
        elif self.path == "/loop":
            self.send(302, location="/loop", content_length="0")
        elif self.path == "/declared-huge":
            self.send(200, b"", content_length=str(LIMIT + 1))
        elif self.path == "/streamed-huge":
            self.send(200, PNG + bytes(LIMIT), connection="close")
        elif self.path == "/text":
            self.send(200, b"hello", content_length="5")
        elif self.path == "/slow":
            time.sleep(2)
            self.send(200, PNG, content_length=str(len(PNG)))
        else:
            self.send(404, b"", content_length="0")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(url: str, allowed=("127.0.0.0/8",), **limits):
    async def run():
        fetcher = ImageFetcher(**{"max_bytes": LIMIT, "timeout_s": 1.0, "max_redirects": 2,
                                  "allowed_networks": list(allowed), **limits})
        try:
            return await fetcher.fetch(url, index=3)
        finally:
            await fetcher.close()

    return asyncio.run(run())


def test_an_image_is_downloaded_from_the_checked_address_under_its_own_host_name(server):
    Handler.hosts.clear()
    assert fetch(f"{server}/cat.png") == PNG
    assert Handler.hosts == [server.removeprefix("http://")]


def test_redirects_are_followed_up_to_the_limit(server):
    assert fetch(f"{server}/hop") == PNG
    with pytest.raises(APIError, match="^image 3: more than 2 redirects$"):
        fetch(f"{server}/loop")
    with pytest.raises(APIError, match="^image 3: more than 0 redirects$"):
        fetch(f"{server}/hop", max_redirects=0)


@pytest.mark.parametrize(("path", "message"), [
    ("/missing", r"image 3: downloading http://localhost:\d+/missing returned HTTP 404"),
    ("/declared-huge", "image 3: larger than the 4096-byte limit"),
    ("/streamed-huge", "image 3: larger than the 4096-byte limit"),
    ("/text", "image 3: not a JPEG, PNG, WebP, GIF, BMP or TIFF file"),
    ("/slow", r"image 3: downloading http://localhost:\d+/slow took longer than 1 s"),
])
def test_a_failed_download_is_a_400_naming_the_image_and_why(server, path, message):
    with pytest.raises(APIError, match=f"^{message}$") as caught:
        fetch(f"{server}{path}")
    assert (caught.value.status, caught.value.param) == (400, "messages")


def test_hosts_on_private_addresses_are_refused_unless_their_network_is_allowed(server):
    with pytest.raises(APIError, match=r"^image 3: host 'localhost' resolves to 127\.0\.0\.1, a non-public address, "
                                       r"and is refused: send such images as data: URLs, or allow the network in "
                                       r"the gateway's image_fetch_allowed_networks$"):
        fetch(f"{server}/cat.png", allowed=())
    with pytest.raises(APIError, match="^image 3: host '127.0.0.1' resolves to 127.0.0.1"):
        fetch(server.replace("localhost", "127.0.0.1") + "/cat.png", allowed=("10.0.0.0/8",))


@pytest.mark.parametrize(("url", "message"), [
    ("http://no-such-host.invalid/a.png", "image 3: cannot resolve host 'no-such-host.invalid': "),
    ("ftp://example.com/a.png", "image 3: only data:, http: and https: image URLs are supported, got 'ftp://"),
    ("http:///a.png", "image 3: only data:, http: and https: image URLs are supported"),
    ("http://[::1/a.png", "image 3: invalid URL: "),
])
def test_urls_that_cannot_be_fetched_are_a_400_naming_why(url, message):
    with pytest.raises(APIError, match=f"^{message}"):
        fetch(url)


def test_only_public_addresses_and_allowed_networks_may_be_fetched():
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=["10.1.0.0/16"])
    assert fetcher.allowed("93.184.216.34") and fetcher.allowed("10.1.2.3") and fetcher.allowed("::ffff:10.1.0.9")
    assert not fetcher.allowed("10.2.0.1") and not fetcher.allowed("224.0.0.1") and not fetcher.allowed("fe80::1%2")
    asyncio.run(fetcher.close())


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def test_data_urls_give_their_bytes_and_name_what_is_wrong():
    assert decode_data_url(data_url(PNG), max_bytes=LIMIT, index=0) == PNG
    assert decode_data_url("data:;base64," + base64.b64encode(PNG).decode(), max_bytes=LIMIT, index=0) == PNG
    cases = [
        ("data:image/png," + "abc", "image 1: data URL must be base64 encoded (data:image/...;base64,...)"),
        ("data:image/png;base64", "image 1: data URL must be base64 encoded (data:image/...;base64,...)"),
        (data_url(PNG, "text/plain"), "image 1: data URL media type 'text/plain' is not image/*"),
        (data_url(bytes(LIMIT + 8)), "image 1: larger than the 4096-byte limit"),
        ("data:image/png;base64,@@@@", "image 1: data URL is not valid base64"),
        (data_url(b""), "image 1: the image holds no bytes"),
        (data_url(b"hello"), "image 1: not a JPEG, PNG, WebP, GIF, BMP or TIFF file"),
    ]
    for url, message in cases:
        with pytest.raises(APIError, match=f"^{re.escape(message)}$"):
            decode_data_url(url, max_bytes=LIMIT, index=1)


def test_a_data_url_just_within_the_limit_is_accepted():
    image = PNG + bytes(LIMIT - len(PNG))
    assert decode_data_url(data_url(image), max_bytes=LIMIT, index=0) == image


def test_videos_come_only_as_data_urls_with_bytes():
    assert decode_video_data_url(data_url(b"mp4", "video/mp4"), max_bytes=LIMIT, index=0) == b"mp4"
    with pytest.raises(APIError, match="^video 2: only data: URLs are supported for videos$"):
        decode_video_data_url("http://example.com/v.mp4", max_bytes=LIMIT, index=2)
    with pytest.raises(APIError, match="^video 2: data URL holds no bytes$"):
        decode_video_data_url(data_url(b"", "video/mp4"), max_bytes=LIMIT, index=2)
    with pytest.raises(APIError, match="^video 2: data URL media type 'image/png' is not video/[*]$"):
        decode_video_data_url(data_url(b"x"), max_bytes=LIMIT, index=2)


def test_check_image_bytes_passes_images_through():
    assert check_image_bytes(PNG, index=0) is PNG


def job_of(*sources: ImageSource) -> Job:
    return Job("r", "tiny", [], list(sources), dvd_pb2.SamplingParams())


def load(job: Job, fetcher_allowed=("127.0.0.0/8",), **settings) -> Job:
    async def run():
        fetcher = ImageFetcher(max_bytes=LIMIT, timeout_s=5, max_redirects=1, allowed_networks=list(fetcher_allowed))
        try:
            await load_images(job, GatewaySettings(**{"max_image_bytes": LIMIT, **settings}), fetcher, "w1")
        finally:
            await fetcher.close()
        return job

    return asyncio.run(run())


def test_a_requests_images_are_loaded_in_order_each_with_its_tiles_and_named_by_content(server):
    job = load(job_of(ImageSource(data_url(PNG), 6), ImageSource(f"{server}/cat.png", 1),
                      ImageSource(data_url(b"mp4", "video/mp4"), 1, video_frames=2)))
    assert [(i.data, i.max_tiles, i.video_frames) for i in job.images] == [(PNG, 6, 0), (PNG, 1, 0), (b"mp4", 0, 2)]
    assert job.image_keys == content_keys("tiny", "w1", job.images)
    assert len(job.image_keys) == 4 and job.image_keys[0] != job.image_keys[1]  # other tiles, other features
    assert job.image_keys[2:] == [job.image_keys[2][:-2] + ".0", job.image_keys[2][:-2] + ".1"]


def test_without_the_feature_cache_images_are_not_named():
    assert load(job_of(ImageSource(data_url(PNG), 1)), feature_cache=False).image_keys == []


def test_one_bad_image_fails_the_request_naming_it():
    with pytest.raises(APIError, match="^image 1: only data:, http: and https: image URLs are supported, got 'file:"):
        load(job_of(ImageSource(data_url(PNG), 1), ImageSource("file:///etc/passwd", 1)))


def test_content_keys_change_with_the_model_the_weights_and_the_tiles():
    image = dvd_pb2.ImageInput(data=PNG, max_tiles=6)
    key = content_keys("tiny", "w1", [image])
    assert key != content_keys("other", "w1", [image]) and key != content_keys("tiny", "w2", [image])
    assert key != content_keys("tiny", "w1", [dvd_pb2.ImageInput(data=PNG, max_tiles=1)])
    assert key == content_keys("tiny", "w1", [dvd_pb2.ImageInput(data=PNG, max_tiles=6)])
