"""The feature wire format round-trips bit-exactly and rejects every malformed field with a `FrameError`."""

from __future__ import annotations

import time
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import dvd_pb2
from transport.frames import (
    MAX_REQUEST_ID_LENGTH,
    FrameError,
    ImageFeatures,
    decode_frames,
    decode_header,
    encode_frames,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MAX_PAYLOAD = 1 << 20


def random_bits(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Every bit pattern is allowed, NaNs and infinities included: the wire must not care."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (shape[0], shape[1] * itemsize), dtype=torch.uint8, generator=generator)
    return raw.view(dtype)


def make_item(
    request_id="req-1",
    image_index=0,
    image_count=1,
    tile_tokens=(4, 2),
    hidden=8,
    dtype=torch.float32,
    seed=0,
) -> ImageFeatures:
    return ImageFeatures(
        request_id=request_id,
        image_index=image_index,
        image_count=image_count,
        tile_tokens=list(tile_tokens),
        features=random_bits((sum(tile_tokens), hidden), dtype, seed),
    )


def header_bytes(**overrides) -> bytes:
    """A valid header for `make_item()`'s defaults, with some fields replaced."""
    fields = {
        "request_id": "req-1",
        "image_index": 0,
        "image_count": 1,
        "tile_tokens": [4, 2],
        "hidden_size": 8,
        "dtype": dvd_pb2.FLOAT32,
        "payload_bytes": 6 * 8 * 4,
    }
    fields.update(overrides)
    return dvd_pb2.FeatureHeader(**fields).SerializeToString()


# --- round trip -----------------------------------------------------------------------------------------


@st.composite
def image_features(draw) -> ImageFeatures:
    image_count = draw(st.integers(1, 64))
    return make_item(
        request_id=draw(st.text(min_size=1, max_size=MAX_REQUEST_ID_LENGTH)),
        image_index=draw(st.integers(0, image_count - 1)),
        image_count=image_count,
        tile_tokens=draw(st.lists(st.integers(1, 20), min_size=1, max_size=13)),
        hidden=draw(st.integers(1, 48)),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=150, deadline=None)
@given(item=image_features(), checksum=st.booleans())
def test_round_trip_preserves_every_field_and_every_bit(item, checksum):
    header, payload = encode_frames(item, checksum=checksum)
    assert isinstance(header, bytes)
    assert payload.nbytes == item.num_bytes

    decoded = decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD)

    assert decoded.request_id == item.request_id
    assert decoded.image_index == item.image_index
    assert decoded.image_count == item.image_count
    assert decoded.tile_tokens == item.tile_tokens
    assert decoded.features.dtype == item.features.dtype
    assert decoded.features.shape == item.features.shape
    # Bit-for-bit: compare the raw bytes, so NaN payloads count as equal only when identical.
    assert torch.equal(decoded.features.view(torch.uint8), item.features.view(torch.uint8))
    assert decode_header(header, max_payload_bytes=MAX_PAYLOAD).HasField("crc32") == checksum


def test_round_trip_accepts_a_payload_of_copied_bytes():
    item = make_item(dtype=torch.bfloat16)
    header, payload = encode_frames(item, checksum=True)
    decoded = decode_frames(bytes(header), bytes(payload), max_payload_bytes=MAX_PAYLOAD)
    assert torch.equal(decoded.features.view(torch.uint8), item.features.view(torch.uint8))


def test_encode_sends_non_contiguous_features_in_row_major_order():
    base = random_bits((8, 6), torch.float16, seed=3)
    item = ImageFeatures("req-t", 0, 1, [6], base.t())  # [6, 8], not contiguous
    header, payload = encode_frames(item)
    decoded = decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD)
    assert torch.equal(decoded.features.view(torch.uint8), base.t().contiguous().view(torch.uint8))


def test_payload_view_keeps_the_tensor_alive():
    _, payload = encode_frames(make_item(seed=7))
    expected = bytes(make_item(seed=7).features.view(torch.uint8).numpy())
    assert bytes(payload) == expected  # the item (and its tensor) went out of scope above


# --- malformed headers and payloads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "match"),
    [
        pytest.param(b"\xff\xff\xff\xff", "not a valid FeatureHeader", id="garbage-bytes"),
        pytest.param(b"\x0a\x05ab", "not a valid FeatureHeader", id="truncated-field"),
        pytest.param(b"\x0a\x02\xff\xfe", "not a valid FeatureHeader", id="request-id-not-utf8"),
        pytest.param(header_bytes(request_id=""), "bad request id of length 0", id="empty-request-id"),
        pytest.param(
            header_bytes(request_id="r" * (MAX_REQUEST_ID_LENGTH + 1)),
            f"bad request id of length {MAX_REQUEST_ID_LENGTH + 1}",
            id="overlong-request-id",
        ),
        pytest.param(
            header_bytes(image_index=3, image_count=3),
            "image index 3 is outside image count 3",
            id="index-equals-count",
        ),
        pytest.param(header_bytes(image_index=0, image_count=0), "outside image count 0", id="zero-count"),
        pytest.param(header_bytes(hidden_size=0), r"^feature header has an empty shape \(hidden size or tile tokens\)$",
                     id="zero-hidden-size"),
        pytest.param(header_bytes(tile_tokens=[]), "empty shape", id="no-tile-tokens"),
        pytest.param(header_bytes(tile_tokens=[4, 0]), "empty shape", id="zero-token-tile"),
        pytest.param(
            header_bytes(dtype=dvd_pb2.DTYPE_UNSPECIFIED), "unknown dtype 0", id="unspecified-dtype"
        ),
        pytest.param(header_bytes(dtype=99), "unknown dtype 99", id="unknown-dtype"),
        pytest.param(
            header_bytes(payload_bytes=6 * 8 * 2),
            "header says 96 payload bytes but its shape needs 192",
            id="payload-length-not-shape",
        ),
        pytest.param(
            header_bytes(tile_tokens=[4096, 4096], hidden_size=4096, payload_bytes=4096 * 4096 * 2 * 4),
            f"payload of {4096 * 4096 * 2 * 4} bytes exceeds the {MAX_PAYLOAD}-byte limit",
            id="payload-over-limit",
        ),
    ],
)
def test_malformed_header_raises_frame_error_naming_the_problem(header, match):
    with pytest.raises(FrameError, match=match):
        decode_header(header, max_payload_bytes=MAX_PAYLOAD)
    with pytest.raises(FrameError, match=match):
        decode_frames(header, bytes(6 * 8 * 4), max_payload_bytes=MAX_PAYLOAD)


def test_valid_header_helper_is_accepted():
    """Guards the table above: each case fails only because of the field it replaces."""
    decoded = decode_header(header_bytes(), max_payload_bytes=MAX_PAYLOAD)
    assert decoded.request_id == "req-1"


def test_payload_shorter_or_longer_than_the_header_says_is_rejected():
    header, payload = encode_frames(make_item())
    with pytest.raises(
        FrameError, match=f"payload has {payload.nbytes - 1} bytes, header says {payload.nbytes}"
    ):
        decode_frames(header, payload[:-1], max_payload_bytes=MAX_PAYLOAD)
    with pytest.raises(FrameError, match=f"payload has {payload.nbytes + 4} bytes"):
        decode_frames(header, bytes(payload) + b"\0" * 4, max_payload_bytes=MAX_PAYLOAD)


def test_max_payload_bytes_is_an_inclusive_limit():
    header, payload = encode_frames(make_item())
    decode_frames(header, payload, max_payload_bytes=payload.nbytes)
    with pytest.raises(FrameError, match=f"exceeds the {payload.nbytes - 1}-byte limit"):
        decode_frames(header, payload, max_payload_bytes=payload.nbytes - 1)


@pytest.mark.parametrize("position", [0, 17, -1])
def test_flipped_payload_byte_fails_the_checksum(position):
    header, payload = encode_frames(make_item(dtype=torch.bfloat16), checksum=True)
    corrupted = bytearray(payload)
    corrupted[position] ^= 0x01
    with pytest.raises(FrameError, match="^payload checksum does not match its header$"):
        decode_frames(header, corrupted, max_payload_bytes=MAX_PAYLOAD)


def test_wrong_checksum_in_header_is_rejected():
    header, payload = encode_frames(make_item())
    parsed = decode_header(header, max_payload_bytes=MAX_PAYLOAD)
    parsed.crc32 = (zlib.crc32(payload) + 1) & 0xFFFFFFFF
    with pytest.raises(FrameError, match="checksum"):
        decode_frames(parsed.SerializeToString(), payload, max_payload_bytes=MAX_PAYLOAD)


def test_without_checksum_a_flipped_byte_goes_unnoticed():
    """The checksum is opt-in: without it, corruption is the transport's business, not the decoder's."""
    header, payload = encode_frames(make_item())
    corrupted = bytearray(payload)
    corrupted[0] ^= 0xFF
    decoded = decode_frames(header, corrupted, max_payload_bytes=MAX_PAYLOAD)
    assert bytes(decoded.features.view(torch.uint8).numpy()) == bytes(corrupted)


# --- what encode refuses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features",
    [
        pytest.param(torch.zeros(5, 8), id="too-few-rows"),
        pytest.param(torch.zeros(7, 8), id="too-many-rows"),
        pytest.param(torch.zeros(6), id="one-dimensional"),
        pytest.param(torch.zeros(1, 6, 8), id="three-dimensional"),
    ],
)
def test_encode_rejects_features_that_do_not_match_tile_tokens(features):
    item = ImageFeatures("req-1", 0, 1, [4, 2], features)
    with pytest.raises(FrameError, match=r"do not match tile_tokens \[4, 2\]"):
        encode_frames(item)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.uint8])
def test_encode_rejects_unsupported_dtypes(dtype):
    item = ImageFeatures("req-1", 0, 1, [6], torch.zeros(6, 8, dtype=dtype))
    with pytest.raises(FrameError, match=f"feature dtype {dtype} cannot be sent"):
        encode_frames(item)


# --- robustness of the parser ---------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=256))
def test_decode_header_on_arbitrary_bytes_raises_only_frame_error(data):
    try:
        decode_header(data, max_payload_bytes=MAX_PAYLOAD)
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    request_id=st.text(max_size=MAX_REQUEST_ID_LENGTH + 8),
    image_index=st.integers(0, 2**32 - 1),
    image_count=st.integers(0, 2**32 - 1),
    tile_tokens=st.lists(st.integers(0, 2**32 - 1), max_size=8),
    hidden_size=st.integers(0, 2**32 - 1),
    dtype=st.integers(0, 5),
    payload_bytes=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=64),
)
def test_decode_frames_on_arbitrary_headers_raises_only_frame_error(
    request_id, image_index, image_count, tile_tokens, hidden_size, dtype, payload_bytes, payload
):
    header = dvd_pb2.FeatureHeader(
        request_id=request_id,
        image_index=image_index,
        image_count=image_count,
        tile_tokens=tile_tokens,
        hidden_size=hidden_size,
        dtype=dtype,
        payload_bytes=payload_bytes,
    ).SerializeToString()
    try:
        decoded = decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD)
    except FrameError:
        return
    # Whatever gets through is consistent with itself.
    assert decoded.features.shape == (sum(decoded.tile_tokens), hidden_size)
    assert decoded.num_bytes == len(payload)


# --- drop reasons (the language server's drop counter is labelled with them) -----------------------------


@pytest.mark.parametrize(
    ("header", "payload", "reason"),
    [
        pytest.param(b"\xff\xff\xff\xff", bytes(192), "bad_header", id="garbage"),
        pytest.param(header_bytes(dtype=9), bytes(192), "dtype", id="unknown-dtype"),
        pytest.param(header_bytes(hidden_size=16, payload_bytes=6 * 16 * 4), bytes(384), "hidden_size",
                     id="other-hidden-size"),
        pytest.param(header_bytes(payload_bytes=100), bytes(100), "payload_length", id="length-not-shape"),
        pytest.param(header_bytes(), bytes(191), "payload_length", id="short-payload"),
        pytest.param(
            header_bytes(tile_tokens=[1 << 16], payload_bytes=(1 << 16) * 8 * 4), b"", "oversized", id="oversized"
        ),
    ],
)
def test_each_rejection_carries_a_fixed_reason_label(header, payload, reason):
    with pytest.raises(FrameError) as caught:
        decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD, hidden_size=8)
    assert caught.value.reason == reason


def test_a_checksum_mismatch_is_labelled_checksum():
    header, payload = encode_frames(make_item(), checksum=True)
    corrupted = bytearray(payload)
    corrupted[0] ^= 1
    with pytest.raises(FrameError) as caught:
        decode_frames(header, corrupted, max_payload_bytes=MAX_PAYLOAD)
    assert caught.value.reason == "checksum"


def test_the_expected_hidden_size_accepts_matching_features():
    header, payload = encode_frames(make_item(hidden=8))
    assert decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD, hidden_size=8).features.shape == (6, 8)


def test_the_expected_hidden_size_refuses_other_features_naming_both_sizes():
    header, payload = encode_frames(make_item(request_id="wide", hidden=16))
    with pytest.raises(FrameError, match="^request wide: hidden size 16 is not the model's 8$"):
        decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD, hidden_size=8)


def test_a_request_id_of_the_longest_length_allowed_is_accepted():
    longest = "r" * MAX_REQUEST_ID_LENGTH
    assert decode_header(header_bytes(request_id=longest), max_payload_bytes=MAX_PAYLOAD).request_id == longest


def test_decoded_features_carry_when_they_were_sent_and_received():
    """For the transfer-latency metric: the sender's clock at encoding, the receiver's at decoding."""
    before = time.time_ns()
    header, payload = encode_frames(make_item())
    item = decode_frames(header, payload, max_payload_bytes=MAX_PAYLOAD)
    assert before <= item.sent_unix_ns <= item.received_unix_ns <= time.time_ns()
