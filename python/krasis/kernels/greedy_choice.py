"""The greedy token of a decode step chosen on the device, in one launch: the argmax of the logits into the
device-side token the next step's graph embeds, and (position, token) written straight into page-locked host
memory for the host to read back, instead of torch's argmax (one program over the vocabulary: ~23 us for 102,400
logits on an H100) and two copies."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _choice_kernel(logits_ptr, V, part_val_ptr, part_idx_ptr, count_ptr, position_ptr, token_ptr, chosen_ptr,
                   BLOCK: tl.constexpr, PARTS: tl.constexpr):
    """Each program takes BLOCK logits and stores its largest (the lowest index among equals); the last program to
    finish (a counter, left at zero again) picks the best of the partials the same way and writes the token."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(logits_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    best = tl.max(v, axis=0)
    tl.store(part_val_ptr + pid, best)
    tl.store(part_idx_ptr + pid, tl.min(tl.where(v == best, offs, V), axis=0))
    tl.debug_barrier()  # the partials stored before the counter says so (release, below)
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        p = tl.arange(0, PARTS)
        p_mask = p < tl.num_programs(0)
        # .cg: the other programs' partials are in L2, not in this SM's L1
        vals = tl.load(part_val_ptr + p, mask=p_mask, other=float("-inf"), cache_modifier=".cg")
        idx = tl.load(part_idx_ptr + p, mask=p_mask, other=V, cache_modifier=".cg")
        top = tl.max(vals, axis=0)
        token = tl.min(tl.where(vals == top, idx, V), axis=0).to(tl.int64)
        tl.store(token_ptr, token)
        tl.store(chosen_ptr, tl.load(position_ptr))
        tl.store(chosen_ptr + 1, token)
        tl.store(count_ptr, 0)


class GreedyChoice:
    """Argmax of a step's logits (``vocab`` values) with fixed scratch on ``device``, so a CUDA graph can hold the
    call."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.parts = triton.cdiv(vocab, BLOCK)
        self._val = torch.empty(self.parts, dtype=torch.float32, device=device)
        self._idx = torch.empty(self.parts, dtype=torch.int32, device=device)
        self._count = torch.zeros(1, dtype=torch.int32, device=device)

    def __call__(self, logits: torch.Tensor, position: torch.Tensor, token: torch.Tensor,
                 chosen: torch.Tensor) -> None:
        """token (int64 [1], device) = argmax of logits ([vocab] or [1, vocab], contiguous; the first of equal
        maxima, as torch.argmax); chosen (int64 [2], page-locked host or device) = [position (int64 [1], device),
        token]. No host sync."""
        if logits.numel() != self.vocab or not logits.is_contiguous():
            raise ValueError(f"logits must be {self.vocab} contiguous values, got {tuple(logits.shape)}")
        if token.numel() != 1 or chosen.numel() != 2 or token.dtype != torch.int64 or chosen.dtype != torch.int64:
            raise ValueError("token must be int64 [1] and chosen int64 [2]")
        _choice_kernel[(self.parts,)](logits, self.vocab, self._val, self._idx, self._count, position, token, chosen,
                                      BLOCK=BLOCK, PARTS=triton.next_power_of_2(self.parts), num_warps=4)
