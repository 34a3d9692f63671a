"""The GPU's own chain of kernels in each MoE layer of a one-graph decode step, from a CUDA trace.

In a one-graph decode step the host waits, in every MoE layer, from its answer to the previous layer (the graph's
wait kernel sees it) until the graph has staged the next layer's inputs (its signal kernel). That stretch is GPU
work alone: the copy of the CPU experts' sum, the residual and norms, attention, the router and the staging. This
script traces a few decode steps with the torch profiler and prints what the stretch is made of: each kernel's
mean time per layer, and the idle gaps between kernels (launch latency inside the graph). It prints the same for
the GPU's work while the host runs its experts (signal to wait: shared, resident and streamed experts).

    python benchmarks/decode_gpu_chain.py /tmp/dsv2 --prompt-tokens 1000 --steps 8
    python benchmarks/decode_gpu_chain.py /tmp/dsv2 --no-hcs --trace /tmp/decode.json   # keep the trace
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
from gpu_engine import load_decode_bench, random_prompt  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
WAIT, SIGNAL = "_wait_kernel", "_signal_kernel"


def gpu_events(events: list[dict]) -> list[dict]:
    """A trace's GPU activities (kernels, copies, memsets) in start order: dicts with name, ts, dur (µs)."""
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    return sorted(gpu, key=lambda e: float(e["ts"]))


def short(name: str, width: int = 58) -> str:
    """A kernel name without its template arguments, cut to ``width``."""
    name = name.split("<", 1)[0].split("(", 1)[0]
    return name if len(name) <= width else name[: width - 3] + "..."


def chains(events: list[dict], opener: str, closer: str, moe_layers: int = 0) -> tuple[list[list[dict]], list[float]]:
    """The stretches from each ``opener`` kernel's end to the next ``closer`` kernel (the signal kernel is kept
    in its stretch, a wait kernel is not: its time is the wait), and each stretch's start. With ``moe_layers``,
    every ``moe_layers``-th opener starts none: a step's last wait is followed by the step's end and the next
    step's first layers (the trace starts at a step's start)."""
    stretches, starts, current, seen = [], [], None, 0
    for e in events:
        name = e["name"]
        if opener in name:
            seen += 1
            current = [] if not moe_layers or seen % moe_layers else None
            start = float(e["ts"]) + float(e["dur"])
            continue
        if current is None:
            continue
        if closer in name:
            if closer == SIGNAL:
                current.append(e)
            if current:
                stretches.append(current)
                starts.append(start)
            current = None
            continue
        current.append(e)
    return stretches, starts


def summarize(title: str, stretches: list[list[dict]], starts: list[float], ends: list[float]) -> None:
    """Print the mean stretch (from its start to its end) and its kernels (µs per layer)."""
    n = len(stretches)
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    total = kernels = gaps = 0.0
    for stretch, start, end in zip(stretches, starts, ends, strict=True):
        prev_end = start
        for e in stretch:
            ts, dur = float(e["ts"]), float(e["dur"])
            gaps += max(0.0, ts - prev_end)
            prev_end = max(prev_end, ts + dur)
            kernels += dur
            entry = per_name[short(e["name"])]
            entry[0] += 1
            entry[1] += dur
        total += end - start
    print(f"{n} {title}: mean {total / n:.1f} µs = kernels and copies {kernels / n:.1f} µs + idle gaps "
          f"{gaps / n:.1f} µs; {sum(len(s) for s in stretches) / n:.1f} activities per stretch")
    print(f"  {'kernel':<60} {'per layer':>9} {'mean µs':>8} {'µs/layer':>9}")
    for name, (count, dur) in sorted(per_name.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<60} {count / n:9.2f} {dur / count:8.2f} {dur / n:9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--vram-budget-mb", type=int, default=6144)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--steps", type=int, default=8, help="decode steps traced")
    p.add_argument("--mode", default="cpu", help="decode mode (cpu, gpu, hybrid, auto)")
    p.add_argument("--no-hcs", action="store_true", help="no hot-expert cache (every routed expert on the CPU)")
    p.add_argument("--prefetch", type=int, default=0, help="experts of each next MoE layer prefetched (0: off)")
    p.add_argument("--trace", type=Path, default=None, help="keep the Chrome trace here")
    p.add_argument("--pipeline", choices=("on", "off"), default="on",
                   help="pipelined greedy decode (each step queued before the host has read the previous token)")
    args = p.parse_args()

    llm = load_decode_bench(args.model_dir, args.vram_budget_mb, hcs=not args.no_hcs)
    llm.set_decode_mode(args.mode)
    llm.set_prefetch(args.prefetch)
    llm.pipeline_decode = args.pipeline == "on"
    vocab = llm.spec.vocab_size
    llm.generate(random_prompt(args.prompt_tokens, vocab, 7), max_new_tokens=16)  # graphs captured
    stream = llm.stream(random_prompt(args.prompt_tokens, vocab, 8), max_new_tokens=args.steps + 4)
    for _ in range(3):  # the prefill and two steps
        next(stream)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            next(stream)
        torch.cuda.synchronize()
    for _ in stream:
        pass
    trace = args.trace or Path(tempfile.mkdtemp()) / "decode_trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace) as fh:
        traced = json.load(fh)["traceEvents"]
    events = gpu_events(traced)
    waits = [e for e in events if WAIT in e["name"]]
    if waits and "stream" in waits[0].get("args", {}):
        # the step's own stream (a prefetch's side stream runs beside it and is not what the host waits for)
        main = waits[0]["args"]["stream"]
        side = [e for e in events if e.get("args", {}).get("stream") != main]
        on_main = [e for e in events if e.get("args", {}).get("stream") == main]
        if sum(SIGNAL in e["name"] for e in on_main) != len(waits):
            # a graph with parallel branches (the streamed share's gather beside the shared experts) is replayed
            # on streams of the driver's choosing: a kernel's stream says nothing about its branch
            print("the step's kernels are spread over several streams (a graph with parallel branches): every "
                  "stream is counted, so overlapping kernels add up to more than the stretch")
            side = []
        else:
            events = on_main
        if side:
            print(f"{len(side)} GPU activities on other streams (prefetch copies, ...) left out of the stretches: "
                  f"{sum(float(e['dur']) for e in side) / len(side):.1f} µs each on average")
            by_name: dict[str, list[float]] = {}
            for e in side:
                by_name.setdefault(short(e["name"]), []).append(float(e["dur"]))
            for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:6]:
                print(f"  {name:<58} {len(durs):>5} x {sum(durs) / len(durs):8.2f} µs")
    names = [e["name"] for e in events]
    print(f"traced {args.steps} decode steps: {len(events)} GPU activities, {len(waits)} wait kernels, "
          f"{sum(SIGNAL in n for n in names)} signal kernels (trace: {trace})")
    if not waits:
        print("no handshakes in the trace: is this a hybrid model decoding through one-graph steps?")
        return
    stretches, starts = chains(events, WAIT, SIGNAL, len(llm._graphs.link.slots))
    summarize("layer stretches (wait kernel's end to the next signal kernel's start)", stretches, starts,
              [float(s[-1]["ts"]) for s in stretches])
    # what the GPU does while the host runs its experts: the shared and resident (and streamed) experts
    stretches, starts = chains(events, SIGNAL, WAIT)
    following = [e for e in events if WAIT in e["name"]]
    ends = [min(float(w["ts"]) for w in following if float(w["ts"]) >= s) for s in starts]
    summarize("expert stretches (signal kernel's end to the wait kernel's start)", stretches, starts, ends)
    wait_us = sum(float(e["dur"]) for e in waits) / len(waits)
    print(f"wait kernels (the GPU waiting for the CPU experts): mean {wait_us:.1f} µs")
    step_edges(events, len(llm._graphs.link.slots))
    launches = [float(e["dur"]) for e in traced
                if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch" and "dur" in e]
    if launches:
        print(f"cudaGraphLaunch: {len(launches)} calls, mean {sum(launches) / len(launches):.1f} µs of the "
              "launching thread's time (under the profiler)")


def step_edges(events: list[dict], moe_layers: int) -> None:
    """Print what lies between one step's last MoE layer and the next step's first: the GPU's tail (final norm,
    lm_head, the logits), the longest idle gap (the host sampling and starting the next step) and the GPU's
    head (the input, the dense layers and the first attention), each a mean over the traced step boundaries."""
    waits = [i for i, e in enumerate(events) if WAIT in e["name"]]
    tails, gaps, heads, periods = [], [], [], []
    tail_kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    head_kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for k in range(moe_layers - 1, len(waits) - moe_layers, moe_layers):
        last = waits[k]
        first_signal = next((i for i in range(last + 1, len(events)) if SIGNAL in events[i]["name"]), None)
        if first_signal is None:
            break
        edge = events[last + 1: first_signal + 1]
        start = float(events[last]["ts"]) + float(events[last]["dur"])
        ends = [start]  # ends[j]: when the GPU's work before edge[j] had all ended
        for e in edge:
            ends.append(max(ends[-1], float(e["ts"]) + float(e["dur"])))
        idle = [float(e["ts"]) - ends[j] for j, e in enumerate(edge)]
        cut = max(range(len(edge)), key=lambda j: idle[j])
        tails.append(ends[cut] - start)
        gaps.append(max(idle[cut], 0.0))
        heads.append(float(edge[-1]["ts"]) - float(edge[cut]["ts"]))
        for j, e in enumerate(edge[:-1]):  # the next step's first signal kernel is not its head's work
            entry = (tail_kernels if j < cut else head_kernels)[short(e["name"])]
            entry[0] += 1
            entry[1] += float(e["dur"])
        periods.append(float(edge[-1]["ts"]) - start)
    if not tails:
        print("fewer than two whole steps traced: no step boundary to show")
        return
    n = len(tails)
    print(f"{n} step boundaries (a step's last wait kernel to the next step's first signal): mean "
          f"{sum(periods) / n:.1f} µs = GPU tail {sum(tails) / n:.1f} µs (final norm, lm_head, logits) + host gap "
          f"{sum(gaps) / n:.1f} µs (sampling, the next step's start) + GPU head {sum(heads) / n:.1f} µs (input, dense "
          "layers, first attention)")
    for title, kernels in (("tail", tail_kernels), ("head", head_kernels)):
        busy = sum(d for _, d in kernels.values()) / n
        print(f"  GPU {title}: kernels and copies {busy:.1f} µs a boundary; the longest:")
        for name, (count, dur) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:8]:
            print(f"    {name:<60} {count / n:6.2f} x {dur / count:8.2f} µs")


if __name__ == "__main__":
    main()
