"""InternVL3.5's thinking mode: its reasoning system prompt, put before a request's own. The language server's
reasoning parser splits the `<think>` part off the output."""

from __future__ import annotations

from proto import dvd_pb2

# From the InternVL3.5 model card ("To enable thinking mode, please set the system prompt to ...").
R1_SYSTEM_PROMPT = """
You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the answer from the think section with a newline.

Ensure that the thinking process is thorough but remains focused on the query. The final answer should be standalone and not reference the thinking section.
""".strip()  # noqa: E501


def with_thinking_prompt(messages: list[dvd_pb2.ChatMessage]) -> None:
    """The model card's way to think: the R1 prompt as the system prompt, the request's own after it."""
    if messages and messages[0].role == "system":
        messages[0].content.insert(0, dvd_pb2.ContentPart(text=R1_SYSTEM_PROMPT + "\n\n"))
    else:
        messages.insert(0, dvd_pb2.ChatMessage(role="system", content=[dvd_pb2.ContentPart(text=R1_SYSTEM_PROMPT)]))
