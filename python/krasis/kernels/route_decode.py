"""A decode step's expert routing in two launches: router logits, then scores, top-k and the staged row.

``ops.router.route`` plus packing the CPU experts' inputs is about ten small torch kernels per layer. Here one
kernel computes the logits (float32 dots over bf16 or float32 weights; rounded to the compute dtype first
where the model's router runs in it), and one program per token scores them (softmax or sigmoid), picks the
top k (by the bias-corrected score where the model has a correction bias), normalises and scales the
weights as ``route`` does, and writes the staging row [x | weights | ids] that is copied to pinned memory for
the CPU experts. Group-limited routing is not covered (``fusable`` says so); it keeps the torch path, and
``flag_pairs`` adds the per-pair flags below to its staged row.

A one-graph decode step's rows end with one flag per routed pair, telling the host which pairs the GPU runs:
1.0 where a prefetch claimed the expert (``claims``), 2.0 where the step streams it over PCIe (``StreamSplit``),
0.0 for the host's own (or resident) pairs. The split is decided per step: of the pairs neither resident nor
claimed (n of them), the last ``streamed_count(n, share)`` in the router's order (its lowest-ranked) are
streamed, so every layer sends both links about their share of its work, not a share of the experts by id.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..models.spec import RouterSpec
from .rounding import round_to


@triton.jit
def _logits_kernel(x_ptr, w_ptr, out_ptr, E, H, stride_x, stride_w, stride_out, ROUND: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_mask = h < H
        x = tl.load(x_ptr + t * stride_x + h, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * stride_w + h[None, :], mask=e_mask[:, None] & h_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if ROUND:  # a router that runs in the compute dtype rounds its logits to it
        acc = round_to(acc, x_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_out + e, acc, mask=e_mask)


# A few experts per program: the router is a few hundred KB read once, so one program per block of 64 experts
# (one SM) took ~43 us per layer on an H100; 16-32 programs read it in a few us.
LOGITS_BLOCK_E = 4
LOGITS_BLOCK_H = 512


def router_logits(x: torch.Tensor, router: torch.Tensor, out: torch.Tensor, rounded: bool) -> None:
    """Router logits of x [T, H] by the router weight [E, H] into ``out`` (float32 [T, E]): float32 dots, rounded
    to x's dtype where ``rounded`` (a router that runs in the compute dtype). Rows must be contiguous. No host
    sync."""
    (t, h), e = x.shape, router.shape[0]
    block_e = min(LOGITS_BLOCK_E, triton.next_power_of_2(e))
    _logits_kernel[(t, triton.cdiv(e, block_e))](x, router, out, e, h, x.stride(0), router.stride(0), out.stride(0),
                                                 ROUND=rounded, BLOCK_E=block_e,
                                                 BLOCK_H=min(LOGITS_BLOCK_H, triton.next_power_of_2(h)),
                                                 num_warps=4)


@triton.jit
def scores_and_choice(logits, bias_ptr, e, e_mask, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A router's scores of experts ``e`` from their logits (sigmoid, or softmax over the unmasked ones; 0 where
    masked) and what it picks its top k by (the scores plus the per-expert correction bias at ``bias_ptr`` where
    it has one; -inf where masked)."""
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        p = tl.exp(logits - tl.max(logits, axis=0))
        scores = p / tl.sum(p, axis=0)
    scores = tl.where(e_mask, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    return scores, tl.where(e_mask, choice, float("-inf"))


class StreamSplit(NamedTuple):
    """What a one-token step needs to split its routed pairs between the CPU and PCIe: the layer's hot-cache
    table (``resident``, int32 [E], >= 0 where the expert is in VRAM), the streamed share (``share``, float32
    [1] on the device, so a captured graph follows changes) and the map the step writes for the gather
    (``expert_map``, int32 [E]: the expert's own index where streamed this step, -1 elsewhere)."""

    resident: torch.Tensor
    share: torch.Tensor
    expert_map: torch.Tensor


@triton.jit
def _pair_flags(picked, k_mask, claims_ptr, resident_ptr, share_ptr, map_ptr, E, CLAIMS: tl.constexpr,
                STREAM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each routed pair's flag (1.0 claimed, 2.0 streamed, 0.0 else; see the module docstring) of one token whose
    experts are ``picked`` (int32 [BLOCK_K], in the router's order; ``k_mask`` the real pairs); with STREAM, also
    writes the gather's expert map (all E entries)."""
    flag = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if CLAIMS:
        flag = tl.where(tl.load(claims_ptr + picked, mask=k_mask, other=-1) >= 0, 1.0, flag)
    if STREAM:
        resident = tl.load(resident_ptr + picked, mask=k_mask, other=0) >= 0
        candidate = (k_mask & ~resident & (flag == 0.0)).to(tl.int32)
        n = tl.sum(candidate, axis=0)
        count = (n.to(tl.float32) * tl.load(share_ptr) + 0.5).to(tl.int32)  # streamed_count: n * share, rounded
        later = n - tl.cumsum(candidate, axis=0)  # candidates after each pair: the last `count` are streamed
        streamed = (candidate > 0) & (later < count)
        flag = tl.where(streamed, 2.0, flag)
        e = tl.arange(0, BLOCK_E)
        hit = tl.max(((e[:, None] == picked[None, :]) & streamed[None, :]).to(tl.int32), axis=1)
        tl.store(map_ptr + e, tl.where(hit > 0, e, -1), mask=e < E)
    return flag


@triton.jit
def _select_kernel(logits_ptr, bias_ptr, x_ptr, weights_ptr, ids_ptr, staged_ptr, claims_ptr, resident_ptr, share_ptr,
                   map_ptr, E, H, scaling, stride_l, stride_x, stride_w, stride_ids, stride_staged,
                   TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                   ROUND: tl.constexpr, FLAGS: tl.constexpr, CLAIMS: tl.constexpr, STREAM: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    logits = tl.load(logits_ptr + t * stride_l + e, mask=e_mask, other=float("-inf"))
    scores, choice = scores_and_choice(logits, bias_ptr, e, e_mask, SIGMOID, HAS_BIAS)
    j = tl.arange(0, BLOCK_K)
    picked = tl.zeros((BLOCK_K,), dtype=tl.int32)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # the best remaining expert, the lowest index among equals
        best = tl.max(choice, axis=0)
        idx = tl.min(tl.where(choice == best, e, BLOCK_E), axis=0)
        picked = tl.where(j == k, idx, picked)
        weights = tl.where(j == k, tl.sum(tl.where(e == idx, scores, 0.0), axis=0), weights)
        choice = tl.where(e == idx, float("-inf"), choice)
    if NORM:
        if HAS_BIAS:
            weights = weights / (tl.sum(weights, axis=0) + 1e-20)
        else:
            weights = weights / tl.sum(weights, axis=0)
    weights = weights * scaling
    if ROUND:
        weights = round_to(weights, x_ptr.dtype.element_ty)
    k_mask = j < TOP_K
    tl.store(weights_ptr + t * stride_w + j, weights, mask=k_mask)
    tl.store(ids_ptr + t * stride_ids + j, picked.to(tl.int64), mask=k_mask)
    row = staged_ptr + t * stride_staged
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        tl.store(row + h, tl.load(x_ptr + t * stride_x + h, mask=h < H, other=0.0).to(tl.float32), mask=h < H)
    tl.store(row + H + j, weights, mask=k_mask)
    tl.store(row + H + TOP_K + j, picked.to(tl.float32), mask=k_mask)
    if FLAGS:
        flag = _pair_flags(picked, k_mask, claims_ptr, resident_ptr, share_ptr, map_ptr, E, CLAIMS, STREAM, BLOCK_E,
                           BLOCK_K)
        tl.store(row + H + 2 * TOP_K + j, flag, mask=k_mask)


@triton.jit
def _flag_kernel(ids_ptr, claims_ptr, resident_ptr, share_ptr, map_ptr, row_ptr, E, TOP_K: tl.constexpr,
                 CLAIMS: tl.constexpr, STREAM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    j = tl.arange(0, BLOCK_K)
    k_mask = j < TOP_K
    picked = tl.load(ids_ptr + j, mask=k_mask, other=0).to(tl.int32)
    flag = _pair_flags(picked, k_mask, claims_ptr, resident_ptr, share_ptr, map_ptr, E, CLAIMS, STREAM, BLOCK_E,
                       BLOCK_K)
    tl.store(row_ptr + j, flag, mask=k_mask)


def fusable(spec: RouterSpec, router: object) -> bool:
    """Whether ``route_and_stage`` covers this router: a torch weight, no group limit."""
    return isinstance(router, torch.Tensor) and not (spec.group_limited and spec.n_group > 1)


def staged_columns(hidden: int, top_k: int, flags: bool) -> int:
    """Width of a staged row: [x | weights | ids], plus [| flags] in a one-graph step (module docstring)."""
    return hidden + (3 if flags else 2) * top_k


def _flag_args(e: int, ids: torch.Tensor, claims: torch.Tensor | None, split: StreamSplit | None) -> tuple:
    """Checked pointers for ``_pair_flags`` (claims, resident, share, map; ``ids`` stands in for unused ones)."""
    if claims is not None and claims.shape != (e,):
        raise ValueError(f"claims must be int32 [{e}], got {tuple(claims.shape)}")
    if split is not None:
        if split.resident.shape != (e,) or split.expert_map.shape != (e,) or split.share.numel() != 1:
            raise ValueError(f"a stream split needs resident and expert_map of [{e}] and a one-element share")
        if ids.shape[0] != 1:
            raise ValueError("a stream split is per step: one token")
    s = split if split is not None else StreamSplit(ids, ids, ids)
    return (claims if claims is not None else ids), s.resident, s.share, s.expert_map


def route_and_stage(x: torch.Tensor, router: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None, flags: bool = False,
                    claims: torch.Tensor | None = None, split: StreamSplit | None = None,
                    staged: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing of x [T, H] by the router weight [E, H]: (weights float32 [T, k], ids int64 [T, k], the staging
    rows float32 [T, H + 2k] = [x | weights | ids]), as ``Forward.route`` (then ``.float()``) and
    ``HybridExperts.stage`` give them; the weights and ids are written to ``out`` when given (fixed buffers
    that later CUDA graphs read). With ``flags`` the rows gain k columns, [x | weights | ids | flags], each pair's
    flag as the module docstring says: from ``claims`` (int32 [E]: >= 0 where the GPU has the expert from a
    prefetch) and ``split`` (one token only; its expert map is written too). ``staged``: where the rows go
    (float32 [T, columns], rows contiguous; page-locked host memory the CPU experts read, so no copy follows). No
    host sync."""
    if not fusable(spec, router):
        raise ValueError("group-limited routing is not fused; use ops.router.route")
    if spec.correction_bias and correction_bias is None:
        raise ValueError("this router adds a per-expert correction bias, but none was given")
    if not flags and (claims is not None or split is not None):
        raise ValueError("claims and a stream split are written as flags: pass flags=True")
    t, h = x.shape
    e, k = router.shape[0], spec.top_k
    if router.shape[1] != h or router.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"router {tuple(router.shape)} and x {tuple(x.shape)} need matching, contiguous rows")
    # a router that runs in the compute dtype rounds its logits and weights to it
    in_compute_dtype = not spec.float32_logits and x.dtype != torch.float32
    logits = torch.empty((t, e), dtype=torch.float32, device=x.device)
    router_logits(x, router, logits, in_compute_dtype)
    if out is None:
        weights = torch.empty((t, k), dtype=torch.float32, device=x.device)
        ids = torch.empty((t, k), dtype=torch.int64, device=x.device)
    else:
        weights, ids = out
        if weights.shape != (t, k) or ids.shape != (t, k) or weights.dtype != torch.float32 or ids.dtype != torch.int64:
            raise ValueError(f"out must be float32 and int64 tensors of [{t}, {k}]")
    flag_args = _flag_args(e, ids, claims, split)
    columns = staged_columns(h, k, flags)
    if staged is None:
        staged = torch.empty((t, columns), dtype=torch.float32, device=x.device)
    elif staged.shape != (t, columns) or staged.dtype != torch.float32 or staged.stride(1) != 1:
        raise ValueError(f"staged must be float32 [{t}, {columns}] with contiguous rows, got {tuple(staged.shape)}")
    bias = correction_bias if spec.correction_bias else logits  # unused pointer without a bias
    _select_kernel[(t,)](logits, bias, x, weights, ids, staged, *flag_args, e, h, float(spec.routed_scaling_factor),
                         logits.stride(0), x.stride(0), weights.stride(0), ids.stride(0), staged.stride(0),
                         TOP_K=k, SIGMOID=spec.scoring == "sigmoid", HAS_BIAS=spec.correction_bias,
                         NORM=spec.norm_topk_prob and (spec.correction_bias or k > 1),
                         ROUND=in_compute_dtype, FLAGS=flags, CLAIMS=claims is not None, STREAM=split is not None,
                         BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(k), BLOCK_H=1024,
                         num_warps=4)
    return weights, ids, staged


def flag_pairs(ids: torch.Tensor, num_experts: int, row: torch.Tensor, claims: torch.Tensor | None = None,
               split: StreamSplit | None = None) -> None:
    """The flags ``route_and_stage`` writes with ``flags``, for a step routed otherwise (group-limited routing):
    one token's routed ``ids`` (int [1, k]) flagged into ``row`` (float32 [k], the staged row's last k columns)
    from ``claims`` and ``split`` (whose expert map is written too). No host sync."""
    k = ids.numel()
    if ids.shape != (1, k) or row.shape != (k,) or row.dtype != torch.float32:
        raise ValueError(f"ids must be [1, k] and row float32 [k], got {tuple(ids.shape)} and {tuple(row.shape)}")
    _flag_kernel[(1,)](ids, *_flag_args(num_experts, ids, claims, split), row, num_experts, TOP_K=k,
                       CLAIMS=claims is not None, STREAM=split is not None,
                       BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(k), num_warps=1)
