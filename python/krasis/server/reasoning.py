"""Splitting a thinking model's output into ``reasoning_content`` (inside the think tags) and ``content``."""

from __future__ import annotations

from .text_buffer import partial_suffix

OPEN_TAG, CLOSE_TAG = "<think>", "</think>"


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an open think block (templates that start the thinking for the
    model), so the output begins as reasoning."""
    i = prompt_text.rfind(OPEN_TAG)
    return i >= 0 and prompt_text.find(CLOSE_TAG, i) < 0


class ReasoningSplitter:
    """Feed text deltas; each call returns (reasoning delta, content delta).

    An opening ``<think>`` is recognised only before any content (whitespace aside); the newlines that follow
    ``</think>`` are dropped from the content.
    """

    def __init__(self, start_in_reasoning: bool = False):
        self.in_reasoning = start_in_reasoning
        self._held = ""
        self._content_started = False
        self._after_close = False

    def feed(self, text: str) -> tuple[str, str]:
        buf = self._held + text
        self._held = ""
        reasoning, content = [], []
        while buf:
            if self.in_reasoning:
                i = buf.find(CLOSE_TAG)
                if i >= 0:
                    reasoning.append(buf[:i])
                    buf = buf[i + len(CLOSE_TAG):]
                    self.in_reasoning, self._after_close = False, True
                    continue
                keep = partial_suffix(buf, (CLOSE_TAG,))
                reasoning.append(buf[:len(buf) - keep])
                self._held = buf[len(buf) - keep:]
                break
            if self._after_close:
                buf = buf.lstrip("\n")
                if not buf:
                    break
                self._after_close = False
            if not self._content_started:
                stripped = buf.lstrip()
                if stripped.startswith(OPEN_TAG):
                    buf = stripped[len(OPEN_TAG):]
                    self.in_reasoning = True
                    continue
                if not stripped or OPEN_TAG.startswith(stripped):
                    self._held = buf  # maybe the start of <think>: wait for more
                    break
            self._content_started = True
            content.append(buf)
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", held)


def split_reasoning(text: str, start_in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    splitter = ReasoningSplitter(start_in_reasoning)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return r1 + r2, c1 + c2
