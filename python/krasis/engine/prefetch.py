"""Prefetching the next MoE layer's likely experts during a one-graph decode step (``kernels.prefetch_decode``).

After MoE layer j's routing, a side stream predicts layer j+1's experts from layer j's normed hidden state: the
``count`` best of those the CPU would otherwise run go to page-locked memory (``HostLink.predictions``), marked with
the handshake. Having answered layer j, the host queues their copies from the pinned expert store into staging
slots on a copy engine, then a write of the handshake's number to a flag (the Rust extension's ``expert_copy``),
while it waits for layer j+1 anyway; PCIe would otherwise idle, and no SM is held by a copy. Layer j+1's routing
marks its pairs whose expert was predicted (``claims``) in the row staged for the host, which skips them; the GPU
waits for the flag, then runs them from the staging slots beside the hot cache's experts. Two sets of slots, maps
and prediction rows alternate between layers, so layer j+1's copy never overwrites what layer j reads.

Stream order inside the graph: the side stream forks from the main stream once layer j's normed hidden state is
computed, beside the layer's routing, and the main stream waits for the prediction (``join``) before it hands layer
j over: the host finds the prediction in place, and layer j+1's work cannot overwrite the hidden state it reads.
A copy that has not landed when layer j+1's GPU experts are due holds them up (``gpu_table`` waits for it before
the resident experts run), and with them the layer: N must be small enough for N experts to cross PCIe within a
layer. The copy reads host DRAM, which the CPU experts read at the same time: a wrong guess costs PCIe time and
some of the CPU's bandwidth, never a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..kernels.expert_layout import GPUExperts
from ..kernels.host_signal import mark_hints, wait_copied
from ..kernels.moe_decode import moe_gemv
from ..kernels.prefetch_decode import predict_experts
from ..models.spec import RouterSpec
from .copy_engine import driver_copies
from .device_sync import current_stream, fork, new_event, on_stream, side_stream, wait_event
from .hybrid_moe import HybridExperts

if TYPE_CHECKING:
    from .graph_link import HostLink

# The link's flags that say which handshake's copies have landed, for MoE layers of even and odd index.
COPIED_FLAGS = (3, 4)


class Prefetcher:
    """The staging slots, maps, side stream and events of prefetching ``count`` experts per MoE layer of ``link``'s
    step (its MoE layers' slots in the runtime, in layer order); ``routers`` are those layers' (router weight [E, H],
    correction bias or None). A RuntimeError when the copies cannot be queued (no usable CUDA driver)."""

    def __init__(self, runtime: HybridExperts, link: HostLink, count: int,
                 routers: list[tuple[torch.Tensor, torch.Tensor | None]], spec: RouterSpec, invert: bool = False):
        self.rt, self.link, self.count, self.slots, self.routers = runtime, link, count, link.slots, routers
        self.spec, self.invert = spec, invert
        device = runtime.device
        experts = runtime.host[0].num_experts
        # the first prefill buffer, idle in decode (DecodeGraphs.step marks it for a later prefill to reload)
        buffer = runtime.streamer.buffers[0]
        if buffer.num_experts < 2 * count:
            raise ValueError(f"prefetching {count} experts a layer needs {2 * count} staging slots; the prefill "
                             f"buffer has {buffer.num_experts}")
        self.staging = [buffer.slice(0, count), buffer.slice(count, 2 * count)]
        self.maps = torch.full((2, experts), -1, dtype=torch.int32, device=device)  # expert -> staging slot
        self.predictions = link.predictions(count)  # per parity: [handshake, expert ids], page-locked
        self.logits = torch.empty((1, experts), dtype=torch.float32, device=device)
        self.stream = side_stream(device)
        self.predicted = [new_event(device), new_event(device)]
        # the layers whose copies had not landed when the GPU came to them, and the polls it then spent (~1-2 µs each)
        self.late = torch.zeros(2, dtype=torch.int64, device=device)
        # the host's copies: on a copy engine of their own on CUDA, by memcpy elsewhere (the Triton interpreter)
        self.copy_stream = side_stream(device)
        # Where the staging slots lie in the hot cache's storage (the prefill buffers are part of it when lent), the
        # prediction also writes one table of each expert's slot there, resident or staged: the layer's resident and
        # prefetched experts then run in one pair of kernels instead of two (``gpu_table``)
        bases = [_index_in(runtime.hcs.experts, s) if runtime.hcs.capacity else None for s in self.staging]
        self._fused_bases = bases if None not in bases else None
        self.fused = torch.full((2, experts), -1, dtype=torch.int32, device=device) if self._fused_bases else None
        # resolved now, on the caller's thread: a missing driver is said once, not at every step
        self.copies = self._copy_spec()

    def claims(self, j: int) -> torch.Tensor:
        """Expert -> staging slot (int32 [E], -1 where none) of MoE layer ``j``."""
        return self.maps[j % 2]

    def start_step(self) -> None:
        """Nothing is prefetched for the step's first MoE layer."""
        self.maps[0].fill_(-1)

    def predict(self, j: int, h: torch.Tensor, hints: torch.Tensor | None = None,
                mark: Callable[[], None] | None = None) -> None:
        """Once MoE layer ``j``'s normed input ``h`` [1, H] is computed (queued), beside its routing on the side
        stream: predict layer j+1's experts into the page-locked predictions (and the fused table), marked with the
        handshake layer j is about to hand over; with ``hints`` (the host link's, int64 [n]) also the n likeliest
        experts after the prefetched ones, for the host to read ahead, then ``mark`` them. ``join`` before the
        hand-over: the predictions are then in place when the host has answered layer j and queues the copies."""
        nxt = j + 1
        if nxt >= len(self.routers):
            return
        rt, p, slot = self.rt, nxt % 2, self.slots[nxt]
        fork(self.stream, rt.device)
        router, bias = self.routers[nxt]
        with on_stream(self.stream):
            predict_experts(h, router, self.spec, bias, rt.hcs.table[slot], self.logits,
                            self.predictions[p, 1:], self.maps[p], invert=self.invert, hints=hints,
                            fused=self.fused[p] if self.fused is not None else None,
                            fused_base=self._fused_bases[p] if self.fused is not None else 0)
            # the handshake layer j hands over next (the signal kernel counts it)
            mark_hints(self.link.seq, self.predictions[p], ahead=1)
            if mark is not None:
                mark()
            self.predicted[p].record(self.stream)

    def join(self, j: int) -> None:
        """The main stream waits for MoE layer ``j``'s prediction (of layer j+1) before it hands layer j over: the host
        reads it with the row, and layer j+1's work overwrites the hidden state it reads."""
        if j + 1 < len(self.routers):
            wait_event(current_stream(self.rt.device), self.predicted[(j + 1) % 2])

    def gpu_table(self, j: int) -> torch.Tensor | None:
        """For MoE layer ``j``'s hot-cache experts (``HybridExperts.gpu_part``): the table of its resident and
        prefetched experts' slots in the hot cache's storage, the copies waited for first; None where the staging
        slots lie elsewhere (``run_claimed`` then runs the prefetched ones) or nothing was prefetched (j = 0)."""
        if j == 0 or self.fused is None:
            return None
        p = j % 2
        wait_copied(self.link.seq, self.link.flags, COPIED_FLAGS[p], late=self.late)
        return self.fused[p]

    def run_claimed(self, j: int, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    out: torch.Tensor) -> None:
        """MoE layer ``j``'s pairs whose expert was prefetched, from the staging slots, added into ``out``
        (float32 [1, H]); nothing where ``gpu_table`` had them run with the resident ones."""
        if j == 0 or self.fused is not None:
            return
        p = j % 2
        wait_copied(self.link.seq, self.link.flags, COPIED_FLAGS[p], late=self.late)
        moe_gemv(h, self.staging[p], weights, ids, out=out, accumulate=True, slot_of=self.maps[p])

    def _copy_spec(self) -> tuple:
        """What the host's side (``serve_decode_graph``'s ``prefetch``) queues the copies with: the predictions, each
        MoE layer's experts in the pinned store, the staging slots, the flags and, on CUDA, the driver's entry
        points with the copy stream."""
        host, flags = self.rt.host, self.link.flags
        driver = tuple(driver_copies(self.copy_stream)) if self.copy_stream is not None else None
        return (self.predictions.numpy(), [layer.raw.data_ptr() for layer in host], host[0].row_stride,
                tuple(s.raw.data_ptr() for s in self.staging), self.staging[0].row_stride, host[0].layout.nbytes,
                tuple(flags.data_ptr() + 8 * i for i in COPIED_FLAGS), driver)


def _index_in(storage: GPUExperts, part: GPUExperts) -> int | None:
    """The slot of ``storage`` where ``part``'s first expert lies, when ``part`` is a run of its slots (else None)."""
    raw, sub = storage.raw, part.raw
    offset, stride = sub.data_ptr() - raw.data_ptr(), raw.stride(0)
    if sub.device != raw.device or offset < 0 or offset % stride or sub.stride(0) != stride:
        return None
    first = offset // stride
    return first if first + part.num_experts <= storage.num_experts else None
