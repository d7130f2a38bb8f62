"""OpenAI chat completions: the request as a `Job`, and the language server's responses as chunks.

`chunks` is the one event stream: the streamed answer sends each chunk as a server-sent event, the
non-streamed one folds the same chunks into one `ChatCompletion`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from gateway import metrics
from gateway.errors import ERROR_RESPONSES, APIError
from gateway.jobs import ImageSource, Job, Responses, logit_bias, tools_message
from gateway.reasoning import with_thinking_prompt
from gateway.request_context import REQUEST_ID
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    JSONObjectFormat,
    JSONSchemaResponseFormat,
    NamedToolChoice,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from gateway.serving import ServingDep
from gateway.settings import GatewaySettings
from gateway.tenants import TenantDep, current_tenant
from proto import dvd_pb2

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "ignore_eos")

router = APIRouter(dependencies=[Depends(current_tenant)], responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: ServingDep, tenant: TenantDep):
    model = await serving.check_model(body.model)
    job = prepare_chat(body, serving.settings, REQUEST_ID.get())
    created = int(time.time())

    def events(responses: Responses) -> AsyncIterator[ChatCompletionChunk]:
        return chunks(job, model, created, responses, logprobs=body.logprobs)

    async def render_stream(responses: Responses) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        try:
            async for chunk in events(responses):
                if chunk.usage is None or include_usage:
                    yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as exc:  # headers are gone: report in-band, as OpenAI's API does
            yield f"data: {json.dumps(exc.to_json())}\n\n"

    async def render_body(responses: Responses) -> dict:
        return (await fold(events(responses), thinking=job.thinking)).model_dump()

    return await serving.run(request, job, tenant, body.cache_salt, stream=body.stream, render_stream=render_stream,
                             render_body=render_body)


# ---------------------------------------------------------------- request


def _thinking(request: ChatCompletionRequest) -> bool:
    kwargs = request.chat_template_kwargs or {}
    unknown = set(kwargs) - {"enable_thinking"}
    if unknown:
        raise APIError(400, f"chat_template_kwargs: only enable_thinking is supported, got {sorted(unknown)}",
                       param="chat_template_kwargs")
    if not isinstance(kwargs.get("enable_thinking", False), bool):
        raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                       param="chat_template_kwargs")
    return kwargs.get("enable_thinking", False)


def _sampling(request: ChatCompletionRequest, settings: GatewaySettings) -> dvd_pb2.SamplingParams:
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if request.n > settings.max_n:
        raise APIError(400, f"n={request.n} is more than the {settings.max_n} choices this server allows", param="n")
    if request.n > 1 and request.temperature == 0:
        raise APIError(400, "n > 1 needs sampling: with temperature 0 every choice would be the same",
                       param="n")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 16 non-empty strings", param="stop")
    sampling = dvd_pb2.SamplingParams(
        max_tokens=request.max_completion_tokens or request.max_tokens or 0,
        stop=stop,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
        n=request.n,
        logit_bias=logit_bias(request.logit_bias),
    )
    for name in SAMPLING_FIELDS:
        if getattr(request, name) is not None:
            setattr(sampling, name, getattr(request, name))
    if isinstance(request.response_format, JSONObjectFormat):
        sampling.json_object = True
    elif isinstance(request.response_format, JSONSchemaResponseFormat):
        sampling.json_schema = json.dumps(request.response_format.json_schema.schema_)
    return sampling


def tools_of(request: ChatCompletionRequest) -> dvd_pb2.Tools | None:
    """The request's tools and tool choice; a constrained choice leaves no room for a response format."""
    choice = request.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    tools = tools_message([t.model_dump(exclude_none=True) for t in request.tools or []],
                          None if named else choice, named, request.parallel_tool_calls)
    if tools and (tools.function or tools.choice == "required") and request.response_format is not None \
            and request.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with a required or named tool_choice",
                       param="response_format")
    return tools


def _message(message: ChatMessage, settings: GatewaySettings, sources: list[ImageSource]) -> dvd_pb2.ChatMessage:
    """One OpenAI message in the servers' terms; its images' sources are added to `sources`."""
    role = "system" if message.role == "developer" else message.role
    if message.tool_calls and role != "assistant":
        raise APIError(400, f"tool_calls belong to assistant messages, not {message.role}", param="messages")
    if (message.tool_call_id is None) != (role != "tool"):
        raise APIError(400, "tool messages, and only they, need tool_call_id", param="messages")
    result = dvd_pb2.ChatMessage(role=role, tool_call_id=message.tool_call_id or "",
                                 reasoning=message.reasoning_content or message.reasoning or "")
    for call in message.tool_calls or []:
        result.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
    if isinstance(message.content, str) or message.content is None:
        result.content.append(dvd_pb2.ContentPart(text=message.content or ""))
        return result
    for part in message.content:
        if part.type == "text":
            result.content.append(dvd_pb2.ContentPart(text=part.text))
            continue
        if role != "user":
            raise APIError(400, f"images are only accepted in user messages, not {message.role}", param="messages")
        if part.type == "video_url":  # "Frame1: <image>\nFrame2: <image>\n...", as the model card does
            source = ImageSource(part.video_url.url, 1, part.video_url.num_frames or settings.video_frames)
            for frame in range(source.video_frames):
                result.content.extend([dvd_pb2.ContentPart(text=f"Frame{frame + 1}: "),
                                       dvd_pb2.ContentPart(image=True)])
        else:
            source = ImageSource.image(part.image_url.url, part.image_url.detail, settings.max_tiles)
            result.content.append(dvd_pb2.ContentPart(image=True))
        sources.append(source)
    return result


def prepare_chat(request: ChatCompletionRequest, settings: GatewaySettings, request_id: str) -> Job:
    """Validate and convert an OpenAI request; image bytes are loaded later by the serving layer."""
    thinking = _thinking(request)
    sources: list[ImageSource] = []
    messages = [_message(message, settings, sources) for message in request.messages]
    if thinking:
        with_thinking_prompt(messages)
    return Job(request_id, request.model, messages, sources, _sampling(request, settings), thinking,
               tools_of(request))


# ---------------------------------------------------------------- output


def usage_of(usage: dvd_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 total_tokens=usage.prompt_tokens + usage.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(image_tokens=usage.image_tokens,
                                                           cached_tokens=usage.cached_tokens))


def _logprobs(response: dvd_pb2.GenerateResponse) -> list[TokenLogprob]:
    def entry(cls, item, **extra):
        return cls(token=item.token, logprob=item.logprob, bytes=list(item.token.encode()), **extra)

    return [entry(TokenLogprob, t, top_logprobs=[entry(TopLogprob, c) for c in t.top]) for t in response.logprobs]


def delta_tool_calls(response: dvd_pb2.GenerateResponse) -> list[DeltaToolCall] | None:
    return [DeltaToolCall(index=c.index, id=c.id or None, type="function" if c.id else None,
                          function=DeltaFunctionCall(name=c.name or None, arguments=c.arguments))
            for c in response.tool_calls] or None


async def chunks(job: Job, model: str, created: int, responses: Responses, *,
                 logprobs: bool) -> AsyncIterator[ChatCompletionChunk]:
    """The chat completion as chunks: a role chunk per choice, a chunk per response that carries anything
    (the last token's chunk carries the finish reason, as vLLM sends it), then one usage chunk."""

    def chunk(choices, usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=f"chatcmpl-{job.request_id}", created=created, model=model, choices=choices,
                                   usage=usage)

    clocks = [metrics.TokenClock(job.tenant) for _ in range(job.n)]
    for index in range(job.n):
        yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
    usage = dvd_pb2.Usage()
    async for response in responses:
        clocks[response.index].add(response)
        token_logprobs = ChoiceLogprobs(content=_logprobs(response)) if logprobs else None
        tool_calls = delta_tool_calls(response)
        if response.text or response.reasoning or tool_calls or token_logprobs or response.finish_reason:
            delta = Delta(content=response.text or None, reasoning_content=response.reasoning or None,
                          tool_calls=tool_calls)
            yield chunk([ChunkChoice(index=response.index, delta=delta, logprobs=token_logprobs,
                                     finish_reason=response.finish_reason or None)])
        if response.HasField("usage"):
            usage = response.usage
    yield chunk([], usage=usage_of(usage))


class _ChoiceSoFar:
    def __init__(self) -> None:
        self.content, self.reasoning, self.logprobs = [], [], None
        self.calls: dict[int, dict] = {}
        self.finish_reason: str | None = None

    def add(self, choice: ChunkChoice) -> None:
        delta = choice.delta
        self.content.append(delta.content or "")
        self.reasoning.append(delta.reasoning_content or "")
        for call in delta.tool_calls or []:
            whole = self.calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            whole["id"] = call.id or whole["id"]
            whole["name"] = call.function.name or whole["name"]
            whole["arguments"] += call.function.arguments or ""
        if choice.logprobs is not None:
            self.logprobs = (self.logprobs or []) + choice.logprobs.content
        self.finish_reason = choice.finish_reason or self.finish_reason

    def choice(self, index: int, thinking: bool) -> Choice:
        calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                 for _, c in sorted(self.calls.items())]
        content = "".join(self.content)
        message = AssistantMessage(content=None if calls and not content else content, tool_calls=calls,
                                   reasoning_content="".join(self.reasoning) if thinking else None)
        return Choice(index=index, message=message, finish_reason=self.finish_reason,
                      logprobs=ChoiceLogprobs(content=self.logprobs) if self.logprobs is not None else None)


async def fold(events: AsyncIterator[ChatCompletionChunk], *, thinking: bool) -> ChatCompletion:
    """The chunks of one chat completion as the whole `ChatCompletion` (`reasoning_content` with thinking on)."""
    choices: dict[int, _ChoiceSoFar] = {}
    first = usage = None
    async for chunk in events:
        first = first or chunk
        for choice in chunk.choices:
            choices.setdefault(choice.index, _ChoiceSoFar()).add(choice)
        usage = chunk.usage or usage
    return ChatCompletion(id=first.id, created=first.created, model=first.model,
                          choices=[c.choice(i, thinking) for i, c in sorted(choices.items())], usage=usage)
