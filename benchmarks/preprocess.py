"""Host preprocessing throughput: tiles/s per core, before and after moving normalisation to the device.

    python -m benchmarks.preprocess --out benchmarks/results/preprocess_<machine>.json

Inputs are synthetic smooth JPEG "photos" (low-frequency colour fields plus mild grain, quality 90) at
896x448, 1344x896, 1920x1080 and 3024x4032. Two measurements:
- stages, one image at a time on one thread: decode, resize + tiling, uint8 stacking, and the float32
  normalisation that the host no longer does (the device does, in `VisionModel`);
- throughput: the whole set pushed through a pool of 1 and 2 workers (threads, and processes for
  comparison), for `before` (`preprocess`: float32 pixel values on the host, the old service path) and
  `after` (`preprocess_tiles`: uint8 tiles, the service path now). Threads scale only where PIL and torch
  release the GIL; the ratio of 2 workers to 1 says whether they do.

Every number is a median of `--repeats` runs; the machine's load average is recorded before and after,
since other jobs may share the cores.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import torch
import typer
from PIL import Image

from benchmarks.toolkit import machine
from benchmarks.toolkit.documents import write
from benchmarks.toolkit.images import smooth_photo
from vision_server.preprocess import (
    IMAGE_SIZE,
    decode_image,
    dynamic_tiles,
    normalize,
    preprocess,
    preprocess_tiles,
    to_tile_bytes,
)

SIZES = ((896, 448), (1344, 896), (1920, 1080), (3024, 4032))
LIMITS = {"max_bytes": 64 << 20, "max_pixels": 64_000_000}


def described_machine() -> dict:
    """The machine, and the libraries and threads that decide preprocessing speed."""
    return machine.machine() | {"cores_given": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                                "torch": torch.__version__, "pillow": Image.__version__,
                                "torch_threads": torch.get_num_threads()}


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stages(data: bytes, repeats: int) -> dict:
    image = decode_image(data, **LIMITS)
    tiles = dynamic_tiles(image)
    u8 = to_tile_bytes(tiles)
    ms = {
        "decode": median_s(lambda: decode_image(data, **LIMITS), repeats),
        "resize_and_tiling": median_s(lambda: dynamic_tiles(image), repeats),
        "uint8_stack": median_s(lambda: to_tile_bytes(tiles), repeats),
        "float_normalise_on_host": median_s(lambda: normalize(u8), repeats),
    }
    out = {k: round(v * 1e3, 2) for k, v in ms.items()}
    out["tiles"] = len(tiles)
    out["host_ms_before"] = round(sum(ms.values()) * 1e3, 2)
    out["host_ms_after"] = round((ms["decode"] + ms["resize_and_tiling"] + ms["uint8_stack"]) * 1e3, 2)
    out["bytes_to_device_before"] = len(tiles) * 3 * IMAGE_SIZE * IMAGE_SIZE * 4  # float32, as it was copied
    out["bytes_to_device_after"] = len(tiles) * 3 * IMAGE_SIZE * IMAGE_SIZE  # uint8
    return out


def _one_thread() -> None:
    torch.set_num_threads(1)


def _before(data: bytes) -> int:
    return preprocess(data, 12, **LIMITS).shape[0]


def _after(data: bytes) -> int:
    return preprocess_tiles(data, 12, **LIMITS).shape[0]


def _after_tensor(data: bytes) -> torch.Tensor:
    return preprocess_tiles(data, 12, **LIMITS)


def _before_tensor(data: bytes) -> torch.Tensor:
    return preprocess(data, 12, **LIMITS)


def throughput(pool: Executor, fn, images: list[bytes], repeats: int) -> float:
    """Median tiles/s of the whole set through `pool`."""
    list(pool.map(fn, images[:2]))  # warm-up (and process start-up)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tiles = sum(r if isinstance(r, int) else r.shape[0] for r in pool.map(fn, images))
        rates.append(tiles / (time.perf_counter() - start))
    return statistics.median(rates)


def pools(processes: bool) -> list[tuple[str, Callable[[int], Executor]]]:
    kinds = [("threads", lambda n: ThreadPoolExecutor(n))]
    if processes:
        kinds.append(("processes", lambda n: ProcessPoolExecutor(n, initializer=_one_thread)))
    return kinds


def throughput_rows(images: list[bytes], workers: list[int], processes: bool, repeats: int) -> list[dict]:
    """Tiles/s of the whole set through each pool kind and size, before and after (see the module's docstring)."""
    rows = []
    for kind, make in pools(processes):
        for n in workers:
            for variant, fn in (("before", _before_tensor if kind == "processes" else _before),
                                ("after", _after_tensor if kind == "processes" else _after)):
                with make(n) as pool:
                    rate = throughput(pool, fn, images, repeats)
                rows.append({"pool": kind, "workers": n, "variant": variant, "tiles_per_s": round(rate, 2),
                             "tiles_per_s_per_core": round(rate / min(n, len(os.sched_getaffinity(0))), 2),
                             "load": machine.load_average()})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """Scaling from 1 to 2 workers, and after over before with 1 worker, per pool kind."""
    rates = {(r["pool"], r["workers"], r["variant"]): r["tiles_per_s"] for r in rows}
    out = {}
    for kind in dict.fromkeys(r["pool"] for r in rows):
        for variant in ("before", "after"):
            if (kind, 1, variant) in rates and (kind, 2, variant) in rates:
                out[f"{kind}_{variant}_scaling_2_vs_1"] = round(rates[kind, 2, variant] / rates[kind, 1, variant], 2)
        if (kind, 1, "before") in rates and (kind, 1, "after") in rates:
            out[f"{kind}_after_vs_before_1_worker"] = round(rates[kind, 1, "after"] / rates[kind, 1, "before"], 2)
    return out


def main(
    repeats: int = 3,
    images_per_size: Annotated[int, typer.Option(help="copies of each size in the throughput set (seeds differ)")] = 3,
    workers: str = "1,2",
    processes: Annotated[bool, typer.Option(help="also measure process pools (results pickled back)")] = True,
    sizes: Annotated[str | None, typer.Option(help="e.g. 896x448,1920x1080 (default: the four sizes)")] = None,
    out: Path | None = None,
) -> None:
    _one_thread()  # the torch work of one worker stays on its core; the pool is the only parallelism
    chosen = [tuple(int(x) for x in s.split("x")) for s in sizes.split(",")] if sizes else list(SIZES)
    result = {"machine": described_machine(), "load_before": machine.load_average(), "repeats": repeats,
              "stages_ms": {}, "throughput": []}
    for w, h in chosen:
        result["stages_ms"][f"{w}x{h}"] = stages(smooth_photo(w, h), repeats)
        print(json.dumps({f"{w}x{h}": result["stages_ms"][f"{w}x{h}"]}), flush=True)
    images = [smooth_photo(w, h, seed) for seed in range(images_per_size) for (w, h) in chosen]
    result["throughput"] = throughput_rows(images, [int(x) for x in workers.split(",")], processes, repeats)
    result |= ratios(result["throughput"])
    result["load_after"] = machine.load_average()
    result["note"] = ("before: float32 normalised pixels made on the host (the old service path); after: uint8 "
                      "tiles, normalised on the vision model's device. tiles_per_s_per_core divides by the "
                      "workers (at most the cores given). Load averages (1, 5, 15 min) show what shared the cores.")
    if out:
        write(result, out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stages_ms", "throughput")}, indent=2))


if __name__ == "__main__":
    typer.run(main)
