"""The embedding row of a token whose id is in device memory, read from a table in VRAM or in page-locked host
memory (unified addressing), so a CUDA graph can start a decode step from the token the previous step chose."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _embed_kernel(table_ptr, token_ptr, out_ptr, H, stride_t, BLOCK: tl.constexpr):
    t = tl.load(token_ptr).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    row = tl.load(table_ptr + t * stride_t + offs, mask=mask)
    tl.store(out_ptr + offs, row.to(out_ptr.dtype.element_ty), mask=mask)


def embed_token(table: torch.Tensor, token: torch.Tensor, out: torch.Tensor) -> None:
    """out [1, H] = table [vocab, H] row ``token`` (int64 [1] on out's device; not range-checked: the id comes from
    the model's own argmax), cast to out's dtype. The table may be page-locked host memory. No host sync."""
    h = table.shape[1]
    if out.shape != (1, h) or out.stride(1) != 1 or table.stride(1) != 1 or token.numel() != 1:
        raise ValueError(f"out must be [1, {h}] and the table [vocab, {h}] with contiguous rows, token one id")
    _embed_kernel[(triton.cdiv(h, BLOCK),)](table, token, out, h, table.stride(0), BLOCK=BLOCK, num_warps=4)
