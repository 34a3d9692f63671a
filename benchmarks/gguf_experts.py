"""GGUF expert kernel benchmark: decode-shaped routed-expert calls on llama.cpp blocks read in place (Q4_K, Q8_0),
beside Krasis' own INT4/INT8 ExpertStore, each as a fraction of the measured DRAM read bandwidth.

Usage:
    python benchmarks/gguf_experts.py                # DeepSeek-V2-Lite shapes, 12 layers x 64 experts (~5-9 GB file)
    python benchmarks/gguf_experts.py --quick        # 3 layers x 16 experts: a smoke run
    python benchmarks/gguf_experts.py --simd scalar  # force a kernel path
    python benchmarks/gguf_experts.py --dir /mnt/x   # where the temporary GGUF goes (default: the system temp dir)

Shapes: H=2048, I=1408, top-6 of 64 (DeepSeek-V2-Lite). "Q4_K" is what llama.cpp's Q4_K_M writes for these
experts: gate/up Q4_K, and down Q5_0 because its rows (I=1408) are not a multiple of Q4_K's 256-value block (llama.cpp
falls back the same way). "Q8_0" is Q8_0 throughout. The GGUF is written with random valid blocks into a temporary
file, memory-mapped (page cache), and calls cycle through the layers so weights come from DRAM, not cache. "GB/s"
counts the stored bytes of the distinct experts a call touches over the call's time; "% DRAM" divides by
`_core.read_bandwidth()` measured in the same run with the same pool. Both activation modes are timed: "int8"
(activations quantised per 32 values, integer dot products; the default) and "f32".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import cpu_experts  # noqa: E402

from krasis import _core  # noqa: E402

HIDDEN, INTER, TOPK, EXPERTS = 2048, 1408, 6, 64
FORMATS = {"Q4_K": ("Q4_K", "Q4_K", "Q5_0"), "Q8_0": ("Q8_0", "Q8_0", "Q8_0")}
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_tensor(rng, type_name, experts, n, k):
    """[experts, n, row bytes] of random valid blocks (finite f16 scales)."""
    _, values, nbytes = dict(_core.gguf_supported_types())[type_name]
    blocks = rng.integers(0, 256, size=(experts * n * k // values, nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[type_name]:
        d = (rng.standard_normal(len(blocks)) * 0.002).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(experts, n, -1)


def write_gguf(path: Path, rng, layers, experts, types):
    """A deepseek2 GGUF with `layers` MoE layers of expert tensors (4 distinct random sets, reused)."""
    import gguf

    sets = []
    for _ in range(min(4, layers)):
        sets.append([random_tensor(rng, t, experts, *((INTER, HIDDEN) if i < 2 else (HIDDEN, INTER)))
                     for i, t in enumerate(types)])
    w = gguf.GGUFWriter(path, "deepseek2")
    for layer in range(layers):
        for role, t, data in zip(("gate", "up", "down"), types, sets[layer % len(sets)], strict=True):
            w.add_tensor(f"blk.{layer}.ffn_{role}_exps.weight", data, raw_dtype=gguf.GGMLQuantizationType[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def open_store(path: Path):
    import gguf

    reader = gguf.GGUFReader(path)
    ts = {t.name: t for t in reader.tensors}
    layers = sorted({int(n.split(".")[1]) for n in ts})
    spec = []
    for i in layers:
        row = [ts[f"blk.{i}.ffn_{r}_exps.weight"] for r in ("gate", "up", "down")]
        spec.append([(0, int(t.data_offset), t.tensor_type.value) for t in row])
    experts = int(ts["blk.0.ffn_gate_exps.weight"].shape[2])
    return _core.GgufExpertStore([str(path)], spec, experts, HIDDEN, INTER)


def bench_gguf(store, layers, m, rng, min_time, act_int8):
    cases = [cpu_experts.routing(rng, m, TOPK, store.num_experts) for _ in range(layers)]
    xs = [rng.standard_normal((m, HIDDEN), dtype=np.float32) for _ in range(layers)]
    touched = np.mean([len(np.unique(ids)) for ids, _ in cases]) * store.expert_nbytes(0)

    def call(i):
        layer = i % layers
        ids, w = cases[layer]
        store.forward(layer, xs[layer], ids, w, act_int8=act_int8)

    cpu_experts.warm_up(call, 2 * layers, min_time)  # fault the file's pages in, warm the pool
    t = cpu_experts.time_calls(call, min_time)
    return t, touched / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 layers x 16 experts, short measurements")
    ap.add_argument("--simd", choices=["avx512", "avx2", "scalar"], help="force a kernel path")
    ap.add_argument("--threads", type=int, default=0, help="worker threads (default: physical cores)")
    ap.add_argument("--layers", type=int, default=0, help="MoE layers (default 12, quick 3)")
    ap.add_argument("--m", type=int, nargs="*", default=None, help="token counts (default 1 4)")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--no-krasis", action="store_true", help="skip Krasis' own INT4/INT8 for comparison")
    ap.add_argument("--dir", default=None, help="directory for the temporary GGUF")
    ap.add_argument("--min-time", type=float, default=0.0, help="seconds per measurement (default 1, quick 0.2)")
    args = ap.parse_args()

    if args.simd:
        _core.set_simd_path(args.simd)
    if args.threads:
        _core.set_num_threads(args.threads)
    layers = args.layers or (3 if args.quick else 12)
    experts = 16 if args.quick else EXPERTS
    ms = args.m or [1, 4]
    min_time = args.min_time or (0.2 if args.quick else 1.0)
    threads = _core.num_threads()
    rng = np.random.default_rng(0)
    _core.read_bandwidth(64 << 20, 1)
    bw = _core.read_bandwidth((256 << 20) if args.quick else (2 << 30), 8)
    print(f"simd={_core.simd_path()} threads={threads} numa_nodes={_core.num_numa_nodes()}")
    print(f"DRAM read bandwidth (pool, {threads} threads): {bw / 1e9:.1f} GB/s")
    print(f"shapes: H={HIDDEN} I={INTER} top-{TOPK} of {experts}, {layers} layers")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")

    rows = []
    for fmt in args.formats:
        types = FORMATS[fmt]
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = Path(tmp) / f"experts-{fmt}.gguf"
            t0 = time.perf_counter()
            write_gguf(path, rng, layers, experts, types)
            store = open_store(path)
            print(f"\nGGUF {fmt} (gate/up/down {'/'.join(types)}): {path.stat().st_size / 2**30:.2f} GiB, "
                  f"{store.expert_nbytes(0) / 2**20:.2f} MiB per expert (written in {time.perf_counter() - t0:.1f}s)")
            for m in ms:
                for act_int8 in (True, False):
                    t, rate = bench_gguf(store, layers, m, rng, min_time, act_int8)
                    act = "int8" if act_int8 else "f32"
                    rows.append([f"GGUF {fmt}", act, m, t * 1e6, rate / 1e9, 100 * rate / bw])
                    print(f"  M={m:<3} act={act:<4} {t * 1e6:9.1f} us/call  {rate / 1e9:7.1f} GB/s  "
                          f"{100 * rate / bw:5.1f}% of DRAM", flush=True)
            del store
    if not args.no_krasis:
        for bits in (4, 8):
            store = cpu_experts.build_store(rng, layers, experts, HIDDEN, INTER, bits, 128)
            print(f"\nKrasis INT{bits} g128: {store.expert_nbytes / 2**20:.2f} MiB per expert")
            for m in ms:
                for act_int8 in (True, False):
                    t, rate, _ = cpu_experts.bench_krasis(store, layers, m, TOPK, rng, act_int8, min_time)
                    act = "int8" if act_int8 else "f32"
                    rows.append([f"Krasis INT{bits}", act, m, t * 1e6, rate / 1e9, 100 * rate / bw])
                    print(f"  M={m:<3} act={act:<4} {t * 1e6:9.1f} us/call  {rate / 1e9:7.1f} GB/s  "
                          f"{100 * rate / bw:5.1f}% of DRAM", flush=True)
            del store

    print(f"\nSummary (DeepSeek-V2-Lite shapes, DRAM {bw / 1e9:.1f} GB/s, {threads} threads, simd={_core.simd_path()})")
    print(f"| {'weights':<13}| {'act':<5}| {'M':>3} | {'us/call':>9} | {'GB/s':>6} | {'% DRAM':>6} |")
    print(f"|{'-' * 14}|{'-' * 6}|{'-' * 5}|{'-' * 11}|{'-' * 8}|{'-' * 8}|")
    for name, act, m, us, gbs, pct in rows:
        print(f"| {name:<13}| {act:<5}| {m:>3} | {us:9.1f} | {gbs:6.1f} | {pct:6.1f} |")


if __name__ == "__main__":
    main()
