"""The rates decode can read non-resident experts at, measured when a model loads: the CPU experts' DRAM read
rate (by the Rust kernels' own thread pool), the pinned host-to-device copy rate (copy engine: prefill's
streaming) and the rate at which the decode step's gather kernel reads pinned memory (decode's streaming)."""

from __future__ import annotations

import torch

from .. import _core
from ..kernels.expert_gather import gather_experts
from ..kernels.gpu_layout import GPUExperts

PROBE_BYTES = 256 << 20


def cpu_read_gbps() -> float:
    """DRAM read rate of the CPU expert kernels' threads, GB/s (best of 3 reads of 256 MiB)."""
    return _core.read_bandwidth(PROBE_BYTES, 3) / 1e9


def h2d_gbps(device: torch.device) -> float:
    """Pinned host-to-device copy rate to ``device``, GB/s (median of 3 copies of 256 MiB)."""
    host = torch.ones(PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
    return PROBE_BYTES / _median_seconds(lambda: dev.copy_(host, non_blocking=True)) / 1e9

def _median_seconds(run, repeats: int = 3) -> float:
    """Median GPU time of ``run()`` over ``repeats`` runs, after one untimed run."""
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gather_gbps(device: torch.device, experts: int = 4) -> float:
    """Rate at which ``gather_experts`` reads experts from pinned host memory into VRAM, GB/s (median of 3
    gathers of ``experts`` experts, 256 MiB in all)."""
    shape = (experts, PROBE_BYTES // (4 * experts))
    parts = [torch.ones(shape, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
    host = GPUExperts(*parts, bits=4, group=128)
    staging = GPUExperts(*(torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(4)), bits=4, group=128)
    ids = torch.arange(experts, device=device)
    expert_map = ids.to(torch.int32)
    slots = torch.empty(experts, dtype=torch.int32, device=device)
    return PROBE_BYTES / _median_seconds(lambda: gather_experts(host, expert_map, ids, staging, slots)) / 1e9
