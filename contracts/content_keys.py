"""An image's name by content: the gateway keys the features a language server keeps for later turns with
it, the vision server the encodes it shares between callers.

A key is the SHA-256 of every setting that changes an input's features, then of its bytes; a video's
frames are `KEY.0`, `KEY.1`, ... Equal keys must mean equal features, so whoever keys an input passes
every setting that shapes its features (tile limit, frame count, model, weights, ViR).
"""

from __future__ import annotations

import hashlib


def content_key(data: bytes, *settings) -> str:
    """Hex digest of an input's bytes and the settings that change its features."""
    digest = hashlib.sha256("\0".join(map(repr, settings)).encode() + b"\0")
    digest.update(data)
    return digest.hexdigest()


def frame_keys(key: str, video_frames: int = 0) -> list[str]:
    """The keys of the images one input stands for: one per video frame, or an image's own key."""
    return [f"{key}.{frame}" for frame in range(video_frames)] if video_frames else [key]
