"""The handshake between a decode step captured as one CUDA graph and the host that runs its CPU experts.

With a whole step (every layer) in one graph, the host's only work per layer is the CPU experts: no Python
replays a layer's graphs, waits on an event or queues a copy. The graph cannot call the host, so the two meet
in mapped pinned memory (``kernels.host_signal``): after staging a MoE layer's inputs the graph raises a flag
and runs the layer's GPU experts; the host, spinning on the flag inside the Rust extension, runs the other
experts and raises the answer flag; the graph, spinning on that, copies the CPU's sum in and goes on.

With read-ahead, the graph also predicts during each MoE layer's handshake which experts the next MoE layer will
send to the CPU (``hints``, ``kernels.prefetch_decode.predict_experts``), and the host reads their weights into
its caches while the GPU runs that layer's attention (``warm`` in the Rust extension).

Launching a graph of a whole step (several hundred nodes) holds the calling thread for a millisecond or more,
longer than the GPU takes to reach the first MoE layer. So a replay is launched from a second, long-lived thread
while this one already waits for the first handshake: the launch overlaps the GPU's work instead of delaying the
CPU experts of the first layer.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels.host_signal import RELEASED, mark_hints, signal_host, wait_host
from ..kernels.prefetch_decode import predict_experts
from .decode_modes import MAX_READ_AHEAD
from .device_sync import current_stream, on_stream, pinned
from .hybrid_moe import HybridExperts

if TYPE_CHECKING:
    from .prefetch import Prefetcher


class GPUGaveUp(RuntimeError):
    """The graph stopped waiting for the host's answer (the host away too long): the step's output is not to be
    trusted, and the link has been reset."""


class HostLink:
    """Flags, handshake counter and routing record of the one-graph decode step of ``runtime``'s MoE layers
    (``slots``, in layer order)."""

    def __init__(self, runtime: HybridExperts, slots: list[int], top_k: int, device: torch.device):
        self.rt, self.slots, self.device = runtime, slots, device
        # [0] staged, [1] answered, [2] gave up (kernels.host_signal); [3], [4] the prefetch's copies landed
        self.flags = torch.zeros(5, dtype=torch.int64, pin_memory=pinned(device))
        self._flags = self.flags.numpy()  # the host's view of the same memory
        self.seq = torch.zeros(1, dtype=torch.int64, device=device)
        self.ids = np.zeros((len(slots), top_k), dtype=np.int64)  # the last step's routing, per MoE layer
        # [0] the handshake the hints were written in, then the next MoE layer's likely CPU experts (-1: none)
        self.hints = torch.full((1 + MAX_READ_AHEAD,), -1, dtype=torch.int64, pin_memory=pinned(device))
        self._hints = self.hints.numpy()
        self._predict_scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # logits, (unused) expert -> slot
        self._predictions: dict[int, torch.Tensor] = {}  # a prefetch's predicted experts, by count (``predictions``)
        self._launcher: _Launcher | None = None
        self._to_serve: tuple[Prefetcher | None, np.ndarray | None] = (None, None)  # what ``launch`` left for ``serve``

    def predictions(self, count: int) -> torch.Tensor:
        """Page-locked int64 [2, 1 + count] where a prefetch of ``count`` experts a layer writes, per parity of the
        next MoE layer's index, the handshake and then its predicted experts (-1: none) for the host to copy."""
        if count not in self._predictions:
            self._predictions[count] = torch.zeros((2, 1 + count), dtype=torch.int64, pin_memory=pinned(self.device))
        return self._predictions[count]

    # -- inside the graph ----------------------------------------------------------------------------------------
    def hand_over(self) -> None:
        """The layer's inputs are staged (queued before this): let the host start."""
        signal_host(self.seq, self.flags)

    def hint(self, j: int, h: torch.Tensor, routers: list, spec, count: int) -> None:
        """After MoE layer ``j``'s hand-over: predict the ``count`` likeliest experts of MoE layer j + 1 that it will
        send to the CPU (its router, ``routers[j + 1]`` = (weight, correction bias), applied to layer j's normed
        input ``h`` [1, H]; not resident) into ``hints``, then mark them with the handshake."""
        if j + 1 >= len(self.slots):
            return
        slot, (router, bias) = self.slots[j + 1], routers[j + 1]
        if self._predict_scratch is None:
            experts = router.shape[0]
            self._predict_scratch = (torch.empty((1, experts), dtype=torch.float32, device=self.device),
                                     torch.empty(experts, dtype=torch.int32, device=self.device))
        logits, expert_slot = self._predict_scratch
        predict_experts(h, router, spec, bias, self.rt.hcs.table[slot], logits,
                        self.hints[1: 1 + count], expert_slot)
        self.mark_hints()

    def mark_hints(self, ahead: int = 0) -> None:
        """The hints written by work queued before this (on the same stream) belong to the current handshake (with
        ``ahead`` = 1, to the next one, queued before its hand-over)."""
        mark_hints(self.seq, self.hints, ahead)

    def take_back(self, out: torch.Tensor) -> None:
        """Wait for the host's answer and copy its sum (float32 [1, hidden]) into ``out`` (one launch)."""
        wait_host(self.seq, self.flags, src=self.rt.cpu_out_row, dst=out)

    # -- on the host ---------------------------------------------------------------------------------------------
    def run(self, work: Callable[[], None], threaded: bool, count: bool = True, prefetch: Prefetcher | None = None,
            read_ahead: int = 0) -> None:
        """Run ``work`` (one step's GPU part) with the host answering its handshakes: after it on this thread
        when ``work`` only queues (a graph replay: ``launch`` then ``serve``), or on a second thread meanwhile when
        ``work`` may wait for the GPU on the way (an eager warm-up, the Triton interpreter). A warm-up is not
        ``count``ed; ``prefetch``: the step's prefetch (its staged rows then carry claims, and the host queues its
        copies); ``read_ahead``: the experts a layer ``work`` hints (``hint``) for the host to read ahead."""
        if not threaded:
            self.launch(work, prefetch, read_ahead)
            self.serve(count)
            return
        try:
            self._serve_beside(work, count, prefetch, self._hints[: 1 + read_ahead] if read_ahead else None)
        except BaseException:
            self._abort()
            raise
        self.check()

    def launch(self, work: Callable[[], None], prefetch: Prefetcher | None = None, read_ahead: int = 0) -> None:
        """Queue ``work`` (a replay; ``prefetch`` and ``read_ahead`` as in ``run``) from the launcher thread, on this
        thread's stream, and return: ``serve`` answers its handshakes. The launch overlaps the GPU's work."""
        if self._launcher is None:
            self._launcher = _Launcher()
        self._to_serve = prefetch, self._hints[: 1 + read_ahead] if read_ahead else None
        self._launcher.start(work, current_stream(self.device))

    def serve(self, count: bool = True) -> None:
        """Answer the handshakes of the work ``launch`` queued, until its last MoE layer; a failed launch is raised
        in place of the wait it caused, and any failure resets the link."""
        prefetch, hints = self._to_serve
        try:
            try:
                self.rt.serve_graph_step(self._flags, self.slots, self.ids, count, prefetch, hints)
            except BaseException as served:
                launched = self._launcher.finish(raise_error=False)
                if launched is not None:
                    raise launched from served
                raise
            self._launcher.finish()
        except BaseException:
            self._abort()
            raise
        self.check()

    def _serve_beside(self, work: Callable[[], None], count: bool, prefetch: Prefetcher | None,
                      hints: np.ndarray | None) -> None:
        """Answer the handshakes on a second thread while ``work`` runs on this one."""
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                self.rt.serve_graph_step(self._flags, self.slots, self.ids, count, prefetch, hints)
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)
                self._release_all()  # so that ``work`` does not wait for answers (or copies) forever

        thread = threading.Thread(target=serve, name="krasis-decode-host", daemon=True)
        thread.start()
        try:
            work()
        finally:
            thread.join()
        if errors:
            raise errors[0]

    def check(self) -> None:
        """Raise if the graph gave up waiting for the host (its step's output is not to be trusted)."""
        if self._flags[2]:
            handshake = int(self._flags[2])
            self._abort()
            raise GPUGaveUp(f"decode step: the GPU gave up waiting for the CPU experts (or the prefetch's copies) at "
                            f"handshake {handshake}; "
                            "the step was abandoned and the link reset")

    def _release_all(self) -> None:
        """Let every remaining wait of a step in flight (for answers and for copies) pass at once."""
        self._flags[[1, 3, 4]] = RELEASED

    def _abort(self) -> None:
        """Let a step in flight finish at once (its remaining waits pass), then start both counters afresh."""
        self._release_all()
        if self._launcher is not None:  # its replay queued (or failed) before the GPU is waited for
            self._launcher.settle()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seq.zero_()
        self._flags[:] = 0
        self._hints[0] = 0  # numbered from 1 again: hints and predictions of the old numbering must not match
        for predicted in self._predictions.values():
            predicted[:, 0] = 0


class _Launcher:
    """A daemon thread that runs the work it is handed (graph replays) one at a time, on a given stream. The thread
    holds only the queues, so the launcher (and the graph its last work replayed) can be collected: the thread
    then ends."""

    def __init__(self):
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = False  # work started whose result has not been taken
        threading.Thread(target=_launch_loop, args=(self._todo, self._done), name="krasis-graph-launch",
                         daemon=True).start()
        weakref.finalize(self, self._todo.put, None)

    def start(self, work: Callable[[], None], stream: torch.cuda.Stream | None) -> None:
        self.settle()  # a result left by an interrupted wait belongs to an earlier step
        self.pending = True
        self._todo.put((work, stream))

    def finish(self, raise_error: bool = True) -> BaseException | None:
        """Wait for the work started last; raise its error (or, with ``raise_error`` off, return it)."""
        error = self._done.get()
        self.pending = False
        if error is not None and raise_error:
            raise error
        return error

    def settle(self) -> None:
        """Wait for work still pending, whatever its outcome (after an error or an interrupted wait)."""
        if self.pending:
            self.finish(raise_error=False)


def _launch_loop(todo: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
    """The launcher thread: run each (work, stream) from ``todo``, put its error or None on ``done``; stop at None."""
    while (item := todo.get()) is not None:
        work, stream = item
        try:
            with on_stream(stream):  # the current stream is per thread: the caller's is used
                work()
        except BaseException as e:  # handed back to the caller
            done.put(e)
        else:
            done.put(None)
        del item, work, stream  # nothing of the last step kept alive while waiting for the next
