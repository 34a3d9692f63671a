"""Triton decode attention for multi-head latent attention (MLA) in the absorbed form, reading the KV cache as stored.

One decode step has one query token, so a program per head would do a few tiny dots and leave most SMs idle.
Instead the key range is cut into splits ("flash-decoding"): each program takes every head at once for its
range, which turns scoring into one dot of [H, R] x [R, BLOCK_S] per block (all heads share the cached
latent, so each cached byte is read once per step), keeps an online softmax (running max, sum, weighted
latent sum) and writes that partial state to scratch; a second, tiny kernel merges the partials. Split count
grows with the span so long contexts fill the GPU while short ones stay cheap to combine.

The position of the query is read on the device, never on the host, so a step can be captured in a CUDA graph
with a fixed span: splits that start past the position run no block and leave an empty partial (max -inf,
sum 0), which the combine weighs as zero. Keys past the position are loaded as zeros, so whatever the unwritten
or stale slots hold (even inf or NaN) cannot leak into the result.

FP8 caches keep one float32 scale per token. The e4m3 values are exact in float16 (one conversion instruction
on sm_89+; as bfloat16 operands the kernel measured about 25% slower at long spans on an H100), so the dots take
them unscaled and the scale goes onto the scores and the probabilities instead: no dequantised copy of the
cache. Each head's query is scaled by a power of two into float16's range first, so no query overflows it.

Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) the dots run in float32, since the interpreter
mishandles bfloat16 dots and casts from float8 to bfloat16. It loads every finite float8 value exactly but reads
the NaN bytes 0x7F/0xFF as +-480; a quantised cache never holds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to

FP8 = torch.float8_e4m3fn
BLOCK_S = 64  # keys per block: the N side of the score dot and the K side of the value dot
MAX_SPLITS = 128  # about one program per SM of an H100 (132) at long spans
COMBINE_BLOCK_R = 64  # latent columns per combine program
NUM_WARPS = 8  # on the H100, 4 warps spill registers with an FP8 cache; BF16 runs as fast with either
# FP8: the value dot's left operand is probability * per-token scale * P_SCALE (a power of two, undone on the
# sum): with _to_fp8's scales (max |latent| / 448) that is at most 0.57 * max |latent| and rarely subnormal
P_SCALE = 256.0


@triton.jit
def _load_query(ptrs, mask, DOT_DTYPE: tl.constexpr):
    """Query rows as dot operands, each scaled by a power of two to a largest |value| in about [1, 4), and
    those powers [H_PAD]: float16 operands then cannot overflow whatever the query's magnitude."""
    q = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    q_max = tl.max(tl.abs(q), axis=1)
    q_exp = tl.floor(tl.log2(tl.where(q_max > 0, q_max, 1.0)))  # zero rows (padded heads) keep 1
    return (q * tl.exp2(-q_exp)[:, None]).to(DOT_DTYPE), tl.exp2(q_exp)


@triton.jit
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, lat_ptr, lat_scale_ptr, pe_ptr, pe_scale_ptr, pos_ptr,
    m_ptr, l_ptr, acc_ptr,
    H, R, DR, span, qk_scale,
    stride_qh, stride_qph, stride_lat, stride_pe,
    R_PAD: tl.constexpr, DR_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr, SCALED: tl.constexpr, P_SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    split = tl.program_id(0)
    offs_h = tl.arange(0, H_PAD)
    offs_r = tl.arange(0, R_PAD)
    offs_d = tl.arange(0, DR_PAD)
    r_mask = offs_r[None, :] < R
    d_mask = offs_d[None, :] < DR
    h_mask = offs_h[:, None] < H
    # padded heads and columns are zeros: finite scores, results never read
    q, q_mult = _load_query(q_lat_ptr + offs_h[:, None] * stride_qh + offs_r[None, :], h_mask & r_mask, DOT_DTYPE)
    qp, qp_mult = _load_query(q_pe_ptr + offs_h[:, None] * stride_qph + offs_d[None, :], h_mask & d_mask,
                              DOT_DTYPE)
    q_mult = (q_mult * qk_scale)[:, None]  # scores in log2 units
    qp_mult = (qp_mult * qk_scale)[:, None]

    position = tl.load(pos_ptr)
    start = split * (BLOCKS_PER_SPLIT * BLOCK_S)
    # the keys this split sees: its own range, cut at the span and just after the query's position
    end = tl.minimum(tl.minimum(start + BLOCKS_PER_SPLIT * BLOCK_S, span), position + 1)

    m_i = tl.full([H_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([H_PAD], dtype=tl.float32)
    acc = tl.zeros([H_PAD, R_PAD], dtype=tl.float32)
    # every block entered holds at least one visible key (its first), so the running max turns finite at once
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < end
        rows = offs_s.to(tl.int64)
        lat = tl.load(lat_ptr + rows[:, None] * stride_lat + offs_r[None, :], mask=s_mask[:, None] & r_mask,
                      other=0.0)
        lat = lat.to(DOT_DTYPE)
        pe = tl.load(pe_ptr + rows[:, None] * stride_pe + offs_d[None, :], mask=s_mask[:, None] & d_mask, other=0.0)
        pe = pe.to(DOT_DTYPE)
        scores = tl.dot(q, tl.trans(lat)) * q_mult  # [H_PAD, BLOCK_S]
        scores_pe = tl.dot(qp, tl.trans(pe)) * qp_mult
        if SCALED:
            lat_scale = tl.load(lat_scale_ptr + rows, mask=s_mask, other=0.0)
            pe_scale = tl.load(pe_scale_ptr + rows, mask=s_mask, other=0.0)
            scores = scores * lat_scale[None, :] + scores_pe * pe_scale[None, :]
        else:
            scores = scores + scores_pe
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SCALED:
            p = p * (lat_scale * P_SCALE)[None, :]  # the value dot takes the latent unscaled
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), lat)
        m_i = m_new
    if SCALED:
        acc = acc * (1.0 / P_SCALE)

    row = split * H_PAD + offs_h
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row[:, None].to(tl.int64) * R_PAD + offs_r[None, :], acc)


@triton.jit
def _mla_decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_oh, R,
    R_PAD: tl.constexpr, H_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    h = tl.program_id(0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, SPLITS_PAD)
    p_mask = offs_p < num_splits
    row = offs_p * H_PAD + h
    m = tl.load(m_ptr + row, mask=p_mask, other=float("-inf"))
    l_p = tl.load(l_ptr + row, mask=p_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    # empty splits (max -inf) weigh zero; tl.where rather than exp2(-inf - max), which is NaN if all were empty
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    acc = tl.load(acc_ptr + row[:, None].to(tl.int64) * R_PAD + offs_r[None, :], mask=p_mask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_p * w, axis=0)
    out_ty = out_ptr.dtype.element_ty  # float32, or the compute dtype rounded as torch's .to() rounds
    tl.store(out_ptr + h * stride_oh + offs_r, round_to(out, out_ty).to(out_ty), mask=offs_r < R)


def split_plan(span: int, block_s: int = BLOCK_S, max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(number of splits, blocks of ``block_s`` keys per split) for a span: one block per split until there
    are ``max_splits``, then longer splits."""
    blocks = triton.cdiv(span, block_s)
    per_split = triton.cdiv(blocks, max_splits)
    return triton.cdiv(blocks, per_split), per_split


def _dot_dtype(device: torch.device, fp8: bool) -> tl.dtype:
    """Operand type of the dots: bfloat16 on CUDA, float16 for an FP8 cache there (e4m3 converts to it in one
    instruction, exactly); float32 under the interpreter."""
    if device.type != "cuda":
        return tl.float32
    return tl.float16 if fp8 else tl.bfloat16


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                         latent_scale: torch.Tensor | None, k_pe: torch.Tensor, k_pe_scale: torch.Tensor | None,
                         position: torch.Tensor, span: int, scale: float, *, block_s: int = BLOCK_S,
                         max_splits: int = MAX_SPLITS, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Absorbed-MLA attention of one query token over a layer's cache, in the latent space.

    q_lat [H, R] (the no-rope query times W_uk), q_pe [H, Dr] (rotated); latent [cap, R] and k_pe [cap, Dr]
    in the compute dtype (scales None) or float8_e4m3fn with float32 scales latent_scale / k_pe_scale [cap]
    (value = fp8 * scale[s]). position: one-element int64 device tensor; keys s <= position and s < span are
    visible, the rest ignored whatever they hold. span (<= cap) fixes the launch shape, so a CUDA graph
    captured for a span serves every position below it. scale: the softmax scale of the scores.

    Returns out_lat [H, R] = softmax_s(scale * (q_lat . latent[s] + q_pe . k_pe[s])) @ latent[s], float32 or
    ``out_dtype`` (rounded as ``.to(out_dtype)`` would round it). Two launches, no host sync. block_s and
    max_splits tune the split scheme (see :func:`split_plan`).
    """
    if q_lat.dim() != 2 or q_pe.dim() != 2 or q_pe.shape[0] != q_lat.shape[0]:
        raise ValueError(f"q_lat must be [H, R] and q_pe [H, Dr], got {tuple(q_lat.shape)}, {tuple(q_pe.shape)}")
    h, r = q_lat.shape
    dr = q_pe.shape[1]
    cap = latent.shape[0]
    if latent.shape != (cap, r) or k_pe.shape != (cap, dr):
        raise ValueError(f"latent must be [cap, {r}] and k_pe [cap, {dr}], got {tuple(latent.shape)}, "
                         f"{tuple(k_pe.shape)}")
    if not _is_pow2(block_s) or block_s < 16:
        raise ValueError(f"block_s must be a power of two >= 16 (a tl.dot side), got {block_s}")
    if not 0 < span <= cap:
        raise ValueError(f"span must be in [1, {cap}], got {span}")
    if position.numel() != 1 or position.device != latent.device:
        raise ValueError("position must be a one-element tensor on the cache's device")
    fp8 = latent.dtype == FP8
    if fp8 != (k_pe.dtype == FP8) or fp8 != (latent_scale is not None) or fp8 != (k_pe_scale is not None):
        raise ValueError("an FP8 cache needs both tensors in float8_e4m3fn and both scales; other caches none")
    if h == 0:
        return torch.empty((0, r), dtype=out_dtype, device=q_lat.device)

    device = latent.device
    if fp8:
        latent_scale = latent_scale.to(torch.float32).contiguous()
        k_pe_scale = k_pe_scale.to(torch.float32).contiguous()
    if q_lat.stride(1) != 1 or q_pe.stride(1) != 1:
        q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    if latent.stride(1) != 1 or k_pe.stride(1) != 1:
        raise ValueError("latent and k_pe need a contiguous last dimension")

    # dot sides are powers of two >= 16: heads, latent and rope columns are padded (masked) to them
    h_pad, r_pad, dr_pad = (max(16, triton.next_power_of_2(n)) for n in (h, r, dr))
    num_splits, per_split = split_plan(span, block_s, max_splits)
    m = torch.empty((num_splits, h_pad), dtype=torch.float32, device=device)
    l_sum = torch.empty((num_splits, h_pad), dtype=torch.float32, device=device)
    acc = torch.empty((num_splits, h_pad, r_pad), dtype=torch.float32, device=device)
    out = torch.empty((h, r), dtype=out_dtype, device=device)
    unused = m  # scale pointers of an unscaled cache
    _mla_decode_split_kernel[(num_splits,)](
        q_lat, q_pe, latent, latent_scale if fp8 else unused, k_pe, k_pe_scale if fp8 else unused, position,
        m, l_sum, acc,
        h, r, dr, span, scale * 1.4426950408889634,  # log2(e): the softmax runs on exp2
        q_lat.stride(0), q_pe.stride(0), latent.stride(0), k_pe.stride(0),
        R_PAD=r_pad, DR_PAD=dr_pad, H_PAD=h_pad, BLOCK_S=block_s, BLOCKS_PER_SPLIT=per_split, SCALED=fp8,
        P_SCALE=P_SCALE, DOT_DTYPE=_dot_dtype(device, fp8), num_warps=NUM_WARPS,
    )
    block_r = min(r_pad, COMBINE_BLOCK_R)
    _mla_decode_combine_kernel[(h, triton.cdiv(r, block_r))](
        m, l_sum, acc, out, num_splits, out.stride(0), r,
        R_PAD=r_pad, H_PAD=h_pad, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), BLOCK_R=block_r, num_warps=4,
    )
    return out
