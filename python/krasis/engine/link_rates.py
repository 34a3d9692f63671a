"""The two rates decode can read non-resident experts at, measured when a model loads: the CPU experts' DRAM
read rate (by the Rust kernels' own thread pool) and the pinned host-to-device copy rate."""

from __future__ import annotations

import torch

from .. import _core

PROBE_BYTES = 256 << 20


def cpu_read_gbps() -> float:
    """DRAM read rate of the CPU expert kernels' threads, GB/s (best of 3 reads of 256 MiB)."""
    return _core.read_bandwidth(PROBE_BYTES, 3) / 1e9


def h2d_gbps(device: torch.device) -> float:
    """Pinned host-to-device copy rate to ``device``, GB/s (median of 3 copies of 256 MiB)."""
    host = torch.ones(PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
    dev.copy_(host)  # the first copy maps the pages
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return PROBE_BYTES / sorted(times)[1] / 1e9
