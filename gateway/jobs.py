"""One API request in the servers' terms, shared by every API: the `Job` a route makes and the serving layer
runs, where its images come from, the stream of responses it yields, and the checked pieces that both the
chat completions and the Responses APIs build a job from (logit bias, tools)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.errors import APIError
from gateway.request_context import REQUEST_ARRIVAL_NS
from gateway.tenants import DEFAULT
from proto import dvd_pb2


@dataclass
class ImageSource:
    """Where one image (or video) of a request comes from, and the tiles it may take."""

    url: str
    max_tiles: int
    video_frames: int = 0  # a video: this many frames, each counted as one image

    @property
    def images(self) -> int:
        return self.video_frames or 1

    @property
    def most_tiles(self) -> int:
        """The most tiles it can take: a frame is one tile; an image its tile limit, plus the thumbnail added
        when it has more than one."""
        return self.video_frames or self.max_tiles + (self.max_tiles > 1)

    @classmethod
    def image(cls, url: str, detail: str, max_tiles: int) -> ImageSource:
        """An image at the request's detail: "low" is one tile, "high" and "auto" up to `max_tiles`."""
        return cls(url, 1 if detail == "low" else max_tiles)


@dataclass
class Job:
    """One API request in the servers' terms; image bytes are loaded by `Serving.run`."""

    request_id: str
    model: str
    messages: list[dvd_pb2.ChatMessage]
    sources: list[ImageSource]
    sampling: dvd_pb2.SamplingParams
    thinking: bool = False
    tools: dvd_pb2.Tools | None = None
    arrival_unix_ns: int = field(default_factory=lambda: REQUEST_ARRIVAL_NS.get() or time.time_ns())
    images: list[dvd_pb2.ImageInput] = field(default_factory=list)  # one per source
    image_keys: list[str] = field(default_factory=list)  # one per image (video frame); empty: no feature cache
    tenant: str = DEFAULT  # its tenant's name (gateway/tenants.py), for metrics
    cache_scope: str = ""  # what its caches are scoped by (its tenant and cache_salt); "": shared

    @property
    def n(self) -> int:
        return self.sampling.n or 1

    @property
    def most_tiles(self) -> int:
        """The most tiles its images can take: the vision work it may queue."""
        return sum(source.most_tiles for source in self.sources)

    @property
    def image_count(self) -> int:
        """Images the language server waits for: every video frame is one."""
        return sum(source.images for source in self.sources)


Responses = AsyncIterator[dvd_pb2.GenerateResponse]


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` (token ids as text) checked; the language server checks the ids against its vocabulary."""
    result = {}
    for token, value in (bias or {}).items():
        if not token.isdigit() or int(token) >= 2**32:
            raise APIError(400, f"logit_bias: {token!r} is not a token id", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: {value} for token {token} is outside -100 to 100", param="logit_bias")
        result[int(token)] = value
    return result


def tools_message(functions: list[dict], choice: str | None, named: str | None, parallel: bool) -> dvd_pb2.Tools | None:
    """Function tools (chat-completions shape) and the tool choice (`choice`: none/auto/required, or `named`), checked
    against each other, for the language server; None without tools."""
    if not functions:
        if named or choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    names = [tool["function"]["name"] for tool in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    return dvd_pb2.Tools(tools_json=json.dumps(functions), parallel_calls=parallel, function=named or "",
                         choice="" if named else choice or "auto")
