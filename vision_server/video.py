"""Video bytes to the model card's evenly sampled frames, decoding no more of the video than those frames need.

The frames picked are the model card's `get_index` over the video's frame count, counted by demuxing (no
decoding). Only the keyframe-led groups of pictures that hold a picked frame are decoded, each up to its last
picked frame, and only picked frames become images. Each video is bounded: frames in the file, frames and
pixels decoded, and time.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from vision_server.preprocess import IMAGE_SIZE, ImageError, dynamic_tiles, normalize, to_tile_bytes

# FFmpeg demuxers a video may use, by FFmpeg's names: the usual video files. Playlist and list formats (HLS,
# DASH, concat, image2 patterns ...) would make FFmpeg open other files or URLs named inside the upload.
VIDEO_DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "h264", "hevc", "mpeg", "flv",
                  "ogg", "asf", "gif")
_OPEN_OPTIONS = {"format_whitelist": ",".join(VIDEO_DEMUXERS)}


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one video, from the vision server's settings (`of`); a video over one is refused naming it."""

    max_bytes: int = 64 << 20
    max_frame_pixels: int = 16_000_000  # width x height of one frame, checked before decoding
    max_length_frames: int = 36_000  # frames in the file (20 min at 30 fps), counted without decoding
    max_decoded_frames: int = 2_048  # frames the decoder produces for one video
    max_decoded_pixels: int = 2_000_000_000  # sum of width x height over those frames (~960 frames of 1080p)
    decode_timeout_s: float = 10.0  # wall clock from the first byte demuxed to the last frame picked

    @classmethod
    def of(cls, settings) -> VideoLimits:
        """The limits a vision server's settings (`VisionServerSettings`) set."""
        return cls(max_bytes=settings.max_video_bytes, max_frame_pixels=settings.max_image_pixels,
                   max_length_frames=settings.max_video_length_frames,
                   max_decoded_frames=settings.max_video_decoded_frames,
                   max_decoded_pixels=settings.max_video_decoded_pixels,
                   decode_timeout_s=settings.video_decode_timeout_s)


@dataclass(frozen=True)
class Run:
    """Packets [start, stop) in decode order, fed to a freshly flushed decoder; its first frame is frame `first`."""

    start: int
    stop: int
    first: int


def frame_indices(count: int, num_frames: int) -> list[int]:
    """The model card's `get_index` (no time bounds): the middle of `num_frames` equal segments."""
    last = count - 1
    segment = last / num_frames
    return [int(segment / 2 + round(segment * i)) for i in range(num_frames)]


def decode_runs(pts: list[int | None], keyframes: list[bool], picked: list[int]) -> list[Run]:
    """The packets to decode for the picked frames (presentation order): each group holding one, up to its last.

    A group (a keyframe and the packets up to the next) decodes on its own when no frame of it shows before its
    keyframe and all of it shows after the groups before it (a closed group; its frames are then a contiguous
    range of presentation indices). When any group is not, or timestamps are missing, everything is decoded in
    order, which is always right.
    """
    count = len(pts)
    starts = [i for i in range(count) if keyframes[i]]
    if not picked:
        return []
    everything = [Run(0, count, 0)]
    if not starts or starts[0] != 0 or any(p is None for p in pts) or len(set(pts)) != count:
        return everything
    bounds = starts + [count]
    groups = list(zip(bounds, bounds[1:]))
    shown_before = None  # the last timestamp shown by the groups so far
    for start, stop in groups:
        first_shown = min(pts[start:stop])
        if pts[start] != first_shown or (shown_before is not None and first_shown <= shown_before):
            return everything
        shown_before = max(pts[start:stop])
    runs: list[Run] = []
    first = 0  # presentation index of the group's first frame
    for start, stop in groups:
        mine = [i - first for i in picked if first <= i < first + stop - start]
        if mine:
            # Feed every packet showing up to the group's last picked frame: the decoder then puts out a
            # contiguous run of frames from the group's first, so a frame's position says which it is.
            order = sorted(range(start, stop), key=lambda i: pts[i])  # presentation order -> decode position
            end = max(order[: max(mine) + 1]) + 1
            if runs and runs[-1].stop == start:  # the previous run ends where this group begins: keep feeding
                runs[-1] = Run(runs[-1].start, end, runs[-1].first)
            else:
                runs.append(Run(start, end, first))
        first += stop - start
    return runs


class DecodeBudget:
    """Counts what decoding one video costs and refuses it, naming the limit, the moment it goes over."""

    def __init__(self, limits: VideoLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.decode_timeout_s
        self.frames = 0
        self.pixels = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ImageError(f"decoding the video took over {self.limits.decode_timeout_s} s; the limit is "
                             f"{self.limits.decode_timeout_s} s (video_decode_timeout_s)")

    def check_plan(self, frames: int, width: int, height: int) -> None:
        """Refuse before decoding when the planned frames alone would exceed a bound."""
        self._check(self.frames + frames, self.pixels + frames * width * height, "needs")

    def charge(self, width: int, height: int) -> None:
        """One decoded frame."""
        limit = self.limits.max_frame_pixels
        if width * height > limit:
            raise ImageError(f"a video frame of {width}x{height} exceeds the {limit}-pixel limit "
                             f"(max_image_pixels)")
        self.frames += 1
        self.pixels += width * height
        self._check(self.frames, self.pixels, "reached")
        self.check_time()

    def _check(self, frames: int, pixels: int, verb: str) -> None:
        limits = self.limits
        if frames > limits.max_decoded_frames:
            raise ImageError(f"the video {verb} {frames} decoded frames; the limit is {limits.max_decoded_frames} "
                             f"(max_video_decoded_frames)")
        if pixels > limits.max_decoded_pixels:
            raise ImageError(f"the video {verb} {pixels} decoded pixels; the limit is {limits.max_decoded_pixels} "
                             f"(max_video_decoded_pixels)")


def _index(data: bytes, budget: DecodeBudget) -> tuple[list[int | None], list[bool], int, int]:
    """Timestamps and keyframe flags of the video's packets in decode order, and its frame size; demuxed only."""
    import av  # PyAV: FFmpeg's demuxers and decoders, from memory

    limits = budget.limits
    try:
        container = av.open(io.BytesIO(data), mode="r", options=_OPEN_OPTIONS)
    except av.error.ArgumentError:  # FFmpeg: "Format ... not on whitelist"
        raise ImageError("corrupt or unsupported video: its container format is not one of the accepted "
                         "video files (mp4/mov, matroska/webm, avi, mpeg-ts, mpeg, flv, ogg, asf, gif, "
                         "raw h264/hevc)") from None
    with container:
        if not container.streams.video:
            raise ImageError("the video has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_frame_pixels:
            raise ImageError(f"video frames of {width}x{height} exceed the {limits.max_frame_pixels}-pixel limit "
                             "(max_image_pixels)")
        pts, keyframes = [], []
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if len(pts) == limits.max_length_frames:
                raise ImageError(f"the video has more than {limits.max_length_frames} frames; the limit is "
                                 f"{limits.max_length_frames} (max_video_length_frames)")
            pts.append(packet.pts)
            keyframes.append(packet.is_keyframe)
            budget.check_time()
    return pts, keyframes, width, height


def _decode(data: bytes, runs: list[Run], picked: set[int], budget: DecodeBudget,
            keep: Callable[[Image.Image], Image.Image]) -> tuple[dict[int, Image.Image], int]:
    """Feed each run's packets to the decoder; what `keep` makes of each picked frame, and how many frames came out."""
    import av

    images: dict[int, Image.Image] = {}
    produced = 0
    with av.open(io.BytesIO(data), mode="r", options=_OPEN_OPTIONS) as container:
        stream = container.streams.video[0]
        decoder = stream.codec_context
        runs_left = iter(runs)
        run, position, index = next(runs_left, None), 0, 0

        def take(frames) -> None:
            nonlocal index, produced
            for frame in frames:
                budget.charge(frame.width, frame.height)
                if index in picked:
                    images[index] = keep(frame.to_image().convert("RGB"))  # only picked frames get here
                index += 1
                produced += 1

        for packet in container.demux(stream):
            if run is None:
                break
            if packet.size == 0:
                continue
            if position >= run.start:
                if position == run.start:
                    index = run.first
                take(decoder.decode(packet))
                if position + 1 == run.stop:  # drain, then start afresh at the next run's keyframe
                    take(decoder.decode(None))
                    decoder.flush_buffers()
                    run = next(runs_left, None)
            position += 1
            budget.check_time()
        if run is not None:  # the file held fewer packets than when indexed: drain what was fed
            take(decoder.decode(None))
    return images, produced


def decode_picked_frames(data: bytes, num_frames: int, limits: VideoLimits = VideoLimits(),
                         keep: Callable[[Image.Image], Image.Image] = lambda image: image) -> list[Image.Image]:
    """The model card's `num_frames` evenly sampled frames of a video, as RGB images passed through `keep` (which
    can shrink each frame as soon as it is decoded), within `limits`."""
    if not data:
        raise ImageError("video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"video is {len(data)} bytes; the limit is {limits.max_bytes}")
    if num_frames < 1:
        raise ImageError(f"a video needs at least 1 frame, asked for {num_frames}")
    budget = DecodeBudget(limits)
    try:
        pts, keyframes, width, height = _index(data, budget)
        if not pts:
            raise ImageError("the video holds no decodable frame")
        picked = frame_indices(len(pts), num_frames)
        runs = decode_runs(pts, keyframes, picked)
        fed = sum(run.stop - run.start for run in runs)
        budget.check_plan(fed, width, height)
        images, produced = _decode(data, runs, set(picked), budget, keep)
        if produced != fed:
            # The decoder's frames disagree with the container's packets (dropped or hidden frames): pick among
            # the frames decoding everything puts out, counted by one more pass when this one skipped any; all
            # within the same budget.
            everything = [Run(0, len(pts), 0)]
            if runs != everything:
                _, produced = _decode(data, everything, set(), budget, keep)
            if not produced:
                raise ImageError("the video holds no decodable frame")
            picked = frame_indices(produced, num_frames)
            images, _ = _decode(data, everything, set(picked), budget, keep)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001  (FFmpeg reports corrupt input in many ways)
        raise ImageError(f"corrupt or unsupported video ({type(e).__name__}: {e})") from None
    return [images[i] for i in picked]


def video_tiles(data: bytes, num_frames: int, limits: VideoLimits = VideoLimits()) -> torch.Tensor:
    """Encoded video bytes to `num_frames` evenly sampled frames, one 448x448 uint8 tile each: [frames, 448, 448, 3].

    As in the model card's `load_video` with `max_num=1`: each frame is resized to one tile, no thumbnail.
    The vision model normalises them on its device (see vision_server/preprocess.py).
    """
    # Each picked frame becomes its one tile as soon as it is decoded: 0.6 MB held per frame, whatever its size.
    tiles = decode_picked_frames(data, num_frames, limits, lambda frame: dynamic_tiles(frame, 1, 1, IMAGE_SIZE)[0])
    return to_tile_bytes(tiles)


def preprocess_video(data: bytes, num_frames: int, limits: VideoLimits = VideoLimits()) -> torch.Tensor:
    """`video_tiles`, normalised here: float32 pixel values [frames, 3, 448, 448]."""
    return normalize(video_tiles(data, num_frames, limits))
