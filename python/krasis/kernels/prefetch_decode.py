"""Predicting the next MoE layer's likely experts during a one-token decode step, inside a CUDA graph.

While the CPU computes layer L's experts, PCIe is idle. ``predict_experts`` applies layer L+1's router to layer
L's normed hidden state (the residual stream changes little from one layer to the next, so its top experts are
a good guess) and picks the ``count`` best that layer L+1 would otherwise send off VRAM (not resident in the hot
cache), and optionally the next ones as hints for the host to read ahead. The host copies the picked experts into
VRAM on a copy engine (``engine.prefetch``); at layer L+1 the routed experts found there run on the GPU and the
host skips them; a wrong guess changes no result and costs the copy's PCIe time and host DRAM reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..models.spec import RouterSpec
from .route_decode import router_logits, scores_and_choice


@triton.jit
def _predict_kernel(logits_ptr, bias_ptr, resident_ptr, ids_ptr, map_ptr, hints_ptr, fused_ptr, fused_base, E,
                    COUNT: tl.constexpr, HINTS: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                    INVERT: tl.constexpr, FUSED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    logits = tl.load(logits_ptr + e, mask=e_mask, other=float("-inf"))
    _, rank = scores_and_choice(logits, bias_ptr, e, e_mask, SIGMOID, HAS_BIAS)  # as the router ranks them
    if INVERT:  # the least likely experts: a prediction that is wrong on purpose (tests, benchmarks)
        rank = -rank
    resident_slot = tl.load(resident_ptr + e, mask=e_mask, other=-1)
    resident = resident_slot >= 0
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
    if FUSED:  # each expert's slot in the storage the staging slots belong to: resident, then staged
        tl.store(fused_ptr + e, tl.where(resident, resident_slot, tl.where(slot >= 0, slot + fused_base, -1)),
                 mask=e_mask)
    if HINTS > 0:  # the next best, after the prefetched ones
        tl.store(hints_ptr + j - COUNT, picked.to(tl.int64), mask=(j >= COUNT) & (j < COUNT + HINTS))


def predict_experts(h: torch.Tensor, router: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None,
                    resident: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, expert_slot: torch.Tensor,
                    invert: bool = False, hints: torch.Tensor | None = None, fused: torch.Tensor | None = None,
                    fused_base: int = 0) -> None:
    """The experts to prefetch for the next MoE layer: its router (weight [E, H], the spec's scoring and
    correction bias) applied to h [1, H]; the ``ids.numel()`` best-scored experts whose ``resident`` entry (int32
    [E], the hot cache's slot in that layer) is < 0 go to ``ids`` (int64 [count], -1 where fewer are left), and
    ``expert_slot`` (int32 [E]) gets each one's staging slot (its index in ``ids``), -1 elsewhere. ``logits`` is
    float32 [1, E] scratch. ``invert`` picks the worst instead. ``hints`` (int64 [n], may be page-locked host
    memory) receives the n candidates ranked after those in ``ids`` (for the host to read ahead; -1 where fewer
    are left). ``fused`` (int32 [E]), when given, receives each expert's slot in the storage that both the
    ``resident`` slots and the staging slots index (the staging slots starting at ``fused_base``): its resident
    slot, else fused_base + its staging slot, else -1; one table for running both at once. No host sync: a CUDA
    graph may hold it."""
    e, hidden = router.shape
    count = ids.numel()
    if h.shape != (1, hidden) or h.stride(1) != 1 or router.stride(1) != 1:
        raise ValueError(f"h must be [1, {hidden}] and the router [E, {hidden}], with contiguous rows")
    if logits.shape != (1, e) or expert_slot.shape != (e,) or resident.shape != (e,):
        raise ValueError(f"logits [1, {e}], expert_slot and resident [{e}] expected")
    if fused is not None and fused.shape != (e,):
        raise ValueError(f"fused must be int32 [{e}]")
    if count < 1:
        raise ValueError("ids must hold at least one expert")
    if spec.correction_bias and correction_bias is None:
        raise ValueError("this router adds a per-expert correction bias, but none was given")
    router_logits(h, router, logits, rounded=False)
    bias = correction_bias if spec.correction_bias else logits  # unused pointer without a bias
    n_hints = hints.numel() if hints is not None else 0
    _predict_kernel[(1,)](logits, bias, resident, ids, expert_slot, hints if hints is not None else ids,
                          fused if fused is not None else expert_slot, fused_base, e,
                          COUNT=count, HINTS=n_hints, SIGMOID=spec.scoring == "sigmoid", HAS_BIAS=spec.correction_bias,
                          INVERT=invert, FUSED=fused is not None, BLOCK_E=triton.next_power_of_2(e),
                          BLOCK_P=triton.next_power_of_2(count + n_hints), num_warps=4)
