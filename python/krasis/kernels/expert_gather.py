"""Copy a decode step's chosen routed experts from pinned host memory into VRAM staging slots, inside a graph.

A copy engine needs its source address when the copy is queued, so a CUDA graph cannot copy experts that the
step's own router picks. This kernel can: it reads the routing from device memory and the experts' bytes
straight from pinned host memory (mapped by unified addressing), a few dozen programs each walking its share
of 16 KiB blocks of the experts' bytes (one contiguous run per expert) in wide reads, which keeps PCIe busy.
Slot j receives the expert of routed pair j when ``expert_map[id]`` names one (its index in ``src``), and
``slots[j]`` says which slot holds pair j's expert (-1: none), ready for ``moe_gemv`` over the staging slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .expert_layout import GPUExperts

BLOCK = 4096  # int32 words a program copies (16 KiB)


# Programs copying at once. Each program walks its share of (pair, block) items, so a few dozen keep PCIe
# busy (on an H100, 64 read pinned memory at ~49 GB/s, as fast as 2112 do: benchmarks/pinned_read.py) while the
# other SMs stay free for the kernels beside the copy (the shared and resident experts, on the graph's other
# branch). One program per block (thousands, most waiting on PCIe) held those SMs: the shared expert's linears
# took ~5x longer beside it.
GATHER_PROGRAMS = 64


@triton.jit
def _gather_kernel(ids_ptr, map_ptr, slots_ptr, src, dst, n, stride_src, stride_dst, K: tl.constexpr,
                   BLOCK_K: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        j = tl.arange(0, BLOCK_K)
        e = tl.load(map_ptr + tl.load(ids_ptr + j, mask=j < K, other=0), mask=j < K, other=-1)
        tl.store(slots_ptr + j, tl.where(e >= 0, j, -1).to(tl.int32), mask=j < K)
    # one expert is n words at src + e * stride_src, to dst + j * stride_dst
    chunks = tl.cdiv(n, BLOCK)
    for w in range(pid, K * chunks, PROGRAMS):
        j = w // chunks
        e = tl.load(map_ptr + tl.load(ids_ptr + j)).to(tl.int64)
        if e >= 0:
            offs = (w % chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(dst + j * stride_dst + offs, tl.load(src + e * stride_src + offs, mask=mask), mask=mask)


def expert_words(src: GPUExperts, dst: GPUExperts) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(src's and dst's bytes as int32 words, words per expert, src's and dst's row strides in words), checked to
    hold experts of one layout; for copy kernels that move experts between them."""
    if src.layout != dst.layout:
        raise ValueError("expert copies need the same layout in source and destination")
    words = [t.raw.view(torch.int32) for t in (src, dst)]
    strides = [w.stride(0) if w.shape[0] > 1 else 0 for w in words]
    return words[0], words[1], src.layout.nbytes // 4, strides[0], strides[1]


def gather_experts(src: GPUExperts, expert_map: torch.Tensor, ids: torch.Tensor, staging: GPUExperts,
                   slots: torch.Tensor) -> None:
    """Copy the experts of routed pairs ``ids`` (int [k], one token) that ``expert_map`` (int32 [E]: index in
    ``src`` or -1) names from ``src`` into ``staging`` slot j for pair j, and set ``slots`` (int32 [k]) to j where
    copied, -1 elsewhere. ``src`` may be in pinned host memory. No host sync: a CUDA graph may hold it."""
    k = ids.numel()
    if staging.num_experts < k or slots.numel() != k:
        raise ValueError(f"staging needs >= {k} slots and slots {k} entries")
    _gather_kernel[(GATHER_PROGRAMS,)](ids.reshape(-1), expert_map, slots, *expert_words(src, staging), K=k,
                                       BLOCK_K=triton.next_power_of_2(k), PROGRAMS=GATHER_PROGRAMS, BLOCK=BLOCK,
                                       num_warps=8)
