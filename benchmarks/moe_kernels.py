"""GPU routed-expert kernel benchmark: Krasis' Triton INT4/INT8 fused_moe vs torch BF16, against the GPU's bounds.

Usage (on the GPU machine):
    python benchmarks/moe_kernels.py                     # DeepSeek-V2-Lite shapes, INT4 + INT8, g128
    python benchmarks/moe_kernels.py --tokens 1 16       # fewer batch sizes
    python benchmarks/moe_kernels.py --no-baseline       # skip the torch BF16 loop

One call = one layer's routed experts (H 2048, I 1408, 64 experts, top-6, uniform random routing) for T tokens.
Times are the median of --iters calls timed with CUDA events after a warm-up, with L2 flushed before each call
(so weights come from HBM, as they do when 26 layers run in turn). "TFLOP/s" counts 6 * H * I FLOPs per routed
pair; "weight GB/s" counts the bytes (packed weights + scales) of the distinct experts a call touches. Bounds
measured in the same run: dense BF16 matmul rate (torch.matmul 8192^3) and device copy bandwidth (read + write);
"of bound" = (max(FLOPs / matmul rate, weight bytes / copy bandwidth)) / time. Each T also runs the launch
configurations in CONFIGS so the best one can be read off; the summary table lists the default config and the
best one. The baseline is torch BF16 with the dequantised weights, one F.linear pair per used expert (its
per-expert token lists are built before timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
from bounds import device_copy_bandwidth, matmul_tflops  # noqa: E402

from krasis.kernels import (  # noqa: E402
    GPUExperts,
    dequantize_gpu,
    experts_from_cpu_layout,
    fused_moe,
    quant_linear,
    quantize_cpu_layout,
    to_gpu_layout,
)
from krasis.kernels.quant_moe import DECODE, MEDIUM, PREFILL, PREFILL_INT4, GemmConfig, moe_config  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 1408, 64, 6
CONFIGS: dict[str, GemmConfig] = {
    "decode": DECODE,
    "decode-swap": replace(DECODE, swap_ab=True),
    "decode-n128": replace(DECODE, block_n=128),
    "medium": MEDIUM,
    "medium-swap": replace(MEDIUM, swap_ab=True),
    "medium-w4s4": replace(MEDIUM, num_warps=4, num_stages=4),
    "prefill": PREFILL,
    "prefill-swap": replace(PREFILL, swap_ab=True),
    "prefill-m128": PREFILL_INT4,
    "prefill-w4s4": replace(PREFILL, num_warps=4, num_stages=4),
}


def flush_buffer() -> torch.Tensor:
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def median_ms(fn: Callable[[], object], iters: int, flush: torch.Tensor, warmup: int = 3) -> float:
    """Median milliseconds of fn over iters calls, L2 flushed before each (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_experts(bits: int, group: int) -> GPUExperts:
    """EXPERTS random experts quantised on the GPU, in the store layout."""
    def mat(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_cpu_layout(torch.randn(n, k, device="cuda") / k**0.5, bits, group)
    gate, up, down = ([mat(n, k) for _ in range(EXPERTS)] for n, k in ((INTER, HIDDEN), (INTER, HIDDEN),
                                                                          (HIDDEN, INTER)))
    return experts_from_cpu_layout(gate, up, down, bits, group)


def fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "n/a"


def expert_bytes(experts: GPUExperts) -> int:
    return experts.nbytes // experts.num_experts


def baseline_fn(x: torch.Tensor, dense: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor,
                ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """torch BF16 loop over the used experts; the token lists are computed here, outside the timed call."""
    work = []
    for e in torch.unique(ids).tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        work.append((dense[e], t, weights[t, j, None].to(torch.bfloat16)))

    def run() -> torch.Tensor:
        y = torch.zeros_like(x)
        for (w13, w2), t, w in work:
            gate, up = F.linear(x[t], w13).chunk(2, dim=1)
            y.index_add_(0, t, F.linear(F.silu(gate) * up, w2) * w)
        return y

    return run


def bench_linear(iters: int, flush: torch.Tensor) -> None:
    """quant_linear at the shapes the engine uses it for: INT8 shared experts (gate_up, down) and lm_head."""
    print("\nquant_linear INT8 g128 (median ms, weight GB/s)")
    for n, k in ((2 * 2 * INTER, HIDDEN), (HIDDEN, 2 * INTER), (102400, HIDDEN)):
        m = to_gpu_layout(*quantize_cpu_layout(torch.randn(n, k, device="cuda") / k**0.5, 8, 128), n, k, 8, 128)
        for rows in (1, 16, 4096):
            x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
            ms = median_ms(lambda x=x, m=m: quant_linear(x, m), iters, flush)
            print(f"  N={n:>6} K={k:>5} M={rows:>5}: {ms:8.3f} ms  {m.nbytes / ms / 1e6:7.0f} GB/s  "
                  f"{2 * rows * n * k / ms / 1e9:6.1f} TFLOP/s")



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096, 16384])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-linear", action="store_true", help="skip the quant_linear section")
    p.add_argument("--no-configs", action="store_true", help="only the default launch configuration")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}")
    peak_tflops = matmul_tflops(8192)
    copy_gbps = device_copy_bandwidth(1 << 30)
    print(f"bounds: bf16 matmul 8192^3 {peak_tflops:.0f} TFLOP/s, device copy {copy_gbps:.0f} GB/s (read + write)")
    flush = flush_buffer()
    summary = []
    for bits in args.bits:
        experts = random_experts(bits, args.group)
        per_expert = expert_bytes(experts)
        dense = None
        if not args.no_baseline:
            dense = []
            for e in range(EXPERTS):
                g, u, d = (dequantize_gpu(m).to(torch.bfloat16) for m in experts.matrices(e))
                dense.append((torch.cat((g, u)), d))
        print(f"\nINT{bits} g{args.group}: {per_expert / 1e6:.2f} MB per expert")
        print(f"{'T':>6} {'config':>13} {'ms':>9} {'TFLOP/s':>8} {'weight GB/s':>11} {'of bound':>8}")
        for t in args.tokens:
            x = torch.randn(t, HIDDEN, device="cuda").to(torch.bfloat16)
            ids = torch.rand(t, EXPERTS, device="cuda").argsort(dim=1)[:, :TOP_K]
            weights = torch.rand(t, TOP_K, device="cuda")
            used = int(torch.unique(ids).numel())
            flops = 6 * HIDDEN * INTER * t * TOP_K
            wbytes = used * per_expert
            bound_ms = max(flops / (peak_tflops * 1e12), wbytes / (copy_gbps * 1e9)) * 1e3
            default = moe_config(t * TOP_K, EXPERTS, bits)
            names = ["default"] + ([] if args.no_configs else list(CONFIGS))
            results = {}
            for name in names:
                cfg = default if name == "default" else CONFIGS[name]

                def call(c=cfg, x=x, ex=experts, w=weights, ids=ids):
                    return fused_moe(x, ex, w, ids, config=c)

                try:
                    ms = median_ms(call, args.iters, flush)
                except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory): report, go on
                    print(f"{t:>6} {name:>13}  failed: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                results[name] = ms
                print(f"{t:>6} {name:>13} {ms:9.3f} {flops / ms / 1e9:8.1f} {wbytes / ms / 1e6:11.0f} "
                      f"{bound_ms / ms:8.1%}")
            base_ms = None
            if dense is not None:
                base_ms = median_ms(baseline_fn(x, dense, weights, ids), max(3, args.iters // 4), flush)
                print(f"{t:>6} {'torch bf16':>13} {base_ms:9.3f} {flops / base_ms / 1e9:8.1f} "
                      f"{used * 3 * HIDDEN * INTER * 2 / base_ms / 1e6:11.0f} {bound_ms / base_ms:8.1%}")
            best = min(results, key=results.get) if results else None
            summary.append((bits, t, results.get("default"), best, results.get(best), bound_ms, base_ms))
        del experts, dense
        torch.cuda.empty_cache()

    if not args.no_linear:
        bench_linear(args.iters, flush)

    print("\nsummary (ms; of bound = bound time / time; baseline weight bytes are its bf16 bytes)")
    print(f"{'bits':>4} {'T':>6} {'default':>9} {'of bound':>8} {'best config':>13} {'best':>9} {'of bound':>8} "
          f"{'bound':>8} {'torch bf16':>10} {'speedup':>7}")
    for bits, t, dms, best, bms, bound_ms, base_ms in summary:
        print(f"{bits:>4} {t:>6} {fmt(dms, '9.3f'):>9} {fmt(dms and bound_ms / dms, '8.1%'):>8} {best or 'n/a':>13} "
              f"{fmt(bms, '9.3f'):>9} {fmt(bms and bound_ms / bms, '8.1%'):>8} {bound_ms:8.3f} "
              f"{fmt(base_ms, '10.3f'):>10} {fmt(base_ms and dms and base_ms / dms, '7.2f'):>7}")


if __name__ == "__main__":
    main()
