"""Renders chat messages into a prompt with the checkpoint's own chat template."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from proto import dvd_pb2


class PromptError(ValueError):
    """Messages the chat template cannot render."""


def load_chat_template(model_path: str | Path) -> str:
    """The template from `chat_template.jinja`, else from `tokenizer_config.json`."""
    path = Path(model_path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    config = json.loads((path / "tokenizer_config.json").read_text())
    if not config.get("chat_template"):
        raise FileNotFoundError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")
    return config["chat_template"]


def _raise(message: str):
    raise TemplateError(message)


ROLES = ("system", "user", "assistant", "tool")


def tool_arguments(arguments: str) -> dict:
    """A tool call's JSON arguments as the dict chat templates expect, as vLLM's chat_utils makes it: empty,
    malformed or non-object arguments become {} (the history must still render)."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def messages_to_dicts(messages) -> list[dict]:
    """Proto `ChatMessage`s as the dicts chat templates expect; text-only content stays a string.
    Assistant tool calls are OpenAI-shaped with their arguments parsed; tool results keep their call id."""
    result = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:  # the gateway maps OpenAI's roles; anything else is a bad caller
            raise PromptError(f"message {index}: role {message.role!r} is not one of {', '.join(ROLES)}")
        parts = []
        for part in message.content:
            if part.WhichOneof("part") == "image":
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        if all(p["type"] == "text" for p in parts):
            item = {"role": message.role, "content": "".join(p["text"] for p in parts)}
        else:
            item = {"role": message.role, "content": parts}
        if message.tool_calls:
            if message.role != "assistant":
                raise PromptError(f"message {index}: only assistant messages carry tool calls")
            item["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": tool_arguments(call.arguments)}}
                for call in message.tool_calls]
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
        if message.reasoning:
            item["reasoning_content"] = message.reasoning
        result.append(item)
    return result


def count_images(messages: list[dvd_pb2.ChatMessage]) -> int:
    return sum(part.WhichOneof("part") == "image" for m in messages for part in m.content)


class ChatRenderer:
    def __init__(self, template: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self._template = env.from_string(template)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt; `tools` are the request's tool dicts as vLLM hands them to chat templates."""
        if not messages:
            raise PromptError("a chat needs at least one message")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools)
        except TemplateError as exc:
            raise PromptError(f"chat template failed: {exc}") from None
