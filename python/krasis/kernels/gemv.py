"""Weight-only INT4 / INT8 matrix-vector products in the GPU layout (``gpu_layout``), for a few rows.

The grouped GEMM of ``quant_moe`` pads rows to a 16-row tensor-core tile; for one token (decode) a plain
dot per column block reads the same bytes without the padding. ``dequant_gemv`` is one K step of it, shared
with the routed-expert kernels of ``moe_decode``; ``linear_gemv`` is the dense layer (shared experts, dense
MLPs, lm_head). Dequantisation is the grouped kernel's: integers exact in float32, scale per (group, column).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import num_sms
from .gpu_layout import GPUQuantMatrix, k_step

# Up to this many rows quant_linear and fused_moe use the matrix-vector kernels (every row re-reads the
# weights, so with more rows the tensor-core GEMM wins).
GEMV_MAX_TOKENS = 4


@triton.jit
def dequant_gemv(x_ptr, k0, w_ptrs, s_ptrs, stride_sk, n_mask, BITS: tl.constexpr, BLOCK_KP: tl.constexpr,
                 SPLIT_SCALE: tl.constexpr):
    """One K step of x @ W for one column block: float32 [BLOCK_N]. w_ptrs [BLOCK_KP, BLOCK_N] address the
    step's packed rows, s_ptrs [BLOCK_N] its scale row."""
    r = tl.arange(0, BLOCK_KP)
    w = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
    s0 = tl.load(s_ptrs, mask=n_mask, other=0.0)
    if BITS == 8:
        a = tl.load(x_ptr + k0 + r).to(tl.float32)
        return tl.sum((w.to(tl.float32) - 128.0) * a[:, None], axis=0) * s0
    # packed row r of a 64-block holds k = 64b + j (low nibble) and 64b + 32 + j (high nibble), j = r % 32
    cols = k0 + (r // 32) * 64 + (r % 32)
    a_lo = tl.load(x_ptr + cols).to(tl.float32)
    a_hi = tl.load(x_ptr + cols + 32).to(tl.float32)
    lo = tl.sum(((w & 0xF).to(tl.float32) - 8.0) * a_lo[:, None], axis=0)
    hi = tl.sum(((w >> 4).to(tl.float32) - 8.0) * a_hi[:, None], axis=0)
    if SPLIT_SCALE:  # group 32: low nibbles are group 2b, high nibbles group 2b + 1
        return lo * s0 + hi * tl.load(s_ptrs + stride_sk, mask=n_mask, other=0.0)
    return (lo + hi) * s0


@triton.jit
def _linear_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, K, N, stride_x, stride_wk, stride_sk, stride_y,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_KP: tl.constexpr, SPLIT_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + tl.arange(0, BLOCK_KP)[:, None] * stride_wk + offs_n[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc += dequant_gemv(x_ptr + row * stride_x, k0, w_base + (k0 * BLOCK_KP // BLOCK_K) * stride_wk,
                            s_ptr + offs_n + (k0 // GROUP) * stride_sk, stride_sk, n_mask, BITS, BLOCK_KP,
                            SPLIT_SCALE)
    tl.store(y_ptr + row * stride_y + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def gemv_consts(bits: int, group: int) -> dict:
    """The kernels' K-step constants for a format (``gpu_layout.k_step``)."""
    bk, bkp, split = k_step(bits, group)
    return dict(BITS=bits, GROUP=group, BLOCK_K=bk, BLOCK_KP=bkp, SPLIT_SCALE=split)


def gemv_block_n(rows: int, n: int, device: torch.device) -> int:
    """The widest column block (128 down to 32 bytes per weight row) that still gives every SM a program."""
    sms = num_sms(device)
    return next((b for b in (128, 64) if rows * triton.cdiv(n, b) >= sms), 32)


def linear_gemv(x: torch.Tensor, m: GPUQuantMatrix) -> torch.Tensor:
    """y [T, N] bf16 = x [T, K] @ W^T for a few rows (x is cast to bf16, as ``quant_linear`` does)."""
    if x.dim() != 2 or x.shape[1] != m.k:
        raise ValueError(f"x must be [T, {m.k}], got {tuple(x.shape)}")
    t = x.shape[0]
    y = torch.empty((t, m.n), dtype=torch.bfloat16, device=x.device)
    if t:
        x = x.to(torch.bfloat16).contiguous()
        bn = gemv_block_n(t, m.n, x.device)
        _linear_gemv_kernel[(t, triton.cdiv(m.n, bn))](x, m.qweight, m.scales, y, m.k, m.n, x.stride(0),
                                                      m.qweight.stride(0), m.scales.stride(0), y.stride(0),
                                                      BLOCK_N=bn, **gemv_consts(m.bits, m.group), num_warps=4)
    return y
