"""Holding back the end of a text stream that might be the start of a marker (a stop string, a tag)."""

from __future__ import annotations


def partial_suffix(text: str, markers: tuple[str, ...] | list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of one of ``markers`` (0 if none)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
