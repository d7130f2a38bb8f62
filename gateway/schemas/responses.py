"""OpenAI Responses API request shapes accepted by the gateway (the subset `vllm serve` supports for one model).

Output shapes are the `openai` package's own (`openai.types.responses`), so what the gateway sends is
what the official client parses (but for `DeletedResponse`, which it lacks). Request parameters are
strict: an unknown one is a 400 that names it.
Items that echo earlier output back (messages, calls, reasoning) ignore the output-only fields the
client copies along (`status`, `annotations`, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from gateway.schemas.common import INT32, UINT32, CacheSalt, Strict


class Echoed(BaseModel):
    """An item as the client may send back what this server returned: output-only fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class InputImage(Strict):
    type: Literal["input_image"]
    image_url: str | None = None  # data: or http(s) URL
    file_id: str | None = None  # refused: this server keeps no files
    detail: Literal["auto", "low", "high"] = "auto"


class OutputText(Echoed):
    type: Literal["output_text"]
    text: str


class Refusal(Echoed):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class Message(Echoed):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class FunctionCallItem(Echoed):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutput(Echoed):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningText(Echoed):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Echoed):
    type: Literal["reasoning"]
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None


def _item_type(value: Any) -> str:
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


# An item without a type is a message, as in OpenAI's API.
InputItem = Annotated[
    Annotated[Message, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(Strict):
    type: Literal["function"]
    name: str


class ReasoningConfig(Strict):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None  # low and up: thinking mode on
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; the reasoning comes back whole


class TextFormatText(Strict):
    type: Literal["text"]


class TextFormatJSONSchema(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextFormatJSONObject(Strict):
    type: Literal["json_object"]


class TextConfig(Strict):
    format: Annotated[TextFormatText | TextFormatJSONSchema | TextFormatJSONObject,
                      Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted and ignored


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: bool = False
    store: bool = True  # kept for `previous_response_id` and `GET /v1/responses/{id}`, within the store's bounds
    max_output_tokens: int | None = Field(default=None, ge=1, le=UINT32)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    # vLLM's sampling extras on this API, sent by the `openai` client as `extra_body`.
    top_k: int | None = Field(default=None, ge=-1, le=INT32)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)  # returned with the response
    cache_salt: CacheSalt | None = None  # vLLM's extension, as on chat completions
    # Accepted and ignored, as `vllm serve` does.
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled"] | None = None  # a prompt over the context is an error, never cut
    include: list[str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class DeletedResponse(BaseModel):
    """The answer to `DELETE /v1/responses/{id}`."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
