"""The traffic a deployment must serve: request shapes, how they arrive, the SLOs and the GPU budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from planner.files import load_model

# A count that is either fixed or drawn from {value: weight}; JSON keys are strings, pydantic makes them ints.
Distribution = int | dict[int, float]


class Workload(BaseModel):
    name: str = "workload"
    images_per_request: Distribution = 1
    tiles_per_image: Distribution = 3  # including the thumbnail of a multi-tile image
    # Or the images' size in pixels: the model geometry's own rule then gives its tiles or patches and tokens
    # (a derived profile's geometry; e.g. Qwen3-VL's native resolution: 640x640 -> 400 tokens).
    image_px: tuple[int, int] | None = None
    images_first: bool = True  # images before the prompt's text (InternVL's habit), else after it
    text_tokens: Distribution = 64  # prompt tokens besides the images' (template and question)
    output_tokens: Distribution = 64
    vir_compressed_share: float = Field(0.0, ge=0, le=1)  # ViR: share of tiles sent as 64 tokens, not 256
    arrival_rate: float | None = Field(None, gt=0)  # Poisson arrivals, requests/s (open loop)
    concurrency: int | None = Field(None, gt=0)  # or: this many clients, each sending when its last reply ends
    requests: int = Field(400, gt=0)
    ttft_slo_s: float = Field(gt=0)
    tpot_slo_s: float = Field(gt=0)
    gpus: int = Field(gt=0)  # devices to split between vision and language
    seed: int = 0

    @field_validator("images_per_request", "tiles_per_image", "text_tokens", "output_tokens")
    @classmethod
    def _valid_distribution(cls, value: Distribution, info) -> Distribution:
        items = value.items() if isinstance(value, dict) else [(value, 1.0)]
        low = 0 if info.field_name in ("images_per_request", "text_tokens") else 1
        if not items:
            raise ValueError(f"{info.field_name}: an empty distribution")
        for count, weight in items:
            if count < low:
                raise ValueError(f"{info.field_name}: value {count} is below {low}")
            if weight < 0:
                raise ValueError(f"{info.field_name}: negative weight {weight} for {count}")
        if sum(w for _, w in items) <= 0:
            raise ValueError(f"{info.field_name}: weights sum to zero")
        return value

    @model_validator(mode="after")
    def _one_arrival_mode(self) -> Workload:
        if (self.arrival_rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of arrival_rate (open loop) and concurrency (closed loop)")
        return self

    @classmethod
    def load(cls, path: Path) -> Workload:
        return load_model(cls, path, "workload")


def draw(distribution: Distribution, rng: np.random.Generator) -> int:
    if isinstance(distribution, int):
        return distribution
    values = list(distribution)
    weights = np.array([distribution[v] for v in values], dtype=float)
    return int(values[rng.choice(len(values), p=weights / weights.sum())])


def mean(distribution: Distribution) -> float:
    if isinstance(distribution, int):
        return float(distribution)
    total = sum(distribution.values())
    return sum(v * w for v, w in distribution.items()) / total
