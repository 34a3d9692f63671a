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
# A narrow matrix (few column blocks) splits K between up to MAX_SPLITS programs per block, aiming at
# SPLIT_TARGET programs per SM (not tuned: chosen so that the dense MLP's down projection and the shared
# experts' linears of DeepSeek-V2-Lite, 64-88 programs unsplit, spread over every SM).
MAX_SPLITS = 8
SPLIT_TARGET = 2


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
def dot_steps(x_ptr, w_base, s_base, k_lo, k_hi, stride_wk, stride_sk, n_mask, BITS: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr,
              SPLIT_SCALE: tl.constexpr, UNROLL: tl.constexpr):
    """The K steps [k_lo, k_hi) of x @ W for one column block, float32 [BLOCK_KP, BLOCK_N] not yet summed over
    axis 0 (``dequant_tile``). w_base addresses packed row 0 of the block's columns, s_base its scale row 0. Steps
    go UNROLL at a time (independent loads in flight together), the remainder one at a time."""
    acc = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
    k_main = k_hi - (k_hi - k_lo) % (BLOCK_K * UNROLL)
    for k1 in range(k_lo, k_main, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            k0 = k1 + u * BLOCK_K
            acc += dequant_tile(x_ptr, k0, w_base + (k0 * BLOCK_KP // BLOCK_K) * stride_wk,
                                s_base + (k0 // GROUP) * stride_sk, stride_sk, n_mask, BITS, BLOCK_KP, SPLIT_SCALE)
    for k0 in range(k_main, k_hi, BLOCK_K):
        acc += dequant_tile(x_ptr, k0, w_base + (k0 * BLOCK_KP // BLOCK_K) * stride_wk,
                            s_base + (k0 // GROUP) * stride_sk, stride_sk, n_mask, BITS, BLOCK_KP, SPLIT_SCALE)
    return acc


@triton.jit
def _linear_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, K, N, stride_x, stride_wk, stride_wn, stride_sk, stride_sn,
                        stride_y,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_KP: tl.constexpr, SPLIT_SCALE: tl.constexpr, UNROLL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + tl.arange(0, BLOCK_KP)[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = dot_steps(x_ptr + row * stride_x, w_base, s_ptr + offs_n * stride_sn, 0, K, stride_wk, stride_sk, n_mask,
                    BITS, GROUP, BLOCK_N, BLOCK_K, BLOCK_KP, SPLIT_SCALE, UNROLL)
    tl.store(y_ptr + row * stride_y + offs_n, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _linear_gemv_split_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, K, K_SPLIT, N, stride_x, stride_wk,
                              stride_wn, stride_sk, stride_sn, stride_y, SPLIT: tl.constexpr, BITS: tl.constexpr,
                              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_KP: tl.constexpr, SPLIT_SCALE: tl.constexpr, UNROLL: tl.constexpr):
    """``_linear_gemv_kernel`` with K divided between SPLIT programs per column block, K_SPLIT values each (the
    last may have fewer): each writes its partial sums, and the last of them
    to finish (a counter per block, left at zero again) adds them up in split order."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.num_programs(0)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + tl.arange(0, BLOCK_KP)[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = dot_steps(x_ptr + row * stride_x, w_base, s_ptr + offs_n * stride_sn, split * K_SPLIT,
                    tl.minimum((split + 1) * K_SPLIT, K), stride_wk, stride_sk, n_mask, BITS, GROUP, BLOCK_N, BLOCK_K,
                    BLOCK_KP, SPLIT_SCALE, UNROLL)
    tl.store(part_ptr + (split * rows + row) * N + offs_n, tl.sum(acc, axis=0), mask=n_mask)
    tl.debug_barrier()  # every thread's partials stored before the counter says so (release, below)
    counter = count_ptr + row * tl.num_programs(1) + block
    if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(SPLIT):  # .cg: the other programs' partials are in L2, not in this SM's L1
            total += tl.load(part_ptr + (s * rows + row) * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + row * stride_y + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_mask)
        tl.store(counter, 0)


def gemv_consts(bits: int, group: int) -> dict:
    """The kernels' K-step constants for a format (``gpu_layout.k_step``): UNROLL, the steps a loop iteration
    takes, is 4 for INT4 and 2 for INT8 (an INT8 step is a whole group of rows, up to 128)."""
    bk, bkp, split = k_step(bits, group)
    return dict(BITS=bits, GROUP=group, BLOCK_K=bk, BLOCK_KP=bkp, SPLIT_SCALE=split, UNROLL=4 if bits == 4 else 2)


def gemv_block_n(rows: int, n: int, device: torch.device) -> int:
    """The widest column block (128 down to 32 bytes per weight row) that still gives every SM a program."""
    sms = num_sms(device)
    return next((b for b in (128, 64) if rows * triton.cdiv(n, b) >= sms), 32)


def gemv_warps(consts: dict, block_n: int) -> int:
    """Warps for a program's [BLOCK_KP, block_n] float32 tile: 8 above 2048 elements (so the tile stays in
    registers), else the 4 these kernels had before the tile (not tuned)."""
    return 8 if consts["BLOCK_KP"] * block_n > 2048 else 4


def gemv_splits(programs: int, steps: int, device: torch.device) -> int:
    """How many programs share each column block's K steps: 1 when ``programs`` (rows x column blocks) already
    give every SM a program; otherwise the power of two (at most MAX_SPLITS) that brings them to about
    SPLIT_TARGET per SM, leaving each at least 2 of the ``steps`` of K."""
    sms = num_sms(device)
    split = 1
    while split < MAX_SPLITS and programs * split < SPLIT_TARGET * sms and triton.cdiv(steps, 2 * split) >= 2:
        split *= 2
    return split


def _split_workspace(m: GPUQuantMatrix, rows: int, blocks: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial sums (float32 [splits, rows, N]) and counters (int32 [rows, blocks], zero between calls) of
    ``m``'s split kernel for ``rows`` rows, kept with the matrix: fixed addresses, so a CUDA graph may hold the
    call (the graphs' warm-up run allocates them before capture)."""
    cache = m.__dict__.setdefault("_gemv_split", {})
    key = rows, blocks, splits
    if key not in cache:
        device = m.qweight.device
        cache[key] = (torch.empty((splits, rows, m.n), dtype=torch.float32, device=device),
                      torch.zeros((rows, blocks), dtype=torch.int32, device=device))
    return cache[key]


def linear_gemv(x: torch.Tensor, m: GPUQuantMatrix) -> torch.Tensor:
    """y [T, N] bf16 = x [T, K] @ W^T for a few rows (x is cast to bf16, as ``quant_linear`` does). With too few
    column blocks to occupy the GPU (a narrow matrix), K is split between programs (``gemv_splits``)."""
    if x.dim() != 2 or x.shape[1] != m.k:
        raise ValueError(f"x must be [T, {m.k}], got {tuple(x.shape)}")
    t = x.shape[0]
    y = torch.empty((t, m.n), dtype=torch.bfloat16, device=x.device)
    if t:
        x = x.to(torch.bfloat16).contiguous()
        bn = gemv_block_n(t, m.n, x.device)
        blocks = triton.cdiv(m.n, bn)
        step = k_step(m.bits, m.group)[0]
        steps = m.k // step
        splits = gemv_splits(t * blocks, steps, x.device)
        per_split = triton.cdiv(steps, splits)
        consts = gemv_consts(m.bits, m.group)
        strides = x.stride(0), *m.qweight.stride(), *m.scales.stride(), y.stride(0)
        if splits == 1:
            _linear_gemv_kernel[(t, blocks)](x, m.qweight, m.scales, y, m.k, m.n, *strides, BLOCK_N=bn, **consts,
                                             num_warps=gemv_warps(consts, bn))
        else:
            parts, counts = _split_workspace(m, t, blocks, splits)
            _linear_gemv_split_kernel[(t, blocks, splits)](x, m.qweight, m.scales, y, parts, counts, m.k,
                                                           per_split * step, m.n, *strides, SPLIT=splits,
                                                           BLOCK_N=bn, **consts, num_warps=gemv_warps(consts, bn))
    return y
