"""Turns `image_url` parts into image bytes; only `data:` URLs are taken."""

from __future__ import annotations

import base64
import binascii

from gateway.errors import APIError


def decode_data_url(url: str, *, max_bytes: int, index: int) -> bytes:
    """The bytes of a base64 `data:image/...` URL; a clear 400 for anything else."""
    if not url.startswith("data:"):
        raise APIError(400, f"image {index}: only data: URLs are supported, got {url[:40]!r}", param="messages")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"image {index}: data URL must be base64 encoded (data:image/png;base64,...)",
                       param="messages")
    media_type = header[len("data:"):-len(";base64")]
    if media_type and not media_type.startswith("image/"):
        raise APIError(400, f"image {index}: data URL media type {media_type!r} is not an image", param="messages")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise APIError(400, f"image {index}: larger than the {max_bytes}-byte limit", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"image {index}: data URL is not valid base64", param="messages") from None
    if not data:
        raise APIError(400, f"image {index}: data URL holds no bytes", param="messages")
    return data
