"""Copy a decode step's chosen routed experts from pinned host memory into VRAM staging slots, inside a graph.

A copy engine needs its source address when the copy is queued, so a CUDA graph cannot copy experts that the
step's own router picks. This kernel can: it reads the routing from device memory and the experts' bytes
straight from pinned host memory (mapped by unified addressing), a few dozen programs each walking its share
of 16 KiB blocks in wide contiguous reads, which keeps PCIe busy. Slot j receives the expert of routed pair j
when ``expert_map[id]`` names one (its index in ``src``), and ``slots[j]`` says which slot holds pair j's
expert (-1: none), ready for ``moe_gemv`` over the staging slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gpu_layout import GPUExperts

PARTS = ("w13", "s13", "w2", "s2")
BLOCK = 4096  # int32 words a program copies (16 KiB)


# Programs copying at once. Each program walks its share of (pair, part, block) items, so a few dozen keep PCIe
# busy (on an H100, 64 read pinned memory at ~49 GB/s, as fast as 2112 do: benchmarks/pinned_read.py) while the
# other SMs stay free for the kernels beside the copy (the shared and resident experts, on the graph's other
# branch). One program per block (thousands, most waiting on PCIe) held those SMs: the shared expert's linears
# took ~5x longer beside it.
GATHER_PROGRAMS = 64


@triton.jit
def _gather_kernel(ids_ptr, map_ptr, slots_ptr, s0, d0, n0, s1, d1, n1, s2, d2, n2, s3, d3, n3,
                   K: tl.constexpr, BLOCK_K: tl.constexpr, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        j = tl.arange(0, BLOCK_K)
        e = tl.load(map_ptr + tl.load(ids_ptr + j, mask=j < K, other=0), mask=j < K, other=-1)
        tl.store(slots_ptr + j, tl.where(e >= 0, j, -1).to(tl.int32), mask=j < K)
    for part in tl.static_range(4):
        # one expert's part is n words at src + e * n, to dst + j * n (each part's experts are contiguous)
        if part == 0:
            src, dst, n = s0, d0, n0
        elif part == 1:
            src, dst, n = s1, d1, n1
        elif part == 2:
            src, dst, n = s2, d2, n2
        else:
            src, dst, n = s3, d3, n3
        chunks = tl.cdiv(n, BLOCK)
        for w in range(pid, K * chunks, PROGRAMS):
            j = w // chunks
            e = tl.load(map_ptr + tl.load(ids_ptr + j)).to(tl.int64)
            if e >= 0:
                offs = (w % chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                tl.store(dst + j * n + offs, tl.load(src + e * n + offs, mask=mask), mask=mask)


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as int32 words (every expert part is a whole number of them)."""
    return t.view(torch.uint8).view(-1).view(torch.int32)


def part_words(src: GPUExperts, dst: GPUExperts) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """For each expert part (PARTS): its words in ``src`` and in ``dst`` and the words of one expert, checked to be
    contiguous and of the same size per expert in both; for copy kernels that move experts between them."""
    out = []
    for p in PARTS:
        s, d = getattr(src, p), getattr(dst, p)
        n = s[0].numel() * s.element_size() // 4
        if not (s.is_contiguous() and d.is_contiguous()) or d[0].numel() * d.element_size() // 4 != n:
            raise ValueError(f"expert part {p} must be contiguous and alike in src and staging")
        out.append((_words(s), _words(d), n))
    return out


def gather_experts(src: GPUExperts, expert_map: torch.Tensor, ids: torch.Tensor, staging: GPUExperts,
                   slots: torch.Tensor) -> None:
    """Copy the experts of routed pairs ``ids`` (int [k], one token) that ``expert_map`` (int32 [E]: index in
    ``src`` or -1) names from ``src`` into ``staging`` slot j for pair j, and set ``slots`` (int32 [k]) to j where
    copied, -1 elsewhere. ``src`` may be in pinned host memory. No host sync: a CUDA graph may hold it."""
    k = ids.numel()
    if staging.num_experts < k or slots.numel() != k:
        raise ValueError(f"staging needs >= {k} slots and slots {k} entries")
    parts = part_words(src, staging)
    args = [a for part in parts for a in part]
    _gather_kernel[(GATHER_PROGRAMS,)](ids.reshape(-1), expert_map, slots, *args, K=k,
                                       BLOCK_K=triton.next_power_of_2(k), PROGRAMS=GATHER_PROGRAMS, BLOCK=BLOCK,
                                       num_warps=8)
