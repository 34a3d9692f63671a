"""Weight-cache benchmark: build rate (GB/s of BF16 input), peak extra anonymous memory while building, and the
time to open a built cache, on a synthetic Qwen3-MoE / DeepSeek-V2-Lite-shaped checkpoint.

    python benchmarks/cache_build.py --out /tmp/synth --layers 8                  # DeepSeek-V2-Lite expert dims
    python benchmarks/cache_build.py --out /tmp/synth --layers 4 --hidden 512 --inter 512 --experts 16  # small
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path


def _rss_anon() -> int:
    """This process's resident anonymous memory in bytes (file-backed pages, e.g. mmap'd weights, excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def write_model(out: Path, layers: int, hidden: int, inter: int, experts: int, top_k: int) -> Path:
    from krasis.synthetic import write_random_checkpoint, write_tokenizer

    config = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 1024, "hidden_size": hidden,
              "intermediate_size": inter, "moe_intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 128 or 1, "num_key_value_heads": 1, "head_dim": 128,
              "num_experts": experts, "num_experts_per_tok": top_k, "max_position_embeddings": 4096}
    write_random_checkpoint(out, config)
    write_tokenizer(out, 1024)
    return out


def measure(model_dir: Path, bits: int = 4) -> dict:
    """Build the cache under $KRASIS_HOME (sampling memory), then time opening it again. Returns the figures."""
    from krasis.cache import QuantConfig, ensure_cache
    from krasis.cache.loader import load_cached_weights
    from krasis.checkpoint import Checkpoint
    from krasis.models import spec_from_config

    ckpt = Checkpoint(model_dir)
    spec = spec_from_config(ckpt.config)
    quant = QuantConfig(cpu_expert_bits=bits)
    baseline, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    directory, manifest = ensure_cache(ckpt, spec, quant, progress=False)
    build_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    source = sum((model_dir / f).stat().st_size for f in ckpt.files)
    expert_source = 3 * spec.hidden_size * spec.moe.intermediate_size * spec.moe.num_experts * 2 * \
        sum(layer.is_moe for layer in spec.layers)
    t0 = time.perf_counter()
    directory2, _ = ensure_cache(Checkpoint(model_dir), spec, quant, progress=False)
    weights = load_cached_weights(ckpt, spec, __import__("torch").bfloat16, quant, directory2)
    load_s = time.perf_counter() - t0
    del weights
    cache_bytes = sum(f["size"] for f in manifest["files"].values())
    return {"source_bytes": source, "expert_source_bytes": expert_source, "cache_bytes": cache_bytes,
            "build_s": build_s, "load_s": load_s, "peak_extra_anon_bytes": max(peak[0] - baseline, 0),
            "one_layer_expert_source_bytes": expert_source // max(1, sum(x.is_moe for x in spec.layers))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="where to write the synthetic checkpoint (default: tmp)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="krasis-cache-bench-"))
    model = args.out or work / "model"
    t0 = time.perf_counter()
    if not (model / "config.json").is_file():
        write_model(model, args.layers, args.hidden, args.inter, args.experts, args.top_k)
    print(f"synthetic checkpoint ready in {time.perf_counter() - t0:.1f} s: {model}", flush=True)
    os.environ["KRASIS_HOME"] = str(work / "home")
    r = measure(model, args.bits)
    import krasis._core as core

    print(f"threads {core.num_threads()}, simd {core.simd_path()}")
    print("| source GB | expert GB | cache GB | build s | build GB/s (source) | load s | peak extra RAM MB "
          "| one layer's experts MB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['source_bytes'] / 1e9:.2f} | {r['expert_source_bytes'] / 1e9:.2f} | {r['cache_bytes'] / 1e9:.2f} "
          f"| {r['build_s']:.1f} | {r['source_bytes'] / 1e9 / r['build_s']:.2f} | {r['load_s']:.2f} "
          f"| {r['peak_extra_anon_bytes'] / 1e6:.0f} | {r['one_layer_expert_source_bytes'] / 1e6:.0f} |")
    shutil.rmtree(work / "home", ignore_errors=True)


if __name__ == "__main__":
    main()
