"""The GPU engine's command-line options, shared by ``krasis`` and ``python -m krasis.server``."""

from __future__ import annotations

import argparse

from .engine.decode_modes import DECODE_MODES, MAX_READ_AHEAD, READ_AHEAD


def _read_ahead(value: str) -> int:
    """--read-ahead-experts: a whole number from 0 to MAX_READ_AHEAD."""
    n = int(value) if value.strip().isdigit() else -1
    if not 0 <= n <= MAX_READ_AHEAD:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 (off) to {MAX_READ_AHEAD}, not {value!r}")
    return n


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    """--vram-budget-mb, --kv-dtype, --kv-cache-mb, --layer-group-size, --no-hcs, --hcs-experts, --hcs-calibrate,
    --decode-mode, --prefetch-experts, --read-ahead-experts, --no-cuda-graphs."""
    g = p.add_argument_group("GPU engine (with --device cuda and --cpu-expert-bits 8 or 4: hybrid GPU/CPU experts)")
    g.add_argument("--vram-budget-mb", type=int, default=None,
                   help="VRAM the runtime may use, MiB (default: free memory less 1 GiB); enforced by the allocator")
    g.add_argument("--kv-dtype", choices=("auto", "bf16", "fp8"), default=None,
                   help="KV cache storage: fp8 (e4m3 with per-token scales; GPU default), bf16, or auto = compute "
                        "dtype (CPU default)")
    g.add_argument("--kv-cache-mb", type=int, default=None,
                   help="KV cache size, MiB (default: up to 32K tokens, at most a quarter of the free budget)")
    g.add_argument("--layer-group-size", type=int, default=None,
                   help="MoE layers whose experts are streamed to VRAM together during prefill (default 1)")
    g.add_argument("--no-hcs", dest="hcs", action="store_false",
                   help="keep no hot experts resident in VRAM (decode runs every routed expert on the CPU)")
    g.add_argument("--hcs-experts", type=int, default=None,
                   help="keep at most this many hot experts in VRAM (default: as many as the budget allows)")
    g.add_argument("--hcs-calibrate", metavar="FILE", default=None,
                   help="after loading, fill the hot-expert cache from the routing of this text file and save it as "
                        "a heat map beside the weight cache; later starts reuse the saved heat map")
    g.add_argument("--decode-mode", choices=DECODE_MODES, default="auto",
                   help="where decode runs the experts not in the hot cache: auto (default: tries shares of them "
                        "copied to the GPU over the first decode steps and keeps the fastest), cpu (the Rust "
                        "kernels), gpu (copied to VRAM each step) or hybrid (split by rates measured on first use)")
    g.add_argument("--prefetch-experts", type=int, default=0, metavar="N",
                   help="in decode, copy N likely experts of each next MoE layer to VRAM while the CPU computes a "
                        "layer, predicted by that layer's router (default 0: off; at most the router's top-k)")
    g.add_argument("--read-ahead-experts", type=_read_ahead, default=None, metavar="N",
                   help="in decode, the CPU reads the weights of N likely CPU experts of each next MoE layer into its "
                        f"caches while the GPU runs that layer's attention (default {READ_AHEAD}; 0: off; at most "
                        f"{MAX_READ_AHEAD})")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="launch each decode kernel from Python instead of replaying captured CUDA graphs (slower; "
                        "for comparison and debugging)")


def after_load(llm, args: argparse.Namespace) -> None:
    """What the GPU options ask for once the model is loaded (--hcs-calibrate)."""
    if args.hcs_calibrate:
        llm.calibrate_hot_experts_from_text(args.hcs_calibrate)


def gpu_kwargs(args: argparse.Namespace) -> dict:
    """The krasis.LLM keyword arguments those options set."""
    return dict(vram_budget_mb=args.vram_budget_mb, kv_dtype=args.kv_dtype, kv_cache_mb=args.kv_cache_mb,
                layer_group_size=args.layer_group_size, hcs=args.hcs, hcs_experts=args.hcs_experts,
                cuda_graphs=args.cuda_graphs, decode_mode=args.decode_mode, prefetch_experts=args.prefetch_experts,
                read_ahead_experts=args.read_ahead_experts)
