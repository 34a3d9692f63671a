"""One generation at a time on a worker thread, requests served in arrival order.

``Generator.start`` queues a request and returns a ``TokenStream``: the worker thread runs ``LLM.stream`` and
hands each token to the event loop; cancelling the stream (client gone, stop string reached) stops the
generation after the token being computed, or before it starts when it is still queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import InvalidInputError

log = logging.getLogger("krasis.server")


def engine_stages(before: dict, after: dict) -> dict:
    """A request's share of the engine's running totals (LLM.engine_counters), with the share of routed-expert
    calls served from VRAM."""
    stages = {k: after[k] - before[k] for k in before}
    calls = stages.get("routed_calls", 0)
    stages["hot_cache_share"] = stages.get("routed_calls_on_gpu", 0) / calls if calls else None
    return stages


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class GenerationStats:
    """Running totals for /metrics (written by the worker thread only)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    # the GPU engine's routed-expert calls in decode: all, served from the VRAM hot cache, copied to the GPU
    routed_calls: int = 0
    routed_calls_hot_cache: int = 0
    routed_calls_streamed: int = 0
    # experts prefetched for the next MoE layer, and the routed calls that found theirs prefetched
    prefetched_experts: int = 0
    routed_calls_prefetched: int = 0
    last_hot_cache_share: float | None = None  # of the last request that made routed calls

    def add_prefill(self, prompt_tokens: int, cached: int, seconds: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached
        self.prefill_seconds += seconds
        self.generated_tokens += 1  # prefill ends with the first new token

    def add_decode(self, seconds: float) -> None:
        self.generated_tokens += 1
        self.decode_seconds += seconds

    def add_engine(self, stages: dict) -> None:
        """A request's engine stages (``engine_stages``)."""
        self.routed_calls += stages.get("routed_calls", 0)
        self.routed_calls_hot_cache += stages.get("routed_calls_on_gpu", 0)
        self.routed_calls_streamed += stages.get("routed_calls_streamed", 0)
        self.prefetched_experts += stages.get("prefetched_experts", 0)
        self.routed_calls_prefetched += stages.get("routed_calls_prefetched", 0)
        if stages.get("hot_cache_share") is not None:
            self.last_hot_cache_share = stages["hot_cache_share"]


class QueueFullError(Exception):
    pass


class TokenStream:
    """Events from the worker: ("cached", n), ("token", id), ("invalid", InvalidInputError), ("error", exc),
    then ("end", None)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pushed_back: list[tuple[str, object]] = []
        self.cancelled = threading.Event()

    def put(self, event: tuple[str, object]) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> tuple[str, object]:
        if self._pushed_back:
            return self._pushed_back.pop()
        return await self._queue.get()

    async def peek(self) -> tuple[str, object]:
        """The first event, left in place (used to answer a bad prompt with an error status before streaming)."""
        event = await self.next()
        self._pushed_back.append(event)
        return event


class Generator:
    """Runs requests on ``llm`` one at a time; at most ``max_queue`` may wait or run at once."""

    def __init__(self, llm, max_queue: int = 64):
        self.llm = llm
        self.max_queue = max_queue
        self.active = 0  # requests queued or running
        self.stats = GenerationStats()
        self._streams: set[TokenStream] = set()  # queued or running
        self.timing_enabled = False  # POST /v1/timing turns it on: each request's stage times are kept
        self.last_timing: dict | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="krasis-generate")

    def start(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        if self.active >= self.max_queue:
            raise QueueFullError(f"{self.active} requests are already waiting or running")
        loop = asyncio.get_running_loop()
        stream = TokenStream(loop)
        self.active += 1
        self._streams.add(stream)
        future = self._executor.submit(self._run, prompt_ids, params, stream, time.perf_counter())

        def finished(_future) -> None:
            try:
                loop.call_soon_threadsafe(self._finished, stream)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        future.add_done_callback(finished)
        return stream

    def _finished(self, stream: TokenStream) -> None:
        self.active -= 1
        self._streams.discard(stream)

    def _run(self, prompt_ids: list[int], params: SamplingParams, stream: TokenStream, queued_at: float) -> None:
        timing = {"queue_seconds": time.perf_counter() - queued_at, "prompt_tokens": len(prompt_ids),
                  "cached_tokens": 0, "prefill_seconds": 0.0, "generated_tokens": 0, "decode_seconds": 0.0,
                  "cancelled": False}
        counters = getattr(self.llm, "engine_counters", dict)
        engine_before = counters()
        try:
            if stream.cancelled.is_set():
                timing["cancelled"] = True
                return
            tokens = self.llm.stream(prompt_ids, max_new_tokens=params.max_tokens, temperature=params.temperature,
                                     top_p=params.top_p, top_k=params.top_k, seed=params.seed, reuse_prefix=True,
                                     min_p=params.min_p, presence_penalty=params.presence_penalty,
                                     frequency_penalty=params.frequency_penalty)
            first = True
            started = time.perf_counter()
            for token in tokens:
                now = time.perf_counter()
                if first:
                    stream.put(("cached", self.llm.last_cached_tokens))
                    self.stats.add_prefill(len(prompt_ids), self.llm.last_cached_tokens, now - started)
                    timing["cached_tokens"] = self.llm.last_cached_tokens
                    timing["prefill_seconds"] = now - started
                    first = False
                else:
                    self.stats.add_decode(now - started)
                    timing["decode_seconds"] += now - started
                timing["generated_tokens"] += 1
                started = now
                stream.put(("token", token))
                if stream.cancelled.is_set():
                    timing["cancelled"] = True
                    tokens.close()
                    break
        except InvalidInputError as e:
            stream.put(("invalid", e))
        except Exception as e:  # reported to the client; the worker carries on with the next request
            log.exception("generation failed")
            stream.put(("error", e))
        finally:
            engine = engine_stages(engine_before, counters()) if engine_before else None
            if engine is not None and engine["routed_calls"]:
                self.stats.add_engine(engine)
                log.info("request: %d prompt tokens, %d generated; hot-expert cache served %.1f%% of %d routed-expert "
                         "calls in decode (%d copied to the GPU, the rest on the CPU)", timing["prompt_tokens"],
                         timing["generated_tokens"], 100 * engine["hot_cache_share"], engine["routed_calls"],
                         engine.get("routed_calls_streamed", 0))
                if engine.get("prefetched_experts"):
                    log.info("request: %d experts prefetched, %d of them routed (%.1f%%)", engine["prefetched_experts"],
                             engine["routed_calls_prefetched"],
                             100 * engine["routed_calls_prefetched"] / engine["prefetched_experts"])
            if self.timing_enabled:  # recorded before "end", so a client that reads it next sees this request
                decoded = timing["generated_tokens"] - 1
                timing["decode_tokens_per_second"] = (decoded / timing["decode_seconds"]
                                                      if decoded > 0 and timing["decode_seconds"] > 0 else None)
                new_prompt = timing["prompt_tokens"] - timing["cached_tokens"]
                timing["prefill_tokens_per_second"] = (new_prompt / timing["prefill_seconds"]
                                                       if timing["prefill_seconds"] > 0 else None)
                if engine is not None:
                    timing["engine"] = engine
                self.last_timing = timing
            stream.put(("end", None))

    def shutdown(self) -> None:
        """Stop the running generation after its current token and drop the queued ones."""
        for stream in list(self._streams):
            stream.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
