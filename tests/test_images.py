"""The gateway's image loading (gateway/images.py) in-process, against a local HTTP server: data URLs checked,
downloads followed through redirects within their limits (size, time, redirects, addresses), every failure a
400 naming the image and the fact, and the images of a request named by content."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
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
    image_format,
    load_images,
)
from gateway.jobs import ImageSource, Job
from gateway.settings import GatewaySettings
from proto import dvd_pb2

PNG = png_bytes(make_image(16, 16, 0))
LIMIT = 4096
EXACT = PNG + bytes(LIMIT - len(PNG))  # an image of exactly LIMIT bytes
LARGE = PNG + bytes(range(256)) * 1200  # 300 KiB: more than one read from the socket


@contextlib.contextmanager
def refused(message: str):
    """The block fails with the 400 the user sees: `message` (a regex, anchored at both ends) about `messages`."""
    with pytest.raises(APIError, match=f"^{message}$") as caught:
        yield
    assert (caught.value.status, caught.value.param) == (400, "messages")


def closed_port() -> int:
    """A local port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []  # the Host header of each request
    agents: list[str] = []  # its User-Agent
    paths: list[str] = []  # its request target

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
        Handler.agents.append(self.headers["user-agent"])
        Handler.paths.append(self.path)
        path = self.path.split("?", 1)[0]  # a query only makes a URL longer
        if path == "/cat.png":
            self.send(200, PNG, content_length=str(len(PNG)))
        elif path == "/hop":
            self.send(302, location="/cat.png", content_length="0")
        elif path == "/loop":
            self.send(302, location="/loop", content_length="0")
        elif path == "/no-location":
            self.send(302, content_length="0")
        elif path == "/to-another-address":
            self.send(302, location=f"http://127.0.0.2:{self.server.server_address[1]}/cat.png", content_length="0")
        elif path == "/located":  # a Location header on a 200 is no redirect
            self.send(200, PNG, content_length=str(len(PNG)), location="/text")
        elif path == "/declared-huge":
            self.send(200, b"", content_length=str(LIMIT + 1))
        elif path == "/streamed-huge":
            self.send(200, PNG + bytes(LIMIT), connection="close")
        elif path == "/exact":
            self.send(200, EXACT, content_length=str(LIMIT))
        elif path == "/exact-streamed":
            self.send(200, EXACT, connection="close")
        elif path == "/large":
            self.send(200, LARGE, content_length=str(len(LARGE)))
        elif path == "/text":
            self.send(200, b"hello", content_length="5")
        elif path == "/slow":
            time.sleep(2)
            self.send(200, PNG, content_length=str(len(PNG)))
        else:
            self.send(404, b"", content_length="0")


@pytest.fixture(scope="module")
def server():
    httpd = serve(QuietServer(("127.0.0.1", 0), Handler))
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up on a refused download
        pass


def serve(httpd: ThreadingHTTPServer):
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


class IPv6Server(QuietServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def server_v6():
    try:
        httpd = serve(IPv6Server(("::1", 0), Handler))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    yield f"http://[::1]:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def tls_names():
    """A TLS server without a certificate: it reads the name a client asks for (SNI), then the handshake fails."""
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        connection, _ = listener.accept()
        with connection, contextlib.suppress(ssl.SSLError, OSError):
            context.wrap_socket(connection, server_side=True)

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], names
    listener.close()


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
    Handler.hosts.clear(), Handler.agents.clear(), Handler.paths.clear()
    assert fetch(f"{server}/cat.png") == PNG
    assert Handler.hosts == [server.removeprefix("http://")]
    assert Handler.agents == ["dvd-gateway"] and Handler.paths == ["/cat.png"]


def test_an_ipv6_address_in_the_url_is_the_host_header_in_brackets(server_v6):
    Handler.hosts.clear()
    assert fetch(f"{server_v6}/cat.png", allowed=("::1/128",)) == PNG
    assert Handler.hosts == [server_v6.removeprefix("http://")]  # "[::1]:port", as HTTP writes it


def test_proxies_named_in_the_environment_are_not_used(server, monkeypatch):
    # A proxy would connect on the gateway's behalf, past the address check: the download goes to the server.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False), monkeypatch.delenv("no_proxy", raising=False)
    assert fetch(f"{server}/cat.png") == PNG


def test_an_allowed_network_may_be_written_with_its_host_bits_set(server):
    assert fetch(f"{server}/cat.png", allowed=("127.0.0.1/8",)) == PNG


def test_https_asks_the_server_for_the_requested_name_not_the_checked_address(tls_names):
    port, names = tls_names
    with refused(rf"image 3: downloading https://localhost:{port}/cat\.png failed: ConnectError\(.*\)"):
        fetch(f"https://localhost:{port}/cat.png")
    assert names == ["localhost"]


def test_redirects_are_followed_up_to_the_limit_under_the_requested_host_name(server):
    Handler.hosts.clear()
    assert fetch(f"{server}/hop") == PNG
    assert Handler.hosts == [server.removeprefix("http://")] * 2
    with refused("image 3: more than 2 redirects"):
        fetch(f"{server}/loop")
    with refused("image 3: more than 0 redirects"):
        fetch(f"{server}/hop", max_redirects=0)


def test_only_a_redirect_status_with_a_location_is_followed(server):
    assert fetch(f"{server}/located") == PNG
    with refused(r"image 3: downloading http://localhost:\d+/no-location returned HTTP 302"):
        fetch(f"{server}/no-location")


def test_each_redirect_is_checked_like_the_first_url(server):
    with refused(r"image 3: host '127\.0\.0\.2' resolves to 127\.0\.0\.2, a non-public address, and is refused: "
                 r"send such images as data: URLs, or allow the network in the gateway's "
                 r"image_fetch_allowed_networks"):
        fetch(f"{server}/to-another-address", allowed=("127.0.0.1/32",))


def test_downloads_of_exactly_the_limit_are_whole(server):
    assert fetch(f"{server}/exact") == EXACT  # declared in Content-Length
    assert fetch(f"{server}/exact-streamed") == EXACT  # no Content-Length: counted as it arrives
    assert fetch(f"{server}/large", max_bytes=len(LARGE)) == LARGE  # many reads, joined


@pytest.mark.parametrize(("path", "message"), [
    ("/missing", r"image 3: downloading http://localhost:\d+/missing returned HTTP 404"),
    ("/declared-huge", "image 3: larger than the 4096-byte limit"),
    ("/streamed-huge", "image 3: larger than the 4096-byte limit"),
    ("/large", "image 3: larger than the 4096-byte limit"),
    ("/text", "image 3: not a JPEG, PNG, WebP, GIF, BMP or TIFF file"),
    ("/slow", r"image 3: downloading http://localhost:\d+/slow took longer than 0\.25 s"),
])
def test_a_failed_download_is_a_400_naming_the_image_and_why(server, path, message):
    with refused(message):
        fetch(f"{server}{path}", timeout_s=0.25)


def test_a_long_url_is_named_by_its_first_200_characters(server):
    query = "?q=" + "x" * 300
    for path, why in [("/missing", "returned HTTP 404"), ("/slow", r"took longer than 0\.25 s")]:
        url = f"{server}{path}{query}"
        with refused(f"image 3: downloading {re.escape(url[:200])} {why}"):
            fetch(url, timeout_s=0.25)
    url = f"http://127.0.0.1:{closed_port()}/{'y' * 300}"
    with refused(f"image 3: downloading {re.escape(url[:200])} failed: ConnectError\\(.*\\)"):
        fetch(url)


def test_hosts_on_private_addresses_are_refused_unless_their_network_is_allowed(server):
    with refused(r"image 3: host 'localhost' resolves to 127\.0\.0\.1, a non-public address, and is refused: send "
                 r"such images as data: URLs, or allow the network in the gateway's image_fetch_allowed_networks"):
        fetch(f"{server}/cat.png", allowed=())
    with refused(r"image 3: host '127\.0\.0\.1' resolves to 127\.0\.0\.1, a non-public address, .*"):
        fetch(server.replace("localhost", "127.0.0.1") + "/cat.png", allowed=("10.0.0.0/8",))


@pytest.mark.parametrize(("url", "message"), [
    ("http://no-such-host.invalid/a.png", "image 3: cannot resolve host 'no-such-host.invalid': [^:]+"),
    ("ftp://127.0.0.1/a.png", "image 3: only data:, http: and https: image URLs are supported, got 'ftp://127.0.0.1/a.png'"),
    ("ftp://127.0.0.1/" + "a" * 100, "image 3: only data:, http: and https: image URLs are supported, got 'ftp://127.0.0.1/"
     + "a" * 44 + "'"),
    ("http:///a.png", "image 3: only data:, http: and https: image URLs are supported, got 'http:///a.png'"),
    ("http://[::1/a.png", "image 3: invalid URL: Invalid port: ':1'"),
])
def test_urls_that_cannot_be_fetched_are_a_400_naming_why(url, message):
    with refused(message):
        fetch(url)


def test_only_public_addresses_and_allowed_networks_may_be_fetched():
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=["10.1.0.0/16"])
    assert fetcher.allowed("93.184.216.34") and fetcher.allowed("10.1.2.3") and fetcher.allowed("::ffff:10.1.0.9")
    assert not fetcher.allowed("10.2.0.1") and not fetcher.allowed("224.0.0.1") and not fetcher.allowed("fe80::1%2")
    asyncio.run(fetcher.close())


def test_a_link_local_address_with_its_scope_is_allowed_by_its_network():
    fetcher = ImageFetcher(max_bytes=1, timeout_s=1, max_redirects=0, allowed_networks=["fe80::/10"])
    assert fetcher.allowed("fe80::1%2") and fetcher.allowed("fe80::1%eth0") and not fetcher.allowed("fd00::1%2")
    asyncio.run(fetcher.close())


@pytest.mark.parametrize(("data", "fmt"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"), (b"\xff\xd8\xff\xe0\x00", "JPEG"),
    (b"GIF87a\x01\x00", "GIF"), (b"GIF89a\x01\x00", "GIF"), (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WEBP"),
    (b"BM\x36\x00", "BMP"), (b"II*\x00\x08\x00", "TIFF"), (b"MM\x00*\x00\x08", "TIFF"),
    (b"\x89PNG\r\n\x1a", None), (b"\xff\xd8\xfe", None), (b"GIF88a\x01\x00", None),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", None), (b"RIFX\x24\x00\x00\x00WEBPVP8 ", None),
    (b"II+\x00\x08\x00", None), (b"MM*\x00\x00\x08", None), (b"<svg/>", None), (b"", None),
])
def test_image_formats_are_told_by_their_first_bytes(data, fmt):
    assert image_format(data) == fmt


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
        ("data:image/png;base64," + "@" * 6000, "image 1: larger than the 4096-byte limit"),  # not decoded at all
        ("data:image/png;base64,@@@@", "image 1: data URL is not valid base64"),
        ("data:image/png;base64,iVBO,RwAA", "image 1: data URL is not valid base64"),  # the first comma ends the header
        ("data:image/png;x=a,b;base64,iVBORwAA",
         "image 1: data URL must be base64 encoded (data:image/...;base64,...)"),
        (data_url(b""), "image 1: the image holds no bytes"),
        (data_url(b"hello"), "image 1: not a JPEG, PNG, WebP, GIF, BMP or TIFF file"),
    ]
    for url, message in cases:
        with refused(re.escape(message)):
            decode_data_url(url, max_bytes=LIMIT, index=1)


@pytest.mark.parametrize("size", [LIMIT - 2, LIMIT - 1, LIMIT])  # base64 with 1, no and 2 "=" of padding
def test_a_data_url_up_to_the_limit_is_accepted(size):
    image = PNG + bytes(size - len(PNG))
    assert decode_data_url(data_url(image), max_bytes=LIMIT, index=0) == image


@pytest.mark.parametrize(("over", "tail"), [(1, b""), (2, b""), (3, b""), (2, b"\x5d\x75\xd7")])
def test_a_data_url_over_the_limit_is_refused_by_a_byte(over, tail):
    # LIMIT + 1, + 2, + 3 bytes: base64 with 1, no and 2 "=" of padding; the last ends in the digits "XXXX".
    image = PNG + bytes(LIMIT + over - len(PNG) - len(tail)) + tail
    assert len(image) == LIMIT + over and data_url(image).endswith("XXXX" if tail else ("=", "A"))
    with refused(f"image 0: larger than the {LIMIT}-byte limit"):
        decode_data_url(data_url(image), max_bytes=LIMIT, index=0)


def test_videos_come_only_as_data_urls_with_bytes_within_their_limit():
    assert decode_video_data_url(data_url(b"mp4", "video/mp4"), max_bytes=LIMIT, index=0) == b"mp4"
    assert decode_video_data_url(data_url(bytes(LIMIT), "video/mp4"), max_bytes=LIMIT, index=0) == bytes(LIMIT)
    with refused("video 2: only data: URLs are supported for videos"):
        decode_video_data_url("http://example.com/v.mp4", max_bytes=LIMIT, index=2)
    with refused("video 2: data URL holds no bytes"):
        decode_video_data_url(data_url(b"", "video/mp4"), max_bytes=LIMIT, index=2)
    with refused("video 2: data URL media type 'image/png' is not video/[*]"):
        decode_video_data_url(data_url(b"x"), max_bytes=LIMIT, index=2)
    with refused(re.escape("video 2: data URL must be base64 encoded (data:video/...;base64,...)")):
        decode_video_data_url("data:video/mp4,abc", max_bytes=LIMIT, index=2)
    with refused("video 2: data URL is not valid base64"):
        decode_video_data_url("data:video/mp4;base64,@@@@", max_bytes=LIMIT, index=2)
    with refused(f"video 2: larger than the {LIMIT}-byte limit"):
        decode_video_data_url(data_url(bytes(LIMIT + 1), "video/mp4"), max_bytes=LIMIT, index=2)


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


def test_a_requests_images_are_named_within_its_cache_scope():
    job = job_of(ImageSource(data_url(PNG), 6), ImageSource(data_url(b"mp4", "video/mp4"), 1, video_frames=2))
    job.cache_scope = "tenant-a"
    keys = load(job).image_keys
    assert keys == content_keys("tiny", "w1", job.images, "tenant-a")
    assert keys[0] != content_keys("tiny", "w1", job.images)[0]  # another scope: other names


@pytest.mark.parametrize(("source", "message"), [
    (ImageSource("file:///etc/passwd", 1),
     "image 1: only data:, http: and https: image URLs are supported, got 'file:///etc/passwd'"),
    (ImageSource("file:///" + "x" * 100, 1),
     "image 1: only data:, http: and https: image URLs are supported, got 'file:///" + "x" * 32 + "'"),
    (ImageSource(data_url(b"hello"), 1), "image 1: not a JPEG, PNG, WebP, GIF, BMP or TIFF file"),
    (ImageSource(data_url(PNG + bytes(LIMIT)), 1), f"image 1: larger than the {LIMIT}-byte limit"),
    (ImageSource(data_url(bytes(9), "video/mp4"), 1, video_frames=2), "video 1: larger than the 8-byte limit"),
])
def test_one_bad_image_fails_the_request_naming_it(source, message):
    with refused(re.escape(message)):
        load(job_of(ImageSource(data_url(PNG), 1), source), max_video_bytes=8)


def test_https_images_are_downloaded_too():
    url = f"https://127.0.0.1:{closed_port()}/cat.png"
    with refused(f"image 1: downloading {re.escape(url)} failed: ConnectError\\(.*\\)"):
        load(job_of(ImageSource(data_url(PNG), 1), ImageSource(url, 1)))


def test_content_keys_change_with_the_model_the_weights_and_the_tiles():
    image = dvd_pb2.ImageInput(data=PNG, max_tiles=6)
    key = content_keys("tiny", "w1", [image])
    assert key != content_keys("other", "w1", [image]) and key != content_keys("tiny", "w2", [image])
    assert key != content_keys("tiny", "w1", [dvd_pb2.ImageInput(data=PNG, max_tiles=1)])
    assert key == content_keys("tiny", "w1", [dvd_pb2.ImageInput(data=PNG, max_tiles=6)])


def test_a_video_sampled_to_another_number_of_frames_shares_no_key():
    # Two frames of a video are not the first two of eight: the frames sampled lie elsewhere in it.
    keys = {frames: content_keys("tiny", "w1", [dvd_pb2.ImageInput(data=b"mp4", video_frames=frames)])
            for frames in (2, 8)}
    assert len(keys[2]) == 2 and len(keys[8]) == 8 and not set(keys[2]) & set(keys[8])
