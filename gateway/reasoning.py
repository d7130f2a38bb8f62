"""InternVL3.5's thinking mode: its reasoning system prompt, and the `<think>` part of the output split off.

As vLLM's DeepSeek-R1-style reasoning parsers do: with thinking on, everything up to `</think>` is
reasoning (a leading `<think>` is dropped), the rest is the answer; a completion cut off before
`</think>` is all reasoning.
"""

from __future__ import annotations

# From the InternVL3.5 model card ("To enable thinking mode, please set the system prompt to ...").
R1_SYSTEM_PROMPT = """
You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the answer from the think section with a newline.

Ensure that the thinking process is thorough but remains focused on the query. The final answer should be standalone and not reference the thinking section.
""".strip()  # noqa: E501

THINK_START, THINK_END = "<think>", "</think>"


def _held_back(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkSplitter:
    """Splits one choice's streamed text into (reasoning, content) deltas, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = ""
        self._start_checked = False
        self._thinking = True

    def feed(self, text: str) -> tuple[str, str]:
        if not self._thinking:
            return "", text
        self._buffer += text
        if not self._start_checked:
            if len(self._buffer) < len(THINK_START) and THINK_START.startswith(self._buffer):
                return "", ""  # could still become "<think>"
            if self._buffer.startswith(THINK_START):
                self._buffer = self._buffer[len(THINK_START):]
            self._start_checked = True
        end = self._buffer.find(THINK_END)
        if end >= 0:
            reasoning, content = self._buffer[:end], self._buffer[end + len(THINK_END):]
            self._buffer, self._thinking = "", False
            return reasoning, content
        keep = _held_back(self._buffer, THINK_END)
        reasoning, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return reasoning, ""

    def flush(self) -> tuple[str, str]:
        """What is held back at the end of the completion (a partial tag is reasoning text)."""
        reasoning, self._buffer = self._buffer, ""
        return (reasoning, "") if self._thinking else ("", reasoning)

