"""Krasis' hybrid GPU pipeline on the bench model under a VRAM budget: load (and weight-cache build) time,
prefill tok/s per prompt length, decode tok/s, peak VRAM and RAM, each beside its bound measured in the same run.

    python benchmarks/gpu_engine.py /tmp/dsv2 --vram-budget-mb 6144 --prompt-tokens 10000 20000 \\
        --decode-tokens 64 --decode-prompts 3 --json engine.json          # [--no-hcs]
    python benchmarks/gpu_engine.py /tmp/dsv2-tiny --device cpu --prompt-tokens 256 --decode-tokens 8  # logic check

What is timed:
- load: ``krasis.LLM(model_dir, device="cuda", expert_bits=4, dtype="bfloat16", vram_budget_mb=..., kv_dtype="fp8",
  hcs=...)``, the first call building the weight cache (its share comes from ``llm.load_report``).
- prefill: ``llm.generate(ids, max_new_tokens=1)`` on random ids, synchronised: time to first token; prefill
  tok/s = prompt length / that time (best of --repeats, after an untimed warm-up: one prefill chunk, then one
  decode of --decode-tokens tokens, so that kernel compilation, graph capture and auto's first trials of its
  shares are not timed).
- decode: ``llm.stream(prompt, max_new_tokens=N)`` after --decode-prompts different random ~128-token prompts,
  each token time-stamped; tok/s = (N - 1) / (last - first stamp), the mean over the prompts. ``llm.eos_token_ids``
  is emptied first so that no run stops early on a random EOS. ``llm.engine_report()`` is read once right before
  the timed decode (it resets the hot-cache counters) and once after it (hot-cache coverage of the timed decode).

Bounds (rates measured by benchmarks/bounds.py at the start of the same run, before the model is loaded):
- prefill time >= max(passes * expert_bytes_total / pinned H2D rate, FLOPs / BF16 matmul rate), passes =
  ceil(prompt / prefill_chunk_tokens), FLOPs = prompt * matmul FLOPs per token + attention's own FLOPs;
- decode time per token >= max(cpu_expert_bytes_per_token / DRAM read rate, streamed bytes per token / H2D rate)
  (the second term only when the engine reports streaming during decode).
Missing engine figures are estimated from config.json where that is exact (FLOPs, all-expert bytes in INT4)
and marked "(est.)"; otherwise printed "n/a".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("krasis") is None:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import bounds  # noqa: E402

from krasis.engine.decode_modes import DECODE_MODES  # noqa: E402

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# Work and bytes from the model's config


def _matrices(spec, layer) -> list[tuple[int, ...]]:
    from krasis.models.shapes import attention_shapes, mlp_shapes

    shapes = {**attention_shapes(spec, layer), **mlp_shapes(spec, layer)}
    return [s for role, s in shapes.items() if len(s) == 2 and role != "router"]


def matmul_flops_per_token(spec) -> int:
    """FLOPs (2 per weight) one token spends in weight matrices: attention projections, dense MLPs, shared and
    top-k routed experts, and lm_head (as the engine's report counts it). Attention over the context is not
    included (see attention_flops)."""
    from krasis.models.shapes import expert_shapes

    weights = spec.vocab_size * spec.hidden_size
    for layer in spec.layers:
        weights += sum(n * k for n, k in _matrices(spec, layer))
        if layer.is_moe:
            weights += spec.moe.router.top_k * sum(n * k for n, k in expert_shapes(spec).values())
    return 2 * weights


def attention_flops(spec, prompt_tokens: int) -> float:
    """FLOPs of attention's own work (scores and the weighted sum of values) for a causal prompt, all layers.

    Every query attends to itself and the keys before it: n (n + 1) / 2 (query, key) pairs per layer, however the
    prompt is chunked. Per pair and head, the scores take (qk_nope + qk_rope) multiply-adds and the value sum
    v_head_dim (MLA, with keys and values expanded from the latent as prefill does); GQA: head_dim each.
    Each multiply-add is 2 FLOPs."""
    from krasis.models.spec import MLASpec

    a = spec.attention
    if isinstance(a, MLASpec):
        per_pair = 2 * a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    else:
        per_pair = 2 * a.num_heads * 2 * a.head_dim
    pairs = prompt_tokens * (prompt_tokens + 1) / 2
    return spec.num_layers * pairs * per_pair


def expert_nbytes(spec, bits: int = 4, group: int = 128) -> int:
    """Bytes of one routed expert (gate, up, down: packed weights + scales) in Krasis' CPU format."""
    from krasis import _core
    from krasis.models.shapes import expert_shapes

    return sum(_core.matrix_layout(n, k, bits, group)["nbytes"] for n, k in expert_shapes(spec).values())


def config_estimates(spec, bits: int = 4) -> dict:
    """What the config alone fixes: FLOPs per token, one expert's and all experts' bytes, and the bytes of
    routed experts a decoded token reads when none is resident in VRAM."""
    moe_layers = sum(layer.is_moe for layer in spec.layers)
    per_expert = expert_nbytes(spec, bits) if spec.moe else 0
    return {"flops_per_token": matmul_flops_per_token(spec), "lm_head_flops": 2 * spec.vocab_size * spec.hidden_size,
            "expert_nbytes": per_expert, "moe_layers": moe_layers,
            "expert_bytes_total": moe_layers * spec.moe.num_experts * per_expert if spec.moe else 0,
            "expert_bytes_per_token_all_cpu": moe_layers * spec.moe.router.top_k * per_expert if spec.moe else 0}


# ---------------------------------------------------------------------------------------------------------------
# Bounds


def prefill_bound(prompt: int, chunk: int | None, expert_bytes_total: float | None, h2d_gbps: float | None,
                  flops_per_token: float | None, lm_head_flops: float, attn_flops: float,
                  tflops: float | None) -> dict:
    """Lower bound on prefill time: max(transfer, compute). Either side is None when a figure is missing."""
    out: dict = {"passes": None, "transfer_s": None, "compute_s": None, "bound_s": None, "bound_tok_s": None}
    if chunk and expert_bytes_total is not None and h2d_gbps:
        out["passes"] = math.ceil(prompt / chunk)
        out["transfer_s"] = out["passes"] * expert_bytes_total / (h2d_gbps * 1e9)
    if flops_per_token is not None and tflops:
        # lm_head runs for the last position only during prefill; the per-token figure counts it for every token
        flops = prompt * (flops_per_token - lm_head_flops) + lm_head_flops + attn_flops
        out["flops"] = flops
        out["compute_s"] = flops / (tflops * 1e12)
    sides = [s for s in (out["transfer_s"], out["compute_s"]) if s is not None]
    if sides:
        out["bound_s"] = max(sides)
        out["bound_tok_s"] = prompt / out["bound_s"]
        out["bound_by"] = "transfer" if out["bound_s"] == out["transfer_s"] else "compute"
    return out


def decode_bound(cpu_bytes: float | None, dram_gbps: float | None, streamed_bytes: float | None = None,
                 h2d_gbps: float | None = None) -> float | None:
    """Upper bound on decode tok/s from the bytes each token must read from DRAM (and stream over PCIe)."""
    if cpu_bytes is None or not dram_gbps:
        return None
    seconds = cpu_bytes / (dram_gbps * 1e9)
    if streamed_bytes and h2d_gbps:
        seconds = max(seconds, streamed_bytes / (h2d_gbps * 1e9))
    return 1 / seconds if seconds > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    """Random ids below the top ids (where the synthetic tokenizer's special tokens sit)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(vocab - 8, 1), (n,), generator=gen).tolist()


def load_decode_bench(model_dir: Path, vram_budget_mb: int, **kwargs):
    """The bench model as the decode benchmarks run it: GPU engine, INT4 experts, BF16 compute, FP8 KV, within
    ``vram_budget_mb`` (``kwargs`` go to krasis.LLM); EOS never ends a generation (random weights), and the page
    cache is written back first, so no write-back of a just-built weight cache runs while anything is timed."""
    import krasis

    llm = krasis.LLM(model_dir, device="cuda", dtype="bfloat16", expert_bits=4, kv_dtype="fp8",
                     vram_budget_mb=vram_budget_mb, **kwargs)
    llm.eos_token_ids = set()
    os.sync()
    return llm


def time_prefill(llm, ids: list[int], device: str, repeats: int) -> dict:
    """Time to first token of ``generate(ids, max_new_tokens=1)``, best of ``repeats``; "OOM" / "too long" on
    failure. With an engine report, also the expert bytes streamed during the best run."""
    from krasis.errors import InvalidInputError

    times, streamed = [], []
    for _ in range(repeats):
        before = _report_value(llm, "expert_bytes_streamed")
        try:
            _sync(device)
            t0 = time.perf_counter()
            llm.generate(ids, max_new_tokens=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"tokens": len(ids), "error": "OOM", "detail": str(e).splitlines()[0][:200]}
        except InvalidInputError as e:
            return {"tokens": len(ids), "error": "too long", "detail": str(e)}
        after = _report_value(llm, "expert_bytes_streamed")
        streamed.append(after - before if before is not None and after is not None else None)
    best = min(range(len(times)), key=times.__getitem__)
    out = {"tokens": len(ids), "ttft_s": times[best], "tok_s": len(ids) / times[best], "all_s": times}
    if streamed[best] is not None:
        out["expert_bytes_streamed"] = streamed[best]
        out["streamed_gbps"] = streamed[best] / times[best] / 1e9
    return out


def _report_value(llm, key: str):
    """A figure of ``llm.engine_report()`` that does not reset anything worth keeping (None when absent).
    Only called around prefill, whose hot-cache counters are not used."""
    fn = getattr(llm, "engine_report", None)
    if fn is None:
        return None
    try:
        return fn().get(key)
    except Exception:  # an engine in progress may not report yet
        return None


def time_decode(llm, prompt: list[int], new_tokens: int) -> dict:
    """Stamp every streamed token; tok/s over the tokens after the first."""
    stamps = []
    t0 = time.perf_counter()
    for _ in llm.stream(prompt, max_new_tokens=new_tokens):
        stamps.append(time.perf_counter())
    n = len(stamps)
    out = {"prompt_tokens": len(prompt), "tokens": n, "ttft_s": stamps[0] - t0 if stamps else None}
    if n >= 2:
        out["tok_s"] = (n - 1) / (stamps[-1] - stamps[0])
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        out["median_ms"] = statistics.median(gaps) * 1e3
        out["max_ms"] = max(gaps) * 1e3
    return out


def find_cache(model_dir: Path) -> tuple[Path | None, int]:
    """The newest weight cache built from ``model_dir`` and its size on disk in bytes."""
    from krasis.paths import cache_dir

    want = Path(model_dir).resolve()
    found = []
    root = cache_dir()
    for manifest in root.glob("*/manifest.json") if root.is_dir() else []:
        try:
            src = json.loads(manifest.read_text()).get("model_dir")
        except (OSError, ValueError):
            continue
        if src and Path(src).resolve() == want:
            found.append(manifest)
    if not found:
        return None, 0
    directory = max(found, key=lambda m: m.stat().st_mtime).parent
    return directory, sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int:
    """This process's resident set now (what it holds after the work, not its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# ---------------------------------------------------------------------------------------------------------------
# Output


def _f(v, spec: str = ",.1f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{format(v, spec)}{suffix}"


def _bytes(v) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1e9:,.2f} GB" if v >= 1e8 else f"{v / 1e6:,.2f} MB"


def _pct(achieved, bound) -> str:
    return "n/a" if achieved is None or not bound else f"{100 * achieved / bound:.0f}%"


def _pick(report: dict, estimates: dict, key: str, est_key: str | None = None) -> tuple[float | None, str]:
    """The engine's figure, else the config estimate (marked), else None."""
    if report.get(key) is not None:
        return report[key], "engine"
    if est_key is not None and estimates.get(est_key) is not None:
        return estimates[est_key], "est."
    return None, "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--vram-budget-mb", type=int, default=6144)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[10000, 20000])
    p.add_argument("--repeats", type=int, default=2, help="prefill runs per prompt length (best is reported)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-prompts", type=int, default=3)
    p.add_argument("--decode-prompt-tokens", type=int, default=128)
    p.add_argument("--no-hcs", action="store_true", help="no hot-expert cache in VRAM")
    p.add_argument("--kv-dtype", default="fp8")
    p.add_argument("--decode-mode", choices=DECODE_MODES, default="auto",
                   help="where decode runs the experts not in the hot cache (krasis.LLM decode_mode)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: LLM(..., device='cpu', expert_bits=4, dtype='float32') to check this script")
    p.add_argument("--quick-bounds", action="store_true", help="smaller buffers for the bound measurements")
    p.add_argument("--json", type=Path, default=None, help="write every number to this file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible; use --device cpu to check the script on the CPU")
    import krasis
    from krasis.checkpoint import Checkpoint
    from krasis.models import spec_from_config

    dev = args.device
    spec = spec_from_config(Checkpoint(args.model_dir).config)
    est = config_estimates(spec)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if dev == "cuda" else None}
    print(f"krasis engine benchmark: {args.model_dir} ({spec.family}, {spec.num_layers} layers, "
          f"{spec.moe.num_experts if spec.moe else 0} experts), device {dev} ({env['gpu'] or 'cpu'}), "
          f"VRAM budget {args.vram_budget_mb} MiB, HCS {'off' if args.no_hcs else 'on'}", flush=True)

    # 1. the machine's rates, before the model takes memory
    t0 = time.perf_counter()
    rates = bounds.measure_all(gpu=dev == "cuda", quick=args.quick_bounds)
    if dev == "cpu":  # the compute side of the CPU run's prefill bound: float32 matmul on the CPU
        rates["matmul_cpu_f32_tflops"] = bounds.matmul_tflops(1024, torch.float32, device="cpu")
    print("measured rates (" + f"{time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{k} {_f(v)}" for k, v in rates.items()), flush=True)
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # 2. load
    cache_before, _ = find_cache(args.model_dir)
    kwargs: dict = {"device": dev, "expert_bits": 4}
    if dev == "cuda":
        kwargs.update(dtype="bfloat16", vram_budget_mb=args.vram_budget_mb, kv_dtype=args.kv_dtype,
                      hcs=not args.no_hcs, decode_mode=args.decode_mode)
    else:
        kwargs.update(dtype="float32")
    t0 = time.perf_counter()
    llm = krasis.LLM(args.model_dir, **kwargs)
    _sync(dev)
    load_s = time.perf_counter() - t0
    load_report = dict(getattr(llm, "load_report", {}) or {})
    cache_s = load_report.get("cache_build_s", load_report.get("cache_s"))
    cache_path, cache_bytes = find_cache(args.model_dir)
    print(f"loaded in {load_s:.1f} s (weight cache {'reused' if cache_before else 'built'}: "
          f"{_f(cache_s)} s); cache {cache_path} ({_bytes(cache_bytes)})", flush=True)
    if load_report:
        print("load report: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in load_report.items()), flush=True)
    report0 = llm.engine_report() if hasattr(llm, "engine_report") else {}
    plan = report0.get("vram_plan")
    if plan:
        print("VRAM plan: " + ", ".join(f"{k}={v}" for k, v in plan.items()), flush=True)

    # 3. prefill
    vocab = spec.vocab_size
    t0 = time.perf_counter()
    # a full prefill chunk, so that compiling the large-batch kernels is not timed (the first timed prompt paid
    # for it before: 6.5K tok/s at 20K tokens where the same code reaches 14K once compiled)
    chunk0 = report0.get("prefill_chunk_tokens") or 256
    llm.generate(random_prompt(min(chunk0 + 1, min(args.prompt_tokens)), vocab, 99), max_new_tokens=2)
    # decode at the timed prompts' length once, as many tokens as a timed prompt: capturing its CUDA graphs, and
    # auto's first trials of its shares (share 0, the shares between 0 and 1, and 1 are captured apart), are not timed
    llm.generate(random_prompt(args.decode_prompt_tokens, vocab, 98), max_new_tokens=args.decode_tokens)
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    prefill = []
    for i, n in enumerate(args.prompt_tokens):
        r = time_prefill(llm, random_prompt(n, vocab, i), dev, args.repeats)
        prefill.append(r)
        print(f"prefill {n} tokens: " + (f"{r['error']} ({r['detail']})" if "error" in r else
                                          f"TTFT {r['ttft_s']:.2f} s = {r['tok_s']:,.0f} tok/s"), flush=True)

    # 4. decode
    llm.eos_token_ids = set()  # random weights: never stop early on a sampled EOS
    if hasattr(llm, "engine_report"):
        llm.engine_report()  # resets the hot-cache counters
    decode = [time_decode(llm, random_prompt(args.decode_prompt_tokens, vocab, 1000 + j), args.decode_tokens)
              for j in range(args.decode_prompts)]
    report = llm.engine_report() if hasattr(llm, "engine_report") else {}
    rates_d = [d["tok_s"] for d in decode if "tok_s" in d]
    decode_tok_s = statistics.mean(rates_d) if rates_d else None
    print(f"decode: {', '.join(f'{x:.2f}' for x in rates_d)} tok/s -> mean {_f(decode_tok_s, '.2f')}", flush=True)

    # 5. memory
    vram = None
    if dev == "cuda":
        free, total = torch.cuda.mem_get_info()
        vram = {"peak_reserved_mib": torch.cuda.max_memory_reserved() / MiB,
                "peak_allocated_mib": torch.cuda.max_memory_allocated() / MiB, "budget_mib": args.vram_budget_mb,
                # the whole device as the driver sees it (CUDA context, cuBLAS/Triton workspaces included), not a peak
                "device_used_mib_at_end": (total - free) / MiB}
    rss, rss_end = peak_rss_bytes(), rss_bytes()

    # 6. bounds
    merged = {**report0, **{k: v for k, v in report.items() if v is not None}}
    chunk = merged.get("prefill_chunk_tokens")
    flops_pt, flops_src = _pick(merged, est, "flops_per_token", "flops_per_token")
    bytes_total, bytes_src = _pick(merged, est, "expert_bytes_total", "expert_bytes_total")
    h2d = rates.get("h2d_pinned_gbps")
    tflops = rates.get("matmul_bf16_tflops") if dev == "cuda" else rates.get("matmul_cpu_f32_tflops")
    for r in prefill:
        r["bound"] = prefill_bound(r["tokens"], chunk, bytes_total, h2d, flops_pt, est["lm_head_flops"],
                                   attention_flops(spec, r["tokens"]), tflops)
    if dev == "cpu":  # everything runs from DRAM: each token reads its routed experts from memory
        cpu_bytes, cpu_src = est["expert_bytes_per_token_all_cpu"], "est."
    else:
        cpu_bytes, cpu_src = _pick(merged, est, "cpu_expert_bytes_per_token")
    streamed_pt = merged.get("streamed_expert_bytes_per_token")
    dec_bound = decode_bound(cpu_bytes, rates.get("dram_read_gbps"), streamed_pt, h2d)

    result = {
        "model_dir": str(args.model_dir), "device": dev, "env": env, "args": {k: str(v) for k, v in vars(args).items()},
        "rates": rates, "load_s": load_s, "cache_s": cache_s, "cache_reused": cache_before is not None,
        "load_report": load_report, "cache_dir": str(cache_path) if cache_path else None, "cache_bytes": cache_bytes,
        "estimates": est, "engine_report_after_load": report0, "engine_report_after_decode": report,
        "prefill": prefill, "decode_runs": decode, "decode_tok_s": decode_tok_s,
        "decode_bound": {"cpu_expert_bytes_per_token": cpu_bytes, "source": cpu_src,
                         "streamed_expert_bytes_per_token": streamed_pt, "bound_tok_s": dec_bound},
        "sources": {"flops_per_token": flops_src, "expert_bytes_total": bytes_src},
        "hcs_coverage": merged.get("hcs_coverage"), "vram": vram, "peak_rss_bytes": rss, "rss_bytes_at_end": rss_end,
    }

    print()
    print(f"Krasis engine, {spec.family} bench model, VRAM budget {args.vram_budget_mb} MiB, "
          f"HCS {'off' if args.no_hcs else 'on'}, decode mode {args.decode_mode}, device {dev}")
    print(f"rates: H2D pinned {_f(h2d)} GB/s, DRAM read {_f(rates.get('dram_read_gbps'))} GB/s, matmul "
          f"{_f(tflops, '.3g')} TFLOP/s{'' if dev == 'cuda' else ' (CPU, float32)'}; prefill chunk "
          f"{_f(chunk, ',d')} tokens; all routed experts {_bytes(bytes_total)} ({bytes_src}); FLOPs/token "
          f"{_f(flops_pt and flops_pt / 1e9, '.3g')} G ({flops_src})")
    print("| measure | achieved | bound | % of bound | bound set by |")
    print("|---|---|---|---|---|")
    print(f"| load s (cache {'reused' if cache_before else 'built'}: {_f(cache_s)} s) | {load_s:.1f} | | | |")
    for r in prefill:
        b = r["bound"]
        ach = r["error"] if "error" in r else f"{r['tok_s']:,.0f} tok/s"
        if b.get("bound_by") == "transfer":
            by = f"transfer ({b['passes']} pass(es) of {_bytes(bytes_total)})"
        elif b.get("bound_by") == "compute":
            by = f"compute ({b['flops'] / 1e12:.3g} TFLOP)"
        else:
            by = "n/a"
        if r.get("streamed_gbps") is not None:
            by += f"; streamed {_bytes(r['expert_bytes_streamed'])} at {r['streamed_gbps']:.1f} GB/s"
        print(f"| prefill {r['tokens']:,} tokens | {ach} | {_f(b['bound_tok_s'], ',.0f', ' tok/s')} | "
              f"{_pct(r.get('tok_s'), b['bound_tok_s'])} | {by} |")
    print(f"| decode ({args.decode_tokens} tokens x {args.decode_prompts} prompts) | "
          f"{_f(decode_tok_s, '.2f', ' tok/s')} | {_f(dec_bound, '.2f', ' tok/s')} | {_pct(decode_tok_s, dec_bound)} "
          f"| DRAM: {_bytes(cpu_bytes)}/token ({cpu_src}); HCS coverage "
          f"{_f(result['hcs_coverage'], '.1%')} |")
    if vram:
        print(f"| peak VRAM reserved (allocated) MiB | {vram['peak_reserved_mib']:,.0f} "
              f"({vram['peak_allocated_mib']:,.0f}) | budget {args.vram_budget_mb:,} | "
              f"{_pct(vram['peak_reserved_mib'], args.vram_budget_mb)} | device memory in use at the end "
              f"{vram['device_used_mib_at_end']:,.0f} MiB (CUDA context included) |")
    print(f"| peak RSS | {_bytes(rss)} | quantised cache {_bytes(cache_bytes)} | {_pct(rss, cache_bytes)} "
          "| (RSS / cache size) |")
    print(f"| RSS at the end | {_bytes(rss_end)} | quantised cache {_bytes(cache_bytes)} | "
          f"{_pct(rss_end, cache_bytes)} | what the process holds after prefill and decode |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
