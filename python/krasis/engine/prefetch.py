"""Prefetching the next MoE layer's likely experts during a one-graph decode step (``kernels.prefetch_decode``).

After MoE layer j's routing, a side stream predicts layer j+1's experts from layer j's normed hidden state and
copies the ``count`` best of those the CPU would otherwise run into staging slots, while the host computes layer
j's CPU experts and PCIe would otherwise idle. Layer j+1's routing marks its pairs whose expert was prefetched
(``claims``) in the row staged for the host, which skips them; the GPU runs them from the staging slots beside
the hot cache's experts. Two sets of slots and maps alternate between layers, so layer j+1's copy never
overwrites what layer j reads.

Stream order inside the graph: the side stream forks from the main stream once layer j's inputs are handed to the
host; the main stream waits for the prediction (``predicted``) before layer j+1 overwrites the hidden state it
reads and stages the claims, and for the copy (``copied``) where layer j+1's claimed experts run, after the host
has its inputs. A copy that outlasts the host's work on layer j+1 delays the GPU's answer-wait of that layer and
so the next layer: N must be small enough for N experts to cross PCIe within a layer. The copy reads host DRAM,
which the CPU experts read at the same time: a wrong guess costs PCIe time and some of the CPU's bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.moe_decode import moe_gemv
from ..kernels.prefetch_decode import copy_predicted, predict_experts
from ..models.spec import RouterSpec
from .device_sync import current_stream, fork, new_event, on_stream, side_stream, wait_event
from .hybrid_moe import HybridExperts


class Prefetcher:
    """The staging slots, maps, side stream and events of prefetching ``count`` experts per MoE layer.
    ``slots`` are the MoE layers' slots in the runtime and ``routers`` their (router weight [E, H], correction
    bias or None), both in layer order."""

    def __init__(self, runtime: HybridExperts, count: int, slots: list[int],
                 routers: list[tuple[torch.Tensor, torch.Tensor | None]], spec: RouterSpec, invert: bool = False):
        self.rt, self.count, self.slots, self.routers = runtime, count, slots, routers
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
        self.ids = torch.full((2, count), -1, dtype=torch.int64, device=device)
        self.logits = torch.empty((1, experts), dtype=torch.float32, device=device)
        self.stream = side_stream(device)
        self.predicted = [new_event(device), new_event(device)]
        self.copied = [new_event(device), new_event(device)]

    def claims(self, j: int) -> torch.Tensor:
        """Expert -> staging slot (int32 [E], -1 where none) of MoE layer ``j``."""
        return self.maps[j % 2]

    def start_step(self) -> None:
        """Nothing is prefetched for the step's first MoE layer."""
        self.maps[0].fill_(-1)

    def before_layer(self, j: int) -> None:
        """Before the work that leads to MoE layer ``j``'s routing: its prediction must be done (it reads the
        hidden state that work overwrites, and writes the claims the routing stages)."""
        if 0 < j < len(self.routers):  # (dense layers after the last MoE layer have nothing to wait for)
            wait_event(current_stream(self.rt.device), self.predicted[j % 2])

    def predict(self, j: int, h: torch.Tensor, hints: torch.Tensor | None = None,
                mark: Callable[[], None] | None = None) -> None:
        """Once MoE layer ``j``'s inputs are handed to the host (``h`` its normed input [1, H]): on the side
        stream, predict and copy layer j+1's experts; with ``hints`` (the host link's, int64 [n]) also the n likeliest
        experts after the prefetched ones, for the host to read ahead, then ``mark`` them as this handshake's
        (before the main stream may signal the next handshake: it waits for the prediction)."""
        nxt = j + 1
        if nxt >= len(self.routers):
            return
        rt, p, slot = self.rt, nxt % 2, self.slots[nxt]
        fork(self.stream, rt.device)
        router, bias = self.routers[nxt]
        with on_stream(self.stream):
            predict_experts(h, router, self.spec, bias, rt.hcs.table[slot], self.logits,
                            self.ids[p], self.maps[p], invert=self.invert, hints=hints)
            if mark is not None:
                mark()
            self.predicted[p].record(self.stream)
            copy_predicted(rt.host[slot], self.ids[p], self.staging[p])
            self.copied[p].record(self.stream)

    def run_claimed(self, j: int, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    out: torch.Tensor) -> None:
        """MoE layer ``j``'s pairs whose expert was prefetched, from the staging slots, added into ``out``
        (float32 [1, H])."""
        if j == 0:
            return
        p = j % 2
        wait_event(current_stream(self.rt.device), self.copied[p])
        moe_gemv(h, self.staging[p], weights, self.maps[p][ids], out=out, accumulate=True)
