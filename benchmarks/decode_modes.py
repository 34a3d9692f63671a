"""Decode speed of each decode mode (cpu, gpu, hybrid, auto) on one model, each beside its bound.

    python benchmarks/decode_modes.py /tmp/dsv2 --vram-budget-mb 6144 --prompt-tokens 1000 16000
    python benchmarks/decode_modes.py /tmp/dsv2 --modes cpu auto --prefetch 0 2 3   # each mode without and with

The model loads once (INT4 experts, BF16 compute, FP8 KV, hot-expert cache on); for each mode and prompt length,
``--prompts`` random prompts are prefilled and ``--tokens`` tokens decoded (greedy, EOS ignored), and the mean
decode tok/s over the tokens after the first is reported. The engine's counters give, per decoded token, the
routed-expert calls served from VRAM (coverage) and the bytes of the others (read by the CPU from DRAM or copied
to the GPU). Bound = (DRAM read rate + pinned host-to-device rate, both measured at the start) / those
non-resident bytes per token: the speed at which both links together could read them. llama.cpp's figure on the
same machine (67.4 tok/s within a 6 GiB budget, ``../shared/peers/README.md``) is printed beside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
import bounds  # noqa: E402
from gpu_engine import load_decode_bench, random_prompt  # noqa: E402

from krasis import _core  # noqa: E402
from krasis.engine.decode_modes import DECODE_MODES  # noqa: E402

# A pseudo-mode for --modes: "cpu" replayed layer by layer, as every decode step was before the one-graph step.
LAYER_BY_LAYER = "cpu-layers"
# llama.cpp on the same H100 machine, synthetic DeepSeek-V2-Lite Q4_K_M, -ncmoe 21 within 6 GiB (peers README)
LLAMA_CPP_TOK_S = 67.4


def decode_run(llm, prompt: list[int], tokens: int) -> dict:
    """Decode ``tokens`` after ``prompt``: tok/s over the tokens after the first, and the counter deltas."""
    before, late_before = llm.engine_counters(), llm._graphs.late_copies()
    stamps = []
    for _ in llm.stream(prompt, max_new_tokens=tokens):
        stamps.append(time.perf_counter())
    after, late_after = llm.engine_counters(), llm._graphs.late_copies()
    delta = {k: after[k] - before[k] for k in after}
    late = {"late_copy_layers": late_after[0] - late_before[0], "late_copy_polls": late_after[1] - late_before[1]}
    return {"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps), **delta, **late}


def measure(llm, mode: str, length: int, prompts: int, tokens: int, expert_nbytes: int, moe_layers: int,
            link_gbps: float, prefetch: int = 0, read_ahead: int | None = 0, pipeline: bool = True) -> dict:
    llm.set_decode_mode("cpu" if mode == LAYER_BY_LAYER else mode)
    llm.pipeline_decode = pipeline
    llm.set_prefetch(prefetch)
    if read_ahead is not None:  # (None: an engine from before read-ahead, when comparing versions)
        llm.runtime.set_read_ahead(read_ahead)
    # the baseline row: decode mode "cpu" with each layer's graphs replayed by the host (before the one-graph step)
    llm._graphs.one_graph = mode != LAYER_BY_LAYER
    vocab = llm.spec.vocab_size
    # captures the graphs of every length the runs reach (a capture inside a timed run cost its first prompt
    # ~10%), and gives the hot cache and the CPU experts a few steps to settle
    llm.generate(random_prompt(length, vocab, 7), max_new_tokens=tokens)
    _core.moe_phase_times()  # reset: the CPU experts' own phase times over the runs below
    runs = [decode_run(llm, random_prompt(length, vocab, 100 + j), tokens) for j in range(prompts)]
    phases, phase_calls = _core.moe_phase_times()
    steps = sum(r["decode_layer_steps"] for r in runs) / moe_layers  # decoded tokens (the prefill is no step)
    calls = sum(r["routed_calls"] for r in runs)
    on_gpu = sum(r["routed_calls_on_gpu"] for r in runs)
    streamed = sum(r["routed_calls_streamed"] for r in runs)
    prefetched = sum(r["prefetched_experts"] for r in runs)
    prefetch_hits = sum(r["routed_calls_prefetched"] for r in runs)
    late_layers = sum(r["late_copy_layers"] for r in runs)
    read_ahead_n = sum(r.get("experts_read_ahead", 0) for r in runs)
    read_ahead_used = sum(r.get("read_ahead_used", 0) for r in runs)
    read_ahead_bytes = sum(r.get("bytes_read_ahead", 0) for r in runs)
    nonres_bytes = (calls - on_gpu) * expert_nbytes / steps
    tok_s = statistics.mean(r["tok_s"] for r in runs)
    bound = link_gbps * 1e9 / nonres_bytes if nonres_bytes else None
    return {"mode": mode, "prefetch": prefetch, "read_ahead": read_ahead, "pipeline": pipeline,
            "prompt_tokens": length, "tok_s": tok_s,
            # of the experts hinted for reading ahead, the share the CPU then ran; of the CPU's calls, the share
            # hinted; the bytes actually read ahead per token (reading stops when the next layer is staged)
            "read_ahead_mb_per_token": read_ahead_bytes / 1e6 / steps,
            "read_ahead_hit_rate": read_ahead_used / read_ahead_n if read_ahead_n else None,
            "read_ahead_share": read_ahead_used / max(calls - on_gpu - streamed - prefetch_hits, 1),
            "per_prompt": [r["tok_s"] for r in runs],
            "coverage": on_gpu / calls if calls else None, "streamed_share": streamed / max(calls - on_gpu, 1),
            "nonresident_bytes_per_token": nonres_bytes, "bound_tok_s": bound,
            "cpu_expert_ms_per_token": 1e3 * sum(r["cpu_expert_seconds"] for r in runs) / steps,
            "wait_ms_per_token": 1e3 * sum(r["wait_for_gpu_seconds"] for r in runs) / steps,
            "prefetch_queue_ms_per_token": 1e3 * sum(r.get("prefetch_queue_seconds", 0) for r in runs) / steps,
            "final_gpu_share": llm.runtime.gpu_share,
            # of the prefetched experts, the share the router picked; of the non-resident calls, the share they served
            "prefetch_hit_rate": prefetch_hits / prefetched if prefetched else None,
            "prefetched_share": prefetch_hits / max(calls - on_gpu, 1),
            # of the MoE layers that ran prefetched experts (all but each step's first), the share that found their
            # copies not yet landed, and the polls (~1-2 µs each) per such layer
            "late_copy_share": late_layers / max(steps * (moe_layers - 1), 1) if prefetched else None,
            "late_copy_polls": sum(r["late_copy_polls"] for r in runs) / late_layers if late_layers else None,
            "cpu_call_phase_us": {k: 1e6 * v / max(phase_calls, 1) for k, v in phases.items()}}


def probe_cpu_store(store, experts_per_call: int, gaps_us: list[float], seconds: float = 1.5) -> None:
    """The CPU experts outside decode: ``store.forward`` for one token and ``experts_per_call`` random experts,
    cycling the MoE layers (cold weights), back to back and with the host idle ``gap`` us between calls (the GPU's
    part of a decode step). Prints the weight read rate of each, to set beside decode's own."""
    rng = np.random.default_rng(0)
    layers, experts = store.num_layers, store.num_experts
    x = rng.standard_normal((layers, 1, store.hidden), dtype=np.float32)
    ids = np.stack([rng.choice(experts, experts_per_call, replace=False) for _ in range(layers)])[:, None]
    w = np.full((1, experts_per_call), 1.0 / experts_per_call, dtype=np.float32)
    nbytes = experts_per_call * store.expert_nbytes
    for gap in gaps_us:
        calls, busy = 0, 0.0
        _core.moe_phase_times()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            layer = calls % layers
            t0 = time.perf_counter()
            store.forward(layer, x[layer], ids[layer], w)
            busy += time.perf_counter() - t0
            calls += 1
            until = time.perf_counter() + gap * 1e-6
            while time.perf_counter() < until:
                pass
        phases, n = _core.moe_phase_times()
        steps = " ".join(f"{k}={1e6 * v / max(n, 1):.0f}" for k, v in phases.items())
        print(f"CPU store probe: {experts_per_call} experts/call, gap {gap:.0f} us: {1e6 * busy / calls:.0f} us/call, "
              f"{nbytes * calls / busy / 1e9:.1f} GB/s  [us: {steps}]", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--vram-budget-mb", type=int, default=6144)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[1000, 16000])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", choices=(*DECODE_MODES, LAYER_BY_LAYER),
                   default=["cpu", "gpu", "hybrid", "auto"],
                   help=f"decode modes to time; {LAYER_BY_LAYER!r} is 'cpu' replaying each layer's graphs (baseline)")
    p.add_argument("--prefetch", type=int, nargs="+", default=[0], metavar="N",
                   help="experts of each next MoE layer to prefetch (LLM.set_prefetch); each mode runs with each N")
    p.add_argument("--read-ahead", type=int, nargs="+", default=None, metavar="N",
                   help="experts of each next MoE layer the host reads ahead; each mode and prefetch runs with each N "
                        "(default: the engine's default)")
    p.add_argument("--pipeline", nargs="+", choices=("on", "off"), default=["on"],
                   help="greedy steps queued before the host has read the previous token (on, the engine's default) "
                        "or one at a time (off); each value measured in turn")
    p.add_argument("--label", default="", help="printed with the table (e.g. the routing skew)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--probe-cpu-store", type=int, default=0, metavar="K",
                   help="also time the CPU store alone with K experts per call, back to back and with gaps")
    args = p.parse_args()

    dram = bounds.dram_read_bandwidth(1 << 30)
    h2d = bounds.h2d_bandwidth(True, 1 << 30)
    # The CPU pool's empty-job dispatch: 2-4 us on a quiet GPU machine, 20-200 us when its neighbours disturb it
    # (then every figure of the run is off, and the run is to be discarded).
    dispatch_us = 1e6 * _core.pool_dispatch_overhead(20000)
    print(f"measured: DRAM read {dram:.1f} GB/s, pinned host-to-device {h2d:.1f} GB/s, CPU pool dispatch "
          f"{dispatch_us:.1f} us", flush=True)
    # A weight cache built by this load (or a model just written) leaves GBs of dirty pages whose write-back
    # competes for the CPUs and DRAM for a minute or more: the load lets it finish before anything is timed.
    t0 = time.perf_counter()
    llm = load_decode_bench(args.model_dir, args.vram_budget_mb)
    print(f"loaded, page cache written back, in {time.perf_counter() - t0:.1f} s; hot cache "
          f"{llm.runtime.hcs.slots} experts", flush=True)
    moe_layers = sum(1 for layer in llm._forward.w.layers if layer.experts is not None)
    if args.probe_cpu_store:
        probe_cpu_store(llm.runtime.store, args.probe_cpu_store, [0, 100, 200, 400])
    rows = []
    for length in args.prompt_tokens:
        for mode in args.modes:
            for prefetch in args.prefetch:
                for read_ahead in args.read_ahead or [getattr(llm.runtime, "read_ahead", None)]:
                    for pipeline in args.pipeline:
                        r = measure(llm, mode, length, args.prompts, args.tokens, llm.runtime.cpu_expert_nbytes,
                                    moe_layers, dram + h2d, prefetch, read_ahead, pipeline == "on")
                        rows.append(r)
                        print(json.dumps(r), flush=True)
    print()
    print(f"decode, {args.tokens} tokens x {args.prompts} prompts, VRAM budget {args.vram_budget_mb} MiB, "
          f"{torch.cuda.get_device_name()} {args.label}")
    print("| prompt | mode | tok/s | bound (% of it) | HCS coverage | non-resident MB/token | streamed share "
          "(final) | prefetch: hit rate, calls served, copies late | CPU experts ms/token | vs llama.cpp 67.4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = r["bound_tok_s"]
        pct = f"{bound:.0f} ({100 * r['tok_s'] / bound:.0f}%)" if bound else "n/a"
        mode = r["mode"] + (f" + prefetch {r['prefetch']}" if r["prefetch"] else "")
        mode += "" if r["pipeline"] else " (steps one at a time)"
        if r["read_ahead"]:
            mode += (f" + read-ahead {r['read_ahead']} ({r['read_ahead_share'] or 0:.0%} of CPU calls hinted, "
                     f"{r['read_ahead_mb_per_token']:.0f} MB/token read)")
        pf = (f"{r['prefetch_hit_rate']:.0%}, {r['prefetched_share']:.0%}" if r["prefetch_hit_rate"] is not None
              else "-")
        if r["late_copy_share"] is not None:
            pf += f"; copies late in {r['late_copy_share']:.0%} of layers"
            pf += f" ({r['late_copy_polls']:.0f} polls each)" if r["late_copy_polls"] is not None else ""
        print(f"| {r['prompt_tokens']:,} | {mode} | {r['tok_s']:.1f} | {pct} | {r['coverage']:.1%} | "
              f"{r['nonresident_bytes_per_token'] / 1e6:.0f} | {r['streamed_share']:.0%} ({r['final_gpu_share']:.2f}) "
              f"| {pf} | {r['cpu_expert_ms_per_token']:.2f} | {r['tok_s'] / LLAMA_CPP_TOK_S:.2f}x |")
    print(f"VRAM: at most {torch.cuda.max_memory_reserved() / 2**20:,.0f} MiB reserved by torch's allocator "
          f"(budget {args.vram_budget_mb:,} MiB)")
    print("\nCPU expert calls in decode, us per call by phase:")
    for r in rows:
        print(f"  {r['prompt_tokens']:>6} {r['mode']:<10} prefetch {r['prefetch']} read-ahead {r['read_ahead']} " +
              " ".join(f"{k}={v:.0f}" for k, v in r["cpu_call_phase_us"].items()))
    if args.json:
        rates = {"dram_gbps": dram, "h2d_gbps": h2d, "pool_dispatch_us": dispatch_us}
        args.json.write_text(json.dumps({"rates": rates, "rows": rows, "label": args.label}, indent=1))


if __name__ == "__main__":
    main()
