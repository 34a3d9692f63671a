"""Routed experts for a few tokens (decode) as matrix-vector kernels: no expert alignment, no padded rows.

``fused_moe``'s grouped GEMM pads every routed pair to a 16-row block and needs an alignment pass first; for
one token that is five launches and 15 wasted rows per expert. Here each (token, slot) pair is one row of
programs: ``gate_up`` computes act[pair] = silu(x W_g^T) * (x W_u^T) over a block of intermediate columns,
``down`` computes the pair's weighted down projection over a block of hidden columns in float32, and ``sum``
adds a token's pairs (into an output that may already hold a share, e.g. the hot cache's, so a CUDA graph
needs no extra add). Three launches whatever k is; pairs whose id is outside [0, E) read no weights.

Weights are the store layout (``expert_layout``): each column's packed K values contiguous, so a program's loads
run along K, a row of bytes per column. Dequantisation is the grouped kernel's: integers exact in float32, scale
per (group, column).

Slots past the experts' own (``extra``) live in separate allocations named by a device table of addresses, so
the hot cache can hold experts in memory it takes and gives back between prompts while a captured CUDA graph
(which holds the table's address, not the slots') stays valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .expert_layout import GPUExperts
from .gemv import dequant_tile, dot_steps, gemv_consts


@triton.jit
def _slot_start(e, E, w_ptr, s_ptr, stride_we, stride_se, extra_ptr, COL: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """Where slot ``e``'s packed weights and scales start: in the tensors below E, else at the addresses in row
    e - E of the extra table (its columns COL and COL + 1)."""
    w = w_ptr + e * stride_we
    s = s_ptr + e * stride_se
    if HAS_EXTRA:
        if e >= E:
            row = extra_ptr + (e - E) * 4 + COL
            # 16-byte aligned (``extra_slot_addresses`` checks): the loads stay as wide as the tensors' own
            w = tl.multiple_of(tl.load(row), 16).to(tl.pointer_type(w_ptr.dtype.element_ty))
            s = tl.multiple_of(tl.load(row + 1), 16).to(tl.pointer_type(s_ptr.dtype.element_ty))
    return w, s


@triton.jit
def _pair_slot(ids_ptr, pair, map_ptr, MAP_N, HAS_MAP: tl.constexpr):
    """The slot pair ``pair`` runs: its id, or with a map the map's entry for it (-1 for an id outside the map)."""
    e = tl.load(ids_ptr + pair).to(tl.int64)
    if HAS_MAP:
        inside = (e >= 0) & (e < MAP_N)
        e = tl.where(inside, tl.load(map_ptr + tl.where(inside, e, 0)).to(tl.int64), -1)
    return e


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, map_ptr, MAP_N, w_ptr, s_ptr, extra_ptr, act_ptr, K, I, E, E_EXTRA, UP_W, UP_S,
                    stride_x, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn, stride_act,
                    TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr, SPLIT_SCALE: tl.constexpr,
                    UNROLL: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_MAP: tl.constexpr):
    pair = tl.program_id(0)
    e = _pair_slot(ids_ptr, pair, map_ptr, MAP_N, HAS_MAP)
    if (e < 0) | (e >= E + E_EXTRA):  # not this device's expert: the down kernel skips the pair too
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x
    w_e, s_e = _slot_start(e, E, w_ptr, s_ptr, stride_we, stride_se, extra_ptr, 0, HAS_EXTRA)
    w_base = w_e + tl.arange(0, BLOCK_KP)[:, None] * stride_wk + offs_n[None, :] * stride_wn
    s_base = s_e + offs_n * stride_sn
    gate = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
    k_main = K - K % (BLOCK_K * UNROLL)
    for k1 in range(0, k_main, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):  # independent steps: their loads are in flight together
            k0 = k1 + u * BLOCK_K
            w_ptrs = w_base + (k0 * BLOCK_KP // BLOCK_K) * stride_wk
            s_ptrs = s_base + (k0 // GROUP) * stride_sk
            gate += dequant_tile(x_row, k0, w_ptrs, s_ptrs, stride_sk, n_mask, BITS, BLOCK_KP, SPLIT_SCALE)
            up += dequant_tile(x_row, k0, w_ptrs + UP_W, s_ptrs + UP_S, stride_sk, n_mask, BITS, BLOCK_KP, SPLIT_SCALE)
    for k0 in range(k_main, K, BLOCK_K):
        w_ptrs = w_base + (k0 * BLOCK_KP // BLOCK_K) * stride_wk
        s_ptrs = s_base + (k0 // GROUP) * stride_sk
        gate += dequant_tile(x_row, k0, w_ptrs, s_ptrs, stride_sk, n_mask, BITS, BLOCK_KP, SPLIT_SCALE)
        up += dequant_tile(x_row, k0, w_ptrs + UP_W, s_ptrs + UP_S, stride_sk, n_mask, BITS, BLOCK_KP, SPLIT_SCALE)
    gate_sum = tl.sum(gate, axis=0)
    act = gate_sum / (1.0 + tl.exp(-gate_sum)) * tl.sum(up, axis=0)
    # rounded to bf16 as the grouped kernel's activations are
    tl.store(act_ptr + pair * stride_act + offs_n, act.to(act_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _down_kernel(act_ptr, ids_ptr, map_ptr, MAP_N, rw_ptr, w_ptr, s_ptr, extra_ptr, out_ptr, K, H, E, E_EXTRA,
                 stride_act, stride_we, stride_wk, stride_wn, stride_se, stride_sk, stride_sn, stride_out,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_KP: tl.constexpr, SPLIT_SCALE: tl.constexpr, UNROLL: tl.constexpr, HAS_EXTRA: tl.constexpr,
                 HAS_MAP: tl.constexpr):
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    e = _pair_slot(ids_ptr, pair, map_ptr, MAP_N, HAS_MAP)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if (e >= 0) & (e < E + E_EXTRA):
        a_row = act_ptr + pair * stride_act
        w_e, s_e = _slot_start(e, E, w_ptr, s_ptr, stride_we, stride_se, extra_ptr, 2, HAS_EXTRA)
        w_base = w_e + tl.arange(0, BLOCK_KP)[:, None] * stride_wk + offs_n[None, :] * stride_wn
        s_base = s_e + offs_n * stride_sn
        tile = dot_steps(a_row, w_base, s_base, 0, K, stride_wk, stride_sk, n_mask, BITS, GROUP, BLOCK_N, BLOCK_K,
                         BLOCK_KP, SPLIT_SCALE, UNROLL)
        acc = tl.sum(tile, axis=0) * tl.load(rw_ptr + pair)
    tl.store(out_ptr + pair * stride_out + offs_n, acc, mask=n_mask)


@triton.jit
def _sum_pairs_kernel(pairs_ptr, out_ptr, H, stride_pairs, stride_out, TOP_K: tl.constexpr,
                      ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(pairs_ptr + (t * TOP_K + j) * stride_pairs + offs, mask=mask, other=0.0)
    if ACCUMULATE:
        acc += tl.load(out_ptr + t * stride_out + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def extra_slot_addresses(slots: GPUExperts) -> torch.Tensor:
    """Rows for ``moe_gemv``'s ``extra`` table: int64 [n, 4] byte addresses of each of ``slots``' experts' gate
    weights, gate scales, down weights and down scales (on the host; copy them into the table)."""
    cols = [t.data_ptr() + t.stride(0) * t.element_size() * torch.arange(slots.num_experts, dtype=torch.int64)
            for t in (*slots.gate_up()[:2], *slots.down())]
    table = torch.stack(cols, dim=1)
    if (table % 16).any():
        raise ValueError("extra expert slots must start at 16-byte aligned addresses (the kernels load them wide)")
    return table


def routed_launch(bits: int, group: int) -> tuple[int, int, dict]:
    """(column block, warps, K-step constants) of the routed-expert kernels: narrow column blocks, many warps and
    8 INT4 steps in flight (4 INT8 ones: an INT8 step is a whole group of rows), for more programs and more loads
    in flight per SM than the dense kernels' choice (`benchmarks/decode_gemv.py --sweep` on the H100: gate/up
    19.7 -> 14.1 µs, down 13.5 -> 8.6 µs, four resident experts of the bench model)."""
    return 16, 8, dict(gemv_consts(bits, group), UNROLL=8 if bits == 4 else 4)


def moe_gemv(x: torch.Tensor, experts: GPUExperts, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             out: torch.Tensor | None = None, accumulate: bool = False,
             extra: torch.Tensor | None = None, slot_of: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts of a few tokens: out[t] (+)= sum_j w[t, j] * down(silu(gate x[t]) * up x[t]) of expert
    ids[t, j] (ids outside [0, E + X) contribute nothing).

    x [T, H] (cast to bf16), topk_weights [T, k] float, topk_ids [T, k] integer. ``out`` [T, H] float32 or
    bf16 (a new float32 tensor when None); with ``accumulate`` the experts' sum is added to what it holds.
    ``extra`` int64 [X, 4] on the device (``extra_slot_addresses``): ids E + j name the expert whose matrices start
    at row j's addresses, laid out as ``experts``' are within a slot; a row must point at live memory
    while ids name it. (The kernels then compile with the table: their float sums may differ in the last bits from
    the kernels without one.) ``slot_of`` int32 [M]: the ids are first mapped through it (the pair of id d runs
    slot slot_of[d]; an id outside [0, M) runs none), as ``moe_gemv(..., slot_of[ids])`` without the gather's
    launch. No host sync: a CUDA graph may hold it."""
    t, h = x.shape
    k = topk_ids.shape[1]
    i, e, bits, group = experts.intermediate, experts.num_experts, experts.bits, experts.group
    if out is None:
        out = torch.zeros((t, h), dtype=torch.float32, device=x.device) if accumulate else torch.empty(
            (t, h), dtype=torch.float32, device=x.device)
    if t == 0:
        return out
    if out.shape != (t, h) or out.stride(1) != 1:
        raise ValueError(f"out must be [{t}, {h}] with contiguous rows, got {tuple(out.shape)}")
    pairs = t * k
    n_extra = 0 if extra is None else extra.shape[0]
    if extra is not None and (extra.dtype != torch.int64 or extra.shape[1:] != (4,) or not extra.is_contiguous()):
        raise ValueError(f"extra must be a contiguous int64 [X, 4] address table, got {extra.dtype} "
                         f"{tuple(extra.shape)}")
    if slot_of is not None and (slot_of.dim() != 1 or not slot_of.is_contiguous() or slot_of.device != x.device
                                or slot_of.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"slot_of must be a contiguous 1-D integer map of ids to slots on {x.device}, got "
                         f"{slot_of.dtype} {tuple(slot_of.shape)} on {slot_of.device}")
    x = x.to(torch.bfloat16).contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    table = ids if extra is None else extra  # (never read without extra slots)
    slot_map, map_n = (ids, 0) if slot_of is None else (slot_of, slot_of.numel())  # (never read without a map)
    act = torch.empty((pairs, i), dtype=torch.bfloat16, device=x.device)
    w, s, up_w, up_s = experts.gate_up()
    bn, warps, consts = routed_launch(bits, group)
    flags = dict(HAS_EXTRA=extra is not None, HAS_MAP=slot_of is not None)
    _gate_up_kernel[(pairs, triton.cdiv(i, bn))](
        x, ids, slot_map, map_n, w, s, table, act, h, i, e, n_extra, up_w, up_s, x.stride(0), *w.stride(),
        *s.stride(), act.stride(0), TOP_K=k, BLOCK_N=bn, **consts, **flags, num_warps=warps)
    per_pair = torch.empty((pairs, h), dtype=torch.float32, device=x.device)
    routing = topk_weights.reshape(-1).to(torch.float32).contiguous()
    w, s = experts.down()
    _down_kernel[(pairs, triton.cdiv(h, bn))](
        act, ids, slot_map, map_n, routing, w, s, table, per_pair, i, h, e, n_extra, act.stride(0), *w.stride(),
        *s.stride(), per_pair.stride(0), BLOCK_N=bn, **consts, **flags, num_warps=warps)
    block = 1024
    _sum_pairs_kernel[(t, triton.cdiv(h, block))](per_pair, out, h, per_pair.stride(0), out.stride(0), TOP_K=k,
                                                  ACCUMULATE=accumulate, BLOCK=block, num_warps=4)
    return out
