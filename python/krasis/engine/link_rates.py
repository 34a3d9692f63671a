"""The rates decode can read non-resident experts at, measured when a model loads: the CPU experts' DRAM read
rate (by the Rust kernels' own thread pool), the pinned host-to-device copy rate (copy engine: prefill's
streaming) and the rate at which the decode step's gather kernel reads pinned memory (decode's streaming)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import _core
from ..kernels.expert_gather import gather_experts
from ..kernels.expert_layout import ExpertLayout, GPUExperts, empty_experts

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


def gather_gbps(layout: ExpertLayout, device: torch.device, experts: int = 4) -> float:
    """Rate at which ``gather_experts`` reads experts from pinned host memory into VRAM, GB/s (median of 3
    gathers of ``experts`` blocks, 256 MiB in all: a model's own experts may be too small to time a rate)."""
    probe = replace(layout, nbytes=PROBE_BYTES // experts)  # only the bytes per expert matter to a copy
    host = GPUExperts(torch.ones((experts, probe.nbytes), dtype=torch.uint8, pin_memory=True), probe)
    staging = empty_experts(probe, experts, device)
    ids = torch.arange(experts, device=device)
    expert_map = ids.to(torch.int32)
    slots = torch.empty(experts, dtype=torch.int32, device=device)
    return staging.nbytes / _median_seconds(lambda: gather_experts(host, expert_map, ids, staging, slots)) / 1e9
