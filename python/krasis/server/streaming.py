"""OpenAI response objects: chat and text completion chunks for server-sent events, usage, whole responses."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


def sse(payload: dict | str) -> str:
    """One server-sent event (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


DONE = sse("[DONE]")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_openai(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class ResponseIds:
    """What every chunk of one response repeats: id, creation time, model."""

    model: str
    prefix: str = "chatcmpl"
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if not self.id:
            self.id = f"{self.prefix}-{uuid.uuid4().hex}"


class ChatChunks:
    """``chat.completion.chunk`` objects of one streamed response."""

    def __init__(self, ids: ResponseIds, include_usage: bool):
        self.ids, self.include_usage = ids, include_usage

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.ids.id, "object": "chat.completion.chunk", "created": self.ids.created,
                 "model": self.ids.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def delta(self, delta: dict, finish_reason: str | None = None) -> str:
        return sse(self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]))

    def usage(self, usage: Usage) -> str:
        chunk = self._chunk([])
        chunk["usage"] = usage.to_openai()
        return sse(chunk)


class TextChunks:
    """``text_completion`` objects of one streamed /v1/completions response."""

    def __init__(self, ids: ResponseIds, include_usage: bool):
        self.ids, self.include_usage = ids, include_usage

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.ids.id, "object": "text_completion", "created": self.ids.created,
                 "model": self.ids.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def text(self, text: str, finish_reason: str | None = None) -> str:
        return sse(self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]))

    def usage(self, usage: Usage) -> str:
        chunk = self._chunk([])
        chunk["usage"] = usage.to_openai()
        return sse(chunk)


def chat_response(ids: ResponseIds, message: dict, finish_reason: str, usage: Usage) -> dict:
    return {"id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage.to_openai()}


def text_response(ids: ResponseIds, text: str, finish_reason: str, usage: Usage) -> dict:
    return {"id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage.to_openai()}
