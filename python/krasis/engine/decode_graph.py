"""Decode steps of the hybrid engine replayed as CUDA graphs.

A decode step launches some 80 small kernels per layer; issued one by one from Python that costs more than
the step's memory traffic. Here each layer's GPU work is captured once into two graphs: "attend" (the
previous layer's sum, attention, the router, and the copy of the CPU experts' inputs to pinned memory) and
"experts" (shared expert and hot-cache experts). The host replays them layer by layer; between the two it
waits only for the staged copy, runs the CPU experts while the GPU runs "experts", and queues the CPU's
result into a fixed device buffer that the next layer's "attend" adds in.

Graphs need fixed shapes and addresses: the position is a device tensor, the KV cache is the one
fixed-capacity cache of the model (its entries written at that position, and the first ``bucket`` entries
attended with the later ones masked), and a set of graphs is captured per bucket (powers of two) when a
sequence first needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from ..ops.mlp import swiglu
from ..ops.norms import rms_norm
from .device_sync import new_event
from .forward import Forward
from .hybrid_moe import HybridExperts
from .kv_cache import KVCache

log = logging.getLogger("krasis")

SMALLEST_BUCKET = 256


def graph_bucket(length: int, capacity: int) -> int:
    """Cache entries a decode step at position ``length - 1`` attends over: the next power of two from
    SMALLEST_BUCKET that holds ``length``, at most ``capacity``."""
    bucket = SMALLEST_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, capacity)


def graphs_unsupported(forward: Forward) -> str | None:
    """Why decode of this hybrid-engine model cannot run as CUDA graphs (None when it can)."""
    if any(layer.mixer != "attention" for layer in forward.spec.layers):
        return "linear-attention layers carry state between steps that is not captured"
    return None


class _Buffers:
    """The fixed device tensors the graphs read and write between replays."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device):
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.x = torch.zeros(1, hidden, dtype=dtype, device=device)  # residual stream before the pending sums
        self.gpu = torch.zeros(1, hidden, dtype=torch.float32, device=device)  # hot-cache experts' share
        self.cpu = torch.zeros(1, hidden, dtype=torch.float32, device=device)  # CPU experts' share
        self.extra = torch.zeros(1, hidden, dtype=dtype, device=device)  # shared expert or dense MLP output
        self.h = torch.zeros(1, hidden, dtype=dtype, device=device)  # normed input of the MoE
        self.weights: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def residual(self) -> torch.Tensor:
        """The residual stream with the last layer's MLP added, as the eager forward sums it."""
        return self.x + ((self.gpu + self.cpu).to(self.x.dtype) + self.extra)


class _Replay(Protocol):
    def replay(self) -> None: ...


class _Eager:
    """Stands in for a captured graph where there is no CUDA: replay runs the work again."""

    def __init__(self, work: Callable[[], None]):
        self.replay = work


class DecodeGraphs:
    """Captures and replays one-token decode steps of a hybrid-engine model (see the module docstring)."""

    def __init__(self, forward: Forward, runtime: HybridExperts, cache: KVCache):
        self.f, self.rt, self.cache = forward, runtime, cache
        self.device = forward.device
        self.buf = _Buffers(forward.spec.hidden_size, forward.dtype, self.device)
        # Off CUDA (tests, with the Triton interpreter) the same steps run eagerly in place of replays.
        self.capturing = self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.capturing else None
        # per bucket and layer: (attend, experts, streamed); the last two are None for dense layers, and streamed
        # is None where the decode mode streams nothing
        self._graphs: dict[int, list[tuple[_Replay, _Replay | None, _Replay | None]]] = {}
        self._final: dict[int, _Replay] = {}
        self._event = new_event(self.device)
        self._embed_row = torch.empty(forward.spec.hidden_size, dtype=forward.w.embed.dtype,
                                      pin_memory=self.capturing and forward.w.embed.device.type == "cpu")

    # -- the work captured -------------------------------------------------------------------------------------
    def _attend(self, index: int, bucket: int) -> None:
        f, b, layer = self.f, self.buf, self.f.w.layers[index]
        spec = f.spec
        x = b.residual()
        cos, sin = f.rotary.angles(b.position)
        h = rms_norm(x, layer.input_norm, spec.rms_norm_eps, spec.norm_weight_offset)

        def kv(first: torch.Tensor, second: torch.Tensor):
            return self.cache.append_at(index, first, second, b.position, bucket)

        x = x + f.attention(layer, h, kv, b.position, cos, sin)
        h = rms_norm(x, layer.post_attention_norm, spec.rms_norm_eps, spec.norm_weight_offset)
        b.x.copy_(x)
        b.gpu.zero_()
        b.cpu.zero_()
        if layer.experts is None:
            m = layer.mlp
            b.extra.copy_(swiglu(h, m["gate"], m["up"], m["down"]))
            return
        weights, ids = f.route(layer, h)
        b.h.copy_(h)
        b.weights, b.ids = weights.float(), ids
        self.rt.stage(h, b.weights, ids)

    def _experts(self, index: int) -> None:
        f, b, layer = self.f, self.buf, self.f.w.layers[index]
        shared = f.shared_expert(layer, b.h)
        if shared is None:
            b.extra.zero_()
        else:
            b.extra.copy_(shared)
        gpu = self.rt.gpu_part(layer.experts.slot, b.h, b.weights, b.ids)
        if gpu is not None:
            b.gpu.copy_(gpu)

    def _streamed(self, index: int) -> None:
        b = self.buf
        b.gpu.add_(self.rt.streamed_part(b.h, b.weights, b.ids).float())

    def _final_norm(self) -> None:
        f, b = self.f, self.buf
        hidden = rms_norm(b.residual(), f.w.final_norm, f.spec.rms_norm_eps, f.spec.norm_weight_offset)
        logits = f.logits(hidden)
        if b.logits is None:
            b.logits = torch.empty_like(logits)
        b.logits.copy_(logits)

    # -- capture and replay -------------------------------------------------------------------------------------
    def _capture(self, work: Callable[[], None]) -> _Replay:
        if not self.capturing:
            return _Eager(work)
        # one eager run first (on a side stream, as torch asks) compiles the Triton kernels and warms cuBLAS
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            work()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            work()
        return graph

    def _capture_bucket(self, bucket: int) -> None:
        graphs = []
        for index, layer in enumerate(self.f.w.layers):
            attend = self._capture(lambda i=index: self._attend(i, bucket))
            experts = streamed = None
            if layer.experts is not None:
                experts = self._capture(lambda i=index: self._experts(i))
                if self.rt.gpu_share > 0:
                    streamed = self._capture(lambda i=index: self._streamed(i))
            graphs.append((attend, experts, streamed))
        self._final[bucket] = self._capture(self._final_norm)
        self._graphs[bucket] = graphs
        log.info("decode CUDA graphs captured for up to %d cached tokens (%d layers)", bucket, len(graphs))

    def _set_input(self, token: int) -> None:
        """The token's embedding as the residual stream, nothing pending from a previous layer."""
        b, embed = self.buf, self.f.w.embed
        if embed.device.type == "cpu":  # through a pinned row, so the copy to the GPU is asynchronous
            self._embed_row.copy_(embed[token])
            b.x.copy_(self._embed_row[None], non_blocking=True)
        else:
            b.x.copy_(embed[token][None])
        for pending in (b.gpu, b.cpu, b.extra):
            pending.zero_()

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, vocab] of ``token`` at ``position`` (the cache holds positions before it); extends the
        cache."""
        b, rt = self.buf, self.rt
        bucket = graph_bucket(position + 1, self.cache.capacity)
        b.position.fill_(position)
        if bucket not in self._graphs:
            self._capture_bucket(bucket)  # its warm-up runs write the buffers: the input is set after it
        self._set_input(token)
        rt.begin_forward(1)
        k = self.f.spec.moe.router.top_k
        for (attend, experts, streamed), layer in zip(self._graphs[bucket], self.f.w.layers, strict=True):
            attend.replay()
            if experts is None:
                continue
            self._event.record()
            experts.replay()
            rt.wait(self._event)
            cpu_ids, any_streamed = rt.split(layer.experts.slot, 1, k)
            if any_streamed:
                streamed.replay()
            y = rt.cpu_part(layer.experts.slot, 1, k, cpu_ids)
            if y is not None:
                b.cpu.copy_(y, non_blocking=True)
        self._final[bucket].replay()
        self.cache.length = position + 1
        return b.logits
