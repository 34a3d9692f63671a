"""Streaming routed experts through VRAM for prefill: each group of MoE layers is copied from pinned host
memory into one of two VRAM buffers on a copy stream while the layers of the previous group compute."""

from __future__ import annotations

import torch

from ..kernels import GPUExperts, copy_experts, empty_experts
from .device_sync import current_stream, new_event, on_stream, side_stream, wait_event


class ExpertStreamer:
    """Double-buffered layer-group streaming of routed experts; MoE layers are numbered 0..L-1 (slots)."""

    def __init__(self, host: list[GPUExperts], group_size: int, device: torch.device,
                 buffers: list[GPUExperts] | None = None):
        """``buffers``: the two VRAM buffers of ``group_size`` layers' experts each (allocated here if None)."""
        self.host, self.group_size, self.device = host, group_size, device
        self.num_groups = -(-len(host) // group_size)
        per_layer = host[0].num_experts
        self.per_layer = per_layer
        self.buffers = buffers or [empty_experts(host[0].layout, group_size * per_layer, device) for _ in range(2)]
        self.copy_stream = side_stream(device)
        self.loaded: list[int | None] = [None, None]
        self.copied = [new_event(device), new_event(device)]
        self.released = [new_event(device), new_event(device)]
        self.bytes_copied = 0

    def _issue(self, group: int) -> None:
        b = group % 2
        if self.loaded[b] == group:
            return
        with on_stream(self.copy_stream):
            # the buffer's previous group must be done computing before it is overwritten
            wait_event(self.copy_stream, self.released[b])
            first = group * self.group_size
            for i, src in enumerate(self.host[first:first + self.group_size]):
                copy_experts(self.buffers[b].slice(i * self.per_layer, (i + 1) * self.per_layer), src)
                self.bytes_copied += src.nbytes
            self.copied[b].record(self.copy_stream)
        self.loaded[b] = group

    def begin_pass(self) -> None:
        """Start copying the first group (a pass visits every MoE layer in order)."""
        self._issue(0)

    def acquire(self, slot: int) -> GPUExperts:
        """Layer ``slot``'s experts in VRAM (the current stream waits for their copy); starts the next group's."""
        group = slot // self.group_size
        b = group % 2
        self._issue(group)
        wait_event(current_stream(self.device), self.copied[b])
        if slot % self.group_size == 0 and group + 1 < self.num_groups:
            self._issue(group + 1)
        i = slot - group * self.group_size
        return self.buffers[b].slice(i * self.per_layer, (i + 1) * self.per_layer)

    def release(self, slot: int) -> None:
        """Layer ``slot`` has been computed (enqueued); the last layer of a group frees its buffer."""
        group = slot // self.group_size
        if slot % self.group_size == self.group_size - 1 or slot == len(self.host) - 1:
            self.released[group % 2].record(current_stream(self.device))
