"""One token's two KV-cache entries written at a device-side position in one launch (decode steps).

In torch an FP8 entry is nine small kernels per tensor (absolute max, scale, divide, cast, two index copies);
this is one program per tensor. FP8 entries get ``kv_cache._to_fp8``'s per-token scale: max|v| / 448,
at least 1e-12, and the values divided by it are rounded to e4m3 to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to_e4m3

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _write_one(v_ptr, store_ptr, scale_ptr, pos, D, stride_store, FP8: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    row = store_ptr + pos * stride_store + offs
    if FP8:
        scale = tl.maximum(tl.max(tl.abs(v), axis=0) / FP8_MAX, 1e-12)
        tl.store(row, round_to_e4m3(v / scale).to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + pos, scale)
    else:
        tl.store(row, v.to(store_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_write_kernel(first_ptr, second_ptr, store0_ptr, store1_ptr, scale0_ptr, scale1_ptr, position_ptr,
                     D0, D1, stride0, stride1, FP8: tl.constexpr, BLOCK: tl.constexpr):
    pos = tl.load(position_ptr).to(tl.int64)
    if tl.program_id(0) == 0:
        _write_one(first_ptr, store0_ptr, scale0_ptr, pos, D0, stride0, FP8, BLOCK)
    else:
        _write_one(second_ptr, store1_ptr, scale1_ptr, pos, D1, stride1, FP8, BLOCK)


def kv_write_at(first: torch.Tensor, second: torch.Tensor, stores: tuple[torch.Tensor, torch.Tensor],
                scales: tuple[torch.Tensor, torch.Tensor] | None, position: torch.Tensor) -> None:
    """Write one token's entries ``first`` and ``second`` ([1, ...], contiguous) into row ``position`` (a
    one-element device tensor) of ``stores`` ([capacity, ...], rows contiguous); FP8 stores take their per-token
    float32 scales ([capacity]) in ``scales``. No host sync."""
    fp8 = scales is not None
    for value, store in zip((first, second), stores, strict=True):
        if value.shape[0] != 1 or value[0].numel() != store[0].numel() or not value.is_contiguous():
            raise ValueError(f"entry {tuple(value.shape)} is not one contiguous token of store {tuple(store.shape)}")
        if (store.dtype == torch.float8_e4m3fn) != fp8:
            raise ValueError("FP8 stores need their scales, and only they take scales")
    s0, s1 = scales if fp8 else (stores[0], stores[1])  # unused pointers without FP8
    d0, d1 = stores[0][0].numel(), stores[1][0].numel()
    _kv_write_kernel[(2,)](first, second, stores[0], stores[1], s0, s1, position, d0, d1, stores[0].stride(0),
                           stores[1].stride(0), FP8=fp8, BLOCK=triton.next_power_of_2(max(d0, d1)), num_warps=4)
