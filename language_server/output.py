"""Tools and thinking in a Generate call, with vLLM's own parsers (`vllm serve --enable-auto-tool-choice
--tool-call-parser hermes --reasoning-parser deepseek_r1`).

`OutputParsers` is built once at start-up from the settings' parser names; per request it turns the proto
`Tools` into vLLM's `ChatCompletionRequest` (its validation, tool dicts and sampling adjustments), and per
choice it gives a `ChoiceParser` that splits generated text into content, reasoning and tool-call deltas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.parser.parser_manager import ParserManager
from vllm.reasoning import ReasoningParserManager
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tool_parsers import ToolParserManager

from proto import dvd_pb2

CHOICES = ("auto", "none", "required")


def _json_choice(tool_parser_cls):
    """`tool_parser_cls` taking `required` and named choices as JSON (the output is the `[{"name",
    "parameters"}]` array, or the named function's arguments), as vLLM does with
    VLLM_ENFORCE_STRICT_TOOL_CALLING=0; the default there is xgrammar structural tags, whose whitespace
    this server could not control."""
    return type(f"Json{tool_parser_cls.__name__}", (tool_parser_cls,),
                {"supports_required_and_named": True, "structural_tag_model": None})


@dataclass
class ToolsRequest:
    """A call's tools as vLLM takes them: its request (after the tool parser's `adjust_request`), the tool
    dicts its chat templates get, the JSON schema a forced choice constrains the output to, and whether
    special tokens stay in the output text."""

    chat_request: ChatCompletionRequest
    tool_dicts: list[dict]
    json_schema: str | None
    skip_special_tokens: bool


@dataclass
class Piece:
    """What one output of one choice adds: content, reasoning and tool-call deltas."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dvd_pb2.ToolCallDelta] = field(default_factory=list)


class OutputParsers:
    """vLLM's tool-call and reasoning parsers named by the settings, checked against the tokenizer."""

    @staticmethod
    def check_names(tool_call_parser: str, reasoning_parser: str) -> None:
        """ValueError, naming the registered parsers, unless vLLM has parsers of both names."""
        for name, registry, lookup, what in (
                (tool_call_parser, ToolParserManager, ToolParserManager.get_tool_parser, "tool call parser"),
                (reasoning_parser, ReasoningParserManager, ReasoningParserManager.get_reasoning_parser,
                 "reasoning parser")):
            try:
                lookup(name)
            except KeyError:
                raise ValueError(f"unknown {what} {name!r}; vLLM has: "
                                 f"{', '.join(sorted(registry.list_registered()))}") from None

    def __init__(self, tokenizer, tool_call_parser: str, reasoning_parser: str):
        self.check_names(tool_call_parser, reasoning_parser)
        self.tokenizer = tokenizer
        self._composed = {}
        for thinking in (False, True):
            cls = ParserManager.get_parser(tool_parser_name=tool_call_parser,
                                           reasoning_parser_name=reasoning_parser if thinking else None,
                                           enable_auto_tools=True, tokenizer=tokenizer)
            json_choice = _json_choice(cls.tool_parser_cls)
            self._composed[thinking] = type(cls.__name__, (cls,), {"tool_parser_cls": json_choice})

    @staticmethod
    def chat_request(tools: dvd_pb2.Tools | None) -> ChatCompletionRequest:
        """vLLM's request for the call's tools (None: no tools); ValueError names what is wrong."""
        data: dict = {"messages": []}
        if tools is not None:
            try:
                data["tools"] = json.loads(tools.tools_json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tools_json is not valid JSON: {exc}") from None
            if not isinstance(data["tools"], list):
                raise ValueError("tools_json must be a JSON array of tools")
            names = [t.get("function", {}).get("name") for t in data["tools"] if isinstance(t, dict)]
            if tools.function and tools.function not in names:
                raise ValueError(f"the tool choice names function {tools.function!r}, which is not among the tools")
            if tools.function:
                data["tool_choice"] = {"type": "function", "function": {"name": tools.function}}
            elif tools.choice in ("", *CHOICES):
                data["tool_choice"] = tools.choice or "auto"
            else:
                raise ValueError(f"tool choice {tools.choice!r} is not one of {', '.join(CHOICES)}")
            data["parallel_tool_calls"] = tools.parallel_calls
        try:
            return ChatCompletionRequest(**data)
        except ValueError as exc:  # pydantic's and vLLM's validation errors
            raise ValueError(f"invalid tools: {exc}") from None

    def adjusted(self, chat_request: ChatCompletionRequest) -> ChatCompletionRequest:
        """The request after the tool parser's `adjust_request`: hermes keeps special tokens in the output
        when tools may be called; `required` and named choices get vLLM's JSON schema in `structured_outputs`."""
        if not chat_request.tools:
            return chat_request
        parser = self._composed[False](self.tokenizer, chat_request.tools)
        return parser.tool_parser.adjust_request(chat_request.model_copy(deep=True))

    def tools_request(self, tools: dvd_pb2.Tools) -> ToolsRequest:
        """The proto `Tools` checked and adjusted as vLLM does; ValueError names what is wrong."""
        chat_request = self.adjusted(self.chat_request(tools))
        schema = chat_request.structured_outputs.json if chat_request.structured_outputs else None
        return ToolsRequest(
            chat_request=chat_request,
            tool_dicts=[tool.model_dump() for tool in chat_request.tools],  # as vLLM's renderer passes them
            json_schema=json.dumps(schema) if isinstance(schema, dict) else schema,
            skip_special_tokens=chat_request.skip_special_tokens,
        )

    def choices(self, tools: ToolsRequest | None, enable_thinking: bool) -> Choices | None:
        """The parser states of one request's choices; None when its output is plain text."""
        chat_request = tools.chat_request if tools else self.chat_request(None)
        if not chat_request.tools and not enable_thinking:
            return None
        return Choices(lambda: self.choice_parser(chat_request, enable_thinking))

    @staticmethod
    def forced(chat_request: ChatCompletionRequest) -> bool:
        """Whether the output is constrained to JSON tool calls (`required` or a named function)."""
        return bool(chat_request.tools) and chat_request.tool_choice not in ("auto", "none", None)

    def choice_parser(self, chat_request: ChatCompletionRequest, enable_thinking: bool) -> ChoiceParser:
        """A fresh parser state for one choice. A forced (JSON) choice is all tool calls from the first token,
        so its thinking is not split off."""
        thinking = enable_thinking and not self.forced(chat_request)
        return ChoiceParser(lambda: self._composed[thinking](self.tokenizer, chat_request.tools), chat_request)


@dataclass
class _Sent:
    reasoning: str = ""
    content: str = ""
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [name, arguments]


class ChoiceParser:
    """One choice's output through vLLM's streaming parser (`Parser.parse_delta`, as vLLM's streaming chat
    completions run it); when the choice finishes, whatever the parser still holds back is flushed, so that
    the deltas add up to vLLM's non-streaming result (`Parser.parse`) wherever the streamed text is its prefix."""

    def __init__(self, make_parser, chat_request: ChatCompletionRequest):
        self._make_parser = make_parser
        self._parser = make_parser()
        self._request = chat_request
        self._text = ""
        self._token_ids: list[int] = []
        self._sent = _Sent()
        reasoning = self._parser.reasoning_parser
        self._markers = {getattr(reasoning, f"{end}_token_id"): getattr(reasoning, f"{end}_token")
                         for end in ("start", "end") if hasattr(reasoning, f"{end}_token_id")}

    @property
    def made_calls(self) -> bool:
        return bool(self._sent.calls)

    def feed(self, text: str, token_ids, finished: bool) -> Piece:
        """The next delta of generated text (and its token ids); `finished` on the choice's last one."""
        self._text += text
        self._token_ids += token_ids
        piece = Piece()
        parts = list(self._split(text, list(token_ids)))
        for number, (part_text, part_ids) in enumerate(parts):
            # An empty prompt: the thinking system prompt names `</think>` in its text, which would make vLLM
            # take the reasoning as ended before the first generated token.
            delta = self._parser.parse_delta(part_text, part_ids, self._request, [],
                                             finished=finished and number == len(parts) - 1)
            if delta is None:
                continue
            piece.content += delta.content or ""
            piece.reasoning += delta.reasoning or ""
            for call in delta.tool_calls or []:
                function = call.function
                self._add_call(piece, call.index, call.id or "", function.name if function else None,
                               (function.arguments if function else None) or "")
        self._sent.content += piece.content
        self._sent.reasoning += piece.reasoning
        if finished:
            self._flush(piece)
        return piece

    def _split(self, text: str, token_ids: list[int]):
        """The delta in parts in which each reasoning marker token (`<think>`, `</think>`) comes alone: vLLM's
        reasoning parsers expect them so (one token per step) and misplace them when the engine's output
        merges steps."""
        start = position = 0
        for i, token_id in enumerate(token_ids):
            marker = self._markers.get(token_id)
            at = text.find(marker, position) if marker else -1
            if at < 0:
                continue
            if i > start:
                yield text[position:at], token_ids[start:i]
            yield marker, [token_id]
            start, position = i + 1, at + len(marker)
        if start < len(token_ids) or position < len(text):
            yield text[position:], token_ids[start:]

    def _add_call(self, piece: Piece, index: int, call_id: str, name: str | None, arguments: str) -> None:
        if self._request.parallel_tool_calls is False and index > 0:
            return  # at most one call, as vLLM's `maybe_filter_parallel_tool_calls`
        sent = self._sent.calls.setdefault(index, ["", ""])
        if name and not sent[0]:
            sent[0] = name
            call_id = call_id or make_tool_call_id()
        else:
            name, call_id = "", ""
        if not (name or arguments):
            return
        sent[1] += arguments
        piece.tool_calls.append(dvd_pb2.ToolCallDelta(index=index, id=call_id, name=name or "",
                                                      arguments=arguments))

    def _flush(self, piece: Piece) -> None:
        """Add what vLLM's non-streaming parse of the whole text has beyond what was streamed. Where that parse
        has fewer calls than were streamed (a call cut off, which it gives back as raw text), the stream stands,
        as in vLLM's streaming chat completions."""
        reasoning, content, calls = self._make_parser().parse(
            self._text, self._request, enable_auto_tools=True, model_output_token_ids=self._token_ids)
        calls = calls or []
        if len(calls) < len(self._sent.calls):
            return
        piece.reasoning += self._rest(reasoning or "", self._sent.reasoning)
        piece.content += self._rest(content or "", self._sent.content)
        for index, call in enumerate(calls):
            name, arguments = self._sent.calls.get(index, ["", ""])
            if not name:
                self._add_call(piece, index, call.id or "", call.name, call.arguments or "")
            elif name == call.name and (call.arguments or "").startswith(arguments):
                self._add_call(piece, index, "", None, (call.arguments or "")[len(arguments):])

    @staticmethod
    def _rest(whole: str, sent: str) -> str:
        return whole[len(sent):] if whole.startswith(sent) else ""

    def finish_reason(self, engine_reason: str) -> str:
        """vLLM's streaming rule: "tool_calls" when calls were made and the model stopped by itself, except
        for a named choice ("stop")."""
        named = not isinstance(self._request.tool_choice, str) and self._request.tool_choice is not None
        if self.made_calls and not named and engine_reason == "stop":
            return "tool_calls"
        return engine_reason


class Choices:
    """The parser state of each choice of one request, made on the choice's first output."""

    def __init__(self, make_choice_parser):
        self._make = make_choice_parser
        self._parsers: dict[int, ChoiceParser] = {}

    def split(self, response: dvd_pb2.GenerateResponse, token_ids: list[int]) -> None:
        """`response.text` (the choice's raw delta) split into content, reasoning and tool calls; its finish
        reason made "tool_calls" where vLLM makes it so."""
        parser = self._parsers.get(response.index)
        if parser is None:
            parser = self._parsers[response.index] = self._make()
        piece = parser.feed(response.text, token_ids, finished=bool(response.finish_reason))
        response.text, response.reasoning = piece.content, piece.reasoning
        response.tool_calls.extend(piece.tool_calls)
        if response.finish_reason:
            response.finish_reason = parser.finish_reason(response.finish_reason)
