"""Benchmark workloads: synthetic images and text, a folder of images, or a JSONL file of requests.

The JSONL format is `vllm bench serve --dataset-name custom_image`'s, one object a line:
`{"prompt": "...", "image_files": ["a.png", "data:image/jpeg;base64,..."], "output_tokens": 64}`
(`image_files` may be empty or left out for text-only requests; `output_tokens` is optional when the run
gives an output length). `write_jsonl` writes any workload in that format with its images inline, so
both tools can be run on the very same requests.
"""

from __future__ import annotations

import io
import json
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.toolkit import images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Common English words, each a single token for Qwen3's tokenizer when preceded by a space: a prompt of
# n words is about n text tokens.
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
         "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were",
         "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would",
         "who", "so", "no", "image", "picture", "describe", "colour", "left", "right", "top", "bottom", "small",
         "large", "light", "dark", "red", "green", "blue", "shape", "line", "what", "where", "how", "many")


class WorkloadError(ValueError):
    """A workload file or option that cannot be used; the message names the line or value."""


@dataclass(frozen=True)
class BenchRequest:
    """One chat request: a text prompt, images as URLs (`data:` or `http(s):`), and its output length."""

    prompt: str
    images: tuple[str, ...]
    output_len: int | None

    def messages(self) -> list[dict]:
        """The user turn as vLLM's benchmark sends it: the text first, then the images."""
        parts = [{"type": "text", "text": self.prompt}]
        parts += [{"type": "image_url", "image_url": {"url": url}} for url in self.images]
        return [{"role": "user", "content": parts}]


@dataclass
class RequestBatches:
    """What a run sends: warm-up requests, then one batch of requests per load point; and, for a sustained-goodput
    search (`benchmarks.toolkit.search`), `draw(count, run)`: `count` requests drawn for search run `run` alone."""

    warmup: list[BenchRequest]
    batches: list[list[BenchRequest]]
    described: dict  # recorded in the results file
    draw: Callable[[int, int], list[BenchRequest]] | None = None  # None: a fixed request set, no fresh ones

    @classmethod
    def fresh(cls, requests: list[BenchRequest], warmup: int, points: int, described: dict,
              draw: Callable[[int, int], list[BenchRequest]] | None = None) -> RequestBatches:
        """Split generated requests: no request (and no image) is sent twice, so no server cache can serve it."""
        size = (len(requests) - warmup) // points if points else 0
        return cls(requests[:warmup], [requests[warmup + i * size:warmup + (i + 1) * size] for i in range(points)],
                   described, draw)

    @classmethod
    def repeated(cls, requests: list[BenchRequest], warmup: int, points: int, described: dict) -> RequestBatches:
        """A fixed request set (a JSONL file) sent whole at every load point; warm-up takes its first lines."""
        return cls([requests[i % len(requests)] for i in range(warmup)], [requests] * points, described)


def run_seed(seed: int, run: int) -> int:
    """The seed of a search run's requests: drawn from (seed, run), so runs, and workloads of other seeds, never
    share requests."""
    return int(np.random.SeedSequence([seed, run]).generate_state(1)[0])


def parse_size(text: str) -> tuple[int, int]:
    """"896x448" -> (896, 448)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise WorkloadError(f"image size {text!r} is not WIDTHxHEIGHT, e.g. 896x448") from None
    if width < 1 or height < 1:
        raise WorkloadError(f"image size {text!r} must be positive")
    return width, height


def noise_image(width: int, height: int, rng: np.random.Generator) -> str:
    """Uniform random pixels as a JPEG data URL (what vLLM's `random-mm` sends: the worst case for codecs)."""
    return images.data_url(images.noise(width, height, rng, "JPEG"), "image/jpeg")


def random_text(words: int, rng: np.random.Generator) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))


def synthetic(num_requests: int, sizes: list[tuple[int, int]], images_per_request: int, input_words: int,
              output_len: int, seed: int) -> list[BenchRequest]:
    """Random-noise images of sizes drawn uniformly from `sizes`, random text; the same for the same seed."""
    if num_requests < 1 or images_per_request < 0 or input_words < 1 or output_len < 1:
        raise WorkloadError("requests, input words and output length must be at least 1, images at least 0")
    if images_per_request and not sizes:
        raise WorkloadError("images need at least one size")
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        picks = rng.integers(0, len(sizes), size=images_per_request) if images_per_request else []
        images = tuple(noise_image(*sizes[i], rng) for i in picks)
        requests.append(BenchRequest(random_text(input_words, rng), images, output_len))
    return requests


def image_file_url(path: Path) -> str:
    """An image file as a data URL (the server may not read the client's files)."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            mime = Image.MIME.get(image.format or "", None)
    except OSError as exc:
        raise WorkloadError(f"{path}: not a readable image ({exc})") from None
    return images.data_url(data, mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream")


def from_folder(folder: Path, num_requests: int, images_per_request: int, input_words: int, output_len: int,
                seed: int) -> list[BenchRequest]:
    """Requests over a folder's images (shuffled by `seed`, reused in turn when there are fewer than needed)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise WorkloadError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    rng = np.random.default_rng(seed)
    order = [files[i] for i in rng.permutation(len(files))]
    urls: dict[Path, str] = {}
    requests = []
    for r in range(num_requests):
        chosen = [order[(r * images_per_request + k) % len(order)] for k in range(images_per_request)]
        images = tuple(urls.setdefault(path, image_file_url(path)) for path in chosen)
        requests.append(BenchRequest(random_text(input_words, rng), images, output_len))
    return requests


def _image_url(entry: object, base: Path, where: str) -> str:
    if not isinstance(entry, str) or not entry:
        raise WorkloadError(f"{where}: image_files entries must be non-empty strings")
    if entry.startswith(("data:image/", "http://", "https://")):
        return entry
    path = Path(entry.removeprefix("file://"))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise WorkloadError(f"{where}: image file {entry!r} not found")
    return image_file_url(path)


def read_jsonl(path: Path, output_len: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL file; `output_len` overrides each line's `output_tokens`."""
    requests = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot be read ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise WorkloadError(f"{where}: expected a JSON object, got {type(item).__name__}")
        unknown = set(item) - {"prompt", "image_files", "output_tokens"}
        if unknown:
            raise WorkloadError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise WorkloadError(f"{where}: 'prompt' must be a non-empty string")
        files = item.get("image_files", [])
        if not isinstance(files, list):
            raise WorkloadError(f"{where}: 'image_files' must be a list")
        tokens = item.get("output_tokens")
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
            raise WorkloadError(f"{where}: 'output_tokens' must be a positive integer")
        if output_len is None and tokens is None:
            raise WorkloadError(f"{where}: no 'output_tokens' and no output length given for the run")
        images = tuple(_image_url(entry, path.parent, where) for entry in files)
        requests.append(BenchRequest(prompt, images, output_len or tokens))
    if not requests:
        raise WorkloadError(f"{path}: no requests")
    return requests


def write_jsonl(requests: list[BenchRequest], path: Path) -> None:
    """Write requests in the `custom_image` JSONL format, images inline as data URLs."""
    with path.open("w", encoding="utf-8") as out:
        for request in requests:
            line = {"prompt": request.prompt, "image_files": list(request.images)}
            if request.output_len is not None:
                line["output_tokens"] = request.output_len
            out.write(json.dumps(line) + "\n")
