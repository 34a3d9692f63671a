"""CPU routed-expert kernel benchmark: Krasis INT4/INT8 ExpertStore vs torch BF16, against DRAM bandwidth.

Usage:
    python benchmarks/cpu_experts.py                 # full run (wants ~16 GB of RAM)
    python benchmarks/cpu_experts.py --quick         # small run that finishes in a minute on a laptop
    python benchmarks/cpu_experts.py --simd avx2     # force a kernel path (same as KRASIS_SIMD=avx2)

Each call runs one layer's routed experts for M tokens; calls cycle through --layers layers so the
weights come cold from DRAM (the store is many times the L3 cache). "weight GB/s" counts the bytes
(packed weights + scales) of the distinct experts a call touches, divided by the call's time;
"% DRAM" divides that by the machine's read bandwidth measured in the same run with the same pool.
Each case reports the median of --repeats timing windows; torch's cases run after all of Krasis's, so
torch's own threads are not about while Krasis is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from krasis import _core  # noqa: E402

MODELS = {
    # name: (hidden, expert intermediate, top-k, experts)
    "DeepSeek-V2-Lite": (2048, 1408, 6, 64),
    "Qwen3-30B-A3B": (2048, 768, 8, 128),
}


def routing(rng, m, k, experts):
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(m)]).astype(np.int64)
    w = rng.random((m, k)).astype(np.float32)
    return ids, w / w.sum(1, keepdims=True)


def build_store(rng, layers, experts, hidden, inter, bits, group):
    """Quantise a few distinct random experts, then copy their bytes into every slot."""
    store = _core.ExpertStore(layers, experts, hidden, inter, bits, group)
    seeds = []
    for e in range(min(4, experts)):
        g = rng.standard_normal((inter, hidden), dtype=np.float32) * 0.05
        u = rng.standard_normal((inter, hidden), dtype=np.float32) * 0.05
        d = rng.standard_normal((hidden, inter), dtype=np.float32) * 0.05
        store.set_expert(0, e, g, u, d)
        seeds.append(np.array(store.expert_view(0, e)))
    for layer in range(layers):
        for e in range(experts):
            store.set_expert_bytes(layer, e, seeds[(layer + e) % len(seeds)])
    return store


def weight_bytes_per_expert(store):
    lay = store.layout()
    return sum(lay[n]["weights_nbytes"] + lay[n]["scales_nbytes"] for n in ("gate", "up", "down"))


def warm_up(fn, min_calls, min_time):
    """Call fn(0), fn(1), ... at least ``min_calls`` times and for at least ``min_time`` seconds."""
    i, start = 0, time.perf_counter()
    while i < min_calls or time.perf_counter() - start < min_time:
        fn(i)
        i += 1


def time_calls(fn, min_time, min_calls=5):
    fn(0)
    calls, start = 0, time.perf_counter()
    while True:
        fn(calls + 1)
        calls += 1
        el = time.perf_counter() - start
        if el >= min_time and calls >= min_calls:
            return el / calls


def bench_krasis(store, layers, m, k, rng, act_int8, min_time, repeats):
    cases = [routing(rng, m, k, store.num_experts) for _ in range(layers)]
    xs = [rng.standard_normal((m, store.hidden), dtype=np.float32) for _ in range(layers)]
    per_expert = weight_bytes_per_expert(store)
    touched = np.mean([len(np.unique(ids)) for ids, _ in cases]) * per_expert

    def call(i):
        layer = i % layers
        ids, w = cases[layer]
        store.forward(layer, xs[layer], ids, w, act_int8=act_int8)

    # Warm up for a while: page faults, pool start, and the kernel's own work right after a store
    # is built (zeroing and compacting huge pages) would otherwise land in the first case.
    warm_up(call, layers, min_time)
    _core.moe_phase_times()
    # The host's DRAM is shared with its neighbours and its rate drifts: the median of a few windows
    # (their spread printed beside it) says more than one.
    times = [time_calls(call, min_time) for _ in range(repeats)]
    phases, calls = _core.moe_phase_times()
    t = statistics.median(times)
    return t, touched / t, {k: v / calls for k, v in phases.items()}, (min(times), max(times))


def bench_torch(hidden, inter, k, experts, layers, m, rng, threads, min_time):
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    w = [
        [
            tuple(
                (torch.rand(shape, generator=gen, dtype=torch.float32) - 0.5).to(torch.bfloat16)
                for shape in ((inter, hidden), (inter, hidden), (hidden, inter))
            )
            for _ in range(experts)
        ]
        for _ in range(layers)
    ]
    cases = [routing(rng, m, k, experts) for _ in range(layers)]
    xs = [torch.randn(m, hidden).to(torch.bfloat16) for _ in range(layers)]
    per_expert = 3 * hidden * inter * 2
    touched = np.mean([len(np.unique(ids)) for ids, _ in cases]) * per_expert

    def call(i):
        layer = i % layers
        ids, rw = cases[layer]
        x = xs[layer]
        y = torch.zeros(m, hidden, dtype=torch.float32)
        with torch.no_grad():
            for e in np.unique(ids):
                tok, slot = np.nonzero(ids == e)
                g, u, d = w[layer][int(e)]
                xt = x[tok]
                h = torch.nn.functional.silu(xt @ g.T) * (xt @ u.T)
                y[tok] += torch.from_numpy(rw[tok, slot])[:, None] * (h @ d.T).float()
        return y

    warm_up(call, layers, min_time)
    t = time_calls(call, min_time)
    return t, touched / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few layers (a smoke run)")
    ap.add_argument("--simd", choices=["avx512", "avx2", "scalar"], help="force a kernel path")
    ap.add_argument("--threads", type=int, default=0, help="worker threads (default: physical cores)")
    ap.add_argument("--layers", type=int, default=0, help="layers in the store (default 12, quick 3)")
    ap.add_argument("--m", type=int, nargs="*", default=None, help="token counts (default 1 4 16 64)")
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act", choices=["int8", "f32", "both"], default="both", help="activation mode(s)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch BF16 comparison")
    ap.add_argument("--torch-layers", type=int, default=0, help="layers of BF16 weights for torch (default 2)")
    ap.add_argument("--min-time", type=float, default=0.0, help="seconds per measurement (default 1, quick 0.2)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per case; the median is reported")
    args = ap.parse_args()

    if args.simd:
        _core.set_simd_path(args.simd)
    if args.threads:
        _core.set_num_threads(args.threads)
    quick = args.quick
    layers = args.layers or (3 if quick else 12)
    torch_layers = args.torch_layers or (1 if quick else 2)
    ms = args.m or ([1, 4] if quick else [1, 4, 16, 64])
    min_time = args.min_time or (0.2 if quick else 1.0)
    acts = {"int8": [True], "f32": [False], "both": [True, False]}[args.act]
    threads = _core.num_threads()
    rng = np.random.default_rng(0)

    _core.read_bandwidth(64 << 20, 1)  # start the pool
    bw = _core.read_bandwidth((256 << 20) if quick else (2 << 30), 8)
    overhead = _core.pool_dispatch_overhead(2000 if quick else 20000)
    print(f"simd={_core.simd_path()} threads={threads} numa_nodes={_core.num_numa_nodes()}")
    print(f"DRAM read bandwidth (pool, {threads} threads): {bw / 1e9:.1f} GB/s")
    print(f"pool dispatch overhead (empty job): {overhead * 1e6:.2f} us")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")

    rows = []
    # quick runs keep 16 experts a layer
    models = {name: (h, i, k, min(e, 16) if quick else e) for name, (h, i, k, e) in MODELS.items()}
    for name, (hidden, inter, k, experts) in models.items():
        for bits in args.bits:
            t0 = time.perf_counter()
            store = build_store(rng, layers, experts, hidden, inter, bits, args.group_size)
            total = layers * experts * store.expert_nbytes
            print(f"\n{name} INT{bits} g{args.group_size}: {layers} layers x {experts} experts "
                  f"= {total / 2**30:.2f} GiB (built in {time.perf_counter() - t0:.1f}s)")
            for m in ms:
                for act_int8 in acts:
                    t, rate, ph, (lo, hi) = bench_krasis(store, layers, m, k, rng, act_int8, min_time,
                                                         args.repeats)
                    act = "int8" if act_int8 else "f32"
                    rows.append([name, f"INT{bits}", act, m, t * 1e6, rate / 1e9, 100 * rate / bw])
                    steps = " ".join(f"{k}={v * 1e6:.0f}" for k, v in ph.items())
                    print(f"  M={m:<3} act={act:<4} {t * 1e6:9.1f} us/call  {rate / 1e9:7.1f} GB/s weights  "
                          f"{100 * rate / bw:5.1f}% of DRAM  (windows {lo * 1e6:.0f}-{hi * 1e6:.0f} us)  "
                          f"[us: {steps}]", flush=True)
            del store
    for name, (hidden, inter, k, experts) in models.items() if not args.no_torch else ():
        print(f"\n{name} torch BF16, {torch_layers} layers")
        for m in ms:
            t, rate = bench_torch(hidden, inter, k, experts, torch_layers, m, rng, threads, min_time)
            rows.append([name, "torch-BF16", "bf16", m, t * 1e6, rate / 1e9, 100 * rate / bw])
            print(f"  torch bf16 M={m:<3} {t * 1e6:9.1f} us/call  {rate / 1e9:7.1f} GB/s weights  "
                  f"{100 * rate / bw:5.1f}% of DRAM", flush=True)

    print(f"\nSummary (DRAM {bw / 1e9:.1f} GB/s, {threads} threads, simd={_core.simd_path()})")
    print(f"| {'model':<17}| {'weights':<11}| {'act':<5}| {'M':>3} | {'us/call':>9} | {'GB/s':>6} | {'% DRAM':>6} |")
    print(f"|{'-' * 18}|{'-' * 12}|{'-' * 6}|{'-' * 5}|{'-' * 11}|{'-' * 8}|{'-' * 8}|")
    for r in rows:
        print(f"| {r[0]:<17}| {r[1]:<11}| {r[2]:<5}| {r[3]:>3} | {r[4]:9.1f} | {r[5]:6.1f} | {r[6]:6.1f} |")


if __name__ == "__main__":
    main()
