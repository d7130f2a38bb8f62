"""Videos: the model card's frames, decoding only the groups of pictures that hold them, within every bound."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from checkpoint.geometry import IMAGENET_MEAN, IMAGENET_STD
from conftest import make_video
from vision_server import video
from vision_server.preprocess import IMAGE_SIZE, ImageError, dynamic_tiles, to_pixel_values
from vision_server.settings import VisionServerSettings
from vision_server.video import (
    DecodeBudget,
    Run,
    VideoLimits,
    decode_picked_frames,
    decode_runs,
    frame_indices,
    preprocess_video,
)


def encode_video(frames: int, width: int, height: int, *, fmt: str = "mp4", codec: str = "libx264",
                 options: dict | None = None) -> bytes:
    """A blocky random picture sliding sideways, so every frame differs and predicted frames carry data."""
    blocks = np.random.default_rng(0).integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    base = blocks.repeat(16, axis=0).repeat(16, axis=1)[:height, :width]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options or {}
        for i in range(frames):
            image = np.roll(base, 3 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_everything_then_pick(data: bytes, num_frames: int) -> list[np.ndarray]:
    """The frames decoding the whole video and then picking by the model card's rule gives (the old way)."""
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(container.streams.video[0]))
        return [np.asarray(frames[i].to_image().convert("RGB")) for i in frame_indices(len(frames), num_frames)]


def test_frame_indices_are_the_model_cards_get_index():
    def reference_get_index(max_frame: int, num_segments: int) -> list[int]:
        seg_size = float(max_frame - 0) / num_segments
        return [int(0 + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]

    for total, frames in [(30, 8), (7, 8), (100, 32), (1, 4), (900, 8), (36_000, 64)]:
        assert frame_indices(total, frames) == reference_get_index(total - 1, frames)


def test_sampled_frames_come_back_in_order_as_one_tile_each():
    pixels = preprocess_video(make_video(30), 8)
    assert pixels.shape == (8, 3, 448, 448)
    # Frame i is grey level 8 * i: the sampled frames come back in order, at the sampled indices.
    grey = (pixels[:, 0, 224, 224] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    expected = torch.tensor([8.0 * i for i in frame_indices(30, 8)])
    assert torch.allclose(grey, expected, atol=4)  # MPEG-4 is lossy


VIDEOS = {  # container, codec and encoder options: closed and open groups, B-frames, no timestamps at all
    "mp4 H.264 B-frames": ("mp4", "libx264", {"preset": "veryfast", "g": "20"}),
    "mp4 H.264 open groups": ("mp4", "libx264", {"preset": "veryfast", "g": "20", "x264-params": "open-gop=1"}),
    "matroska H.264": ("matroska", "libx264", {"preset": "veryfast", "g": "15"}),
    "webm VP8": ("webm", "libvpx", {"g": "10", "deadline": "realtime", "cpu-used": "8"}),
    "raw H.264 (no timestamps)": ("h264", "libx264", {"preset": "veryfast", "g": "20"}),
    "mpeg-ts H.264": ("mpegts", "libx264", {"preset": "veryfast", "g": "20"}),
    "avi MPEG-4 B-frames": ("avi", "mpeg4", {"g": "10", "bf": "2"}),
}


@pytest.mark.parametrize("kind", VIDEOS)
def test_picked_frames_equal_decoding_everything_then_picking(kind):
    fmt, codec, options = VIDEOS[kind]
    data = encode_video(90, 128, 96, fmt=fmt, codec=codec, options=options)
    for num_frames in (1, 8, 32):
        picked = [np.asarray(image) for image in decode_picked_frames(data, num_frames)]
        reference = decode_everything_then_pick(data, num_frames)
        assert len(picked) == len(reference) == num_frames
        assert all(np.array_equal(a, b) for a, b in zip(picked, reference)), (kind, num_frames)
    # Tiled and normalised as the model card's `load_video` does with the frames decoding everything gives.
    tiles = [dynamic_tiles(Image.fromarray(frame), 1, 1, IMAGE_SIZE, True)[0] for frame in reference]
    assert torch.equal(preprocess_video(data, num_frames), to_pixel_values(tiles))


def test_a_long_video_decodes_only_the_groups_holding_sampled_frames():
    frames, width, height, group = 600, 640, 360, 30
    data = encode_video(frames, width, height, options={"preset": "ultrafast", "g": str(group)})
    # Eight sampled frames lie in at most eight groups of 30: 240 of the 600 frames decoded at most.
    enough = 8 * group
    limits = VideoLimits(max_decoded_frames=enough, max_decoded_pixels=enough * width * height)
    picked = decode_picked_frames(data, 8, limits)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(picked, decode_everything_then_pick(data, 8)))
    with pytest.raises(ImageError, match=r"needs \d+ decoded frames; the limit is 100 \(max_video_decoded_frames\)"):
        decode_picked_frames(data, 8, VideoLimits(max_decoded_frames=100))


def test_when_the_decoder_puts_out_fewer_frames_than_the_container_lists_the_picks_follow_the_decoder(monkeypatch):
    data = encode_video(90, 128, 96, options={"preset": "veryfast", "g": "20"})
    index = video._index

    def overcounting(data, budget):  # a container listing ten frames more than its decoder puts out
        pts, keyframes, width, height = index(data, budget)
        return pts + [max(pts) + 512 * k for k in range(1, 11)], keyframes + [False] * 10, width, height

    monkeypatch.setattr(video, "_index", overcounting)
    picked = decode_picked_frames(data, 8)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(picked, decode_everything_then_pick(data, 8)))
    assert frame_indices(100, 8) != frame_indices(90, 8)


SMALL = make_video(30)  # 96x64, 30 frames
OVER_A_BOUND = [
    (VideoLimits(max_bytes=100), f"video is {len(SMALL)} bytes; the limit is 100"),
    (VideoLimits(max_frame_pixels=96 * 64 - 1), "exceed the 6143-pixel limit (max_image_pixels)"),
    (VideoLimits(max_length_frames=29), "more than 29 frames; the limit is 29 (max_video_length_frames)"),
    (VideoLimits(max_decoded_frames=7), "needs 8 decoded frames; the limit is 7 (max_video_decoded_frames)"),
    (VideoLimits(max_decoded_pixels=8 * 96 * 64 - 1),
     "needs 49152 decoded pixels; the limit is 49151 (max_video_decoded_pixels)"),
    (VideoLimits(decode_timeout_s=0), "the limit is 0 s (video_decode_timeout_s)"),
]


@pytest.mark.parametrize("limits,message", OVER_A_BOUND, ids=[m.split("(")[-1] for _, m in OVER_A_BOUND])
def test_a_video_over_a_bound_is_refused_naming_the_limit(limits, message):
    with pytest.raises(ImageError) as refused:
        preprocess_video(SMALL, 8, limits)
    assert message in str(refused.value)
    preprocess_video(SMALL, 8)  # the same video within the default bounds


def test_the_budget_refuses_the_decoded_frame_that_goes_over():
    budget = DecodeBudget(VideoLimits(max_decoded_frames=2))
    budget.charge(96, 64)
    budget.charge(96, 64)
    with pytest.raises(ImageError, match="reached 3 decoded frames; the limit is 2"):
        budget.charge(96, 64)
    budget = DecodeBudget(VideoLimits(max_frame_pixels=100))
    with pytest.raises(ImageError, match="frame of 20x20 exceeds the 100-pixel limit"):
        budget.charge(20, 20)  # a frame larger than the stream declared


def test_video_limits_are_the_vision_servers_settings():
    assert VideoLimits.of(VisionServerSettings()) == VideoLimits(max_frame_pixels=64_000_000)


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"\x00\x00\x00\x18ftypmp42" + bytes(200), "corrupt or unsupported video"),
    (bytes(range(256)) * 8, "corrupt or unsupported video"),
    # Lists of other files or URLs: FFmpeg would open what they name.
    # Lists of other files or URLs, which FFmpeg would open, are refused.
    (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n",
     "corrupt or unsupported video"),
    (b"ffconcat version 1.0\nfile /etc/hostname\n", "container format is not one of"),
])
def test_bad_videos_fail_clearly(data, message):
    with pytest.raises(ImageError, match=message):
        preprocess_video(data, 8)


def test_only_video_file_formats_are_opened():
    """FFmpeg opens a PNG as a one-frame video (its png_pipe demuxer); that demuxer is not on the list."""
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    assert av.open(io.BytesIO(png.getvalue())).format.name == "png_pipe"
    with pytest.raises(ImageError, match="corrupt or unsupported video: its container format is not one of"):
        preprocess_video(png.getvalue(), 1)


# --- the plan, against a model of a decoder ---------------------------------------------------------


@st.composite
def closed_groups(draw):
    """Packets in decode order: groups led by a keyframe shown first, the rest of each group in any order."""
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=12))
    pts, keyframes, shown = [], [], 0
    for size in sizes:
        rest = draw(st.permutations(range(shown + 1, shown + size)))
        pts += [512 * p for p in [shown, *rest]]
        keyframes += [True] + [False] * (size - 1)
        shown += size
    return pts, keyframes


def frames_out(runs: list[Run], pts: list[int]) -> dict[int, int]:
    """A decoder's frames, labelled as the decoding loop labels them: label -> the frame it really is."""
    shown = {p: i for i, p in enumerate(sorted(pts))}
    out = {}
    for run in runs:
        for k, p in enumerate(sorted(pts[run.start:run.stop])):  # a decoder puts frames out in showing order
            out.setdefault(run.first + k, shown[p])
    return out


@given(closed_groups(), st.integers(1, 64))
def test_runs_give_every_picked_frame_under_its_own_index(stream, num_frames):
    pts, keyframes = stream
    picked = frame_indices(len(pts), num_frames)
    runs = decode_runs(pts, keyframes, picked)
    assert all(0 <= a.start < a.stop <= b.start for a, b in zip(runs, runs[1:]))
    assert all(keyframes[run.start] for run in runs)
    out = frames_out(runs, pts)
    assert all(out[i] == i for i in picked)


@given(closed_groups(), st.integers(1, 8))
def test_runs_decode_no_group_without_a_picked_frame(stream, num_frames):
    pts, keyframes = stream
    picked = frame_indices(len(pts), num_frames)
    group_of = np.cumsum(keyframes) - 1
    shown = {p: i for i, p in enumerate(sorted(pts))}
    wanted_groups = {int(group_of[pts.index(sorted(pts)[i])]) for i in picked}
    fed = {int(group_of[i]) for run in decode_runs(pts, keyframes, picked) for i in range(run.start, run.stop)}
    assert fed == wanted_groups
    assert all(shown[pts[run.start]] == run.first for run in decode_runs(pts, keyframes, picked))


def test_groups_that_cannot_be_decoded_apart_are_decoded_in_order():
    everything = [Run(0, 6, 0)]
    # A frame shown before its group's keyframe (an open group's leading B-frame) needs the group before.
    assert decode_runs([0, 3, 1, 2, 5, 4], [True, False, False, False, True, False], [5]) == everything
    assert decode_runs([None] * 6, [True, False, False, True, False, False], [5]) == everything  # no timestamps
    assert decode_runs([0, 1, 2, 3, 4, 5], [False, False, True, False, False, False], [5]) == everything
    assert decode_runs([0, 1, 2, 3, 4, 5], [True, False, False, True, False, False], [4]) == [Run(3, 5, 3)]
