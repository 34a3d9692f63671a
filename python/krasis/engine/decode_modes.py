"""Where decode runs the routed experts that are not in the hot-expert cache, and how "auto" moves its split.

No heavy imports: the command line offers these modes before anything is loaded."""

from __future__ import annotations

# Where decode runs the routed experts that are not in the hot cache: "cpu" (the Rust kernels), "gpu" (copied
# from pinned memory into VRAM per step and run there), "hybrid" (split between both in proportion to the
# measured DRAM and host-to-device rates, so that both finish together) or "auto" (hybrid's split to start
# with, then moved after every layer step toward the share at which the CPU and the GPU finish together).
DECODE_MODES = ("auto", "cpu", "gpu", "hybrid")
# auto: how far one layer step's timings move the share (a fraction of their relative imbalance)
REBALANCE_RATE = 0.05


def rebalanced_share(share: float, cpu_seconds: float, gpu_seconds: float, rate: float = REBALANCE_RATE) -> float:
    """The GPU's next share of the non-resident experts after a layer step in which the CPU's experts took
    ``cpu_seconds`` and the GPU's (hot-cache and streamed) ``gpu_seconds``: moved toward the side that
    finished first, by ``rate`` times the relative imbalance, within [0, 1]."""
    total = cpu_seconds + gpu_seconds
    if total <= 0:
        return share
    return min(1.0, max(0.0, share + rate * (cpu_seconds - gpu_seconds) / total))
