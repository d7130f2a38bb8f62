"""Chat messages as chat templates take them, the template found in a checkpoint, and rendering's own errors
(the rendering of real templates is checked against transformers and vLLM in test_language_tools and
test_family)."""

from __future__ import annotations

import json

import pytest

from language_server.prompt import (
    ChatRenderer,
    PromptError,
    count_images,
    load_chat_template,
    messages_to_dicts,
    tool_arguments,
)
from proto import dvd_pb2


def text(value: str) -> dvd_pb2.ContentPart:
    return dvd_pb2.ContentPart(text=value)


IMAGE = dvd_pb2.ContentPart(image=True)


def test_messages_become_the_dicts_chat_templates_expect():
    messages = [
        dvd_pb2.ChatMessage(role="system", content=[text("Be "), text("brief.")]),
        dvd_pb2.ChatMessage(role="user", content=[text("Compare "), IMAGE, text(" and "), IMAGE]),
        dvd_pb2.ChatMessage(role="assistant", reasoning="Look it up.", tool_calls=[
            dvd_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}'),
            dvd_pb2.ToolCall(id="call_2", name="get_time", arguments="")]),
        dvd_pb2.ChatMessage(role="tool", content=[text("cold")], tool_call_id="call_1"),
    ]
    assert messages_to_dicts(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                     {"type": "text", "text": " and "}, {"type": "image"}]},
        {"role": "assistant", "content": "", "reasoning_content": "Look it up.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "cold", "tool_call_id": "call_1"},
    ]
    assert count_images(messages) == 2


@pytest.mark.parametrize(("arguments", "parsed"), [('{"a": 1}', {"a": 1}), ("", {}), ("{bad", {}), ("[1, 2]", {})])
def test_tool_arguments_are_an_object_or_empty(arguments, parsed):
    assert tool_arguments(arguments) == parsed


def test_unknown_roles_and_tool_calls_off_the_assistant_are_refused_by_message():
    with pytest.raises(PromptError, match="^message 0: role 'root' is not one of system, user, assistant, tool$"):
        messages_to_dicts([dvd_pb2.ChatMessage(role="root")])
    with pytest.raises(PromptError, match="^message 1: only assistant messages carry tool calls$"):
        messages_to_dicts([dvd_pb2.ChatMessage(role="user"), dvd_pb2.ChatMessage(
            role="user", tool_calls=[dvd_pb2.ToolCall(id="c", name="f", arguments="{}")])])


def test_the_template_file_comes_first_then_the_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from the config"}))
    assert load_chat_template(tmp_path) == "from the config"
    (tmp_path / "chat_template.jinja").write_text("from the file")
    assert load_chat_template(str(tmp_path)) == "from the file"


def test_a_checkpoint_without_a_template_is_refused_naming_where_it_looked(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": ""}))
    with pytest.raises(FileNotFoundError,
                       match=r"has no chat template \(chat_template\.jinja or tokenizer_config\.json\)$"):
        load_chat_template(tmp_path)


def test_rendering_passes_the_messages_the_generation_prompt_and_the_tools():
    renderer = ChatRenderer("{{ messages[0].content }}|{{ add_generation_prompt }}|{{ tools | tojson }}|"
                            "{{ messages | tojson(indent=1) }}")
    messages = [{"role": "user", "content": "é"}]
    assert renderer.render(messages, tools=[{"name": "ü"}]) == (
        'é|True|[{"name": "ü"}]|' + json.dumps(messages, ensure_ascii=False, indent=1))
    assert renderer.render(messages, add_generation_prompt=False).split("|")[1:3] == ["False", "null"]


def test_a_template_that_raises_and_an_empty_chat_are_prompt_errors():
    with pytest.raises(PromptError, match="^chat template failed: no tools here$"):
        ChatRenderer("{{ raise_exception('no tools here') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(PromptError, match="^a chat needs at least one message$"):
        ChatRenderer("x").render([])


def test_block_tags_leave_no_blank_lines_or_indentation_as_in_transformers():
    """transformers renders chat templates with `trim_blocks` and `lstrip_blocks`; a template that puts its
    block tags on lines of their own, indented, relies on both."""
    template = "{% for m in messages %}\n  {% if m.content %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert ChatRenderer(template).render([{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]) == "a\nb\n"
