"""Routed experts of a model whose experts do not fit in VRAM, run where each is cheapest.

Prefill (many tokens): every layer's experts are streamed through VRAM (ExpertStreamer) and run by the
grouped GPU kernel. Decode (few tokens): experts resident in the hot-expert cache run on the GPU while the
others run on the CPU through the Rust ExpertStore, at the same time; only the hidden state, routing
decisions and the CPU's result cross PCIe."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._core import ExpertStore, GgufExpertStore
from ..kernels import GPUExperts, copy_experts, empty_experts, fused_moe
from ..kernels.expert_gather import gather_experts
from ..kernels.moe_decode import moe_gemv
from ..kernels.route_decode import StreamSplit
from .decode_modes import DECODE_MODES, MAX_READ_AHEAD, READ_AHEAD, AutoSplit, streamed_count
from .device_sync import current_stream, join, new_event, pinned
from .expert_stream import ExpertStreamer
from .hot_cache import UPDATE_EVERY, HotExpertCache

if TYPE_CHECKING:
    from .prefetch import Prefetcher

# Up to this many tokens a forward is a decode step (hot cache + CPU); above it the layer's experts are
# streamed to the GPU. Streaming one layer costs ~its expert bytes over PCIe, which only pays off once
# a chunk touches most experts with many tokens each.
DECODE_MAX_TOKENS = 32
# auto: a gap longer than this between one-token forwards is not a decode step (the host did something else)
MAX_STEP_SECONDS = 1.0
# a decode step's CPU side gives up when the GPU has not staged the next layer within this many seconds
GRAPH_TIMEOUT = 30.0
# Decode keeps the first slots of each prefill buffer for its own staging, and lends the rest to the hot cache:
# 2 x PREFETCH_MAX of the first buffer (prefetch), DECODE_STAGING of the second (experts streamed per step).
PREFETCH_MAX = 8
DECODE_STAGING = 16


class HybridExperts:
    """All MoE layers' routed experts: the page-locked expert store's layers in host memory (``host``, for
    streaming and the hot cache), the CPU store (for decode: the cache's ExpertStore, or a GGUF's GgufExpertStore,
    both indexed by MoE layer), and the statistics that say how decode was served."""

    def __init__(self, host: list[GPUExperts], store: ExpertStore | GgufExpertStore, group_size: int, hcs_slots: int,
                 device: torch.device, lend_buffers: bool = True, extra_slots: int = 0):
        """``lend_buffers``: the hot cache also holds experts in prefill's buffers between prompts, and in up to
        ``extra_slots`` more slots allocated between prompts (in the memory prefill's activations take)."""
        self.host, self.store, self.device = host, store, torch.device(device)
        e = host[0].num_experts if host else 0
        per_buffer = group_size * e
        # staging slots of decode in the first buffer (prefetch) and the second (streamed experts): all of each,
        # except where the hot cache is lent the rest
        self.prefetch_slots = min(per_buffer, 2 * PREFETCH_MAX) if lend_buffers else per_buffer
        self.staging_slots = min(per_buffer, DECODE_STAGING) if lend_buffers else per_buffer
        if host and lend_buffers:
            # one allocation: the hot cache's own slots, then prefill's two buffers, whose slots past decode's
            # staging the cache holds experts in between prompts
            base = min(hcs_slots, len(host) * e)
            storage = empty_experts(host[0].layout, base + 2 * per_buffer, self.device)
            buffers = [storage.slice(base + i * per_buffer, base + (i + 1) * per_buffer) for i in range(2)]
            lendable = [*range(base + self.prefetch_slots, base + per_buffer),
                        *range(base + per_buffer + self.staging_slots, base + 2 * per_buffer)]
            self.streamer = ExpertStreamer(host, group_size, self.device, buffers=buffers)
            extra_slots = max(0, min(extra_slots, len(host) * e - base - len(lendable)))  # no more than all experts
            self.hcs = HotExpertCache(host, hcs_slots, self.device, storage=storage, lendable=lendable,
                                      extra_slots=extra_slots)
        else:
            self.streamer = ExpertStreamer(host, group_size, self.device)
            self.hcs = HotExpertCache(host, hcs_slots, self.device)
        hidden, k_max = store.hidden, DECODE_MAX_TOKENS
        # pinned staging: [x | routing weights | ids (| flags)] of a decode step in, the CPU experts' output back
        pin = pinned(self.device)
        self._in = torch.empty(k_max, hidden + 3 * 64, dtype=torch.float32, pin_memory=pin)
        self._y = torch.empty(k_max, hidden, dtype=torch.float32, pin_memory=pin)
        self._in_np, self._y_np = self._in.numpy(), self._y.numpy()  # host-side views, no torch ops per step
        self._staged = new_event(self.device)
        self.streaming = False
        # running totals since load (the server's /v1/timing reports a request's share)
        self.counters = {"decode_layer_steps": 0, "routed_calls": 0, "routed_calls_on_gpu": 0,
                         "routed_calls_streamed": 0, "decode_bytes_streamed": 0,
                         "prefetched_experts": 0, "routed_calls_prefetched": 0,
                         # experts hinted for reading ahead (read in part or whole), of those the CPU's, bytes read
                         "experts_read_ahead": 0, "read_ahead_used": 0, "bytes_read_ahead": 0,
                         "cpu_expert_seconds": 0.0, "wait_for_gpu_seconds": 0.0,
                         "prefetch_queue_seconds": 0.0}  # the host queuing the prefetch's copies
        # decode's streamed experts go to the second prefill buffer (idle during decode), mapped expert -> slot
        self.gpu_share = 0.0  # share of the non-resident experts streamed (set_decode_mode)
        self._decode_steps = 0  # one-token forwards since load
        self.hcs_update_every = UPDATE_EVERY  # decode steps between the hot cache's updates
        self.auto: AutoSplit | None = None  # "auto": picks gpu_share by the time of whole decode steps
        self._last_step: float | None = None  # when the last one-token forward began (auto)
        self._last_copying = False  # whether the hot cache's copies were in flight then
        self._staging = self.streamer.buffers[1].slice(0, self.staging_slots) if host else None
        self._stage_map = torch.full((max(e, 1),), -1, dtype=torch.int32, device=self.device)
        self._stage_map_host = torch.full((max(e, 1),), -1, dtype=torch.int32, pin_memory=pin)
        # The one-graph step (decode_graph) streams, of each layer's routed pairs neither resident nor prefetched,
        # streamed_count(n, gpu_share) of them, chosen by its routing kernel (``stream_split``), which writes their
        # map (``_stream_map``: expert -> its own index, -1 elsewhere) for a copy kernel inside the graph
        # (``pcie_gather``, then ``pcie_run``) and flags them in the row staged for the host.
        # ``_not_cpu`` tells the host which experts are resident (>= 0): the others are its own unless flagged.
        self._stream_share = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._stream_map = torch.full((max(e, 1),), -1, dtype=torch.int32, device=self.device)
        self._not_cpu = np.full((len(host), max(e, 1)), -1, dtype=np.int64)
        self._split_key: tuple[int, float] | None = None
        self._pcie_slots: torch.Tensor | None = None  # which staging slot holds each routed pair's expert
        # experts of the next MoE layer prefetched per layer in one-graph decode steps (engine.prefetch); invert:
        # the least likely ones instead (a wrong prediction on purpose, for tests and benchmarks)
        self.prefetch = 0
        self.prefetch_invert = False
        # experts of the next MoE layer the host reads ahead per layer in one-graph decode steps (0: off)
        self.read_ahead = READ_AHEAD
        # set by the loader: what owns ``host``'s memory (engine.store_memory), and whether the host-side embedding
        # table is page-locked too (decode graphs then read each step's token row themselves)
        self.host_memory = None
        self.embed_registered = False

    def set_prefetch(self, count: int, invert: bool = False) -> None:
        """Prefetch ``count`` experts of the next MoE layer per layer in one-graph decode steps (0: off)."""
        if count < 0:
            raise ValueError(f"prefetch must be 0 (off) or a number of experts, not {count}")
        if 2 * count > self.prefetch_slots:
            raise ValueError(f"prefetch {count}: at most {self.prefetch_slots // 2} experts a layer fit the staging "
                             "slots")
        self.prefetch, self.prefetch_invert = count, invert

    def set_read_ahead(self, count: int) -> None:
        """Have the host read ahead the ``count`` likeliest CPU experts of each next MoE layer (0: off)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_READ_AHEAD:
            raise ValueError(f"read-ahead must be 0 (off) to {MAX_READ_AHEAD} experts, not {count}")
        self.read_ahead = count

    def set_decode_mode(self, mode: str, cpu_gbps: float | None = None, stream_gbps: float | None = None) -> None:
        """Where decode runs the non-resident experts (DECODE_MODES); "hybrid" needs both rates (GB/s: the CPU
        kernels' DRAM reads, the GPU's streaming from pinned memory) and streams the share stream / (cpu + stream)
        of them; "auto" tries shares and keeps the fastest (AutoSplit)."""
        if mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
        self.auto, self._last_step = None, None
        if mode == "hybrid":
            if not cpu_gbps or not stream_gbps:
                raise ValueError("decode mode 'hybrid' needs the measured CPU and GPU streaming rates")
            self.gpu_share = stream_gbps / (cpu_gbps + stream_gbps)
        elif mode == "auto":
            self.auto = AutoSplit()
            self.gpu_share = self.auto.share
        else:
            self.gpu_share = 1.0 if mode == "gpu" else 0.0

    def layer(self, slot: int) -> HybridExpertLayer:
        return HybridExpertLayer(self, slot)

    def begin_forward(self, num_tokens: int) -> None:
        """Called before each forward pass over ``num_tokens`` new tokens."""
        self.streaming = num_tokens > DECODE_MAX_TOKENS
        if self.auto is not None:
            self._time_step(num_tokens)
        if num_tokens == 1 and self.hcs.capacity:
            # the hot cache follows decode's routing: a few swaps every UPDATE_EVERY steps, copied in the background
            # and added to the tables at the start of the first step after their copies landed
            self.hcs.install_copied()
            self._decode_steps += 1
            if self._decode_steps % self.hcs_update_every == 0:
                self.hcs.update_between_steps()
        if num_tokens == 1:
            self._refresh_split()
            if self.gpu_share > 0:  # a one-graph step may stage experts in the second prefill buffer
                self.streamer.loaded[1] = None
        if self.streaming:
            self._take_lent_back()  # refilled after the prompt
            # decode may have used the buffers for streamed or prefetched experts: their copies wait for that work
            for released in self.streamer.released:
                released.record(current_stream(self.device))
            self.streamer.begin_pass()

    def _refresh_split(self) -> None:
        """Bring the streamed share on the device and ``_not_cpu`` up to date with gpu_share and the hot cache
        (the share queued on the current stream; nothing to do when neither changed)."""
        key = (self.hcs.version, self.gpu_share)
        if key == self._split_key or not self.host:
            return
        self._split_key = key
        self._stream_share.fill_(self.gpu_share)
        self._not_cpu = np.where(self.hcs.table_host >= 0, 0, -1)

    def stream_split(self, slot: int) -> StreamSplit:
        """What a one-graph step's routing of MoE layer ``slot`` needs to choose its streamed experts."""
        return StreamSplit(self.hcs.table[slot], self._stream_share, self._stream_map)

    def _time_step(self, num_tokens: int) -> None:
        """auto: one-token forwards that follow one another are decode steps; the time between their starts
        (sampling and the host's work included) is what the split is judged by. A step that began or ended with
        the hot cache's copies in flight (the refill after a prompt: ~2 GB on the bench model) is not timed: those
        copies slow every share, the first tried most."""
        now, copying = time.perf_counter(), self.hcs.copying
        if (num_tokens == 1 and self._last_step is not None and now - self._last_step < MAX_STEP_SECONDS
                and not (copying or self._last_copying)):
            self.auto.observe(now - self._last_step)
            self.gpu_share = self.auto.share
        self._last_step = now if num_tokens == 1 else None
        self._last_copying = copying

    def end_prefill(self) -> None:
        """After a prompt: lend the prefill buffers (and the extra slots' memory) to the hot cache again and refill
        it from the routing counts seen so far, the copies in the background behind the first decode steps."""
        if self.hcs.lend(True):
            self.streamer.loaded = [None, None]  # what prefill left in the buffers is about to be overwritten
            # a pass cut short (an error mid-prompt) may leave a group's copy in flight into the buffers
            join(self.streamer.copy_stream, self.device)
        # copied behind the first decode steps, which run the experts not yet in on the CPU
        self.hcs.refill(background=True)

    @contextmanager
    def hot_cache_lent_back(self) -> Iterator[None]:
        """The memory the hot cache borrows (prefill's buffers, the extra slots) handed back for the duration, then
        lent and refilled (in the background) again: room for a decode graph's capture, whose eager warm-up
        allocates beyond the plan (cuBLAS workspaces, the attention's split partials of a new length)."""
        lent = self.hcs.lent
        if lent:
            self._take_lent_back()
            self._refresh_split()  # the host serves this step's experts with the table as it is now
        try:
            yield
        finally:
            if lent:
                self.end_prefill()
                self._refresh_split()

    def _take_lent_back(self) -> None:
        """The hot cache gives back the prefill buffers' slots and the extra slots' memory: their experts leave it,
        and what the buffers held is no longer known."""
        if self.hcs.lend(False):
            self.streamer.loaded = [None, None]

    def forward(self, slot: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        weights = weights.float()
        if self.streaming:
            experts = self.streamer.acquire(slot)
            y = fused_moe(x, experts, weights, ids)
            self.streamer.release(slot)
            self.hcs.record_gpu(slot, ids)
            return y
        return self._decode(slot, x, weights, ids)

    def _decode(self, slot: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Stage the CPU's inputs first so the copy is not queued behind the GPU experts' kernels.
        self.stage(x, weights, ids)
        self._staged.record()
        y = self.gpu_part(slot, x, weights, ids)
        self.wait(self._staged)
        cpu_ids, streamed = self.split(slot, x.shape[0], ids.shape[1])
        if streamed:
            y_s = self.streamed_part(x, weights, ids)
            y = y_s if y is None else y + y_s
        y_cpu = self.cpu_part(slot, x.shape[0], ids.shape[1], cpu_ids)
        if y_cpu is None:
            return y.to(x.dtype)
        y_cpu = y_cpu.to(self.device, non_blocking=True)
        return (y_cpu if y is None else y.float() + y_cpu).to(x.dtype)

    def stage(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """Queue the copy of a decode step's CPU-expert inputs (x [T, H], float weights [T, k], ids [T, k]) to
        pinned host memory. No host sync, fixed shapes: a CUDA graph may hold it."""
        rows = torch.cat((x.float(), weights, ids.float()), dim=1)
        self._in[: rows.shape[0], : rows.shape[1]].copy_(rows, non_blocking=True)

    def staging_rows(self, tokens: int, columns: int) -> torch.Tensor:
        """The pinned rows ``stage`` fills, float32 [tokens, columns], for a kernel to write in place (the device
        reaches page-locked memory directly): no copy queued after it."""
        return self._in[:tokens, :columns]

    def gpu_part(self, slot: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 out: torch.Tensor | None = None, table: torch.Tensor | None = None) -> torch.Tensor | None:
        """The hot-cache experts' share of a decode step, [T, H] bf16, or written to ``out`` (float32 [T, H]);
        experts not resident contribute nothing. None without a hot cache (``out`` untouched). ``table``: the
        layer's slots in the cache's storage to use instead of the cache's own (int32 [E]; a prefetch's, naming
        its staged experts too). No host sync."""
        if not self.hcs.capacity:  # not the slots usable now: a captured graph must serve lent slots later too
            return None
        table = self.hcs.table[slot] if table is None else table
        experts, extra = self.hcs.experts, self.hcs.extra_table
        if out is not None:
            return moe_gemv(x, experts, weights, ids, out=out, extra=extra, slot_of=table)
        slots = table[ids]
        y = fused_moe(x, experts, weights, slots)  # the slots past the storage (extra ones) are skipped here
        if extra is None:
            return y
        # the grouped kernel has no address table: the extra slots' pairs go through the matrix-vector kernels
        in_extra = torch.where(slots >= experts.num_experts, slots, -1)
        return (y.float() + moe_gemv(x, experts, weights, in_extra, extra=extra)).to(torch.bfloat16)

    def wait(self, event) -> None:
        """Block until ``event`` (a decode step's staged copy) has happened, counting the time waited."""
        start = time.perf_counter()
        event.synchronize()
        self.counters["wait_for_gpu_seconds"] += time.perf_counter() - start

    def split(self, slot: int, t: int, k: int) -> tuple[np.ndarray | None, bool]:
        """Once the staged copy has landed: decide where each routed expert of the step runs. Resident ones ran
        in gpu_part; of the others, the decode mode's share is copied into the staging buffer now (queued on the
        current stream, with its expert -> slot map) for streamed_part, and the rest is left to the CPU.
        Returns (the ids for cpu_part, -1 where not the CPU's; None when the CPU has nothing), and whether any
        expert was streamed."""
        h = self.store.hidden
        ids = self._in_np[:t, h + k: h + 2 * k].astype(np.int64)
        resident = self.hcs.table_host[slot][ids] >= 0
        hits = self.hcs.record_step([slot] * t, ids)
        c = self.counters
        c["decode_layer_steps"] += 1
        c["routed_calls"] += ids.size
        c["routed_calls_on_gpu"] += hits
        streamed = np.zeros_like(resident)
        if self.gpu_share > 0 and not resident.all():
            others, uses = np.unique(ids[~resident], return_counts=True)
            n = min(streamed_count(len(others), self.gpu_share), self.staging_slots)
            chosen = others[np.argsort(-uses, kind="stable")[:n]]  # the most used ones save the most CPU work
            if len(chosen):
                self._stream_in(slot, chosen)
                streamed = np.isin(ids, chosen)
                c["routed_calls_streamed"] += int(streamed.sum())
        rest = ~(resident | streamed)
        return (np.where(rest, ids, -1) if rest.any() else None), bool(streamed.any())

    def _stream_in(self, slot: int, experts: np.ndarray) -> None:
        """Queue the copies of ``experts`` of MoE layer ``slot`` into staging slots 0.. and the map to them."""
        # the staging buffer is the second prefill buffer: prefill must re-copy it, and wait for decode's use
        self.streamer.loaded[1] = None
        for j, e in enumerate(experts.tolist()):
            copy_experts(self._staging.slice(j, j + 1), self.host[slot].slice(e, e + 1))
        self.counters["decode_bytes_streamed"] += len(experts) * (self.host[slot].nbytes // self.host[slot].num_experts)
        mapping = self._stage_map_host.numpy()
        mapping[:] = -1
        mapping[experts] = np.arange(len(experts), dtype=np.int32)
        self._stage_map.copy_(self._stage_map_host, non_blocking=True)

    def streamed_part(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      add_to: torch.Tensor | None = None) -> torch.Tensor:
        """The streamed experts' share of a decode step, [T, H] bf16, or added into ``add_to`` (float32 [T, H])
        (others contribute nothing). No host sync, fixed addresses: a CUDA graph may hold it."""
        if add_to is not None:
            return moe_gemv(x, self._staging, weights, ids, out=add_to, accumulate=True, slot_of=self._stage_map)
        return fused_moe(x, self._staging, weights, self._stage_map[ids])

    def cpu_part(self, slot: int, t: int, k: int, cpu_ids: np.ndarray | None) -> torch.Tensor | None:
        """The CPU's share of a decode step (``cpu_ids`` from split), float32 [T, H] in pinned host memory (valid
        until the next call); None when the CPU has nothing to do."""
        if cpu_ids is None:
            return None
        h, c, staged = self.store.hidden, self.counters, self._in_np[:t]
        start = time.perf_counter()
        self._y_np[:t] = self.store.forward(slot, np.ascontiguousarray(staged[:, :h]), cpu_ids,
                                            np.ascontiguousarray(staged[:, h:h + k]))
        c["cpu_expert_seconds"] += time.perf_counter() - start
        return self._y[:t]

    @property
    def cpu_out_row(self) -> torch.Tensor:
        """The pinned row the CPU experts' sum of a one-token step is written to, float32 [1, hidden]."""
        return self._y[:1]

    def serve_graph_step(self, flags: np.ndarray, slots: list[int], ids_out: np.ndarray, count: bool = True,
                         prefetch: Prefetcher | None = None, hints: np.ndarray | None = None) -> None:
        """Answer the handshakes of one decode step captured as a single graph (``kernels.host_signal``): for
        each MoE layer ``slots[j]`` in turn, run its staged experts that are neither resident nor flagged for the
        GPU (prefetched or streamed, ``kernels.route_decode``) on the CPU, write their sum to ``cpu_out_row`` and
        raise ``flags[1]``; then (with ``count``; not for a warm-up) count the step as ``split`` and ``cpu_part``
        would have. ``flags`` is the host view of the graph's flags, ``ids_out`` int64 [layers, k] receives the
        routing; ``prefetch``: the step's prefetch (engine.prefetch), whose predicted experts of each next MoE layer
        the host copies to VRAM having answered a layer; ``hints``: the host view of the link's hints when the step
        writes them (the host then reads those experts ahead)."""
        (cpu_pairs, claimed, cpu_seconds, wait_seconds, hinted, hinted_used, read_ahead_bytes, prefetched,
         prefetch_seconds) = (
            self.store.serve_decode_graph(self._in_np[:1], self._y_np[:1], flags, slots, self._not_cpu, ids_out,
                                          timeout_s=GRAPH_TIMEOUT, claims=True, hints=hints,
                                          prefetch=prefetch.copies if prefetch is not None else None))
        if not count:
            return
        calls = len(slots) * ids_out.shape[1]
        hits = self.hcs.record_step(slots, ids_out[: len(slots)])
        streamed = calls - cpu_pairs - hits - claimed
        c = self.counters
        c["decode_layer_steps"] += len(slots)
        c["routed_calls"] += calls
        c["routed_calls_on_gpu"] += hits
        c["routed_calls_streamed"] += streamed
        c["decode_bytes_streamed"] += streamed * (self.host[0].nbytes // self.host[0].num_experts)
        c["prefetched_experts"] += prefetched
        c["prefetch_queue_seconds"] += prefetch_seconds
        c["routed_calls_prefetched"] += claimed
        c["experts_read_ahead"] += hinted
        c["read_ahead_used"] += hinted_used
        c["bytes_read_ahead"] += read_ahead_bytes
        c["cpu_expert_seconds"] += cpu_seconds
        c["wait_for_gpu_seconds"] += wait_seconds

    def pcie_gather(self, slot: int, ids: torch.Tensor) -> None:
        """Copy the experts of a one-token step's pairs ``ids`` (int [1, k]) that its routing chose to stream
        (``stream_split``) from pinned host memory into staging slots (``gather_experts``), for ``pcie_run``. The
        copy reads PCIe and little else, so it may run on a side stream beside the step's VRAM-bound work. No host
        sync, fixed addresses: a CUDA graph may hold it."""
        k = ids.numel()
        if self._pcie_slots is None or self._pcie_slots.numel() != k:
            self._pcie_slots = torch.full((k,), -1, dtype=torch.int32, device=self.device)
        gather_experts(self.host[slot], self._stream_map, ids, self._pcie_staging(k), self._pcie_slots)

    def pcie_run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, add_to: torch.Tensor) -> torch.Tensor:
        """The pairs that ``pcie_gather`` copied, run from their staging slots and added into ``add_to`` (float32
        [1, H]); queued on a stream that the gather's work is ordered before. No host sync."""
        k = ids.numel()
        return moe_gemv(x, self._pcie_staging(k), weights, self._pcie_slots.view(1, k), out=add_to, accumulate=True)

    def _pcie_staging(self, k: int) -> GPUExperts:
        if k > self.staging_slots:
            raise ValueError(f"a decode step streams up to {self.staging_slots} experts a layer, not {k}")
        return self.streamer.buffers[1].slice(0, k)  # the second prefill buffer's staging slots

    @property
    def cpu_expert_nbytes(self) -> int:
        """Bytes of one routed expert as the CPU reads it (a GGUF store's first MoE layer stands for all)."""
        n = self.store.expert_nbytes
        return n(0) if callable(n) else n

    def nbytes_per_layer(self) -> int:
        return self.host[0].nbytes


class HybridExpertLayer:
    """One MoE layer's view of HybridExperts (the Experts protocol of engine.weights)."""

    def __init__(self, owner: HybridExperts, slot: int):
        self.owner, self.slot = owner, slot

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.owner.forward(self.slot, x, weights, ids)
