"""Triton weight-only INT4 / INT8 GEMMs: the routed-expert MoE (experts in the store layout, ``expert_layout``)
and a linear (the GPU layout, ``gpu_layout``). Both read a matrix as [K_packed, N] at any strides.

One kernel, three modes:
  dense    C [M, N] = A [M, K] @ W^T                               (``quant_linear``)
  gate_up  C [slot, I] = silu(A[token] @ Wg^T) * (A[token] @ Wu^T)  (rows grouped by expert, ``moe_align``)
  down     C [pair, H] = routing weight * (A[slot] @ Wd^T)
Weights are dequantised in registers: integer values are exact in bf16, so each K step is
``dot(a, q) * scale[None, :]`` with fp32 accumulation, and the CPU's quantised weights are used unchanged.
BLOCK_K equals the group (INT8), or max(group, 64) for INT4, where the packed rows of one 64-block give two
dots: low nibbles against A columns 64b + j, high nibbles against 64b + 32 + j (with group 32 each of the
two dots is one whole group, so it gets its own scale row).

Nothing here reads device values back to the host, so ``fused_moe`` can be captured in a CUDA graph and
overlapped with CPU work. With TRITON_INTERPRET=1 (set before this module is imported) the functions run on
CPU tensors through the Triton interpreter; there the dots are done in float32, because the interpreter
mishandles bfloat16 dots and integer-to-bfloat16 casts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts of the package
    OutOfResources = RuntimeError

from .device import num_sms
from .expert_layout import GPUExperts
from .gemv import GEMV_MAX_TOKENS, linear_gemv
from .gpu_layout import GPUQuantMatrix, k_step
from .moe_align import align_by_expert
from .moe_decode import moe_gemv

MODE_DENSE, MODE_GATE_UP, MODE_DOWN = 0, 1, 2


@triton.jit
def _dequant_dot(a_lo, a_hi, w_ptrs, w_mask, s_ptrs, stride_sk, n_mask, BITS: tl.constexpr,
                 SPLIT_SCALE: tl.constexpr, SWAP_AB: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One K step of A @ W for one weight tile, scales applied: float32 [BLOCK_M, BLOCK_N], or its transpose
    [BLOCK_N, BLOCK_M] = W^T-tile @ A^T-tile with SWAP_AB (then the weights are the dot's left operand)."""
    w = tl.load(w_ptrs, mask=w_mask, other=0)
    s0 = tl.load(s_ptrs, mask=n_mask, other=0.0)
    if SWAP_AB:
        s0 = s0[:, None]
    else:
        s0 = s0[None, :]
    # via float32: exact, and the interpreter cannot cast integers to bfloat16
    if BITS == 8:
        q = (w.to(tl.float32) - 128.0).to(DOT_DTYPE)
        if SWAP_AB:
            out = tl.dot(q, a_lo) * s0
        else:
            out = tl.dot(a_lo, q) * s0
    else:
        lo = ((w & 0xF).to(tl.float32) - 8.0).to(DOT_DTYPE)
        hi = ((w >> 4).to(tl.float32) - 8.0).to(DOT_DTYPE)
        if SPLIT_SCALE:
            # group 32: the low nibbles of a 64-block are group 2b, the high nibbles group 2b + 1
            s1 = tl.load(s_ptrs + stride_sk, mask=n_mask, other=0.0)
            if SWAP_AB:
                out = tl.dot(lo, a_lo) * s0 + tl.dot(hi, a_hi) * s1[:, None]
            else:
                out = tl.dot(a_lo, lo) * s0 + tl.dot(a_hi, hi) * s1[None, :]
        else:
            if SWAP_AB:
                out = tl.dot(hi, a_hi, tl.dot(lo, a_lo)) * s0
            else:
                out = tl.dot(a_hi, hi, tl.dot(a_lo, lo)) * s0
    return out


@triton.jit
def _quant_gemm_kernel(
    a_ptr, w_ptr, s_ptr, c_ptr,
    sorted_ptr, block_expert_ptr, rw_ptr,
    num_rows, N, K, UP_W, UP_S, num_pid_m,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn, stride_cm, stride_cn,
    MODE: tl.constexpr, TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr,
    SPLIT_SCALE: tl.constexpr, SWAP_AB: tl.constexpr, GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    # Swizzled launch order: GROUP_M row blocks (one expert's, mostly) walk the N blocks together, so their
    # weight tiles and activation rows are reused from L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_kp = tl.arange(0, BLOCK_KP)
    if MODE == 0:
        row_ok = offs < num_rows
        a_rows = offs
        c_rows = offs
        w_ptr_e = w_ptr
        s_ptr_e = s_ptr
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:  # capacity beyond the padded runs
            return
        pair = tl.load(sorted_ptr + offs)
        row_ok = pair < num_rows  # padding rows hold the sentinel T*k
        if MODE == 1:
            a_rows = pair // TOP_K
            c_rows = offs
        else:
            a_rows = offs
            c_rows = pair
        w_ptr_e = w_ptr + expert.to(tl.int64) * stride_we
        s_ptr_e = s_ptr + expert.to(tl.int64) * stride_se

    if BITS == 8:
        a_cols = offs_kp
    else:
        a_cols = (offs_kp // 32) * 64 + (offs_kp % 32)  # low nibbles of packed rows; high ones are +32
    a_rows = a_rows.to(tl.int64)
    # tiles are [rows, cols] of the product: [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with SWAP_AB
    if SWAP_AB:
        a_base = a_ptr + a_rows[None, :] * stride_am + a_cols[:, None] * stride_ak
        a_mask = row_ok[None, :]
        w_base = w_ptr_e + offs_kp[None, :] * stride_wk + offs_n[:, None] * stride_wn
        w_mask = n_mask[:, None]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        a_base = a_ptr + a_rows[:, None] * stride_am + a_cols[None, :] * stride_ak
        a_mask = row_ok[:, None]
        w_base = w_ptr_e + offs_kp[:, None] * stride_wk + offs_n[None, :] * stride_wn
        w_mask = n_mask[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_base = s_ptr_e + offs_n * stride_sn

    for k0 in range(0, K, BLOCK_K):
        a_lo = tl.load(a_base + k0 * stride_ak, mask=a_mask, other=0.0).to(DOT_DTYPE)
        if BITS == 8:
            a_hi = a_lo
            w_ptrs = w_base + k0 * stride_wk
        else:
            a_hi = tl.load(a_base + (k0 + 32) * stride_ak, mask=a_mask, other=0.0).to(DOT_DTYPE)
            w_ptrs = w_base + (k0 // 2) * stride_wk
        s_ptrs = s_base + (k0 // GROUP) * stride_sk
        acc += _dequant_dot(a_lo, a_hi, w_ptrs, w_mask, s_ptrs, stride_sk, n_mask, BITS, SPLIT_SCALE, SWAP_AB,
                            DOT_DTYPE)
        if MODE == 1:
            acc_up += _dequant_dot(a_lo, a_hi, w_ptrs + UP_W, w_mask, s_ptrs + UP_S, stride_sk, n_mask, BITS,
                                   SPLIT_SCALE, SWAP_AB, DOT_DTYPE)

    if MODE == 1:
        out = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, in fp32 before the one rounding
    elif MODE == 2:
        rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0)
        if SWAP_AB:
            out = acc * rw[None, :]
        else:
            out = acc * rw[:, None]
    else:
        out = acc
    c_rows = c_rows.to(tl.int64)
    if SWAP_AB:
        c_ptrs = c_ptr + c_rows[None, :] * stride_cm + offs_n[:, None] * stride_cn
        c_mask = a_mask & n_mask[:, None]
    else:
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = a_mask & n_mask[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters; block_m is shared by both MoE steps (the alignment pads runs to it).

    swap_ab computes the transposed tile (weights x activations): the dequantised weights, which live in
    registers, become the dot's left operand, which Hopper's wgmma can take from registers, and few rows
    (decode) become the dot's narrow N side. Whether it pays is measured by benchmarks/moe_kernels.py.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    swap_ab: bool = False


# Decode: one row block per routed expert; BLOCK_N 64 gives E_used x I/64 programs (6 x 22 = 132 for V2-Lite).
# Not tuned on a GPU yet (benchmarks/moe_kernels.py compares variants). Compiled offline with Triton 3.9 for
# sm_90: no register spills except 56 bytes in INT4 g32 gate_up at PREFILL, shared memory up to 144 KiB (sm_89:
# up to 96 KiB, some spills at PREFILL). A GPU with less shared memory gets fewer stages (see _launch).
DECODE = GemmConfig(block_m=16, block_n=64, num_warps=4, num_stages=4)
MEDIUM = GemmConfig(block_m=32, block_n=128, num_warps=8, num_stages=3)
PREFILL = GemmConfig(block_m=64, block_n=128, num_warps=8, num_stages=3)
# INT4 prefill: taller row blocks amortise the nibble unpacking over more rows. Measured on the H100
# (benchmarks/RESULTS.md, "Routed-expert kernels"): 1.5-1.6x PREFILL at 4,096 and 16,384 tokens; INT8 gains nothing.
PREFILL_INT4 = GemmConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


def moe_config(num_pairs: int, num_experts: int, bits: int = 8) -> GemmConfig:
    """Block sizes by rows per expert (T*k / E): small for decode, large for prefill (taller for INT4)."""
    per_expert = num_pairs / max(num_experts, 1)
    if num_pairs <= 64 or per_expert < 8:
        return DECODE
    if per_expert < 64:
        return MEDIUM
    return PREFILL_INT4 if bits == 4 else PREFILL


def linear_config(m: int, n: int, device: torch.device) -> GemmConfig:
    """Block sizes for quant_linear: large tiles for many rows; for few rows, BLOCK_N small enough to fill SMs."""
    if m > 64:
        return PREFILL if m > 256 else MEDIUM
    sms = num_sms(device)
    block_n = next((b for b in (128, 64) if triton.cdiv(n, b) >= 2 * sms), 32)
    return GemmConfig(block_m=16 if m <= 16 else 32, block_n=block_n, num_warps=4, num_stages=4)


def _dot_dtype(device: torch.device):
    return tl.bfloat16 if device.type == "cuda" else tl.float32


def _launch(mode: int, a: torch.Tensor, w: torch.Tensor, s: torch.Tensor, c: torch.Tensor, *, bits: int, group: int,
            num_rows: int, n: int, k: int, num_pid_m: int, cfg: GemmConfig, top_k: int = 1,
            up: tuple[int, int] = (0, 0),
            sorted_pairs: torch.Tensor | None = None, block_expert: torch.Tensor | None = None,
            routing: torch.Tensor | None = None) -> None:
    bk, bkp, split = k_step(bits, group)
    stride_we, stride_se = (w.stride(0), s.stride(0)) if w.dim() == 3 else (0, 0)
    unused = c  # pointer arguments the mode does not read
    args = (a, w, s, c, *(unused if t is None else t for t in (sorted_pairs, block_expert, routing)),
            num_rows, n, k, *up, num_pid_m, a.stride(0), a.stride(1), stride_we, w.stride(-2), w.stride(-1), stride_se,
            s.stride(-2), s.stride(-1), c.stride(0), c.stride(1))
    consts = dict(MODE=mode, TOP_K=top_k, BITS=bits, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_K=bk, BLOCK_KP=bkp, SPLIT_SCALE=split, SWAP_AB=cfg.swap_ab, GROUP_M=cfg.group_m,
                  DOT_DTYPE=_dot_dtype(c.device))
    grid = (num_pid_m * triton.cdiv(n, cfg.block_n),)
    key = (c.device, mode, bits, group, cfg)
    stages = _stages_that_fit.get(key, cfg.num_stages)
    while True:
        try:
            _quant_gemm_kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=stages)
            return
        except OutOfResources:
            # a GPU with less shared memory than the config was sized for: fewer pipeline stages (raised when
            # the kernel is loaded, before anything is queued, so retrying is safe)
            if stages <= 1:
                raise
            stages -= 1
            _stages_that_fit[key] = stages


# (device, mode, bits, group, config) -> pipeline stages that fit this GPU's shared memory
_stages_that_fit: dict[tuple, int] = {}


def quant_linear(x: torch.Tensor, m: GPUQuantMatrix, config: GemmConfig | None = None) -> torch.Tensor:
    """y [M, N] bf16 = x [M, K] @ W^T for a GPU-layout INT8/INT4 matrix (x is cast to bf16; the tensor-core
    path also takes an expert's matrix views, ``GPUExperts.matrices``). Up to
    GEMV_MAX_TOKENS rows (without an explicit ``config``) it runs the matrix-vector kernel of ``gemv``."""
    if x.dim() != 2 or x.shape[1] != m.k:
        raise ValueError(f"x must be [M, {m.k}], got {tuple(x.shape)}")
    rows = x.shape[0]
    if config is None and rows <= GEMV_MAX_TOKENS:
        return linear_gemv(x, m)
    y = torch.empty((rows, m.n), dtype=torch.bfloat16, device=x.device)
    if rows == 0:
        return y
    cfg = config or linear_config(rows, m.n, x.device)
    _launch(MODE_DENSE, x.to(torch.bfloat16), m.qweight, m.scales, y, bits=m.bits, group=m.group,
            num_rows=rows, n=m.n, k=m.k, num_pid_m=triton.cdiv(rows, cfg.block_m), cfg=cfg)
    return y


def fused_moe(x: torch.Tensor, experts: GPUExperts, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              config: GemmConfig | None = None) -> torch.Tensor:
    """Routed experts: y[t] = sum_j w[t, j] * down(silu(gate x[t]) * up x[t]) of expert ids[t, j].

    x [T, H] (cast to bf16), topk_weights [T, k] float, topk_ids [T, k] int indexing experts (ids outside
    [0, E), e.g. -1 for experts not on this device, contribute nothing). Returns [T, H] bf16. No host sync.
    Up to GEMV_MAX_TOKENS tokens (without an explicit ``config``) it runs the matrix-vector kernels of
    ``moe_decode``.
    """
    t, h = x.shape
    k = topk_ids.shape[1]
    i, e = experts.intermediate, experts.num_experts
    if h != experts.hidden or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != t:
        raise ValueError(f"x {tuple(x.shape)}, weights {tuple(topk_weights.shape)}, ids {tuple(topk_ids.shape)} "
                         f"do not fit experts with hidden={experts.hidden}")
    if t == 0:
        return torch.empty((0, h), dtype=torch.bfloat16, device=x.device)
    if config is None and t <= GEMV_MAX_TOKENS:
        return moe_gemv(x, experts, topk_weights, topk_ids).to(torch.bfloat16)
    num_pairs = t * k
    cfg = config or moe_config(num_pairs, e, experts.bits)
    align = align_by_expert(topk_ids, e, cfg.block_m)
    p_max = align.sorted_pairs.shape[0]
    num_pid_m = p_max // cfg.block_m
    x = x.to(torch.bfloat16)
    act = torch.empty((p_max, i), dtype=torch.bfloat16, device=x.device)  # indexed by sorted slot
    w, s, up_w, up_s = experts.gate_up()
    _launch(MODE_GATE_UP, x, w, s, act, bits=experts.bits, group=experts.group,
            num_rows=num_pairs, n=i, k=h, num_pid_m=num_pid_m, cfg=cfg, top_k=k, up=(up_w, up_s),
            sorted_pairs=align.sorted_pairs, block_expert=align.block_expert)
    # skipped pairs are never written, so they must read as zero in the per-pair sum
    per_pair = torch.zeros((num_pairs, h), dtype=torch.bfloat16, device=x.device)
    routing = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _launch(MODE_DOWN, act, *experts.down(), per_pair, bits=experts.bits, group=experts.group,
            num_rows=num_pairs, n=h, k=i, num_pid_m=num_pid_m, cfg=cfg, top_k=k,
            sorted_pairs=align.sorted_pairs, block_expert=align.block_expert, routing=routing)
    if k == 1:
        return per_pair
    return per_pair.view(t, k, h).sum(dim=1)  # torch accumulates bf16 reductions in float32
