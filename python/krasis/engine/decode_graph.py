"""Decode steps of the hybrid engine replayed as CUDA graphs, built from one-launch decode kernels.

A step is one graph: every layer, with each MoE layer handing its routing to the host through mapped pinned
memory and waiting for the sum of the host's experts (``graph_link``): those neither resident in VRAM nor
flagged for the GPU in the staged row. The host replays it and then answers the layers' handshakes in turn from
the Rust extension, so Python does nothing per layer. The experts a step streams (the routing kernel picks
``streamed_count`` of each layer's non-resident ones, ``kernels.route_decode``) are copied by a kernel straight
from pinned host memory into staging slots (``HybridExperts.pcie_gather``, on a side stream beside the shared
and resident experts: it reads PCIe, they read VRAM), then run from there: no copies to queue, so nothing for
the host to decide between layers.

``one_graph = False`` keeps the earlier design, measured as a baseline: each MoE layer's GPU work is captured into
three graphs, "attend" (the previous layer's sums, attention, the router, and the copy of the CPU experts' inputs
to pinned memory), "experts" (shared expert and hot-cache experts) and "streamed" (experts the host copied to the
GPU this step); the host replays them layer by layer, after "attend" waits for the staged copy, queues the
step's expert copies and "streamed", runs the CPU experts while the GPU works, and queues their result.

Inside a graph a kernel still costs a few microseconds however small its work, and for one token nearly all
of them are small; so the step uses fused kernels where torch would launch many: the residual sums with each
RMSNorm (``kernels.fused_norm``), rotary embedding (``kernels.rotary``, angles once per step), the KV write
(``kernels.kv_write``), MLA attention over the cache as stored (``kernels.mla_decode``), routing with the
staging row (``kernels.route_decode``) and the routed experts as matrix-vector kernels (``kernels.moe_decode``).
Their roundings follow the eager forward's; sums are reduced in other orders, so steps agree with eager decode
to rounding, not bit for bit.

Graphs need fixed shapes and addresses: the position is a device tensor, the KV cache is the one
fixed-capacity cache of the model (its entries written at that position, and the first ``bucket`` entries
attended with the later ones masked), and a set of graphs is captured per bucket (powers of two) when a
sequence first needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import NamedTuple, Protocol

import torch

from ..kernels.embed_lookup import embed_token
from ..kernels.fused_norm import add_rms_norm
from ..kernels.greedy_choice import GreedyChoice
from ..kernels.mla_decode import mla_decode_attention
from ..kernels.rotary import rotary_pair
from ..kernels.route_decode import flag_pairs, fusable, route_and_stage, staged_columns
from ..models.spec import MLASpec
from ..ops.linear import linear
from ..ops.mlp import swiglu
from .device_sync import fork, join, new_event, on_stream, side_stream
from .forward import MLA_NORM_EPS, Forward
from .graph_link import GPUGaveUp, HostLink
from .hybrid_moe import HybridExperts
from .kv_cache import KVCache
from .prefetch import Prefetcher

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

    def __init__(self, hidden: int, rope_dim: int, top_k: int, dtype: torch.dtype, device: torch.device):
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # the step's input token (whole-step graphs look its embedding up themselves), then the token it chose
        # (greedy), and the (position, chosen token) the graph copies to the host at its end
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.chosen = torch.zeros(2, dtype=torch.long, pin_memory=device.type == "cuda")
        self.cos = torch.zeros(1, rope_dim // 2, dtype=torch.float32, device=device)  # the step's rotary angles
        self.sin = torch.zeros(1, rope_dim // 2, dtype=torch.float32, device=device)
        self.x = torch.zeros(1, hidden, dtype=dtype, device=device)  # residual stream before the pending sums
        # the routed experts' pending shares, zeroed together: [0] GPU (hot cache, streamed), [1] CPU
        self.shares = torch.zeros(2, 1, hidden, dtype=torch.float32, device=device)
        self.gpu, self.cpu = self.shares[0], self.shares[1]
        self.extra = torch.zeros(1, hidden, dtype=dtype, device=device)  # shared expert or dense MLP output
        self.h = torch.zeros(1, hidden, dtype=dtype, device=device)  # normed input of the MoE
        # the routing of the current MoE layer: written by "attend", read by "experts" and "streamed". Every tensor
        # one graph leaves for another must be allocated here: a tensor allocated during a capture holds nothing
        # until the graph is replayed, and the next graph's warm-up run would read it
        self.weights = torch.zeros(1, max(top_k, 1), dtype=torch.float32, device=device)
        self.ids = torch.zeros(1, max(top_k, 1), dtype=torch.int64, device=device)
        self.logits: torch.Tensor | None = None  # allocated by the first (eager) warm-up run


class _Launched(NamedTuple):
    """A step ``DecodeGraphs.launch`` queued: where, its end event, its ticket, and what serving it runs."""

    position: int
    done: object
    ticket: int
    work: Callable[[], None]
    prefetch: Prefetcher | None
    read_ahead: int


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
        spec = forward.spec
        self.buf = _Buffers(spec.hidden_size, spec.rope.dim, spec.moe.router.top_k if spec.moe else 0, forward.dtype,
                            self.device)
        # Off CUDA (tests, with the Triton interpreter) the same steps run eagerly in place of replays.
        self.capturing = self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.capturing else None
        # per bucket and layer: (attend, experts, streamed); the last two are None for dense layers
        self._graphs: dict[int, list[tuple[_Replay, _Replay | None, _Replay | None]]] = {}
        self._final: dict[int, _Replay] = {}
        # per (bucket, whether any expert is read over PCIe, the prefetch's (count, invert) or None, the experts a
        # layer read ahead): the whole step as one graph, meeting the host through ``link``
        self._steps: dict[tuple[int, bool, tuple[int, bool] | None, int], _Replay] = {}
        self._prefetchers: dict[tuple[int, bool], Prefetcher | None] = {}
        moe = [layer.experts.slot for layer in forward.w.layers if layer.experts is not None]
        self.link = HostLink(runtime, moe, spec.moe.router.top_k, self.device) if moe else None
        # (router weight, correction bias or None) of each MoE layer, in order (prefetch and read-ahead predict)
        self._routers = [(layer.mlp["router"], layer.mlp.get("router_bias")) for layer in forward.w.layers
                         if layer.experts is not None]
        # decided once (read-ahead asks every step): group-limited routing is not predicted
        self._predictable = all(fusable(spec.moe.router, r) for r, _ in self._routers) if moe else False
        self.one_graph = True  # False: replay layer by layer, streaming through copies (the earlier design)
        self._event = new_event(self.device)
        self._gather_stream = side_stream(self.device)  # the PCIe share's copies, beside the VRAM-bound work
        self._shared_stream = side_stream(self.device)  # the shared expert, beside the routed ones (``_experts``)
        self._embed_row = torch.empty(spec.hidden_size, dtype=forward.w.embed.dtype,
                                      pin_memory=self.capturing and forward.w.embed.device.type == "cpu")
        # whole-step graphs start from the token id on the device when they can read the embedding table: in
        # VRAM, page-locked host memory, or anywhere off CUDA (the interpreter reads host tensors)
        embed = forward.w.embed
        self._graph_input = embed.device == self.device or not self.capturing or runtime.embed_registered
        self._token_row = torch.zeros(1, dtype=torch.long, pin_memory=self.capturing)
        self._warm_stream: torch.cuda.Stream | None = None  # where captures' warm-up runs go (``_capture``)
        self._choose: GreedyChoice | None = None  # the in-graph greedy choice's scratch (the first run makes it)
        self._done = [new_event(self.device), new_event(self.device)]  # a launched step's end, by parity
        self._launched: _Launched | None = None  # the step launch() queued and serve() has not run
        self._tickets = 0
        self._served: tuple[int, object] | None = None  # the same of the step serve() finished
        self._kept: tuple[int, int] | None = None  # (position, choice) of a served step, read before a capture

    # -- the work captured -------------------------------------------------------------------------------------
    def _whole_steps_unsupported(self) -> str | None:
        """Why this model's decode steps are not whole-step graphs meeting the host (None when they are)."""
        if self.link is None:
            return "the model has no MoE layer with experts outside VRAM"
        if not self.one_graph:
            return "decode steps replay each layer's graphs (one_graph off)"
        return None

    def prefetch_unsupported(self) -> str | None:
        """Why this model's decode steps cannot prefetch experts (None when they can)."""
        if (why := self._whole_steps_unsupported()) is not None:
            return why
        if not self._predictable:
            return "group-limited routing is not predicted"
        return None

    def _read_ahead(self) -> int:
        """The experts a layer the host is to read ahead this step (0 when off, when every non-resident expert is
        read over PCIe, or when routing cannot be predicted); with a prefetch, those ranked after its experts."""
        rt = self.rt
        if not rt.read_ahead or rt.gpu_share >= 1 or self.prefetch_unsupported() is not None:
            return 0
        return rt.read_ahead

    def _prefetcher(self) -> Prefetcher | None:
        """The prefetch the runtime asks for (``HybridExperts.prefetch``), or None when off or unsupported."""
        rt = self.rt
        # with every non-resident expert read over PCIe (gpu_share 1) nothing is left to predict
        if not rt.prefetch or rt.gpu_share >= 1:
            return None
        key = rt.prefetch, rt.prefetch_invert
        if key not in self._prefetchers:
            # decided once: steps reach here only as one graph, and the model's routers do not change
            pf = None
            if self.prefetch_unsupported() is None:
                try:
                    pf = Prefetcher(rt, self.link, rt.prefetch, self._routers, self.f.spec.moe.router,
                                    invert=rt.prefetch_invert)
                except RuntimeError as e:  # the copies cannot be queued: decode goes on without prefetch
                    log.warning("expert prefetch is off: %s", e)
            self._prefetchers[key] = pf
        return self._prefetchers[key]

    def late_copies(self) -> tuple[int, int]:
        """Over every prefetch so far: how many MoE layers found their prefetched experts' copies not yet landed when
        the GPU came to run them, and the polls it spent waiting for them (~1-2 µs each). Waits for the device, so not
        while a launched step waits to be served."""
        if self._launched is not None:
            raise RuntimeError("late_copies() waits for the device: serve the launched step first")
        late = [pf.late for pf in self._prefetchers.values() if pf is not None]
        if not late:
            return 0, 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        layers, polls = torch.stack(late).sum(dim=0).tolist()
        return int(layers), int(polls)

    def _attend(self, index: int, bucket: int, whole: bool = False, claims: torch.Tensor | None = None,
                pcie: bool = False, beside_routing: Callable[[], None] | None = None) -> None:
        """Layer ``index`` up to its experts' inputs: attention, then (MoE) routing and the row staged for the host;
        a ``whole`` step's rows carry each pair's flag (the prefetch's ``claims``; the experts it streams, with
        ``pcie``). ``beside_routing`` queues work that reads the MoE's normed input, once it is there."""
        f, b, layer = self.f, self.buf, self.f.w.layers[index]
        spec = f.spec
        eps, offset = spec.rms_norm_eps, spec.norm_weight_offset
        if index == 0:  # one set of rotary angles serves every layer of the step
            cos, sin = f.rotary.angles(b.position)
            b.cos.copy_(cos)
            b.sin.copy_(sin)
        # the previous layer's pending sums join the residual stream (in place; the routed shares are zeroed for
        # this layer's), and the attention's input norm
        _, h = add_rms_norm(b.x, layer.input_norm, eps, offset, a=b.gpu, b=b.cpu, c=b.extra, x_out=b.x,
                            clear_ab=True)
        if isinstance(spec.attention, MLASpec):
            out = self._mla(index, layer, h, bucket)
        else:
            def kv(first: torch.Tensor, second: torch.Tensor):
                return self.cache.append_at(index, first, second, b.position, bucket)

            out = f.attention(layer, h, kv, b.position, b.cos, b.sin)
        if layer.experts is None:
            _, h = add_rms_norm(b.x, layer.post_attention_norm, eps, offset, c=out, x_out=b.x)
            m = layer.mlp
            b.extra.copy_(swiglu(h, m["gate"], m["up"], m["down"]))
            return
        add_rms_norm(b.x, layer.post_attention_norm, eps, offset, c=out, x_out=b.x, y=b.h)
        if beside_routing is not None:
            beside_routing()
        router, m = spec.moe.router, layer.mlp
        split = self.rt.stream_split(layer.experts.slot) if pcie else None
        staged = self.rt.staging_rows(1, staged_columns(b.h.shape[1], router.top_k, whole))
        if fusable(router, m["router"]):
            route_and_stage(b.h, m["router"], router, m.get("router_bias"), out=(b.weights, b.ids), flags=whole,
                            claims=claims, split=split, staged=staged)
        else:
            weights, ids = f.route(layer, b.h)
            b.weights.copy_(weights)
            b.ids.copy_(ids)
            self.rt.stage(b.h, b.weights, b.ids)
            if whole:
                flag_pairs(b.ids, self.rt.hcs.num_experts, staged[0, -router.top_k:], claims=claims, split=split)

    def _mla(self, index: int, layer, h: torch.Tensor, bucket: int) -> torch.Tensor:
        """Multi-head latent attention of one token in the absorbed form, reading the cache in place."""
        a, w, b = self.f.spec.attention, layer.attention, self.buf
        dn, r = a.qk_nope_head_dim, a.kv_lora_rank
        interleaved = self.f.spec.rope.interleaved
        if "q" in w:
            q = linear(h, w["q"])
        else:
            q = linear(add_rms_norm(linear(h, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], MLA_NORM_EPS)[1], w["q_b"])
        q = q.view(a.num_heads, dn + a.qk_rope_head_dim)
        ckv = linear(h, w["kv_a"], w.get("kv_a_bias"))
        latent = add_rms_norm(ckv[:, :r], w["kv_a_norm"], MLA_NORM_EPS)[1]
        k_pe, q_pe = rotary_pair(ckv[:, None, r:], q[None, :, dn:], b.cos, b.sin, interleaved)  # one launch
        k_pe, q_pe = k_pe[:, 0], q_pe[0]
        self.cache.write_at(index, latent, k_pe, b.position)
        kv_b = w["kv_b"].view(a.num_heads, dn + a.v_head_dim, r)
        q_lat = torch.bmm(q[:, None, :dn], kv_b[:, :dn, :])[:, 0]  # [heads, r]
        latent_all, kpe_all, latent_scale, kpe_scale = self.cache.storage(index)
        out_lat = mla_decode_attention(q_lat, q_pe, latent_all, latent_scale, kpe_all, kpe_scale, b.position, bucket,
                                       a.softmax_scale, out_dtype=h.dtype)
        out = torch.bmm(out_lat[:, None, :], kv_b[:, dn:, :].transpose(1, 2))  # [heads, 1, v]
        return linear(out.reshape(1, -1), w["o"], w.get("o_bias"))

    def _experts(self, index: int, pcie: bool = False, pf: Prefetcher | None = None, j: int = 0) -> None:
        """Layer ``index``'s GPU experts (shared, resident, streamed with ``pcie``, and what ``pf`` prefetched for
        it, the ``j``-th MoE layer)."""
        f, b, layer = self.f, self.buf, self.f.w.layers[index]
        if pcie:  # the gather reads PCIe, the shared and resident experts VRAM: side by side, on two streams
            fork(self._gather_stream, self.device)
            with on_stream(self._gather_stream):
                self.rt.pcie_gather(layer.experts.slot, b.ids)
        # The shared expert beside the routed ones: for one token each is a few small kernels that leave most SMs
        # idle, and the routed ones may first wait for a prefetch's copies
        fork(self._shared_stream, self.device)
        with on_stream(self._shared_stream):
            shared = f.shared_expert(layer, b.h)
            if shared is None:
                b.extra.zero_()
            else:
                b.extra.copy_(shared)
        table = pf.gpu_table(j) if pf is not None else None
        self.rt.gpu_part(layer.experts.slot, b.h, b.weights, b.ids, out=b.gpu, table=table)
        if pcie:
            join(self._gather_stream, self.device)
            self.rt.pcie_run(b.h, b.weights, b.ids, add_to=b.gpu)
        if pf is not None:
            pf.run_claimed(j, b.h, b.weights, b.ids, out=b.gpu)
        join(self._shared_stream, self.device)

    def _streamed(self, index: int) -> None:
        b = self.buf
        self.rt.streamed_part(b.h, b.weights, b.ids, add_to=b.gpu)

    def _whole_step(self, bucket: int, pcie: bool, pf: Prefetcher | None = None, read_ahead: int = 0) -> None:
        b, j = self.buf, 0  # j: the MoE layer's index among the MoE layers
        if self._graph_input:
            embed_token(self.f.w.embed, b.token, b.x)
            b.shares.zero_()
            b.extra.zero_()
        if pf is not None:
            pf.start_step()
        for index, layer in enumerate(self.f.w.layers):
            moe = layer.experts is not None
            predict = None
            if pf is not None and moe:  # on a side stream beside the routing, joined before the hand-over
                hints = self.link.hints[1: 1 + read_ahead] if read_ahead else None  # ranked after the prefetched
                predict = partial(pf.predict, j, b.h, hints=hints,
                                  mark=partial(self.link.mark_hints, ahead=1) if read_ahead else None)
            self._attend(index, bucket, whole=True, claims=pf.claims(j) if pf is not None and moe else None,
                         pcie=pcie and moe, beside_routing=predict)
            if not moe:
                continue
            if pf is not None:
                pf.join(j)
            self.link.hand_over()
            if pf is None and read_ahead:  # the host reads these while the GPU runs layer j + 1's attention
                self.link.hint(j, b.h, self._routers, self.f.spec.moe.router, read_ahead)
            self._experts(index, pcie, pf, j)
            self.link.take_back(b.cpu)
            j += 1
        self._final_norm()
        if self._graph_input:  # the greedy choice, for a next step launched before the host has seen it
            if self._choose is None:
                self._choose = GreedyChoice(b.logits.numel(), self.device)
            self._choose(b.logits, b.position, b.token, b.chosen)

    def _final_norm(self) -> None:
        f, b = self.f, self.buf
        hidden = add_rms_norm(b.x, f.w.final_norm, f.spec.rms_norm_eps, f.spec.norm_weight_offset, a=b.gpu, b=b.cpu,
                              c=b.extra)[1]
        logits = f.logits(hidden)
        if b.logits is None:
            b.logits = torch.empty_like(logits)
        b.logits.copy_(logits)

    # -- capture and replay -------------------------------------------------------------------------------------
    def _capture(self, work: Callable[[], None], linked: bool = False, prefetch: Prefetcher | None = None,
                 read_ahead: int = 0) -> _Replay:
        """``work`` as a graph (or its eager stand-in); ``linked`` work hands layers to the host (``link``), whose
        rows carry claims when the step prefetches (``prefetch``, whose copies it queues), and which reads
        ``read_ahead`` hinted experts a layer ahead."""
        if not self.capturing:
            return _Eager(work)
        # one eager run first (on a side stream, as torch asks) compiles the Triton kernels and warms cuBLAS; the
        # same stream every time: cuBLAS keeps a workspace (32 MiB) per stream it ran on, so a new stream per
        # capture took another workspace out of the VRAM budget each time
        if self._warm_stream is None:
            self._warm_stream = torch.cuda.Stream(self.device)
        side = self._warm_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if linked:  # the host answers from another thread: an eager run may wait for the GPU on the way
                self.link.run(work, threaded=True, count=False, prefetch=prefetch, read_ahead=read_ahead)
            else:
                work()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            work()
        return graph

    def _room_for_capture(self) -> AbstractContextManager:
        """Around a capture on CUDA: the hot cache's borrowed memory handed back meanwhile (the plan lends it all
        between prompts, and a capture's warm-up allocates beyond the plan)."""
        return self.rt.hot_cache_lent_back() if self.capturing else nullcontext()

    def _capture_bucket(self, bucket: int) -> None:
        graphs = []
        for index, layer in enumerate(self.f.w.layers):
            attend = self._capture(lambda i=index: self._attend(i, bucket))
            experts = streamed = None
            if layer.experts is not None:
                experts = self._capture(lambda i=index: self._experts(i))
                # captured whatever the decode mode now, so that the mode may change later
                streamed = self._capture(lambda i=index: self._streamed(i))
            graphs.append((attend, experts, streamed))
        self._final[bucket] = self._capture(self._final_norm)
        self._graphs[bucket] = graphs
        log.info("decode CUDA graphs captured for up to %d cached tokens (%d layers)", bucket, len(graphs))

    def _capture_step(self, key: tuple[int, bool, tuple[int, bool] | None, int], pf: Prefetcher | None) -> None:
        """The whole step of ``_steps``' ``key`` (bucket, PCIe reads, prefetch, read-ahead) captured, with prefetch
        ``pf``."""
        bucket, pcie, _, read_ahead = key
        self._steps[key] = self._capture(lambda: self._whole_step(bucket, pcie, pf, read_ahead), linked=True,
                                         prefetch=pf, read_ahead=read_ahead)
        log.info("decode CUDA graph of the whole step captured for up to %d cached tokens (CPU experts answered "
                 "through mapped memory%s%s%s)", bucket, ", some experts read over PCIe" if pcie else "",
                 f", {pf.count} experts of each next MoE layer prefetched" if pf is not None else "",
                 f", the host reads {read_ahead} likely experts of each next MoE layer ahead" if read_ahead else "")

    def _set_input(self, token: int, whole_step: bool) -> None:
        """The token's embedding as the residual stream, nothing pending from a previous layer (a whole step that
        looks the embedding up itself gets the token's id)."""
        if whole_step and self._graph_input:
            self.set_token(token)
            return
        b, embed = self.buf, self.f.w.embed
        if embed.device.type == "cpu":  # through a pinned row, so the copy to the GPU is asynchronous
            self._embed_row.copy_(embed[token])
            b.x.copy_(self._embed_row[None], non_blocking=True)
        else:
            b.x.copy_(embed[token][None])
        b.shares.zero_()
        b.extra.zero_()

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, vocab] of ``token`` at ``position`` (the cache holds positions before it); extends the
        cache."""
        if self.one_graph and self.link is not None:
            key, pf, read_ahead = self._prepare(position)
            self._set_input(token, whole_step=True)
            self.link.run(self._steps[key].replay, threaded=not self.capturing,
                          prefetch=pf, read_ahead=read_ahead)
        else:
            bucket = self._begin(position)
            if bucket not in self._graphs:
                with self._room_for_capture():
                    self._capture_bucket(bucket)
            self._set_input(token, whole_step=False)
            self._layer_by_layer(bucket)
        self.cache.length = position + 1
        return self.buf.logits

    def _begin(self, position: int) -> int:
        """Start the step at ``position``: its position on the device, the runtime told; returns its bucket."""
        self.buf.position.fill_(position)
        self.rt.begin_forward(1)  # may change the decode mode's split ("auto")
        return graph_bucket(position + 1, self.cache.capacity)

    def _prepare(self, position: int) -> tuple[tuple, Prefetcher | None, int]:
        """Set up the whole step at ``position``: its key in ``_steps`` (captured now if new), prefetch, read-ahead.
        A capture keeps the device's input token (a pipelined step's) and the last served step's choice."""
        rt = self.rt
        bucket = self._begin(position)
        self.link.check()
        pf = self._prefetcher()
        read_ahead = self._read_ahead()
        # a step that reads no expert over PCIe leaves its kernels out
        key = bucket, rt.gpu_share > 0, (pf.count, pf.invert) if pf is not None else None, read_ahead
        if pf is not None:  # its staging slots are in the first prefill buffer: a later prefill copies it afresh
            rt.streamer.loaded[0] = None
        if key not in self._steps:  # its warm-up run writes the buffers
            self._keep_choice()
            token = self.buf.token.clone()
            with self._room_for_capture():
                self._capture_step(key, pf)
            self.buf.token.copy_(token)
        return key, pf, read_ahead

    # -- pipelined greedy decode -----------------------------------------------------------------------------
    def pipeline_unsupported(self) -> str | None:
        """Why a step cannot be launched before the host has seen the previous step's token (None when it can:
        ``launch``, ``serve``, ``chosen``)."""
        if (why := self._whole_steps_unsupported()) is not None:
            return why
        if not self._graph_input:
            return "the GPU cannot read the embedding table (its host memory is not page-locked)"
        return None

    def set_token(self, token: int) -> None:
        """The input token of the next launched step (otherwise the last step's greedy choice, on the device)."""
        self._token_row[0] = token
        self.buf.token.copy_(self._token_row, non_blocking=True)

    def launch(self, position: int) -> int:
        """Queue the whole step at ``position`` on the token the device holds (``set_token``, or the greedy choice
        of the step queued before) and return: ``serve`` runs its CPU experts, ``chosen`` then reads its choice.
        The step may be queued before the previous one has ended; a step whose token turns out unwanted (EOS) is
        served with ``extend=False`` (``discard``). Off CUDA the step runs in ``serve``. Returns the step's ticket
        (for ``discard``)."""
        key, pf, read_ahead = self._prepare(position)
        replay, done = self._steps[key].replay, self._done[position % 2]

        def work() -> None:
            replay()
            done.record()

        self._tickets += 1
        self._launched = _Launched(position, done, self._tickets, work, pf, read_ahead)
        if self.capturing:
            self.link.launch(work, self._launched.prefetch, read_ahead)
        return self._tickets

    def serve(self, extend: bool = True) -> None:
        """Run the CPU experts of the step ``launch`` queued, to its last MoE layer; with ``extend`` the cache then
        counts its position (without, the step is one not wanted: its entries lie past the cache's length)."""
        if self._launched is None:
            raise RuntimeError("decode pipeline: no step is queued to serve (launch one first)")
        step, self._launched = self._launched, None
        self._kept = None  # a choice read before a capture belongs to the step served before this one
        if self.capturing:
            self.link.serve(count=extend)
        else:
            self.link.run(step.work, threaded=True, count=extend, prefetch=step.prefetch, read_ahead=step.read_ahead)
        self._served = step.position, step.done
        if extend:
            self.cache.length = step.position + 1

    def queued(self, ticket: int) -> bool:
        """Whether the step of ``ticket`` is still queued (not served, nor discarded by another caller)."""
        return self._launched is not None and self._launched.ticket == ticket

    def discard(self, ticket: int | None = None) -> None:
        """Serve, unextended, the step ``launch`` queued (only if it is the one of ``ticket``, when given): a step
        queued on a token that ended its generation, or left by a generation its caller abandoned. A step the
        GPU gave up waiting for (its host away too long) resets the link instead of raising: its work is unused."""
        if self._launched is None or (ticket is not None and not self.queued(ticket)):
            return
        try:
            self.serve(extend=False)
        except GPUGaveUp:
            pass

    def _keep_choice(self) -> None:
        """Read the last served step's (position, choice) now (waiting for its end), unless already read: before
        anything else writes the buffer it is read from."""
        if self._served is not None and (self._kept is None or self._kept[0] != self._served[0]):
            self._served[1].synchronize()
            self._kept = tuple(self.buf.chosen.tolist())

    def chosen(self) -> int:
        """The greedy choice of the step ``serve`` finished last (waits for the step's end)."""
        self._keep_choice()
        (at, token), position = self._kept, self._served[0]
        if at != position:
            raise RuntimeError(f"decode pipeline: the chosen token read back is for position {at}, not {position}")
        return token

    def _layer_by_layer(self, bucket: int) -> None:
        """A step whose decode mode streams experts: the host decides each MoE layer's copies between graphs."""
        b, rt = self.buf, self.rt
        k = self.f.spec.moe.router.top_k if self.f.spec.moe else 0
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
