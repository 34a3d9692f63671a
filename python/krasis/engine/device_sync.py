"""Streams and events where the device has them (CUDA), and their no-op stand-ins where work is synchronous
(the CPU, where the hybrid engine runs its kernels through the Triton interpreter in tests)."""

from __future__ import annotations

from contextlib import nullcontext

import torch


class _DoneEvent:
    """An event on a synchronous device: everything recorded before it has already happened."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def new_event(device: torch.device):
    return torch.cuda.Event() if device.type == "cuda" else _DoneEvent()


def side_stream(device: torch.device):
    """A second stream for copies (None on a synchronous device)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def on_stream(stream):
    """Context manager making ``stream`` current (a no-op for None)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def fork(stream, device: torch.device) -> None:
    """Order ``stream``'s later work after what ``device``'s current stream has queued (nothing for None)."""
    if stream is not None:
        stream.wait_stream(current_stream(device))


def join(stream, device: torch.device) -> None:
    """Order the current stream's later work after what ``stream`` has queued (nothing for None)."""
    if stream is not None:
        current_stream(device).wait_stream(stream)


def wait_event(stream, event) -> None:
    """Make ``stream``'s later work wait for ``event`` (nothing to wait for on a synchronous device)."""
    if stream is not None:
        stream.wait_event(event)


def pinned(device: torch.device) -> bool:
    """Whether host buffers that feed ``device`` should be page-locked (for asynchronous DMA)."""
    return device.type == "cuda"
