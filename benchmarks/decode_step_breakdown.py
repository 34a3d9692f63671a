"""Where the wall time of a one-graph decode step goes, on the GPU machine: the host's answering of the MoE layers
(``serve_graph_step``: the CPU experts, the wait for the GPU to stage each layer, and its own bookkeeping), the rest
of ``DecodeGraphs.step`` (setting the input, launching the graph), sampling (which waits for the step's last GPU
work), and what is left between steps (Python); then a cProfile of one prompt's decode, by own time.

    python benchmarks/decode_step_breakdown.py /tmp/dsv2 --prompt-tokens 1000 --prompts 3
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
from gpu_engine import load_decode_bench, random_prompt  # noqa: E402

import krasis.llm as llm_module  # noqa: E402


def timed(fn: Callable, totals: dict, key: str) -> Callable:
    """``fn`` adding its wall time to ``totals[key]``."""
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[key] += time.perf_counter() - t0
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--vram-budget-mb", type=int, default=6144)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--mode", default="cpu", help="decode mode (cpu, gpu, hybrid, auto)")
    args = p.parse_args()

    llm = load_decode_bench(args.model_dir, args.vram_budget_mb)
    llm.set_decode_mode(args.mode)
    vocab, rt = llm.spec.vocab_size, llm.runtime
    llm.generate(random_prompt(args.prompt_tokens, vocab, 7), max_new_tokens=16)  # graphs captured, cache settled

    totals = {"serve": 0.0, "step": 0.0, "sample": 0.0}
    rt.serve_graph_step = timed(rt.serve_graph_step, totals, "serve")
    llm._graphs.step = timed(llm._graphs.step, totals, "step")
    llm_module.sample = timed(llm_module.sample, totals, "sample")
    print(f"decode mode {args.mode}, prompts of {args.prompt_tokens} tokens, {args.tokens} tokens each; "
          "ms per token:")
    for j in range(args.prompts):
        for key in totals:
            totals[key] = 0.0
        before = dict(rt.counters)
        stamps = [time.perf_counter() for _ in llm.stream(random_prompt(args.prompt_tokens, vocab, 100 + j),
                                                         max_new_tokens=args.tokens)]
        n, wall = len(stamps) - 1, stamps[-1] - stamps[0]
        cpu = rt.counters["cpu_expert_seconds"] - before["cpu_expert_seconds"]
        wait = rt.counters["wait_for_gpu_seconds"] - before["wait_for_gpu_seconds"]
        ms = {k: 1e3 * v / n for k, v in totals.items()}
        cpu_ms, wait_ms, wall_ms = 1e3 * cpu / n, 1e3 * wait / n, 1e3 * wall / n
        print(f"  prompt {j}: {n / wall:.1f} tok/s = {wall_ms:.2f} ms | serve {ms['serve']:.2f} (CPU experts "
              f"{cpu_ms:.2f}, wait for the GPU {wait_ms:.2f}, its own {ms['serve'] - cpu_ms - wait_ms:.2f}) | rest of "
              f"step() {ms['step'] - ms['serve']:.2f} | sample {ms['sample']:.2f} | between steps "
              f"{wall_ms - ms['step'] - ms['sample']:.2f}", flush=True)
    profile = cProfile.Profile()
    stream = llm.stream(random_prompt(args.prompt_tokens, vocab, 200), max_new_tokens=args.tokens)
    next(stream)  # the prefill is not profiled
    profile.enable()
    for _ in stream:
        pass
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
