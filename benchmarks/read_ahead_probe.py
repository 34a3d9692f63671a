"""Does reading an expert's weights ahead make the CPU kernels faster? The CPU store alone, M = 1, k experts a
call, cycling the MoE layers (cold weights): a call as it comes; the same call right after ``read_ahead`` of its
experts, timed apart; and the read-ahead alone.

Usage: python benchmarks/read_ahead_probe.py [--model DeepSeek-V2-Lite] [--layers 26] [--k 3] [--bits 4]
           [--group 64] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from benchmarks.cpu_experts import MODELS, build_store  # noqa: E402
from krasis import _core  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DeepSeek-V2-Lite", choices=list(MODELS))
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--k", type=int, default=3, help="experts per call (the CPU's share of a layer's top-k)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    hidden, inter, _, experts = MODELS[args.model]
    rng = np.random.default_rng(0)
    store = build_store(rng, args.layers, experts, hidden, inter, args.bits, args.group)
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    w = np.full((1, args.k), 1.0 / args.k, dtype=np.float32)
    nbytes = args.k * store.expert_nbytes
    print(f"{args.model}: {args.layers} layers x {experts} experts, INT{args.bits} g{args.group}, k={args.k}, "
          f"{nbytes / 1e6:.1f} MB a call, {_core.num_threads()} threads", flush=True)

    def run(mode: str) -> None:
        calls, fwd, ahead = 0, 0.0, 0.0
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            layer = calls % args.layers
            ids = rng.choice(experts, args.k, replace=False)
            if mode != "cold":
                t0 = time.perf_counter()
                store.read_ahead(layer, ids.tolist())
                ahead += time.perf_counter() - t0
            t0 = time.perf_counter()
            if mode != "ahead only":
                store.forward(layer, x, ids[None], w)
            fwd += time.perf_counter() - t0
            calls += 1
        line = f"  {mode:<12} forward {1e6 * fwd / calls:6.1f} us ({nbytes * calls / max(fwd, 1e-9) / 1e9:6.1f} GB/s)"
        if mode != "cold":
            line += f", read-ahead {1e6 * ahead / calls:6.1f} us ({nbytes * calls / ahead / 1e9:6.1f} GB/s)"
        print(line, flush=True)

    for mode in ("cold", "ahead", "cold", "ahead", "ahead only"):
        run(mode)


if __name__ == "__main__":
    main()
