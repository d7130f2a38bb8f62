"""OpenAI Responses API: `POST /v1/responses` (streamed or not), `GET` and `DELETE /v1/responses/{id}`.

The request becomes a `Job` as a chat does (instructions as the system message, function calls and
their outputs as assistant tool calls and tool messages); `events` turns the language server's
responses into the Responses event sequence, which the streamed answer sends as server-sent events and
the non-streamed one reduces to its final `Response`.

`ResponseStore` keeps stored responses (`store`, on by default) in memory for `previous_response_id`
and `GET`: each with its whole conversation (inputs, images included, and outputs), for
`responses_store_ttl_s` after it was made, the oldest dropped first beyond `responses_store_max_bytes`.
A stored response belongs to the tenant (API key) that made it: for any other it does not exist (404, as
for an unknown id, so that ids cannot be probed), and only its owner may delete it. Nothing survives a
gateway restart, and each gateway replica has its own store.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_reasoning_item import Content as ReasoningContent

from gateway import metrics
from gateway.errors import ERROR_RESPONSES, APIError
from gateway.jobs import ImageSource, Job, Responses, logit_bias, tools_message
from gateway.reasoning import with_thinking_prompt
from gateway.request_context import REQUEST_ID
from gateway.schemas.responses import (
    DeletedResponse,
    FunctionCallItem,
    FunctionCallOutput,
    InputItem,
    InputText,
    Message,
    NamedFunctionChoice,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponsesRequest,
)
from gateway.serving import ServingDep
from gateway.settings import GatewaySettings
from gateway.tenants import TenantDep, current_tenant
from proto import dvd_pb2

router = APIRouter(dependencies=[Depends(current_tenant)], responses=ERROR_RESPONSES)


@router.post("/v1/responses", response_model=Response)
async def create_response(body: ResponsesRequest, request: Request, serving: ServingDep, tenant: TenantDep):
    store: ResponseStore = request.app.state.response_store
    await serving.check_model(body.model)
    history = store.history(body.previous_response_id, tenant.name) if body.previous_response_id else []
    items = history + ([Message(role="user", content=body.input)] if isinstance(body.input, str) else body.input)
    job = prepare_response(body, items, serving.settings, REQUEST_ID.get())
    shell = _shell(body, job)

    async def stored(responses: Responses) -> AsyncIterator:
        async for event in events(job, shell, responses):
            if event.type in ("response.completed", "response.incomplete") and body.store:
                history = items + output_as_input(event.response)
                size = await asyncio.to_thread(store.size_of, event.response, history)
                store.put(event.response, history, size, tenant.name)
            yield event

    async def render_stream(responses: Responses) -> AsyncIterator[str]:
        sequence = 0
        try:
            async for event in stored(responses):
                sequence = event.sequence_number
                yield f"event: {event.type}\ndata: {event.model_dump_json(exclude_none=True)}\n\n"
        except APIError as exc:  # headers are gone: the failure is the stream's last event
            error = ResponseError(code="server_error", message=exc.message)
            failed = shell.model_copy(update={"status": "failed", "error": error})
            event = ResponseFailedEvent(type="response.failed", sequence_number=sequence + 1, response=failed)
            yield f"event: {event.type}\ndata: {event.model_dump_json(exclude_none=True)}\n\n"

    async def render_body(responses: Responses) -> dict:
        last = None
        async for event in stored(responses):
            last = event
        return last.response.model_dump(exclude_none=True)

    return await serving.run(request, job, tenant, body.cache_salt, stream=body.stream, render_stream=render_stream,
                             render_body=render_body)


@router.get("/v1/responses/{response_id}", response_model=Response)
async def get_response(response_id: str, request: Request, tenant: TenantDep) -> dict:
    return request.app.state.response_store.get(response_id, tenant.name).model_dump(exclude_none=True)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, request: Request, tenant: TenantDep) -> DeletedResponse:
    request.app.state.response_store.delete(response_id, tenant.name)
    return DeletedResponse(id=response_id)


# ---------------------------------------------------------------- request


def _thinking(body: ResponsesRequest) -> bool:
    return body.reasoning is not None and body.reasoning.effort in ("low", "medium", "high")


def _sampling(body: ResponsesRequest) -> dvd_pb2.SamplingParams:
    sampling = dvd_pb2.SamplingParams(max_tokens=body.max_output_tokens or 0, n=1,
                                      logit_bias=logit_bias(body.logit_bias))
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty"):
        if getattr(body, name) is not None:
            setattr(sampling, name, getattr(body, name))
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        sampling.json_object = True
    elif fmt is not None and fmt.type == "json_schema":
        sampling.json_schema = json.dumps(fmt.schema_)
    return sampling


def _tools(body: ResponsesRequest) -> dvd_pb2.Tools | None:
    choice = body.tool_choice
    named = choice.name if isinstance(choice, NamedFunctionChoice) else None
    functions = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                 for t in body.tools or []]
    return tools_message(functions, None if named else choice, named, body.parallel_tool_calls)


def _text_of(content) -> str:
    return "".join(getattr(part, "text", None) or getattr(part, "refusal", "") for part in content)


def _message(item: Message, settings: GatewaySettings, sources: list[ImageSource]) -> dvd_pb2.ChatMessage:
    role = "system" if item.role == "developer" else item.role
    message = dvd_pb2.ChatMessage(role=role)
    for part in [InputText(type="input_text", text=item.content)] if isinstance(item.content, str) else item.content:
        if part.type != "input_image":
            message.content.append(dvd_pb2.ContentPart(text=_text_of([part])))
            continue
        if role != "user":
            raise APIError(400, f"images are only accepted in user messages, not {item.role}", param="input")
        if not part.image_url:
            raise APIError(400, "input_image needs image_url: this server keeps no files (file_id)", param="input")
        sources.append(ImageSource.image(part.image_url, part.detail, settings.max_tiles))
        message.content.append(dvd_pb2.ContentPart(image=True))
    return message


def to_messages(items: list[InputItem], settings: GatewaySettings, sources: list[ImageSource]) -> list:
    """Responses items as chat messages: consecutive function calls join the assistant message before them,
    each output is a tool message, and a reasoning item goes with the assistant message after it."""
    messages: list[dvd_pb2.ChatMessage] = []
    reasoning = ""
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning = _text_of(item.content or item.summary)
        elif isinstance(item, FunctionCallItem):
            if not messages or messages[-1].role != "assistant":
                messages.append(dvd_pb2.ChatMessage(role="assistant", reasoning=reasoning))
                reasoning = ""
            messages[-1].tool_calls.add(id=item.call_id, name=item.name, arguments=item.arguments)
        elif isinstance(item, FunctionCallOutput):
            text = item.output if isinstance(item.output, str) else _text_of(item.output)
            messages.append(dvd_pb2.ChatMessage(role="tool", tool_call_id=item.call_id,
                                                content=[dvd_pb2.ContentPart(text=text)]))
        else:
            messages.append(_message(item, settings, sources))
            if item.role == "assistant":
                messages[-1].reasoning, reasoning = reasoning, ""
    return messages


def prepare_response(body: ResponsesRequest, items: list[InputItem], settings: GatewaySettings,
                     request_id: str) -> Job:
    sources: list[ImageSource] = []
    messages = to_messages(items, settings, sources)
    if body.instructions:
        messages.insert(0, dvd_pb2.ChatMessage(role="system", content=[dvd_pb2.ContentPart(text=body.instructions)]))
    thinking = _thinking(body)
    if thinking:
        with_thinking_prompt(messages)
    if not messages:
        raise APIError(400, "input is empty", param="input")
    return Job(request_id, body.model, messages, sources, _sampling(body), thinking, _tools(body))


# ---------------------------------------------------------------- output


def _shell(body: ResponsesRequest, job: Job) -> Response:
    """The response as it is before any output: what the request asked for."""
    return Response(
        id=f"resp_{job.request_id}", object="response", created_at=int(time.time()), model=body.model,
        status="in_progress", output=[], parallel_tool_calls=body.parallel_tool_calls,
        tool_choice=body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else
        body.tool_choice or ("auto" if body.tools else "none"),
        tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
        temperature=body.temperature, top_p=body.top_p, max_output_tokens=body.max_output_tokens,
        instructions=body.instructions, metadata=body.metadata, previous_response_id=body.previous_response_id,
        store=body.store, text=body.text.model_dump(by_alias=True, exclude_none=True) if body.text else None,
        reasoning=body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _OpenItem:
    """An output item being streamed: its index, id and text so far."""

    kind: str  # "reasoning", "message" or "function_call"
    index: int
    item_id: str
    text: str = ""
    call_id: str = ""
    name: str = ""

    def done(self, status: str):
        if self.kind == "reasoning":
            return ResponseReasoningItem(type="reasoning", id=self.item_id, summary=[], status=status,
                                         content=[ReasoningContent(type="reasoning_text", text=self.text)])
        if self.kind == "message":
            return ResponseOutputMessage(type="message", id=self.item_id, role="assistant", status=status,
                                         content=[ResponseOutputText(type="output_text", text=self.text,
                                                                     annotations=[], logprobs=[])])
        return ResponseFunctionToolCall(type="function_call", id=self.item_id, call_id=self.call_id, name=self.name,
                                        arguments=self.text, status=status)


class _EventWriter:
    """The Responses event sequence of one response, numbered; output items opened and closed in order."""

    def __init__(self, shell: Response):
        self.shell = shell
        self.sequence = 0
        self.output: list = []
        self.open: _OpenItem | None = None

    def event(self, cls, **fields):
        self.sequence += 1
        return cls(type=cls.model_fields["type"].annotation.__args__[0], sequence_number=self.sequence, **fields)

    def close(self, status: str = "completed") -> list:
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item.item_id, "output_index": item.index}
        done = item.done(status)
        self.output.append(done)
        if item.kind == "reasoning":
            events = [self.event(ResponseReasoningTextDoneEvent, content_index=0, text=item.text, **where)]
        elif item.kind == "message":
            part = done.content[0]
            events = [self.event(ResponseTextDoneEvent, content_index=0, text=item.text, logprobs=[], **where),
                      self.event(ResponseContentPartDoneEvent, content_index=0, part=part, **where)]
        else:
            events = [self.event(ResponseFunctionCallArgumentsDoneEvent, arguments=item.text, name=item.name,
                                 **where)]
        return events + [self.event(ResponseOutputItemDoneEvent, item=done, output_index=item.index)]

    def opened(self, kind: str, call: dvd_pb2.ToolCallDelta | None = None) -> list:
        """Events that open a new item of `kind`, closing the open one (a new call always opens an item)."""
        if self.open is not None and self.open.kind == kind and call is None:
            return []
        events = self.close()
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        self.open = _OpenItem(kind, len(self.output), _new_id(prefix), call_id=call.id if call else "",
                              name=call.name if call else "")
        events.append(self.event(ResponseOutputItemAddedEvent, item=self.open.done("in_progress"),
                                 output_index=self.open.index))
        if kind == "message":
            part = ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[])
            events.append(self.event(ResponseContentPartAddedEvent, content_index=0, part=part,
                                     item_id=self.open.item_id, output_index=self.open.index))
        return events

    def add(self, response: dvd_pb2.GenerateResponse) -> list:
        events = []
        if response.reasoning:
            events += self.opened("reasoning")
            self.open.text += response.reasoning
            events.append(self.event(ResponseReasoningTextDeltaEvent, content_index=0, delta=response.reasoning,
                                     item_id=self.open.item_id, output_index=self.open.index))
        if response.text:
            events += self.opened("message")
            self.open.text += response.text
            events.append(self.event(ResponseTextDeltaEvent, content_index=0, delta=response.text, logprobs=[],
                                     item_id=self.open.item_id, output_index=self.open.index))
        for call in response.tool_calls:
            if call.id:
                events += self.opened("function_call", call)
            self.open.text += call.arguments
            if call.arguments:
                events.append(self.event(ResponseFunctionCallArgumentsDeltaEvent, delta=call.arguments,
                                         item_id=self.open.item_id, output_index=self.open.index))
        return events

    def finished(self, finish_reason: str, usage: dvd_pb2.Usage, reasoning_tokens: int) -> list:
        incomplete = finish_reason == "length"
        events = self.close("incomplete" if incomplete else "completed")
        response = self.shell.model_copy(update={
            "status": "incomplete" if incomplete else "completed", "output": self.output,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "usage": ResponseUsage(
                input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens,
                input_tokens_details={"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
                output_tokens_details={"reasoning_tokens": reasoning_tokens}),
        })
        done = ResponseIncompleteEvent if incomplete else ResponseCompletedEvent
        return events + [self.event(done, response=response)]


async def events(job: Job, shell: Response, responses: Responses) -> AsyncIterator:
    """The response as Responses API events: created, in progress, each output item opened, streamed and
    closed in turn, then completed (or incomplete when cut off by max_output_tokens)."""
    writer = _EventWriter(shell)
    yield writer.event(ResponseCreatedEvent, response=shell)
    yield writer.event(ResponseInProgressEvent, response=shell)
    clock, finish_reason, usage, reasoning_tokens = metrics.TokenClock(job.tenant), "stop", dvd_pb2.Usage(), 0
    async for response in responses:
        clock.add(response)
        if response.reasoning:
            reasoning_tokens += len(response.token_ids)
        for event in writer.add(response):
            yield event
        finish_reason = response.finish_reason or finish_reason
        if response.HasField("usage"):
            usage = response.usage
    for event in writer.finished(finish_reason, usage, reasoning_tokens):
        yield event


def output_as_input(response: Response) -> list[InputItem]:
    """A response's output as the input items that continue its conversation."""
    items: list[InputItem] = []
    for item in response.output:
        if item.type == "message":
            text = OutputText(type="output_text", text=_text_of(item.content))
            items.append(Message(role="assistant", content=[text]))
        elif item.type == "function_call":
            items.append(FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name,
                                          arguments=item.arguments))
        elif item.type == "reasoning":
            items.append(ReasoningItem(type="reasoning", content=[
                ReasoningText(type="reasoning_text", text=_text_of(item.content or []))]))
    return items


# ---------------------------------------------------------------- store


@dataclass
class _Stored:
    response: Response
    history: list[InputItem]
    stored_at: float
    num_bytes: int
    owner: str  # the tenant that made it


class ResponseStore:
    """Stored responses and their conversations, in memory, each its owner's: bounded by bytes and age, oldest
    out first."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._max_bytes, self._ttl_s = max_bytes, ttl_s
        self.num_bytes = 0

    @staticmethod
    def size_of(response: Response, history: list[InputItem]) -> int:
        """The bytes a stored response counts for: its JSON and its conversation's, images included (in a
        thread: a long conversation serialises megabytes)."""
        return len(response.model_dump_json()) + sum(len(item.model_dump_json()) for item in history)

    def put(self, response: Response, history: list[InputItem], size: int, owner: str) -> None:
        if size > self._max_bytes:
            return  # larger than the whole store: not kept
        self._entries[response.id] = _Stored(response, history, time.monotonic(), size, owner)
        self.num_bytes += size
        self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if self.num_bytes <= self._max_bytes and now - oldest.stored_at <= self._ttl_s:
                break
            self._entries.popitem(last=False)
            self.num_bytes -= oldest.num_bytes

    def _entry(self, response_id: str, owner: str, param: str | None = None) -> _Stored:
        """The entry of `owner`'s response; another tenant's is not found, exactly as an unknown one."""
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            raise APIError(404, f"response {response_id!r} is not stored here (unknown, made with store=false, "
                                "or expired)", param=param)
        return entry

    def get(self, response_id: str, owner: str) -> Response:
        return self._entry(response_id, owner).response

    def history(self, response_id: str, owner: str) -> list[InputItem]:
        """The conversation up to and including the response's output."""
        return list(self._entry(response_id, owner, "previous_response_id").history)

    def delete(self, response_id: str, owner: str) -> None:
        entry = self._entry(response_id, owner)
        del self._entries[response_id]
        self.num_bytes -= entry.num_bytes
