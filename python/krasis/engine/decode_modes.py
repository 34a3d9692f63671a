"""Where decode runs the routed experts that are not in the hot-expert cache, and how "auto" picks its split.

No heavy imports: the command line offers these modes before anything is loaded."""

from __future__ import annotations

import statistics

# Where decode runs the routed experts that are not in the hot cache: "cpu" (the Rust kernels), "gpu" (copied
# from pinned memory into VRAM per step and run there), "hybrid" (split between both in proportion to the
# measured DRAM and GPU streaming rates) or "auto" (the split that decodes fastest on this machine, found by
# timing whole decode steps; see AutoSplit).
DECODE_MODES = ("auto", "cpu", "gpu", "hybrid")

# Experts of each next MoE layer the host reads into its caches while the GPU runs that layer's attention, as the
# GPU predicts them (graph_link); 0: off. About the CPU's share of a layer's experts on the bench model (top-6,
# ~45% not resident); measured: the CPU experts' time per token 2-26% lower, decode +5% on average
# (benchmarks/RESULTS.md).
READ_AHEAD = 3
MAX_READ_AHEAD = 8  # the most the link's hint buffer holds


def streamed_count(n: int, share: float) -> int:
    """How many of a layer's ``n`` non-resident experts a step streams at ``share``: n * share rounded half up
    (the one-graph step's routing kernel rounds alike, ``kernels.route_decode``)."""
    return int(n * share + 0.5)


# A candidate this much slower than the fastest tried so far ends the round's trials of larger shares.
GIVE_UP = 1.1


class AutoSplit:
    """Chooses the GPU's share of the non-resident experts (each layer streams ``streamed_count`` of its own) by
    the wall time of whole decode steps.

    The rates measured at load do not predict a step's time well: per-call costs (launching copies, waking CPU
    threads, the host waiting on the GPU) are a large part of it. So the candidates are tried in turn (smallest
    first), each for ``trial_steps`` steps after one step to settle, until one is more than GIVE_UP times slower
    than the fastest so far, and the fastest (median step time) is kept; every
    ``revisit_every`` steps its neighbours are tried again, so the choice follows what the context length and the
    hot cache do to the costs. ``observe`` takes each step's seconds; ``share`` is the share to use next."""

    # Shares whose rounded counts differ where it matters on a top-6 model with ~3 experts a layer off VRAM:
    # streamed of n = 1..6: 0.2 -> 0,0,1,1,1,1; 0.35 -> 0,1,1,1,2,2; 0.5 -> 1,1,2,2,3,3 (streamed_count).
    CANDIDATES = (0.0, 0.2, 0.35, 0.5, 0.75, 1.0)

    def __init__(self, trial_steps: int = 4, revisit_every: int = 256):
        self.trial_steps, self.revisit_every = trial_steps, revisit_every
        self.best: float | None = None  # the share kept after the last round of trials
        self.times: dict[float, float] = {}  # median step seconds of each candidate in the current round
        self._queue = list(self.CANDIDATES)  # candidates still to try in this round
        self._samples: list[float] = []
        self._since_round = 0

    @property
    def share(self) -> float:
        return self._queue[0] if self._queue else self.best

    def observe(self, seconds: float) -> None:
        """One decode step of the current share took ``seconds``."""
        if not self._queue:
            self._since_round += 1
            if self._since_round >= self.revisit_every:
                i = self.CANDIDATES.index(self.best)
                self._start_round(list(self.CANDIDATES[max(i - 1, 0): i + 2]))
            return
        self._samples.append(seconds)
        if len(self._samples) > self.trial_steps:  # the first step after a switch settles it and is not counted
            share = self._queue.pop(0)
            self.times[share] = statistics.median(self._samples[1:])
            self._samples = []
            if self.times[share] > GIVE_UP * min(self.times.values()):
                # step time rises with the share past its best (one link saturates), so larger shares would only
                # be slower: trials of them cost whole slow steps
                self._queue = [s for s in self._queue if s < share]
            if not self._queue:
                self.best = min(self.times, key=self.times.__getitem__)
                self._since_round = 0

    def _start_round(self, candidates: list[float]) -> None:
        self.times, self._queue, self._samples = {}, candidates, []
