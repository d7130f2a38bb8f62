"""One video request's cost in the vision server's preprocessing: every frame decoded (before) against bounded.

    python -m benchmarks.video_bounds           # writes benchmarks/results/video_bounds_cpu.json

The video is issue 15's: 900 frames of 1920x1080 H.264 (libx264), about 0.6 MiB, a slowly moving picture;
made once and kept in the temporary folder. Each variant runs in a fresh interpreter, everything imported
first: the growth of peak RSS over the RSS before the call (`ru_maxrss`), and the call's CPU time (user +
system, all threads) and wall time, and the frames decoded.
- `decode_everything`: the code before, copied here: every frame decoded to a full-size image, then picked.
- `bounded`: `vision_server.video.preprocess_video` under the vision server's default limits.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.toolkit.documents import write
from benchmarks.toolkit.machine import machine

FRAMES, WIDTH, HEIGHT = 900, 1920, 1080
OUTPUT = Path("benchmarks/results/video_bounds_cpu.json")
CACHE = Path(tempfile.gettempdir())

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def make_issue_video(path: Path) -> Path:
    """900 frames of 1080p H.264: a still gradient with a textured square sliding across it."""
    if path.exists():
        return path
    import av
    import numpy as np

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 255 // (WIDTH + HEIGHT)], -1).astype(np.uint8)
    texture = np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(FRAMES):
            image = background.copy()
            left = 2 * i % (WIDTH - 300)
            image[400:700, left:left + 300] = texture
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.write_bytes(buffer.getvalue())
    return path


def decode_everything(data: bytes, num_frames: int):
    """The code before bounds (vision_server/preprocess.py's preprocess_video), for comparison."""
    import av

    from vision_server.preprocess import IMAGE_SIZE, dynamic_tiles, to_pixel_values
    from vision_server.video import frame_indices

    frames = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if len(frames) == 4096:
                raise ValueError("video has more than 4096 frames")
            frames.append(frame.to_image())
    picked = [frames[i].convert("RGB") for i in frame_indices(len(frames), num_frames)]
    return to_pixel_values([tile for frame in picked for tile in dynamic_tiles(frame, 1, 1, IMAGE_SIZE, True)])


def measure(variant: str, path: str, num_frames: int) -> None:
    """In a fresh interpreter: one call, its peak RSS growth and CPU time, as JSON on stdout."""
    import resource
    import time

    from vision_server import video
    from vision_server.preprocess import ImageError
    from vision_server.video import preprocess_video

    decoded = []  # frames the bounded decoder charged to its budget
    charge = video.DecodeBudget.charge
    video.DecodeBudget.charge = lambda budget, width, height: (decoded.append(1), charge(budget, width, height))
    data = Path(path).read_bytes()
    call = {"decode_everything": decode_everything, "bounded": preprocess_video}[variant]
    call(Path(path).with_name("warm-up.mp4").read_bytes(), 1)  # libraries loaded, decoders initialised
    decoded.clear()
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        pixels = call(data, num_frames)
        outcome = f"ok: {tuple(pixels.shape)}"
    except ImageError as e:
        outcome = f"refused: {e}"
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "variant": variant, "num_frames": num_frames, "outcome": outcome,
        "frames_decoded": FRAMES if variant == "decode_everything" else len(decoded),
        "peak_rss_growth_mib": round((after.ru_maxrss * 1024 - rss_before) / 2**20, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, 2), "wall_s": round(wall, 2),
    }))


def make_warm_up_video(path: Path) -> None:
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.write_bytes(buffer.getvalue())


@app.command()
def main(
    output: Annotated[Path, typer.Option(help="Where the JSON goes")] = OUTPUT,
    folder: Annotated[Path, typer.Option(help="Where the video is kept between runs")] = CACHE,
) -> None:
    """Measure both variants on the issue's video and write the results."""
    video = make_issue_video(folder / f"dvd-issue-video-{FRAMES}x{WIDTH}x{HEIGHT}.mp4")
    make_warm_up_video(video.with_name("warm-up.mp4"))
    runs = []
    for variant, num_frames in [("decode_everything", 8), ("bounded", 8), ("bounded", 64)]:
        child = subprocess.run([sys.executable, "-c", "import sys; from benchmarks.video_bounds import measure; "
                                "measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))", variant, str(video),
                                str(num_frames)], capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        typer.echo(json.dumps(runs[-1]))
    result = {
        "machine": {"cpu": machine()["cpu"], "cores": os.cpu_count(), "python": platform.python_version()},
        "video": {"frames": FRAMES, "width": WIDTH, "height": HEIGHT, "codec": "h264 (libx264, veryfast, crf 20)",
                  "bytes": video.stat().st_size},
        "runs": runs,
    }
    write(result, output)
    typer.echo(f"wrote {output}")


if __name__ == "__main__":
    app()
