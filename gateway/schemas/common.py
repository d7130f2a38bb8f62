"""Shapes every OpenAI-compatible route shares: strict request models, the proto's integer widths, the model
list and the error body."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field


class Strict(BaseModel):
    """Unknown fields are refused rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


INT64 = 2**63 - 1
UINT32, INT32 = 2**32 - 1, 2**31 - 1  # the proto fields' widths: a wider value cannot be sent on


# vLLM's `cache_salt`: the request's caches (prefix cache, image features) are shared only with requests of its
# tenant that bring the same salt. Any text: the gateway hashes it with the tenant's scope.
CacheSalt = Annotated[str, Field(min_length=1, max_length=1024)]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dvd"

    @computed_field
    @property
    def root(self) -> str:
        """vLLM's extension: the model behind the name (`vllm bench serve` reads it)."""
        return self.id


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail
