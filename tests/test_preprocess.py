"""Preprocessing matches the model card's `dynamic_preprocess` + `build_transform`; bad bytes fail clearly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from checkpoint.geometry import IMAGENET_MEAN, IMAGENET_STD
from vision_server.preprocess import (
    ImageError,
    decode_image,
    dynamic_tiles,
    normalize,
    preprocess,
    preprocess_tiles,
    tile_grid,
    to_pixel_values,
)

LIMITS = {"max_bytes": 8 << 20, "max_pixels": 40_000_000}


# --- the reference pipeline, written out directly from the model card -------------------------------


def reference_grid(width, height, min_num, max_num, image_size=448):
    aspect_ratio = width / height
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def reference_pixel_values(image, max_num=12, image_size=448):
    cols, rows = reference_grid(image.width, image.height, 1, max_num, image_size)
    target_width, target_height = image_size * cols, image_size * rows
    resized = image.resize((target_width, target_height))  # PIL's default filter: bicubic for RGB
    tiles = []
    for i in range(cols * rows):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        tiles.append(resized.crop(box))
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    # build_transform: Resize to (448, 448) bicubic, ToTensor, Normalize.
    arrays = []
    for tile in tiles:
        tile = tile.resize((image_size, image_size), Image.Resampling.BICUBIC)
        x = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
        arrays.append((x - mean) / std)
    return np.stack(arrays)


# --- helpers -----------------------------------------------------------------------------------------


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise, so resampling filters have something to get wrong.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width, height) -> bytes:
    """A well-formed PNG header declaring a huge RGB image, followed by a tiny IDAT; nothing is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


# --- tile_grid ---------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(1, 6000),
    height=st.integers(1, 6000),
    max_tiles=st.integers(1, 12),
    data=st.data(),
)
def test_tile_grid_picks_the_reference_grid_within_the_tile_limits(width, height, max_tiles, data):
    min_tiles = data.draw(st.integers(1, max_tiles))
    cols, rows = tile_grid(width, height, min_tiles, max_tiles)
    assert (cols, rows) == reference_grid(width, height, min_tiles, max_tiles)
    assert min_tiles <= cols * rows <= max_tiles


@settings(max_examples=200, deadline=None)
@given(side=st.integers(1, 3000), max_tiles=st.integers(1, 12))
def test_tile_grid_square_ties_go_to_the_larger_grid_only_for_large_images(side, max_tiles):
    cols, rows = tile_grid(side, side, 1, max_tiles)
    assert cols == rows
    assert (cols, rows) == reference_grid(side, side, 1, max_tiles)


@pytest.mark.parametrize(
    "size, grid",
    [
        ((800, 800), (2, 2)),
        ((1000, 1000), (3, 3)),
        ((300, 300), (1, 1)),
        ((1344, 448), (3, 1)),
        ((448, 1344), (1, 3)),
    ],
)
def test_tile_grid_known_cases(size, grid):
    assert tile_grid(*size, 1, 12) == grid


def test_tile_grid_rejects_impossible_limits():
    with pytest.raises(ValueError, match="min_tiles"):
        tile_grid(100, 100, 3, 2)


# --- dynamic_tiles and pixel values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(1500, 400), (300, 900), (100, 80), (448, 448)], ids=["wide", "tall", "small", "one"]
)
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_dynamic_tiles_counts_tiles_plus_thumbnail(size, max_tiles):
    image = random_image(*size)
    cols, rows = tile_grid(*size, 1, max_tiles)
    tiles = dynamic_tiles(image, max_tiles=max_tiles)
    assert len(tiles) == cols * rows + (1 if cols * rows > 1 else 0)
    assert all(tile.size == (448, 448) for tile in tiles)
    assert len(dynamic_tiles(image, max_tiles=max_tiles, use_thumbnail=False)) == cols * rows


@pytest.mark.parametrize("size", [(1500, 400), (300, 900), (100, 80)], ids=["wide", "tall", "small"])
def test_pixel_values_equal_the_reference_pipeline(size):
    image = random_image(*size, seed=size[0])
    expected = reference_pixel_values(image)
    ours = to_pixel_values(dynamic_tiles(image))
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == expected.shape
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_uint8_tiles_normalised_anywhere_equal_the_float_pipeline():
    """The host's uint8 tiles, normalised later (on the model's device), are the very pixel values of before."""
    data = encode(random_image(1500, 400), "JPEG", quality=90)
    tiles = preprocess_tiles(data, max_tiles=12)
    assert tiles.dtype == torch.uint8 and tuple(tiles.shape) == (5, 448, 448, 3)
    expected = reference_pixel_values(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(normalize(tiles).numpy(), expected)
    np.testing.assert_array_equal(preprocess(data, max_tiles=12).numpy(), expected)
    with pytest.raises(ValueError, match="uint8 tiles"):
        normalize(tiles.float())


def test_the_device_path_table_lookup_is_the_reference_arithmetic_bit_for_bit():
    """Off the CPU, normalisation looks values up in a table the CPU computed; every value in every channel."""
    from vision_server.normalize import _reference_normalize, _table, lookup

    values = torch.arange(256, dtype=torch.uint8)
    tiles = torch.stack([values, values.flip(0), values.roll(7)], -1).view(1, 16, 16, 3)
    assert torch.equal(lookup(tiles, _table(torch.device("cpu"))), _reference_normalize(tiles))


def test_tiles_are_cut_row_major():
    image = random_image(1344, 896)  # exactly 3 x 2 tiles, no resampling
    tiles = dynamic_tiles(image, max_tiles=6)
    assert tile_grid(1344, 896, 1, 6) == (3, 2)
    source = np.asarray(image)
    for index, tile in enumerate(tiles[:6]):
        r, c = divmod(index, 3)
        np.testing.assert_array_equal(
            np.asarray(tile), source[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448]
        )


def test_preprocess_decodes_and_tiles_a_jpeg():
    image = random_image(1500, 400)
    data = encode(image, "JPEG", quality=90)
    pixels = preprocess(data, max_tiles=12)
    expected = reference_pixel_values(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(pixels.numpy(), expected)


def test_decode_image_converts_to_rgb():
    rgba = Image.new("RGBA", (20, 10), (10, 20, 30, 40))
    image = decode_image(encode(rgba, "PNG"), **LIMITS)
    assert image.mode == "RGB" and image.size == (20, 10)


# --- decode_image refuses bad input ------------------------------------------------------------------


def test_empty_bytes_are_refused():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", **LIMITS)


def test_too_many_bytes_are_refused_before_decoding():
    data = encode(random_image(64, 64), "PNG")
    with pytest.raises(ImageError, match=f"{len(data)} bytes; the limit is 100"):
        decode_image(data, max_bytes=100, max_pixels=10**6)


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not an image"):
        decode_image(data, **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt):
    data = encode(random_image(256, 256), fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_declared_pixel_count_over_the_limit_is_refused_before_decoding():
    data = png_declaring(3000, 2000)
    assert len(data) < 200
    with pytest.raises(ImageError, match="3000x2000 = 6000000 pixels; the limit is 1000000"):
        decode_image(data, max_bytes=1 << 20, max_pixels=1_000_000)


def test_decompression_bomb_is_refused_without_allocating():
    # 10^10 declared pixels: PIL's own bomb guard fires while reading the header.
    with pytest.raises(ImageError, match="too many pixels|pixels; the limit"):
        decode_image(png_declaring(100_000, 100_000), **LIMITS)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)
