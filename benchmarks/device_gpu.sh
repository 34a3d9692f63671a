#!/usr/bin/env bash
# On the GPU machine: the bench model (DeepSeek-V2-Lite dimensions, random weights) under a VRAM budget.
# 1. make the bench model in $MODEL (reused when $MODEL/bench_model.json says a previous run finished it),
# 2. benchmarks/bounds.py, 3. benchmarks/gpu_engine.py (Krasis), 4. benchmarks/hf_offload_baseline.py
# (transformers + accelerate offload), then one combined table. Logs and JSON go to $OUT (or ./bench-out).
#
#   bash benchmarks/device_gpu.sh                                  # everything (may not fit one 10-minute call)
#   SKIP_BASELINE=1 bash benchmarks/device_gpu.sh                  # call 1: model, bounds, Krasis
#   SKIP_BOUNDS=1 SKIP_ENGINE=1 bash benchmarks/device_gpu.sh      # call 2: baseline (re-makes the model if gone)
#
# Settings (environment): MODEL=/tmp/dsv2  PROMPTS="10000 20000"  BUDGET=6144 (MiB)  DECODE_TOKENS=64
# DECODE_PROMPTS=3  HF_DECODE_TOKENS=8  REPEATS=2  NO_HCS=1 (also run Krasis without the hot-expert cache)
# DECODE_MODE=auto|cpu|gpu|hybrid (where Krasis' decode runs the experts not in the hot cache; default auto)
# SKIP_MAKE / SKIP_BOUNDS / SKIP_ENGINE / SKIP_BASELINE=1  KRASIS_HOME (default /tmp/krasis-bench-home: the
# weight cache, ~10 GB, lives beside the 31 GB model on the same disk)  PY=python3
# Per-step time limits in seconds: MAKE_TIMEOUT=300 BOUNDS_TIMEOUT=120 ENGINE_TIMEOUT=480 HF_TIMEOUT=540
# Each step's JSON is also copied to $RESULTS (default /tmp/krasis-bench-results) so that the final table of a
# later call still shows the steps an earlier call ran (while the machine stays warm; marked "earlier call").
# DEVICE=cpu TINY=1 MODEL=/tmp/dsv2-tiny runs the same steps on the CPU with the tiny stand-in (a dry run).
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"; touch "$out/summary.txt"
MODEL=${MODEL:-/tmp/dsv2}
PROMPTS=${PROMPTS:-10000 20000}
BUDGET=${BUDGET:-6144}
DECODE_TOKENS=${DECODE_TOKENS:-64}
DECODE_PROMPTS=${DECODE_PROMPTS:-3}
HF_DECODE_TOKENS=${HF_DECODE_TOKENS:-8}
REPEATS=${REPEATS:-2}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-/tmp/krasis-bench-results}; mkdir -p "$RESULTS"
export KRASIS_HOME=${KRASIS_HOME:-/tmp/krasis-bench-home}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
read -r -a prompts <<< "$PROMPTS"

step() { echo "== $(date +%H:%M:%S) $*"; }
run() {  # run NAME TIMEOUT CMD...: output to $out/NAME.log and to stdout (progress), status to summary
  local name=$1 limit=$2; shift 2
  step "$name: $*"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]|B/s\]" | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc" >> "$out/summary.txt"
  [ "$rc" = 124 ] && echo "$name: timed out after $limit s"
  if [ -f "$out/$name.json" ]; then cp "$out/$name.json" "$RESULTS/"; else rm -f "$RESULTS/$name.json"; fi
  return 0
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv,noheader 2>/dev/null
  lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"
  free -g | head -2
  df -h /tmp | tail -1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ -z "${SKIP_MAKE:-}" ]; then
  if [ -f "$MODEL/bench_model.json" ]; then
    step "reusing the bench model in $MODEL"
  else
    run make_model "${MAKE_TIMEOUT:-300}" $PY benchmarks/make_bench_model.py "$MODEL" --force --device "$DEVICE" \
      ${TINY:+--tiny}
  fi
fi

if [ -z "${SKIP_BOUNDS:-}" ]; then
  run bounds "${BOUNDS_TIMEOUT:-120}" $PY benchmarks/bounds.py --json "$out/bounds.json"
fi

if [ -z "${SKIP_ENGINE:-}" ]; then
  run engine "${ENGINE_TIMEOUT:-480}" $PY benchmarks/gpu_engine.py "$MODEL" --vram-budget-mb "$BUDGET" \
    --prompt-tokens "${prompts[@]}" --decode-tokens "$DECODE_TOKENS" --decode-prompts "$DECODE_PROMPTS" \
    --repeats "$REPEATS" --device "$DEVICE" --decode-mode "${DECODE_MODE:-auto}" --json "$out/engine.json"
  if [ -n "${NO_HCS:-}" ]; then
    run engine_no_hcs "${ENGINE_TIMEOUT:-480}" $PY benchmarks/gpu_engine.py "$MODEL" --vram-budget-mb "$BUDGET" \
      --prompt-tokens "${prompts[@]}" --decode-tokens "$DECODE_TOKENS" --decode-prompts "$DECODE_PROMPTS" \
      --repeats "$REPEATS" --device "$DEVICE" --no-hcs --json "$out/engine_no_hcs.json"
  fi
fi

if [ -z "${SKIP_BASELINE:-}" ]; then
  run hf_baseline "${HF_TIMEOUT:-540}" $PY benchmarks/hf_offload_baseline.py "$MODEL" --vram-budget-mb "$BUDGET" \
    --prompt-tokens "${prompts[@]}" --decode-tokens "$HF_DECODE_TOKENS" --device "$DEVICE" \
    --json "$out/hf_baseline.json"
fi

step "summary"
cat "$out/summary.txt"
$PY - "$out" "$BUDGET" "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

out, budget, results = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
earlier = []
def load(name):
    for d in (out, results):
        p = d / f"{name}.json"
        if p.is_file():
            if d != out:
                earlier.append(name)
            return json.loads(p.read_text())
    return None

def f(v, spec=",.0f"):
    return "n/a" if v is None else format(v, spec)

b, runs, hf = load("bounds"), {k: load(k) for k in ("engine", "engine_no_hcs")}, load("hf_baseline")
runs = {k: v for k, v in runs.items() if v}
if b:
    print("rates: " + ", ".join(f"{k} {f(v, ',.1f')}" for k, v in b.items()))
cols = list(runs) + (["hf_baseline"] if hf else [])
if not cols:
    sys.exit("no results to summarise")
print(f"\nbench model, VRAM budget {budget} MiB; Krasis cells: achieved (% of bound)")
print("| measure | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
lengths = sorted({r["tokens"] for r in (list(runs.values())[0]["prefill"] if runs else hf["prefill"])})
def cell(col, kind, n=None):
    if col == "hf_baseline":
        if kind == "prefill":
            r = next((x for x in hf["prefill"] if x["tokens"] == n), None)
            return "n/a" if r is None else r.get("error") or f"{f(r['tok_s'])} tok/s"
        if kind == "decode":
            return hf["decode"].get("error") or f"{hf['decode']['tok_s']:.2f} tok/s"
        if kind == "vram":
            v = hf.get("peak_vram") or {}
            return f"{f(v.get('reserved_mib'))} MiB"
        if kind == "load":
            return f"{hf['load_s']:.0f} s"
    e = runs[col]
    if kind == "prefill":
        r = next((x for x in e["prefill"] if x["tokens"] == n), None)
        if r is None:
            return "n/a"
        if "error" in r:
            return r["error"]
        bt = r["bound"].get("bound_tok_s")
        pct = "n/a" if not bt else f"{100 * r['tok_s'] / bt:.0f}%"
        return f"{f(r['tok_s'])} tok/s ({pct})"
    if kind == "decode":
        d, bt = e.get("decode_tok_s"), e["decode_bound"].get("bound_tok_s")
        pct = "n/a" if not (d and bt) else f"{100 * d / bt:.0f}%"
        return f"{f(d, '.2f')} tok/s ({pct}); HCS {f(e.get('hcs_coverage'), '.0%')}"
    if kind == "vram":
        return f"{f((e.get('vram') or {}).get('peak_reserved_mib'))} MiB"
    if kind == "load":
        return f"{e['load_s']:.0f} s (cache {'reused' if e['cache_reused'] else 'built'})"
for n in lengths:
    print(f"| prefill {n:,} tokens | " + " | ".join(cell(c, "prefill", n) for c in cols) + " |")
print("| decode | " + " | ".join(cell(c, "decode") for c in cols) + " |")
print("| peak VRAM reserved | " + " | ".join(cell(c, "vram") for c in cols) + " |")
print("| load | " + " | ".join(cell(c, "load") for c in cols) + " |")
if earlier:
    print(f"(from an earlier call, kept in {results}: {', '.join(earlier)})")
EOF
