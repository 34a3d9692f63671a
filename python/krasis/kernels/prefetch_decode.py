"""Prefetching the next MoE layer's likely experts during a one-token decode step, inside a CUDA graph.

While the CPU computes layer L's experts, PCIe is idle. ``predict_experts`` applies layer L+1's router to layer
L's normed hidden state (the residual stream changes little from one layer to the next, so its top experts are
a good guess) and picks the ``count`` best that layer L+1 would otherwise send off VRAM (not resident in the hot
cache); ``copy_predicted`` copies them from pinned host memory into
VRAM staging slots with a bounded number of programs (COPY_PROGRAMS), on a side stream beside the step's own
kernels. At layer L+1 the routed experts found in the staging slots run on the GPU and the host
skips them; a wrong guess changes no result and costs the copy's PCIe time and host DRAM reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..models.spec import RouterSpec
from .expert_gather import expert_words
from .expert_layout import GPUExperts
from .route_decode import router_logits, scores_and_choice

COPY_BLOCK = 4096  # int32 words a program moves per iteration (16 KiB)
# Programs (and warps each) copying at once. 64 programs of 8 warps read pinned host memory at ~49 GB/s, as fast
# as 2112 do (benchmarks/pinned_read.py), but beside them the shared expert's matrix-vector kernels took ~3x
# longer (24 against 7.5 us each, traced on an H100), and prefetching cost decode 11-12%. The copy has a whole
# layer (the host's experts, then the next attention: ~150-190 us) to land, so fewer suffice: 8 programs of 4
# warps made prefetching break even or gain a few percent (4 were too slow; benchmarks/RESULTS.md).
COPY_PROGRAMS = 8
COPY_WARPS = 4


@triton.jit
def _predict_kernel(logits_ptr, bias_ptr, resident_ptr, ids_ptr, map_ptr, hints_ptr, E,
                    COUNT: tl.constexpr, HINTS: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                    INVERT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    logits = tl.load(logits_ptr + e, mask=e_mask, other=float("-inf"))
    _, rank = scores_and_choice(logits, bias_ptr, e, e_mask, SIGMOID, HAS_BIAS)  # as the router ranks them
    if INVERT:  # the least likely experts: a prediction that is wrong on purpose (tests, benchmarks)
        rank = -rank
    resident = tl.load(resident_ptr + e, mask=e_mask, other=-1) >= 0
    choice = tl.where(e_mask & ~resident, rank, float("-inf"))
    j = tl.arange(0, BLOCK_P)
    picked = tl.full((BLOCK_P,), -1, dtype=tl.int32)
    slot = tl.full((BLOCK_E,), -1, dtype=tl.int32)
    for k in tl.static_range(COUNT + HINTS):  # the best remaining candidate, the lowest index among equals
        best = tl.max(choice, axis=0)
        idx = tl.min(tl.where(choice == best, e, BLOCK_E), axis=0)
        idx = tl.where(best > float("-inf"), idx, -1)  # -1: no candidate left
        picked = tl.where(j == k, idx, picked)
        if k < COUNT:
            slot = tl.where(e == idx, k, slot)
        choice = tl.where(e == idx, float("-inf"), choice)
    tl.store(ids_ptr + j, picked.to(tl.int64), mask=j < COUNT)
    tl.store(map_ptr + e, slot, mask=e_mask)
    if HINTS > 0:  # the next best, after the prefetched ones
        tl.store(hints_ptr + j - COUNT, picked.to(tl.int64), mask=(j >= COUNT) & (j < COUNT + HINTS))


@triton.jit
def _copy_kernel(ids_ptr, src_ptr, dst_ptr, n, stride_src, stride_dst, COUNT: tl.constexpr, PROGRAMS: tl.constexpr,
                 BLOCK: tl.constexpr):
    chunks = tl.cdiv(n, BLOCK)
    for w in range(tl.program_id(0), COUNT * chunks, PROGRAMS):
        j = w // chunks
        e = tl.load(ids_ptr + j)
        if e >= 0:
            offs = (w % chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(src_ptr + e * stride_src + offs, mask=mask)
            tl.store(dst_ptr + j.to(tl.int64) * stride_dst + offs, v, mask=mask)


def predict_experts(h: torch.Tensor, router: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None,
                    resident: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, expert_slot: torch.Tensor,
                    invert: bool = False, hints: torch.Tensor | None = None) -> None:
    """The experts to prefetch for the next MoE layer: its router (weight [E, H], the spec's scoring and
    correction bias) applied to h [1, H]; the ``ids.numel()`` best-scored experts whose ``resident`` entry (int32
    [E], the hot cache's slot in that layer) is < 0 go to ``ids`` (int64 [count], -1 where fewer are left), and
    ``expert_slot`` (int32 [E]) gets each one's staging slot (its index in ``ids``), -1 elsewhere. ``logits`` is
    float32 [1, E] scratch. ``invert`` picks the worst instead. ``hints`` (int64 [n], may be page-locked host
    memory) receives the n candidates ranked after those in ``ids`` (for the host to read ahead; -1 where fewer
    are left). No host sync: a CUDA graph may hold it."""
    e, hidden = router.shape
    count = ids.numel()
    if h.shape != (1, hidden) or h.stride(1) != 1 or router.stride(1) != 1:
        raise ValueError(f"h must be [1, {hidden}] and the router [E, {hidden}], with contiguous rows")
    if logits.shape != (1, e) or expert_slot.shape != (e,) or resident.shape != (e,):
        raise ValueError(f"logits [1, {e}], expert_slot and resident [{e}] expected")
    if count < 1:
        raise ValueError("ids must hold at least one expert")
    if spec.correction_bias and correction_bias is None:
        raise ValueError("this router adds a per-expert correction bias, but none was given")
    router_logits(h, router, logits, rounded=False)
    bias = correction_bias if spec.correction_bias else logits  # unused pointer without a bias
    n_hints = hints.numel() if hints is not None else 0
    _predict_kernel[(1,)](logits, bias, resident, ids, expert_slot, hints if hints is not None else ids, e,
                          COUNT=count, HINTS=n_hints, SIGMOID=spec.scoring == "sigmoid", HAS_BIAS=spec.correction_bias,
                          INVERT=invert, BLOCK_E=triton.next_power_of_2(e),
                          BLOCK_P=triton.next_power_of_2(count + n_hints), num_warps=4)


def copy_predicted(src: GPUExperts, ids: torch.Tensor, staging: GPUExperts) -> None:
    """Copy expert ``ids[j]`` (int64 [count]; -1: none) of ``src`` (one layer's experts, in pinned host memory or
    VRAM) into ``staging`` slot j. No host sync: a CUDA graph may hold it."""
    count = ids.numel()
    if staging.num_experts < count:
        raise ValueError(f"staging holds {staging.num_experts} experts, {count} asked for")
    _copy_kernel[(COPY_PROGRAMS,)](ids, *expert_words(src, staging), COUNT=count, PROGRAMS=COPY_PROGRAMS,
                                   BLOCK=COPY_BLOCK, num_warps=COPY_WARPS)
