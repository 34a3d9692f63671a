"""Stop strings: generation ends where one appears; the stop string itself is not returned."""

from __future__ import annotations

from .text_buffer import partial_suffix


class StopMatcher:
    """Feed text deltas; returns (text safe to emit, whether a stop string was reached)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = partial_suffix(buf, self.stops)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
