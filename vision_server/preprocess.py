"""Image bytes to InternVL3.5 pixel values: safe decoding, dynamic tiling and ImageNet normalisation.

The tiling reproduces the model card's `dynamic_preprocess` and `build_transform` pixel for pixel.

The host's work stops at uint8 tiles [tiles, 448, 448, 3] (`preprocess_tiles`): decoding, resizing and cutting.
The float conversion and normalisation (`vision_server.normalize`) is as much host time again and makes 4x the
bytes, so the vision model runs it on its own device (`VisionModel` accepts uint8 tiles). `preprocess` does both
steps here, for callers that want the float32 pixel values themselves (the reference, tests).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from vision_server.normalize import normalize

IMAGE_SIZE = 448

# Formats a client may send; PIL's rarer plugins are more attack surface than use.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """The bytes sent as an image cannot be used: empty, too large, not an image, or corrupt."""


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode fully to RGB, refusing oversized input and checking the declared size before decoding."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"image declares {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")  # convert copies even when RGB
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image declares too many pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    # Corrupt input makes PIL's decoders raise almost anything (OSError, SyntaxError, struct.error, ...).
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    # Built exactly as the reference does, so equal-area grids keep the reference's order.
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(
    width: int, height: int, min_tiles: int, max_tiles: int, image_size: int = IMAGE_SIZE
) -> tuple[int, int]:
    """The (cols, rows) grid closest to the image's aspect ratio, by the reference's rule and tie-break."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(
            f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
        )
    aspect_ratio = width / height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        # On a tie the larger grid wins only when the image has more than half its pixels.
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Resize to the chosen grid, cut row-major tiles, and append a whole-image thumbnail when tiles > 1."""
    cols, rows = tile_grid(image.width, image.height, min_tiles, max_tiles, image_size)
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def to_tile_bytes(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack RGB tiles into one uint8 tensor [tiles, H, W, 3], as PIL lays them out (no float work)."""
    return torch.from_numpy(np.stack([np.asarray(tile.convert("RGB")) for tile in tiles]))


def to_pixel_values(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack RGB tiles into normalised float32 pixel values [tiles, 3, H, W] (on the host)."""
    # The reference re-resizes each tile to its own size (a copy in PIL): np.asarray makes that copy.
    return normalize(to_tile_bytes(tiles))


def preprocess_tiles(
    data: bytes,
    max_tiles: int = 12,
    *,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
    max_bytes: int = 32 << 20,
    max_pixels: int = 64_000_000,
) -> torch.Tensor:
    """Encoded image bytes to uint8 tiles [tiles, 448, 448, 3]: the host's share of preprocessing."""
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return to_tile_bytes(dynamic_tiles(image, min_tiles, max_tiles, IMAGE_SIZE, use_thumbnail))


def preprocess(data: bytes, max_tiles: int = 12, **options) -> torch.Tensor:
    """Encoded image bytes to pixel values [tiles, 3, 448, 448] float32 (`preprocess_tiles`, then `normalize`)."""
    return normalize(preprocess_tiles(data, max_tiles, **options))
