"""Qwen3-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the output become
OpenAI ``tool_calls``; anything malformed stays plain content."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .text_buffer import partial_suffix

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN_TAG) + r"(.*?)" + re.escape(CLOSE_TAG), re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]] | None:
    """(content before the first call, the calls), or None when the text holds no well-formed call (then it is
    plain content). Text after the calls other than whitespace makes it malformed."""
    start = text.find(OPEN_TAG)
    if start < 0:
        return None
    calls: list[ToolCall] = []
    pos = start
    for m in _CALL.finditer(text, start):
        if text[pos:m.start()].strip():
            return None
        try:
            body = json.loads(m.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        args = body.get("arguments", body.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError:
                return None
        elif isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        else:
            return None
        calls.append(ToolCall(body["name"], args, f"call_{uuid.uuid4().hex[:24]}"))
        pos = m.end()
    if not calls or text[pos:].strip():
        return None
    return text[:start].rstrip(), calls


class ToolCallBuffer:
    """Streaming: content passes through until ``<tool_call>`` appears; from there the text is kept until the
    end, when ``finish`` parses it into calls (or gives it back as content when malformed)."""

    def __init__(self):
        self._held = ""
        self._calls_text: str | None = None

    def feed(self, text: str) -> str:
        if self._calls_text is not None:
            self._calls_text += text
            return ""
        buf = self._held + text
        i = buf.find(OPEN_TAG)
        if i >= 0:
            self._held, self._calls_text = "", buf[i:]
            return buf[:i]
        keep = partial_suffix(buf, (OPEN_TAG,))
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, tool calls)."""
        held, self._held = self._held, ""
        if self._calls_text is None:
            return held, []
        parsed = parse_tool_calls(self._calls_text)
        if parsed is None:
            return self._calls_text, []
        return parsed[0], parsed[1]
