"""Weight-only INT4 / INT8 matrix-vector products for a few rows, weights read as [K_packed, N] at any strides
(the GPU layout of ``gpu_layout``, or the store layout of routed experts, ``expert_layout``).

The grouped GEMM of ``quant_moe`` pads rows to a 16-row tensor-core tile; for one token (decode) a plain
dot per column block reads the same bytes without the padding. ``dequant_tile`` is one K step of it, shared
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
def dequant_tile(x_ptr, k0, w_ptrs, s_ptrs, stride_sk, n_mask, BITS: tl.constexpr, BLOCK_KP: tl.constexpr,
                 SPLIT_SCALE: tl.constexpr):
    """One K step of x @ W for one column block, not yet summed over its rows: float32 [BLOCK_KP, BLOCK_N]
    (the caller adds the steps up elementwise and sums over axis 0 once, after its K loop: a reduction across
    threads per step was most of the kernels' time). w_ptrs [BLOCK_KP, BLOCK_N] address the step's packed
    rows, s_ptrs [BLOCK_N] its scale row."""
    r = tl.arange(0, BLOCK_KP)
    w = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
    s0 = tl.load(s_ptrs, mask=n_mask, other=0.0)
    if BITS == 8:
        a = tl.load(x_ptr + k0 + r).to(tl.float32)
        return (w.to(tl.float32) - 128.0) * (a[:, None] * s0[None, :])
    # packed row r of a 64-block holds k = 64b + j (low nibble) and 64b + 32 + j (high nibble), j = r % 32
    cols = k0 + (r // 32) * 64 + (r % 32)
    a_lo = tl.load(x_ptr + cols).to(tl.float32)
    a_hi = tl.load(x_ptr + cols + 32).to(tl.float32)
    lo = ((w & 0xF).to(tl.float32) - 8.0) * a_lo[:, None]
    hi = ((w >> 4).to(tl.float32) - 8.0) * a_hi[:, None]
    if SPLIT_SCALE:  # group 32: low nibbles are group 2b, high nibbles group 2b + 1
        return lo * s0[None, :] + hi * tl.load(s_ptrs + stride_sk, mask=n_mask, other=0.0)[None, :]
    return (lo + hi) * s0[None, :]


@triton.jit
def _linear_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, K, N, stride_x, stride_wk, stride_wn, stride_sk, stride_sn,
                        stride_y,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_KP: tl.constexpr, SPLIT_SCALE: tl.constexpr, UNROLL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + tl.arange(0, BLOCK_KP)[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
    for k1 in range(0, K, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):  # independent steps: their loads are in flight together
            k0 = k1 + u * BLOCK_K
            acc += dequant_tile(x_ptr + row * stride_x, k0, w_base + (k0 * BLOCK_KP // BLOCK_K) * stride_wk,
                                s_ptr + offs_n * stride_sn + (k0 // GROUP) * stride_sk, stride_sk, n_mask, BITS,
                                BLOCK_KP, SPLIT_SCALE)
    tl.store(y_ptr + row * stride_y + offs_n, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty), mask=n_mask)


def gemv_consts(bits: int, group: int, k: int) -> dict:
    """The kernels' K-step constants for a format (``gpu_layout.k_step``) and a K of ``k`` values: UNROLL, the
    steps a loop iteration takes, divides k's steps (at most 2 for INT8, whose steps are twice the rows)."""
    bk, bkp, split = k_step(bits, group)
    steps = k // bk
    unroll = next(u for u in ((4, 2, 1) if bits == 4 else (2, 1)) if steps % u == 0)
    return dict(BITS=bits, GROUP=group, BLOCK_K=bk, BLOCK_KP=bkp, SPLIT_SCALE=split, UNROLL=unroll)


def gemv_block_n(rows: int, n: int, device: torch.device) -> int:
    """The widest column block (128 down to 32 bytes per weight row) that still gives every SM a program."""
    sms = num_sms(device)
    return next((b for b in (128, 64) if rows * triton.cdiv(n, b) >= sms), 32)


def gemv_warps(consts: dict, block_n: int) -> int:
    """Warps for a program's [BLOCK_KP, block_n] float32 tile: 8 above 2048 elements (so the tile stays in
    registers), else the 4 these kernels had before the tile (not tuned)."""
    return 8 if consts["BLOCK_KP"] * block_n > 2048 else 4


def linear_gemv(x: torch.Tensor, m: GPUQuantMatrix) -> torch.Tensor:
    """y [T, N] bf16 = x [T, K] @ W^T for a few rows (x is cast to bf16, as ``quant_linear`` does)."""
    if x.dim() != 2 or x.shape[1] != m.k:
        raise ValueError(f"x must be [T, {m.k}], got {tuple(x.shape)}")
    t = x.shape[0]
    y = torch.empty((t, m.n), dtype=torch.bfloat16, device=x.device)
    if t:
        x = x.to(torch.bfloat16).contiguous()
        bn, consts = gemv_block_n(t, m.n, x.device), gemv_consts(m.bits, m.group, m.k)
        _linear_gemv_kernel[(t, triton.cdiv(m.n, bn))](x, m.qweight, m.scales, y, m.k, m.n, x.stride(0),
                                                      *m.qweight.stride(), *m.scales.stride(), y.stride(0),
                                                      BLOCK_N=bn, **consts, num_warps=gemv_warps(consts, bn))
    return y
