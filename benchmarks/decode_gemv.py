"""Decode's matrix-vector kernels (one token) on the shapes of the bench model, inside CUDA graphs, L2 cold.

A MoE layer's GPU experts in decode are the routed experts of the hot cache (``moe_gemv``: a gate/up kernel, a
down kernel, a sum over the pairs) and the shared expert's INT8 linears (``linear_gemv``); the step's head and tail
have the dense MLP's and lm_head's. While the host runs its experts these kernels decide whether the GPU's side of
the layer is the shorter one, so a prefetched or streamed expert can be added to it. This benchmark times each
kernel as the step graph runs it: 16 calls captured in one CUDA graph, each reading other experts / another copy of
the matrix (L2 cold), the replay's time / 16 per call; beside it the bytes read per call over that time and the
device-to-device copy rate (bytes read + written per second: what HBM moves). ``--sweep`` also times
other launch configurations (column block, warps, unrolled K steps) so the best one can be read off.

    python benchmarks/decode_gemv.py                      # the defaults the engine uses
    python benchmarks/decode_gemv.py --sweep              # and the configurations around them
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
from bounds import device_copy_bandwidth  # noqa: E402
from moe_kernels import EXPERTS, HIDDEN, INTER, TOP_K, random_experts  # noqa: E402

from krasis.kernels import quantize_cpu_layout, to_gpu_layout  # noqa: E402
from krasis.kernels.gemv import gemv_consts, linear_gemv  # noqa: E402
from krasis.kernels.moe_decode import _down_kernel, _gate_up_kernel, moe_gemv, routed_launch  # noqa: E402

CALLS = 16  # calls per graph, each on other weights


def graph_us(calls: list[Callable[[], object]], repeats: int = 20) -> float:
    """Mean µs per call of ``calls`` captured in one CUDA graph (after an eager warm-up that compiles them)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats / len(calls)


def routed(args: argparse.Namespace, copy_gbps: float) -> None:
    """gate/up and down of ``--resident`` of the TOP_K pairs (the others not resident: -1), INT4 g128."""
    experts = random_experts(4, 128)
    per_expert = experts.nbytes // EXPERTS
    x = torch.randn(1, HIDDEN, device="cuda").to(torch.bfloat16)
    weights = torch.rand(1, TOP_K, device="cuda")
    r = args.resident
    id_sets = []
    for c in range(CALLS):  # each call its own experts: 16 x r distinct ones, cycling through the 64
        chosen = [(c * r + i) % EXPERTS for i in range(r)] + [-1] * (TOP_K - r)
        id_sets.append(torch.tensor([chosen], dtype=torch.int64, device="cuda"))
    out = torch.zeros(1, HIDDEN, dtype=torch.float32, device="cuda")
    us = graph_us([lambda ids=ids: moe_gemv(x, experts, weights, ids, out=out) for ids in id_sets])
    print(f"\nrouted experts INT4 g128, {r} of {TOP_K} pairs resident ({r * per_expert / 1e6:.1f} MB a call)")
    print(f"  moe_gemv (3 launches): {us:7.2f} µs a call, {r * per_expert / us / 1e3:6.0f} GB/s "
          f"({r * per_expert / us / 1e3 / copy_gbps:.0%} of the copy rate)")
    if not args.sweep:
        return
    i, h, pairs = INTER, HIDDEN, TOP_K
    act = torch.empty((pairs, i), dtype=torch.bfloat16, device="cuda")
    per_pair = torch.empty((pairs, h), dtype=torch.float32, device="cuda")
    rw = weights.reshape(-1).contiguous()
    w, s, up_w, up_s = experts.gate_up()
    dw, ds = experts.down()
    base = gemv_consts(4, 128)
    gate_bytes, down_bytes = r * per_expert * 2 / 3, r * per_expert / 3
    print(f"  {'kernel':<8} {'BLOCK_N':>7} {'warps':>5} {'unroll':>6} {'µs':>7} {'GB/s':>6}")
    rows = []
    for bn, warps, unroll in itertools.product((8, 16, 32, 64), (4, 8, 16), (2, 4, 8, 16)):
        consts = dict(base, UNROLL=unroll)

        def gu(ids, bn=bn, warps=warps, consts=consts):
            _gate_up_kernel[(pairs, triton.cdiv(i, bn))](
                x, ids.reshape(-1), ids, 0, w, s, ids, act, h, i, EXPERTS, 0, up_w, up_s, x.stride(0), *w.stride(),
                *s.stride(), act.stride(0), TOP_K=TOP_K, BLOCK_N=bn, **consts, HAS_EXTRA=False, HAS_MAP=False,
                num_warps=warps)

        def dn(ids, bn=bn, warps=warps, consts=consts):
            _down_kernel[(pairs, triton.cdiv(h, bn))](
                act, ids.reshape(-1), ids, 0, rw, dw, ds, ids, per_pair, i, h, EXPERTS, 0, act.stride(0),
                *dw.stride(), *ds.stride(), per_pair.stride(0), BLOCK_N=bn, **consts, HAS_EXTRA=False, HAS_MAP=False,
                num_warps=warps)

        for name, fn, nbytes in (("gate_up", gu, gate_bytes), ("down", dn, down_bytes)):
            try:
                t = graph_us([lambda ids=ids, fn=fn: fn(ids) for ids in id_sets])
            except Exception as exc:  # a configuration the compiler rejects: say so, go on
                print(f"  {name:<8} {bn:>7} {warps:>5} {unroll:>6}  failed: {type(exc).__name__}")
                continue
            rows.append((name, t, bn, warps, unroll))
            print(f"  {name:<8} {bn:>7} {warps:>5} {unroll:>6} {t:7.2f} {nbytes / t / 1e3:6.0f}")
    bn, warps, consts = routed_launch(4, 128)
    for name in ("gate_up", "down"):
        best = min((row for row in rows if row[0] == name), key=lambda row: row[1])
        print(f"  best {name}: {best[1]:.2f} µs at BLOCK_N {best[2]}, {best[3]} warps, unroll {best[4]} "
              f"(moe_gemv's: BLOCK_N {bn}, {warps} warps, unroll {consts['UNROLL']})")


def dense(args: argparse.Namespace, copy_gbps: float) -> None:
    """linear_gemv at the INT8 shapes of the shared expert, the dense MLP and lm_head."""
    print("\nINT8 matrix-vector products (linear_gemv; group 128, 64 where K is no multiple of 128)")
    shapes = (("shared gate/up", 2 * INTER, HIDDEN), ("shared down", HIDDEN, 2 * INTER),
              ("dense gate/up", 10944, HIDDEN), ("dense down", HIDDEN, 10944), ("lm_head", 102400, HIDDEN))
    for name, n, k in shapes:
        group = 128 if k % 128 == 0 else 64  # (the dense MLP's 10944 inputs are not a multiple of 128)
        copies = max(2, min(CALLS, int(400e6 // (n * k))))  # enough copies to pass L2, within memory
        mats = [to_gpu_layout(*quantize_cpu_layout(torch.randn(n, k, device="cuda") / k**0.5, 8, group), n, k, 8,
                              group) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        nbytes = mats[0].qweight.numel() + mats[0].scales.numel() * 4
        calls = [lambda m=mats[c % copies], x=x: linear_gemv(x, m) for c in range(CALLS)]
        us = graph_us(calls)
        print(f"  {name:<15} N={n:>6} K={k:>5}: {us:8.2f} µs  {nbytes / us / 1e3:6.0f} GB/s "
              f"({nbytes / us / 1e3 / copy_gbps:.0%} of the copy rate)")
        del mats
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resident", type=int, default=4, help="routed pairs of the 6 that the GPU runs")
    p.add_argument("--sweep", action="store_true", help="time other launch configurations too")
    p.add_argument("--no-dense", action="store_true", help="skip the INT8 linears")
    args = p.parse_args()
    if not 1 <= args.resident <= TOP_K:
        p.error(f"--resident must be 1 to {TOP_K} (the pairs of one token)")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    copy_gbps = device_copy_bandwidth(1 << 30)  # bytes read + written per second: what HBM moves in a copy
    print(f"device: {torch.cuda.get_device_name()}; device copy {copy_gbps:.0f} GB/s (read + write)")
    routed(args, copy_gbps)
    if not args.no_dense:
        dense(args, copy_gbps)


if __name__ == "__main__":
    main()
