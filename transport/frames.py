"""The feature wire format: a protobuf `FeatureHeader` frame, then the raw little-endian payload frame.

Both backends move exactly these two frames. Decoding checks every field against the payload before a
tensor is built, so a malformed message is rejected here and never reaches the language model.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from proto import dvd_pb2

DTYPE_TO_WIRE = {
    torch.bfloat16: dvd_pb2.BFLOAT16,
    torch.float16: dvd_pb2.FLOAT16,
    torch.float32: dvd_pb2.FLOAT32,
}
WIRE_TO_DTYPE = {wire: dtype for dtype, wire in DTYPE_TO_WIRE.items()}
MAX_REQUEST_ID_LENGTH = 128

if sys.byteorder != "little":  # the payload is the tensor's memory, sent as is
    raise ImportError("the feature wire format assumes a little-endian host")


class FrameError(ValueError):
    """A feature message that cannot be accepted; the message says which field is wrong.

    `reason` is a short, fixed label for counting drops (a metric label, never the free-form message).
    """

    def __init__(self, message: str, reason: str = "bad_header"):
        super().__init__(message)
        self.reason = reason


@dataclass
class ImageFeatures:
    """One image's features: `tile_tokens[i]` rows per tile, `[sum(tile_tokens), hidden]` in total."""

    request_id: str
    image_index: int
    image_count: int
    tile_tokens: list[int]
    features: torch.Tensor  # [tokens, hidden]
    sent_unix_ns: int = 0  # set by the sender's transport
    received_unix_ns: int = 0  # set by the receiver's transport

    @property
    def num_bytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def encode_frames(item: ImageFeatures, *, checksum: bool = False) -> tuple[bytes, memoryview]:
    """Header bytes and a zero-copy view of the payload (the view keeps the tensor alive)."""
    features = item.features.detach()
    if features.device.type != "cpu":
        features = features.cpu()
    features = features.contiguous()
    if features.dtype not in DTYPE_TO_WIRE:
        raise FrameError(f"feature dtype {features.dtype} cannot be sent; use one of {list(DTYPE_TO_WIRE)}")
    if features.dim() != 2 or features.shape[0] != sum(item.tile_tokens):
        raise FrameError(
            f"features of shape {tuple(features.shape)} do not match tile_tokens {item.tile_tokens}"
        )
    payload = memoryview(features.view(torch.uint8).numpy()).cast("B")
    header = dvd_pb2.FeatureHeader(
        request_id=item.request_id,
        image_index=item.image_index,
        image_count=item.image_count,
        tile_tokens=item.tile_tokens,
        hidden_size=features.shape[1],
        dtype=DTYPE_TO_WIRE[features.dtype],
        payload_bytes=payload.nbytes,
        sent_unix_ns=time.time_ns(),
    )
    if checksum:
        header.crc32 = zlib.crc32(payload)
    return header.SerializeToString(), payload


def decode_header(
    data: bytes | memoryview, *, max_payload_bytes: int, hidden_size: int | None = None
) -> dvd_pb2.FeatureHeader:
    """Parse and check a header on its own, before its payload is looked at.

    With `hidden_size`, features of any other width are refused (they could never be used by the model).
    """
    header = dvd_pb2.FeatureHeader()
    try:
        header.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise FrameError(f"feature header is not a valid FeatureHeader: {exc}") from None
    if not header.request_id or len(header.request_id) > MAX_REQUEST_ID_LENGTH:
        raise FrameError(f"feature header has a bad request id of length {len(header.request_id)}")
    if header.image_count == 0 or header.image_index >= header.image_count:
        raise FrameError(f"image index {header.image_index} is outside image count {header.image_count}")
    if header.dtype not in WIRE_TO_DTYPE:
        raise FrameError(f"feature header has unknown dtype {header.dtype}", "dtype")
    if header.hidden_size == 0 or not header.tile_tokens or 0 in header.tile_tokens:
        raise FrameError("feature header has an empty shape (hidden size or tile tokens)")
    if hidden_size is not None and header.hidden_size != hidden_size:
        raise FrameError(
            f"request {header.request_id}: hidden size {header.hidden_size} is not the model's {hidden_size}",
            "hidden_size",
        )
    if header.payload_bytes > max_payload_bytes:
        raise FrameError(
            f"payload of {header.payload_bytes} bytes exceeds the {max_payload_bytes}-byte limit", "oversized"
        )
    itemsize = torch.empty((), dtype=WIRE_TO_DTYPE[header.dtype]).element_size()
    expected = sum(header.tile_tokens) * header.hidden_size * itemsize
    if header.payload_bytes != expected:
        raise FrameError(
            f"header says {header.payload_bytes} payload bytes but its shape needs {expected} "
            f"({sum(header.tile_tokens)} tokens x {header.hidden_size} x {itemsize})",
            "payload_length",
        )
    return header


def decode_frames(
    header_data: bytes | memoryview, payload, *, max_payload_bytes: int, hidden_size: int | None = None
) -> ImageFeatures:
    """Build `ImageFeatures` over the payload buffer (no copy) after checking it against its header."""
    header = decode_header(header_data, max_payload_bytes=max_payload_bytes, hidden_size=hidden_size)
    view = memoryview(payload).cast("B")
    if view.nbytes != header.payload_bytes:
        raise FrameError(f"payload has {view.nbytes} bytes, header says {header.payload_bytes}", "payload_length")
    if header.HasField("crc32") and zlib.crc32(view) != header.crc32:
        raise FrameError("payload checksum does not match its header", "checksum")
    dtype = WIRE_TO_DTYPE[header.dtype]
    features = torch.frombuffer(view, dtype=dtype).view(-1, header.hidden_size)
    return ImageFeatures(
        request_id=header.request_id,
        image_index=header.image_index,
        image_count=header.image_count,
        tile_tokens=list(header.tile_tokens),
        features=features,
        sent_unix_ns=header.sent_unix_ns,
        received_unix_ns=time.time_ns(),
    )
