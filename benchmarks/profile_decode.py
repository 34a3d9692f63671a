"""Where a hybrid decode step's time goes, on the GPU machine: per-step wall time split into the CPU experts'
forward, the wait for the GPU before the CPU can start, and the rest (GPU work and Python), for three
placements of the routed experts; then a torch.profiler table of the default placement.

    python benchmarks/profile_decode.py /tmp/dsv2            # the bench model made by make_bench_model.py
    python benchmarks/profile_decode.py /tmp/dsv2 --steps 16 --no-profiler

Placements: "hcs" (the VRAM budget's hot cache, the rest on the CPU), "cpu" (no hot cache: every routed expert
on the CPU) and "gpu" (a budget large enough for every expert to stay in VRAM: the GPU-side floor); "hcs" and
"gpu" also without decode CUDA graphs (every kernel launched from Python), the baseline the graphs replace.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
import krasis  # noqa: E402


class _Timed:
    """Wraps an object so that calls of one method add their wall time to ``self.seconds``."""

    def __init__(self, inner, method: str):
        self._inner, self._method, self.seconds, self.calls = inner, method, 0.0, 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return attr(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def run(model: Path, budget: int, hcs: bool, graphs: bool, steps: int, profile: bool) -> dict:
    llm = krasis.LLM(model, device="cuda", dtype="bfloat16", expert_bits=4, vram_budget_mb=budget, hcs=hcs,
                     kv_dtype="fp8", cuda_graphs=graphs)
    llm.eos_token_ids = set()
    vocab = llm.spec.vocab_size
    prompt = [int(t) for t in torch.randint(0, vocab, (128,), generator=torch.Generator().manual_seed(5))]
    llm.generate(prompt, max_new_tokens=8)  # warm-up (kernels compiled, hot cache filled)
    rt = llm.runtime
    store, staged = _Timed(rt.store, "forward"), _Timed(rt._staged, "synchronize")
    rt.store, rt._staged = store, staged
    if llm._graphs is not None:  # the graph path waits on its own event
        staged = llm._graphs._event = _Timed(llm._graphs._event, "synchronize")
    gen = llm.stream(prompt, max_new_tokens=steps + 1)
    next(gen)  # the prompt's first token (prefill) is not a decode step
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = sum(1 for _ in gen)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    report = llm.engine_report()
    out = {"steps": n, "ms_per_step": 1e3 * wall / n, "tok_s": n / wall,
           "cpu_experts_ms": 1e3 * store.seconds / n, "cpu_calls_per_step": store.calls / n,
           "wait_gpu_ms": 1e3 * staged.seconds / n, "hcs_coverage": report.get("hcs_coverage")}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in llm.stream(prompt, max_new_tokens=6):
                pass
            torch.cuda.synchronize()
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    del llm, rt, gen
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--budget", type=int, default=6144, help="VRAM budget (MiB) of the hcs and cpu placements")
    p.add_argument("--no-profiler", action="store_true")
    args = p.parse_args()
    rows = {}
    placements = (("hcs", args.budget, True, True), ("hcs, no graphs", args.budget, True, False),
                  ("cpu", args.budget, False, True), ("gpu", 40000, True, True), ("gpu, no graphs", 40000, True, False))
    for name, budget, hcs, graphs in placements:
        rows[name] = run(args.model_dir, budget, hcs, graphs, args.steps,
                         profile=name == "hcs" and not args.no_profiler)
        print(name, rows[name], flush=True)
    print("| placement | tok/s | ms/step | CPU experts ms | wait for GPU ms | other ms | HCS coverage |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        other = r["ms_per_step"] - r["cpu_experts_ms"] - r["wait_gpu_ms"]
        print(f"| {name} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | {r['cpu_experts_ms']:.2f} | "
              f"{r['wait_gpu_ms']:.2f} | {other:.2f} | {statistics.fmean([r['hcs_coverage'] or 0]):.1%} |")


if __name__ == "__main__":
    main()
