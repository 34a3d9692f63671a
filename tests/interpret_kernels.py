"""Checks of the Triton quantised-MoE kernels, shared by two runs:

- CPU (CI): ``TRITON_INTERPRET=1 python tests/interpret_kernels.py`` runs every check through the Triton
  interpreter on tiny shapes and prints one JSON line {check name: "ok" | failure text, "_seconds": {...}}.
  The interpreter must be switched on before ``triton.jit`` decorates the kernels, hence a separate process;
  ``test_gpu_kernels.py`` starts it once and asserts each check in its own test.
- GPU: ``test_gpu_kernels.py`` calls the same checks in process on CUDA with DeepSeek-V2-Lite-like shapes.

Every check draws fresh random inputs (never zeros) and raises AssertionError on a mismatch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from krasis.kernels import (
    GPUExperts,
    align_by_expert,
    copy_experts,
    dequantize_gpu,
    empty_experts,
    expert_gather,
    experts_from_cpu_layout,
    fused_moe,
    quant_linear,
    quantize_cpu_layout,
    to_gpu_layout,
)
from krasis.kernels.embed_lookup import embed_token
from krasis.kernels.expert_gather import gather_experts
from krasis.kernels.fused_norm import add_rms_norm
from krasis.kernels.greedy_choice import GreedyChoice
from krasis.kernels.host_signal import RELEASED, signal_host, wait_copied, wait_host
from krasis.kernels.kv_write import kv_write_at
from krasis.kernels.moe_align import small_align_fits
from krasis.kernels.moe_decode import extra_slot_addresses, moe_gemv
from krasis.kernels.prefetch_decode import predict_experts
from krasis.kernels.quant_moe import DECODE, MEDIUM, PREFILL, PREFILL_INT4
from krasis.kernels.rotary import rotary, rotary_pair
from krasis.kernels.route_decode import route_and_stage
from krasis.models.spec import RouterSpec

# bf16 activations and outputs against a float32 computation with the same quantised weights
REL_TOL = 2e-2


@dataclass(frozen=True)
class Size:
    hidden: int
    inter: int
    experts: int
    top_k: int
    prefill_tokens: int
    linear_rows: tuple[int, ...]
    linear_out: int

    def inter_for(self, group: int) -> int:
        """The intermediate size rounded up to a multiple of the group (K of down must be)."""
        return -(-self.inter // group) * group


# Tiny enough for the interpreter; I = 192 leaves a partial 128-wide N block and H = 128 two 64-wide ones.
SMALL = Size(hidden=128, inter=192, experts=6, top_k=3, prefill_tokens=40, linear_rows=(1, 37), linear_out=200)
# DeepSeek-V2-Lite: H 2048, I 1408 (= 11 * 128), 64 routed experts, top-6.
LARGE = Size(hidden=2048, inter=1408, experts=64, top_k=6, prefill_tokens=2048, linear_rows=(1, 300),
             linear_out=5000)


def rel_norm_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64."""
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def poison_allocator(device: torch.device, nbytes: int = 64 << 20) -> None:
    """Leave NaN bytes in freed memory so a kernel output that is never written shows up as NaN."""
    torch.full((nbytes // 4,), float("nan"), device=device)


def random_matrix(n: int, k: int, bits: int, group: int, device: torch.device):
    """A random W [n, k] quantised in the CPU layout (on device), values scaled so outputs are O(1)."""
    return quantize_cpu_layout(torch.randn(n, k, device=device) / k**0.5, bits, group)


def random_experts(size: Size, bits: int, group: int, device: torch.device, count: int | None = None) -> GPUExperts:
    """``count`` (default size.experts) random experts in the store layout, built on ``device``."""
    h, i = size.hidden, size.inter_for(group)
    n = count or size.experts
    gate, up, down = ([random_matrix(a, b, bits, group, device) for _ in range(n)] for a, b in ((i, h), (i, h), (h, i)))
    return experts_from_cpu_layout(gate, up, down, bits, group)


def random_routing(tokens: int, size: Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k] in (0, 1), distinct expert ids int64 [T, k]) as a top-k router gives them."""
    ids = torch.rand(tokens, size.experts, device=device).argsort(dim=1)[:, : size.top_k]
    return torch.rand(tokens, size.top_k, device=device) * 0.9 + 0.1, ids


def reference_moe(x: torch.Tensor, experts: GPUExperts, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 [T, H]: the routed-expert sum with the dequantised weights; ids outside [0, E) skipped."""
    xf = x.float()
    out = torch.zeros(x.shape[0], experts.hidden, dtype=torch.float32, device=x.device)
    for e in range(experts.num_experts):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        g, u, d = (dequantize_gpu(m) for m in experts.matrices(e))
        xe = xf[t]
        out.index_add_(0, t, (F.silu(xe @ g.t()) * (xe @ u.t())) @ d.t() * weights[t, j, None])
    return out


def check_fused_moe(size: Size, device: torch.device, bits: int, group: int, tokens: int, config=None) -> None:
    experts = random_experts(size, bits, group, device)
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, ids = random_routing(tokens, size, device)
    poison_allocator(device)
    y = fused_moe(x, experts, weights, ids, config=config)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    err = rel_norm_err(y, reference_moe(x, experts, weights, ids))
    assert err < REL_TOL, f"relative error {err:.3g} (bits={bits}, group={group}, T={tokens})"


def check_skipped_pairs(size: Size, device: torch.device) -> None:
    """ids of -1 (experts not on this device) contribute nothing; a token with every pair skipped gets 0."""
    experts = random_experts(size, 4, 128, device)
    tokens = size.prefill_tokens
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, ids = random_routing(tokens, size, device)
    ids = torch.where(torch.rand(ids.shape, device=device) < 0.4, torch.full_like(ids, -1), ids)
    ids[0] = -1
    poison_allocator(device)
    y = fused_moe(x, experts, weights, ids)
    assert torch.all(y[0] == 0), "a token whose pairs are all skipped must get exactly zero"
    err = rel_norm_err(y, reference_moe(x, experts, weights, ids))
    assert err < REL_TOL, f"relative error {err:.3g}"
    assert torch.all(fused_moe(x, experts, weights, torch.full_like(ids, -1)) == 0)


def check_idle_and_repeated_experts(size: Size, device: torch.device) -> None:
    """Experts that get no token are harmless, and a token routed to one expert twice gets both shares."""
    experts = random_experts(size, 8, 64, device)
    tokens = size.prefill_tokens
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, _ = random_routing(tokens, size, device)
    busy = torch.tensor([1, size.experts - 1], device=device)  # every other expert idle
    ids = busy[torch.randint(0, 2, (tokens, size.top_k), device=device)]
    ids[0] = busy[0]  # token 0: the same expert in every slot
    y = fused_moe(x, experts, weights, ids)
    err = rel_norm_err(y, reference_moe(x, experts, weights, ids))
    assert err < REL_TOL, f"relative error {err:.3g}"
    one = fused_moe(x[:1], experts, weights[:1].sum(1, keepdim=True), ids[:1, :1])
    assert rel_norm_err(y[0], one[0].float()) < REL_TOL, "repeated expert != one pair with the summed weight"


def check_strided_expert_view(size: Size, device: torch.device) -> None:
    """GPUExperts may be a view with any stride along the expert dim (e.g. every other VRAM slot)."""
    both = random_experts(size, 4, 64, device, count=2 * size.experts)
    experts = GPUExperts(both.raw[::2], both.layout)
    tokens = size.prefill_tokens
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, ids = random_routing(tokens, size, device)
    err = rel_norm_err(fused_moe(x, experts, weights, ids), reference_moe(x, experts, weights, ids))
    assert err < REL_TOL, f"relative error {err:.3g}"


def check_small_align_equals_torch_align(size: Size, device: torch.device) -> None:
    """The one-program Triton alignment gives exactly the torch one (decode sizes, skips, repeats, and the
    thousands of expert slots of a large hot cache)."""
    for num_experts in (size.experts, 3000):
        for tokens, block_m in ((1, 16), (2, 16), (3, 32), (4, 16)):
            if not small_align_fits(tokens * size.top_k, num_experts, block_m):
                continue
            ids = torch.rand(tokens, num_experts, device=device).argsort(dim=1)[:, : size.top_k]
            ids[torch.rand(ids.shape, device=device) < 0.3] = -1
            ids[0, : min(2, size.top_k)] = ids[0, -1]  # a repeated expert (or all skipped)
            for routed in (ids, ids.to(torch.int32), torch.full_like(ids, -1)):
                got = align_by_expert(routed, num_experts, block_m, use_triton=True)
                want = align_by_expert(routed, num_experts, block_m, use_triton=False)
                for name, g, w in zip(got._fields, got, want, strict=True):
                    assert torch.equal(g.cpu(), w.cpu()), f"{name} differs for ids {routed.tolist()}: {g} != {w}"


def check_moe_gemv(size: Size, device: torch.device, bits: int, group: int) -> None:
    """The few-token kernels: skipped and repeated experts, a strided expert view, and adding into an output."""
    both = random_experts(size, bits, group, device, count=2 * size.experts)
    experts = GPUExperts(both.raw[::2], both.layout)
    tokens = 3
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, ids = random_routing(tokens, size, device)
    ids[0, 0] = -1
    ids[1, :] = ids[1, 0]  # one expert in every slot of token 1
    ids[2, -1] = size.experts  # past the last expert: skipped too
    start = torch.randn(tokens, size.hidden, device=device)
    poison_allocator(device)
    out = moe_gemv(x, experts, weights, ids, out=start.clone(), accumulate=True)
    want = reference_moe(x, experts, weights, ids)
    err = rel_norm_err(out - start, want)
    assert err < REL_TOL, f"relative error {err:.3g} (bits={bits}, group={group})"
    assert rel_norm_err(moe_gemv(x, experts, weights, ids.to(torch.int32)), want) < REL_TOL, "int32 ids"
    assert torch.all(moe_gemv(x, experts, weights, torch.full_like(ids, -1)) == 0)


def check_moe_gemv_slot_map(size: Size, device: torch.device) -> None:
    """With ``slot_of`` each id runs the slot the map names: as the ids mapped beforehand, an id the map sends to
    -1, a negative id or an id past the map running none."""
    experts = random_experts(size, 4, 64, device)
    tokens = 2
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, ids = random_routing(tokens, size, device)
    e = size.experts
    slot_of = torch.randperm(e, device=device).to(torch.int32)
    slot_of[ids[0, 0]] = -1
    ids[1, -1] = e  # past the map
    ids[1, 0] = -1
    mapped = torch.where((ids >= 0) & (ids < e), slot_of[ids.clamp(0, e - 1)].long(), -1)
    out = moe_gemv(x, experts, weights, ids, slot_of=slot_of)
    want = reference_moe(x, experts, weights, mapped)
    assert rel_norm_err(out, want) < REL_TOL, "mapped slots"


def check_moe_gemv_extra_slots(size: Size, device: torch.device) -> None:
    """Slots past the experts' own, in two other allocations named by an address table, compute their experts, also
    when the ids name them through a map (``slot_of``); a row of the table not named by any id is never read
    (address 0)."""
    whole = random_experts(size, 4, 32, device, count=size.experts + 5)
    e = size.experts
    # three allocations of their own (slots past own's must not just read on in ``whole``)
    own, *parts = (empty_experts(whole.layout, n, device) for n in (e, 2, 3))
    for dst, start in zip((own, *parts), (0, e, e + 2), strict=True):
        copy_experts(dst, whole.slice(start, start + dst.num_experts))
    extra = torch.cat([extra_slot_addresses(p) for p in parts] + [torch.zeros(1, 4, dtype=torch.int64)]).to(device)
    tokens = 2
    x = torch.randn(tokens, size.hidden, device=device).to(torch.bfloat16)
    weights, ids = random_routing(tokens, size, device)
    ids[0, : min(3, size.top_k)] = torch.tensor([e, e + 4, 0][: size.top_k], device=device)
    ids[1, 0] = e + 2
    ids[1, -1] = e + 6  # past the table: skipped like an id past the experts
    want_ids = ids.clone()
    want_ids[1, -1] = -1
    out = moe_gemv(x, own, weights, ids, extra=extra.contiguous())
    want = reference_moe(x, whole, weights, want_ids)
    assert rel_norm_err(out, want) < REL_TOL, "extra slots"
    # the same slots named through a map (as the hot cache's table names them): ids shifted by 3, mapped back
    n = e + 7
    slot_of = torch.arange(n, dtype=torch.int32, device=device).roll(3)  # slot_of[(i + 3) % n] = i
    mapped = moe_gemv(x, own, weights, (ids + 3) % n, extra=extra.contiguous(), slot_of=slot_of)
    assert rel_norm_err(mapped, want) < REL_TOL, "extra slots through a map"


def check_quant_linear(size: Size, device: torch.device, bits: int, group: int, config=None) -> None:
    n, k = size.linear_out, size.hidden
    m = to_gpu_layout(*random_matrix(n, k, bits, group, device), n, k, bits, group)
    w = dequantize_gpu(m)
    for rows in size.linear_rows:
        x = torch.randn(rows, k, device=device).to(torch.bfloat16)
        y = quant_linear(x, m, config=config)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        err = rel_norm_err(y, x.float() @ w.t())
        assert err < REL_TOL, f"relative error {err:.3g} (bits={bits}, group={group}, M={rows})"


def check_linear_gemv_split(size: Size, device: torch.device, bits: int, group: int) -> None:
    """A narrow matrix splits K between programs: the result is within the bound, the same on a second call (the
    block counters are left at zero), for one row and for several, with K's steps a multiple of the split count
    and not (the last program's share shorter)."""
    from krasis.kernels.gemv import gemv_splits, linear_gemv
    from krasis.kernels.gpu_layout import k_step

    n, step = 64, k_step(bits, group)[0]
    for k in (4 * size.hidden, 4 * size.hidden + 64):  # whole 64-value blocks; an odd step count but for INT8 g32
        m = to_gpu_layout(*random_matrix(n, k, bits, group, device), n, k, bits, group)
        w = dequantize_gpu(m)
        assert gemv_splits(1, k // step, device) > 1, "the split path is taken"
        for rows in (1, 3):
            x = torch.randn(rows, k, device=device).to(torch.bfloat16)
            y = linear_gemv(x, m)
            err = rel_norm_err(y, x.float() @ w.t())
            assert err < REL_TOL, f"relative error {err:.3g} (bits={bits}, group={group}, K={k}, M={rows})"
            assert torch.equal(linear_gemv(x, m), y), "a second call gives the same sums"
        for _, counts in m._gemv_split.values():
            assert not counts.any(), "every counter is back at zero"


def check_add_rms_norm(size: Size, device: torch.device, offset: float) -> None:
    """The fused residual sums and norm give torch's rounding: the sums exactly, the norm within an ulp."""
    from krasis.ops.norms import rms_norm

    h = size.hidden
    x, c, w = (torch.randn(2, h, device=device).to(torch.bfloat16) for _ in range(3))
    a, b = torch.randn(2, h, device=device), torch.randn(2, h, device=device)
    weight = w[0] if offset == 0 else w[0] * 0.1
    eps = 1e-6
    ref_x = x + ((a + b).to(x.dtype) + c)
    got_x, got_ab = add_rms_norm(x, weight, eps, offset, a=a, b=b, c=c)
    assert torch.equal(got_x, ref_x), "x + ((a + b) + c) rounded as torch rounds it"
    assert rel_norm_err(got_ab, rms_norm(ref_x, weight, eps, offset)) < 4e-3
    got_x, got = add_rms_norm(x, weight, eps, offset, c=c)
    assert torch.equal(got_x, x + c)
    same, got = add_rms_norm(x, weight, eps, offset)
    assert same is x and rel_norm_err(got, rms_norm(x, weight, eps, offset)) < 4e-3
    inplace = x.clone()
    add_rms_norm(inplace, weight, eps, offset, c=c, x_out=inplace)
    assert torch.equal(inplace, x + c), "x_out may be x itself"
    wide = add_rms_norm(x, weight.float(), eps, offset)[1]
    assert wide.dtype == (torch.float32 if offset == 0 else torch.bfloat16), "torch's promotion with the weight"
    shares_a, shares_b = a.clone(), b.clone()
    cleared_x, cleared = add_rms_norm(x, weight, eps, offset, a=shares_a, b=shares_b, c=c, clear_ab=True)
    assert torch.equal(cleared_x, ref_x), "clear_ab: the sums read the shares before they are zeroed"
    assert rel_norm_err(cleared, rms_norm(ref_x, weight, eps, offset)) < 4e-3
    assert not shares_a.any() and not shares_b.any(), "clear_ab zeroes the shares once read"


def check_rotary(size: Size, device: torch.device, interleaved: bool) -> None:
    """The one-launch rotation equals Rotary.apply (interleaved in float32, rotate-half in bf16 steps)."""
    from krasis.models.spec import RopeSpec
    from krasis.ops.rope import Rotary

    rope = Rotary(RopeSpec(dim=16, theta=10000.0, interleaved=interleaved), device)
    cos, sin = rope.angles(torch.tensor([37], device=device))
    q = torch.randn(1, 4, 24, device=device).to(torch.bfloat16)
    got = rotary(q[..., 8:], cos, sin, interleaved)  # a strided slice, as the rope part of a query
    want = rope.apply(q[..., 8:], cos, sin)
    assert got.shape == want.shape and rel_norm_err(got, want) < 4e-3
    k = torch.randn(1, 1, 40, device=device).to(torch.bfloat16)  # a second tensor of other heads and strides
    got_q, got_k = rotary_pair(q[..., 8:], k[..., 24:], cos, sin, interleaved)
    assert torch.equal(got_q, got), "the pair's first tensor as rotary alone"
    assert torch.equal(got_k, rotary(k[..., 24:], cos, sin, interleaved)), "the pair's second tensor as rotary alone"


def check_kv_write(size: Size, device: torch.device, kv_dtype: str) -> None:
    """One launch writes a token's two entries at a device-side position as the torch cache writes them."""
    from krasis.engine.kv_cache import FP8, _to_fp8

    shapes = ((size.hidden,), (4, 16))
    store_dtype = FP8 if kv_dtype == "fp8" else torch.bfloat16
    stores = tuple(torch.zeros(9, *shape, device=device).to(store_dtype) for shape in shapes)
    scales = tuple(torch.zeros(9, device=device) for _ in shapes) if kv_dtype == "fp8" else None
    values = [torch.randn(1, *shape, device=device).to(torch.bfloat16) * 30 for shape in shapes]
    kv_write_at(values[0], values[1].reshape(1, -1), stores, scales, torch.tensor([5], device=device))
    for i, (store, value) in enumerate(zip(stores, values, strict=True)):
        assert store[[0, 1, 2, 3, 4, 6, 7, 8]].float().abs().sum() == 0, "only row 5 is written"
        if scales is None:
            assert torch.equal(store[5], value[0])
        else:
            q, scale = _to_fp8(value)
            assert torch.equal(scales[i][5:6], scale)
            assert torch.equal(store[5].float(), q[0].float()), "e4m3 rounding as torch's cast"


ROUTERS = {
    "softmax-f32": RouterSpec(top_k=3, float32_logits=True),
    "softmax-norm-bf16": RouterSpec(top_k=3, norm_topk_prob=True, routed_scaling_factor=2.5),
    "sigmoid-bias-norm": RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=True, correction_bias=True,
                                    float32_logits=True),
}


def check_route_and_stage(size: Size, device: torch.device, name: str) -> None:
    """The two-launch routing picks route()'s experts and weights, and stages [x | weights | ids]. Rows whose
    choice is within rounding of a tie (BF16 logits round to ~3 digits) may pick either expert and are left out
    of the comparison with route()."""
    from krasis.ops.router import route, routing_margin

    spec = ROUTERS[name]
    e, h = 42, size.hidden  # not a power of two nor of whole logits blocks: masked experts must never be picked
    x = torch.randn(8, h, device=device).to(torch.bfloat16)
    router = (torch.randn(e, h, device=device) * h ** -0.5).to(torch.bfloat16)
    bias = torch.randn(e, device=device) * 0.1 if spec.correction_bias else None
    weights, ids, rows = route_and_stage(x, router, spec, bias)
    logits = F.linear(x.float(), router.float())
    if spec.float32_logits:
        want_w, want_ids = route(logits, spec, torch.float32, bias)
    else:  # float32 dots rounded to bf16, as the kernel says (a bf16 GEMM may round a logit one ulp the other
        # way, which moves a softmax weight by up to ~1.6%)
        want_w, want_ids = route(logits.to(x.dtype), spec, x.dtype, bias)
    clear = routing_margin(logits, spec, bias) > 1e-3  # scores are probabilities ~1/42 here
    assert clear.any()
    ids_c, want_c = ids[clear], want_ids[clear]
    assert torch.equal(ids_c.sort(dim=1).values, want_c.sort(dim=1).values), f"{ids_c} != {want_c}"
    order, want_order = ids_c.argsort(dim=1), want_c.argsort(dim=1)
    assert torch.allclose(weights[clear].gather(1, order), want_w[clear].float().gather(1, want_order), rtol=1e-2,
                          atol=1e-6)
    k = spec.top_k
    assert torch.equal(rows, torch.cat((x.float(), weights, ids.float()), dim=1))
    assert rows.shape == (8, h + 2 * k)


def check_gather_experts(size: Size, device: torch.device) -> None:
    """gather_experts copies the mapped experts of each routed pair into its staging slot (from pinned host
    memory on a GPU) and marks the slots; unmapped pairs copy nothing and get slot -1."""
    host = random_experts(size, 4, 32, torch.device("cpu"), count=6)
    if device.type == "cuda":
        host = GPUExperts(host.raw.pin_memory(), host.layout)
    e = host.num_experts
    expert_map = torch.full((e,), -1, dtype=torch.int32, device=device)
    expert_map[[e - 1, 0, 2]] = torch.tensor([e - 1, 0, 2], dtype=torch.int32, device=device)
    ids = torch.tensor([[2, 1, e - 1, 0]], device=device)  # expert 1 is not mapped
    # the default blocks and programs, then blocks of 32 words over 3 programs: many blocks per part and per program
    for block, programs in ((expert_gather.BLOCK, expert_gather.GATHER_PROGRAMS), (32, 3)):
        staging = random_experts(size, 4, 32, device, count=4)
        before = staging.to("cpu")
        slots = torch.zeros(4, dtype=torch.int32, device=device)
        saved = expert_gather.BLOCK, expert_gather.GATHER_PROGRAMS
        expert_gather.BLOCK, expert_gather.GATHER_PROGRAMS = block, programs
        try:
            gather_experts(host, expert_map, ids, staging, slots)
        finally:
            expert_gather.BLOCK, expert_gather.GATHER_PROGRAMS = saved
        assert slots.tolist() == [0, -1, 2, 3], slots.tolist()
        g, h, b = staging.raw.cpu(), host.raw, before.raw
        assert torch.equal(g[0], h[2]) and torch.equal(g[2], h[e - 1]) and torch.equal(g[3], h[0]), block
        assert torch.equal(g[1], b[1]), f"an unmapped pair's slot was written (blocks of {block} words)"


def check_route_and_stage_claims(size: Size, device: torch.device) -> None:
    """With flags and claims, the staged rows gain one flag per pair: 1.0 where claims[id] >= 0, else 0.0."""
    spec = ROUTERS["softmax-norm-bf16"]
    e, h, k = 40, size.hidden, spec.top_k
    x = torch.randn(2, h, device=device).to(torch.bfloat16)
    router = (torch.randn(e, h, device=device) * h ** -0.5).to(torch.bfloat16)
    plain_w, plain_ids, plain_rows = route_and_stage(x, router, spec, None)
    claims = torch.full((e,), -1, dtype=torch.int32, device=device)
    claims[plain_ids[0, 0]] = 0  # the first token's best expert was prefetched; the second token's maybe too
    weights, ids, rows = route_and_stage(x, router, spec, None, flags=True, claims=claims)
    assert torch.equal(ids, plain_ids) and torch.equal(weights, plain_w)
    assert rows.shape == (2, h + 3 * k) and torch.equal(rows[:, :h + 2 * k], plain_rows)
    assert torch.equal(rows[:, h + 2 * k:], (claims[ids] >= 0).float())


def _split_reference(ids: list[int], resident: torch.Tensor, claims: torch.Tensor, share: float) -> list[float]:
    """Each pair's flag as the module docstring of kernels.route_decode states it, computed plainly."""
    from krasis.engine.decode_modes import streamed_count

    flags = [1.0 if claims[i] >= 0 else 0.0 for i in ids]
    candidates = [j for j, i in enumerate(ids) if resident[i] < 0 and flags[j] == 0.0]
    count = streamed_count(len(candidates), share)
    for j in candidates[len(candidates) - count:] if count else []:  # the last ones in the router's order
        flags[j] = 2.0
    return flags


def check_route_and_stage_split(size: Size, device: torch.device) -> None:
    """With a stream split, the routing streams streamed_count(n, share) of its n pairs neither resident nor
    claimed, the lowest-weighted ones (flag 2.0), and maps exactly those experts to themselves for the gather;
    weights, ids and the rest of the row are as without."""
    from krasis.engine.decode_modes import AutoSplit
    from krasis.kernels.route_decode import StreamSplit

    spec = replace(ROUTERS["softmax-norm-bf16"], top_k=6)
    e, h, k = 40, size.hidden, spec.top_k
    x = torch.randn(1, h, device=device).to(torch.bfloat16)
    router = (torch.randn(e, h, device=device) * h ** -0.5).to(torch.bfloat16)
    plain_w, plain_ids, plain_rows = route_and_stage(x, router, spec, None)
    order = plain_ids[0].tolist()
    resident = torch.full((e,), -1, dtype=torch.int32, device=device)
    resident[order[1]] = 3  # in VRAM: never streamed
    resident[order[4]] = 0
    claims = torch.full((e,), -1, dtype=torch.int32, device=device)
    claims[order[0]] = 1  # prefetched: flagged 1.0, not streamed
    expert_map = torch.full((e,), 7, dtype=torch.int32, device=device)  # stale entries: every one is rewritten
    for share in AutoSplit.CANDIDATES:
        for use_claims in (False, True):
            split = StreamSplit(resident, torch.full((1,), share, device=device), expert_map)
            weights, ids, rows = route_and_stage(x, router, spec, None, flags=True,
                                                 claims=claims if use_claims else None, split=split)
            assert torch.equal(ids, plain_ids) and torch.equal(weights, plain_w)
            assert torch.equal(rows[:, :h + 2 * k], plain_rows)
            unclaimed = torch.full_like(claims, -1)
            want = _split_reference(order, resident.cpu(), (claims if use_claims else unclaimed).cpu(), share)
            assert rows[0, h + 2 * k:].tolist() == want, (share, use_claims, rows[0, h + 2 * k:].tolist(), want)
            streamed = {order[j] for j, f in enumerate(want) if f == 2.0}
            assert expert_map.tolist() == [i if i in streamed else -1 for i in range(e)], (share, use_claims)


def check_flag_pairs(size: Size, device: torch.device) -> None:
    """flag_pairs flags a step routed elsewhere exactly as route_and_stage flags its own routing."""
    from krasis.kernels.route_decode import StreamSplit, flag_pairs

    spec = replace(ROUTERS["softmax-norm-bf16"], top_k=6)
    e, h, k = 40, size.hidden, spec.top_k
    x = torch.randn(1, h, device=device).to(torch.bfloat16)
    router = (torch.randn(e, h, device=device) * h ** -0.5).to(torch.bfloat16)
    resident = torch.where(torch.rand(e, device=device) < 0.4, 0, -1).to(torch.int32)
    claims = torch.where(torch.rand(e, device=device) < 0.2, 0, -1).to(torch.int32)
    share = torch.full((1,), 0.5, device=device)
    fused_map, own_map = (torch.full((e,), -1, dtype=torch.int32, device=device) for _ in range(2))
    _, ids, rows = route_and_stage(x, router, spec, None, flags=True, claims=claims,
                                   split=StreamSplit(resident, share, fused_map))
    row = torch.full((k,), 9.0, device=device)
    flag_pairs(ids, e, row, claims=claims, split=StreamSplit(resident, share, own_map))
    assert torch.equal(row, rows[0, h + 2 * k:]) and torch.equal(own_map, fused_map)


def check_predict_experts(size: Size, device: torch.device, name: str, invert: bool) -> None:
    """predict_experts ranks the next layer's experts as its router would, leaves out those resident, and maps
    each picked expert to its staging slot (-1 elsewhere); invert picks the worst."""
    from krasis.ops.router import route

    spec = ROUTERS[name]
    e, h, count = 40, size.hidden, 3
    x = torch.randn(1, h, device=device).to(torch.bfloat16)
    router = (torch.randn(e, h, device=device) * h ** -0.5).to(torch.bfloat16)
    bias = torch.randn(e, device=device) * 0.1 if spec.correction_bias else None
    # the ranking by the router's own choice: every expert's score (top_k = e), bias-corrected where it has one
    full = replace(spec, top_k=e, norm_topk_prob=False, routed_scaling_factor=1.0)
    weights, order = route(F.linear(x.float(), router.float()), full, torch.float32, bias)
    key = weights[0].clone()
    if bias is not None:
        key += bias[order[0]]
    ranked = order[0][key.argsort(descending=not invert)].tolist()
    resident = torch.full((e,), -1, dtype=torch.int32, device=device)
    resident[ranked[0]] = 5
    resident[ranked[2]] = 1
    want = [i for i in ranked if i not in (ranked[0], ranked[2])][:count]
    logits = torch.empty(1, e, device=device)
    ids = torch.zeros(count, dtype=torch.int64, device=device)
    slot = torch.zeros(e, dtype=torch.int32, device=device)
    predict_experts(x, router, spec, bias, resident, logits, ids, slot, invert=invert)
    assert ids.tolist() == want, (ids.tolist(), want)
    expected = torch.full((e,), -1, dtype=torch.int32)
    expected[want] = torch.arange(count, dtype=torch.int32)
    assert torch.equal(slot.cpu(), expected)
    # with hints: the same picks and map, and the next two candidates in the hints
    hints = torch.zeros(2, dtype=torch.int64, device=device)
    predict_experts(x, router, spec, bias, resident, logits, ids, slot, invert=invert, hints=hints)
    after = [i for i in ranked if i not in (ranked[0], ranked[2])][count: count + 2]
    assert ids.tolist() == want and torch.equal(slot.cpu(), expected) and hints.tolist() == after
    # with a fused table: resident experts keep their slots, picked ones get fused_base + their staging slot
    fused = torch.zeros(e, dtype=torch.int32, device=device)
    predict_experts(x, router, spec, bias, resident, logits, ids, slot, invert=invert, fused=fused, fused_base=100)
    want_fused = torch.where(expected >= 0, expected + 100, resident.cpu())
    assert ids.tolist() == want and torch.equal(fused.cpu(), want_fused)


def check_predict_experts_with_few_candidates(size: Size, device: torch.device) -> None:
    """With fewer candidates than slots, the rest of ids is -1."""
    spec = ROUTERS["softmax-norm-bf16"]
    e, h = 8, size.hidden
    x = torch.randn(1, h, device=device).to(torch.bfloat16)
    router = (torch.randn(e, h, device=device) * h ** -0.5).to(torch.bfloat16)
    resident = torch.arange(e, dtype=torch.int32, device=device)
    resident[[1, 6]] = -1  # only experts 1 and 6 are left to the CPU
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    slot = torch.zeros(e, dtype=torch.int32, device=device)
    predict_experts(x, router, spec, None, resident, torch.empty(1, e, device=device), ids, slot)
    got = ids.tolist()
    assert sorted(got[:2]) == [1, 6] and got[2:] == [-1, -1], got
    assert sorted(slot[[1, 6]].tolist()) == [0, 1] and (slot[[0, 2, 3, 4, 5, 7]] == -1).all()


def check_embed_token(size: Size, device: torch.device) -> None:
    """embed_token copies the token's row (the id read on the device) from a host table (page-locked on a GPU),
    cast to the output's dtype."""
    table = torch.randn(50, size.hidden).to(torch.bfloat16)
    if device.type == "cuda":
        table = table.pin_memory()
    out = torch.zeros(1, size.hidden, dtype=torch.float32, device=device)
    for token in (0, 37, 49):
        embed_token(table, torch.tensor([token], device=device), out)
        assert torch.equal(out.cpu(), table[token:token + 1].float()), token


def check_greedy_choice(size: Size, device: torch.device) -> None:
    """GreedyChoice writes torch.argmax's token (the first of equal maxima, across the programs' blocks) to the
    device token and [position, token] to the host row, call after call (its counter is left at zero)."""
    vocab = 3 * 1024 + 5 * size.hidden + 3  # a partial last block
    choose = GreedyChoice(vocab, device)
    token = torch.zeros(1, dtype=torch.int64, device=device)
    chosen = torch.zeros(2, dtype=torch.int64, pin_memory=device.type == "cuda")
    for step, top in enumerate((vocab - 1, 5, 2048, 1500)):
        logits = torch.randn(1, vocab, device=device).to(torch.bfloat16)
        logits[0, top] = 30.0
        if step == 3:
            logits[0, 3500] = 30.0  # a tie in a later block: the lower index wins
        position = torch.tensor([100 + step], device=device)
        choose(logits, position, token, chosen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        want = int(torch.argmax(logits))
        assert want == top and int(token) == want and chosen.tolist() == [100 + step, want], (step, chosen.tolist())
    assert int(choose._count) == 0


def _host_flags(device: torch.device) -> torch.Tensor:
    """The handshake flags in host memory the device can reach (pinned when it is a GPU)."""
    return torch.zeros(3, dtype=torch.int64, pin_memory=device.type == "cuda")


def check_host_handshake(device: torch.device, copy: bool = False) -> None:
    """signal_host counts the handshake and raises flags[0]; wait_host holds the stream until the host (another
    thread, answering late) raises flags[1], and work queued after it sees what the host wrote first (``copy``:
    the wait kernel itself copies the host's answer)."""
    seq, flags = torch.full((1,), 4, dtype=torch.int64, device=device), _host_flags(device)
    flags[:2] = 4
    answer = torch.randn(8).pin_memory() if device.type == "cuda" else torch.randn(8)
    sent = answer.clone()
    answer.zero_()
    view = flags.numpy()

    def host() -> None:
        deadline = time.monotonic() + 30
        while view[0] < 5 and time.monotonic() < deadline:
            pass
        time.sleep(0.05)  # the GPU is polling by now
        answer.copy_(sent)
        view[1] = view[0]

    thread = threading.Thread(target=host)
    thread.start()
    got = torch.zeros(8, device=device)
    try:
        signal_host(seq, flags)
        if copy:
            wait_host(seq, flags, src=answer, dst=got)
        else:
            wait_host(seq, flags)
            got.copy_(answer, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        thread.join()
    assert int(seq) == 5 and flags.tolist() == [5, 5, 0], (int(seq), flags.tolist())
    assert torch.equal(got.cpu(), sent)


def check_host_wait_gives_up(device: torch.device) -> None:
    """With nobody answering, wait_host returns after its polls and records the handshake it gave up on."""
    seq, flags = torch.full((1,), 6, dtype=torch.int64, device=device), _host_flags(device)
    flags[1] = 5
    wait_host(seq, flags, polls=100)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert flags.tolist() == [0, 5, 6], flags.tolist()



def check_copy_wait(device: torch.device) -> None:
    """wait_copied passes once the copies' flag holds the previous handshake, or once the host has released an
    aborted step (whose late copy flag may have overwritten its release); otherwise it gives up after its polls."""
    seq = torch.full((1,), 6, dtype=torch.int64, device=device)
    flags = torch.zeros(5, dtype=torch.int64, pin_memory=device.type == "cuda")

    def wait() -> list[int]:
        wait_copied(seq, flags, 4, polls=100)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return flags.tolist()

    flags[4] = 5  # handshake 5 queued the copies that handshake 6 runs
    assert wait() == [0, 0, 0, 0, 5]
    flags[4] = 3  # an older handshake's copies
    assert wait() == [0, 0, 6, 0, 3], "gave up at handshake 6"
    flags[2], flags[1] = 0, RELEASED
    assert wait() == [0, RELEASED, 0, 0, 3], "a released step passes"


def check_copy_wait_counts_late_copies(device: torch.device) -> None:
    """A copy wait given ``late`` counts the waits that found the copies not yet landed and their polls; one that
    found them landed counts nothing."""
    seq = torch.full((1,), 6, dtype=torch.int64, device=device)
    flags = torch.zeros(5, dtype=torch.int64, pin_memory=device.type == "cuda")
    late = torch.zeros(2, dtype=torch.int64, device=device)

    def wait() -> list[int]:
        wait_copied(seq, flags, 3, polls=40, late=late)
        return late.tolist()  # (a sync on CUDA)

    flags[3] = 5
    assert wait() == [0, 0], "landed: not late"
    flags[3] = 4
    assert wait() == [1, 40], "never landed: late, all its polls"
    flags[2] = 0
    flags[3] = 5
    assert wait() == [1, 40], "landed again: nothing added"


FORMATS = [(bits, group) for bits in (4, 8) for group in (32, 64, 128)]


def checks(size: Size) -> dict[str, Callable[[torch.device], None]]:
    """Check name -> check(device) for one size."""
    out: dict[str, Callable[[torch.device], None]] = {}
    for bits, group in FORMATS:
        tag = f"int{bits}-g{group}"
        out[f"fused_moe[{tag}-prefill]"] = lambda d, b=bits, g=group: check_fused_moe(size, d, b, g,
                                                                                      size.prefill_tokens)
        out[f"fused_moe[{tag}-decode]"] = lambda d, b=bits, g=group: check_fused_moe(size, d, b, g, 1)
        out[f"quant_linear[{tag}]"] = lambda d, b=bits, g=group: check_quant_linear(size, d, b, g)
        out[f"moe_gemv[{tag}]"] = lambda d, b=bits, g=group: check_moe_gemv(size, d, b, g)
    # every launch configuration on one batch of several rows per expert, whatever the size-based choice is
    tokens = max(16, size.prefill_tokens // 2)
    configs = {"decode": DECODE, "medium": MEDIUM, "prefill": PREFILL, "prefill_int4": PREFILL_INT4}
    configs |= {f"{name}-swap_ab": replace(cfg, swap_ab=True) for name, cfg in configs.items()}
    for name, cfg in configs.items():
        out[f"fused_moe_config[{name}]"] = lambda d, c=cfg: check_fused_moe(size, d, 4, 32, tokens, c)
    out["quant_linear_swap_ab[int8-g64]"] = lambda d: check_quant_linear(size, d, 8, 64, replace(DECODE, swap_ab=True))
    # K of 4 INT4 steps: the matrix-vector kernels take 4 steps per loop iteration (fewer where K has fewer)
    wide = replace(size, hidden=4 * size.hidden)
    out["quant_linear[int4-g64-4-steps]"] = lambda d: check_quant_linear(wide, d, 4, 64)
    out["moe_gemv[int4-g64-4-steps]"] = lambda d: check_moe_gemv(wide, d, 4, 64)
    # K of 11 INT4 steps (the bench model's down projection): 8 in the unrolled loop, 3 one at a time
    odd = replace(size, hidden=11 * 64, inter=11 * 64)
    out["quant_linear[int4-g64-11-steps]"] = lambda d: check_quant_linear(odd, d, 4, 64)
    out["moe_gemv[int4-g64-11-steps]"] = lambda d: check_moe_gemv(odd, d, 4, 64)
    out["moe_gemv_extra_slots"] = lambda d: check_moe_gemv_extra_slots(size, d)
    out["moe_gemv_slot_map"] = lambda d: check_moe_gemv_slot_map(size, d)
    for bits, group in ((8, 32), (8, 64), (4, 64), (4, 32)):
        out[f"linear_gemv_split[int{bits}-g{group}]"] = lambda d, b=bits, g=group: check_linear_gemv_split(size, d, b,
                                                                                                           g)
    out["skipped_pairs"] = lambda d: check_skipped_pairs(size, d)
    for offset in (0.0, 1.0):
        out[f"add_rms_norm[offset={offset:g}]"] = lambda d, o=offset: check_add_rms_norm(size, d, o)
    for name in ROUTERS:
        out[f"route_and_stage[{name}]"] = lambda d, n=name: check_route_and_stage(size, d, n)
    for kv_dtype in ("bf16", "fp8"):
        out[f"kv_write[{kv_dtype}]"] = lambda d, k=kv_dtype: check_kv_write(size, d, k)
    for interleaved in (False, True):
        out[f"rotary[interleaved={interleaved}]"] = lambda d, i=interleaved: check_rotary(size, d, i)
    out["small_align_equals_torch_align"] = lambda d: check_small_align_equals_torch_align(size, d)
    out["gather_experts"] = lambda d: check_gather_experts(size, d)
    out["route_and_stage_claims"] = lambda d: check_route_and_stage_claims(size, d)
    out["route_and_stage_split"] = lambda d: check_route_and_stage_split(size, d)
    out["flag_pairs"] = lambda d: check_flag_pairs(size, d)
    for name in ("softmax-norm-bf16", "sigmoid-bias-norm"):
        for invert in (False, True):
            out[f"predict_experts[{name}-invert={invert}]"] = lambda d, n=name, i=invert: check_predict_experts(
                size, d, n, i)
    out["predict_experts_few_candidates"] = lambda d: check_predict_experts_with_few_candidates(size, d)
    out["embed_token"] = lambda d: check_embed_token(size, d)
    out["greedy_choice"] = lambda d: check_greedy_choice(size, d)
    out["host_handshake"] = check_host_handshake
    out["host_handshake_copies_the_answer"] = lambda d: check_host_handshake(d, copy=True)
    out["host_wait_gives_up"] = check_host_wait_gives_up
    out["copy_wait"] = check_copy_wait
    out["copy_wait_counts_late_copies"] = check_copy_wait_counts_late_copies
    out["idle_and_repeated_experts"] = lambda d: check_idle_and_repeated_experts(size, d)
    out["strided_expert_view"] = lambda d: check_strided_expert_view(size, d)
    return out


CHECK_NAMES = list(checks(SMALL))


def _run_check(name: str, seed: int) -> tuple[str, str, float]:
    """(name, "ok" or the failure's traceback, seconds) of one SMALL check on the CPU."""
    torch.set_num_threads(1)  # the interpreter is Python-bound; workers share the cores
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        checks(SMALL)[name](torch.device("cpu"))
        result = "ok"
    except Exception:  # reported per check by the test that reads this output
        result = traceback.format_exc()
    return name, result, round(time.perf_counter() - t0, 3)


def main() -> None:
    """Run every SMALL check on the CPU (meant for TRITON_INTERPRET=1), spread over worker processes; print one
    JSON line: check name -> "ok" or the failure, plus "_seed" and "_seconds"."""
    seed = int.from_bytes(os.urandom(4), "little")
    results: dict[str, object] = {"_seed": seed}
    seconds: dict[str, float] = {}
    workers = max(1, min(8, os.cpu_count() or 1))
    # spawn: fresh interpreters that inherit TRITON_INTERPRET, rather than forks of a process with torch threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, result, sec in pool.map(_run_check, CHECK_NAMES, [seed + i for i in range(len(CHECK_NAMES))]):
            results[name] = result
            seconds[name] = sec
    results["_seconds"] = seconds
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
