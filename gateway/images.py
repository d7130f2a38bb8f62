"""Turns `image_url` parts into image bytes: base64 `data:` URLs, and http(s) URLs fetched with limits; all of a
request's images at once (`load_images`), each named by its content when the feature cache is on.

Fetching guards against server-side request forgery: every address a host name resolves to must be
global (not private, loopback, link-local, ...) unless an allowed network holds it, the connection goes
to the checked address (no second DNS lookup to rebind), and each redirect is checked the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket

import httpx

from contracts.content_keys import content_key, frame_keys
from gateway.errors import APIError
from gateway.jobs import ImageSource, Job
from gateway.settings import GatewaySettings
from proto import dvd_pb2

log = logging.getLogger(__name__)

FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def image_format(data: bytes) -> str | None:
    """The image format by its magic bytes, or None when it is not one the vision server decodes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def check_image_bytes(data: bytes, *, index: int) -> bytes:
    if not data:
        raise APIError(400, f"image {index}: the image holds no bytes", param="messages")
    if image_format(data) is None:
        raise APIError(400, f"image {index}: not a {FORMATS} file", param="messages")
    return data


def _data_url_bytes(url: str, *, max_bytes: int, index: int, kind: str) -> bytes:
    """The bytes of a base64 `data:<kind>/...` URL; a clear 400 for anything else."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{kind} {index}: data URL must be base64 encoded (data:{kind}/...;base64,...)",
                       param="messages")
    media_type = header[len("data:"):-len(";base64")]
    if media_type and not media_type.startswith(f"{kind}/"):
        raise APIError(400, f"{kind} {index}: data URL media type {media_type!r} is not {kind}/*",
                       param="messages")
    # The size the payload decodes to, read before decoding it: every 4 base64 characters are 3 bytes, and
    # each "=" of padding stands for one byte less (a payload that is not valid base64 fails to decode below).
    if len(payload.rstrip("=")) * 3 // 4 > max_bytes:
        raise APIError(400, f"{kind} {index}: larger than the {max_bytes}-byte limit", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{kind} {index}: data URL is not valid base64", param="messages") from None


def decode_data_url(url: str, *, max_bytes: int, index: int) -> bytes:
    """The bytes of a base64 `data:image/...` URL, checked to start like an accepted image format."""
    return check_image_bytes(_data_url_bytes(url, max_bytes=max_bytes, index=index, kind="image"), index=index)


def decode_video_data_url(url: str, *, max_bytes: int, index: int) -> bytes:
    """The bytes of a base64 `data:video/...` URL; the vision server decodes and checks them."""
    if not url.startswith("data:"):
        raise APIError(400, f"video {index}: only data: URLs are supported for videos", param="messages")
    data = _data_url_bytes(url, max_bytes=max_bytes, index=index, kind="video")
    if not data:
        raise APIError(400, f"video {index}: data URL holds no bytes", param="messages")
    return data


class ImageFetcher:
    """Downloads http(s) images; one per app, its connection pool closed in the lifespan."""

    def __init__(self, *, max_bytes: int, timeout_s: float, max_redirects: int, allowed_networks: list[str]):
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._max_redirects = max_redirects
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s,
                                         headers={"user-agent": "dvd-gateway"})

    async def close(self) -> None:
        await self._client.aclose()

    def allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)  # an IPv6 scope ("fe80::1%eth0") is parsed, and changes nothing here
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self._allowed):
            return True
        return ip.is_global and not ip.is_multicast

    async def fetch(self, url: str, *, index: int) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url, index), self._timeout_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"image {index}: downloading {url[:200]} took longer than {self._timeout_s:g} s",
                           param="messages") from None
        except httpx.HTTPError as exc:
            raise APIError(400, f"image {index}: downloading {url[:200]} failed: {exc!r}", param="messages") from None

    async def _resolve(self, host: str, index: int) -> str:
        """One checked address of `host`; every address it resolves to must pass, or none is used."""
        try:  # a name resolves to at least one address, or fails; each address comes once per socket type
            infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise APIError(400, f"image {index}: cannot resolve host {host!r}: {exc.strerror}",
                           param="messages") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not self.allowed(a)]
        if refused:
            raise APIError(400, f"image {index}: host {host!r} resolves to {refused[0]}, "
                                "a non-public address, and is refused: send such images as data: URLs, or allow "
                                "the network in the gateway's image_fetch_allowed_networks", param="messages")
        return addresses[0]

    async def _fetch(self, url: str, index: int) -> bytes:
        for _ in range(self._max_redirects + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise APIError(400, f"image {index}: invalid URL: {exc}", param="messages") from None
            if target.scheme not in ("http", "https") or not target.host:
                raise APIError(400, f"image {index}: only data:, http: and https: image URLs are supported, "
                                    f"got {url[:60]!r}", param="messages")
            address = await self._resolve(target.host, index)
            # Connect to the address just checked; Host header and TLS name stay the requested ones.
            pinned = target.copy_with(host=address)
            host_header = target.netloc.decode()  # "[::1]:8080" for an IPv6 address, with its brackets
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            async with self._client.stream("GET", pinned, headers={"host": host_header},
                                           extensions=extensions) as response:
                if response.is_redirect and "location" in response.headers:
                    url = str(target.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise APIError(400, f"image {index}: downloading {str(target)[:200]} returned HTTP "
                                        f"{response.status_code}", param="messages")
                declared = response.headers.get("content-length")
                if declared is not None and int(declared) > self._max_bytes:
                    raise self._too_large(index)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self._max_bytes:
                        raise self._too_large(index)
                return check_image_bytes(bytes(data), index=index)
        raise APIError(400, f"image {index}: more than {self._max_redirects} redirects", param="messages")

    def _too_large(self, index: int) -> APIError:
        return APIError(400, f"image {index}: larger than the {self._max_bytes}-byte limit", param="messages")


async def load_images(job: Job, settings: GatewaySettings, fetcher: ImageFetcher, vision_weights: str) -> None:
    """Decode data URLs (in threads) and download http(s) URLs, all of a request's images at once; with the
    feature cache on, name each by content within the job's cache scope (`vision_weights`: the vision pool's
    weights fingerprint)."""

    async def load(index: int, source: ImageSource) -> dvd_pb2.ImageInput:
        if source.video_frames:
            data = await asyncio.to_thread(decode_video_data_url, source.url, max_bytes=settings.max_video_bytes,
                                           index=index)
            return dvd_pb2.ImageInput(data=data, video_frames=source.video_frames)
        if source.url.startswith("data:"):
            data = await asyncio.to_thread(decode_data_url, source.url, max_bytes=settings.max_image_bytes,
                                           index=index)
        elif source.url.startswith(("http://", "https://")):
            data = await fetcher.fetch(source.url, index=index)
        else:
            raise APIError(400, f"image {index}: only data:, http: and https: image URLs are supported, "
                                f"got {source.url[:40]!r}", param="messages")
        return dvd_pb2.ImageInput(data=data, max_tiles=source.max_tiles)

    tasks = [asyncio.ensure_future(load(i, s)) for i, s in enumerate(job.sources)]
    try:
        job.images = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # the first failure ends the others
            task.cancel()
    if settings.feature_cache and job.images:
        job.image_keys = await asyncio.to_thread(content_keys, job.model, vision_weights, job.images, job.cache_scope)


def content_keys(model: str, weights: str, images: list[dvd_pb2.ImageInput], scope: str = "") -> list[str]:
    """One key per image (video frame): the model, the vision weights, everything of the input that changes
    its features, and the cache scope (gateway/tenants.py), so that equal images of two scopes never meet."""
    keys = []
    for image in images:
        keys += frame_keys(content_key(image.data, model, weights, image.max_tiles, image.video_frames, scope),
                           image.video_frames)
    return keys
