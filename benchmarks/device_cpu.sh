#!/usr/bin/env bash
# On the GPU machine (no cargo there): run the Rust core's tests on its AVX-512 CPU, the weight-cache and CPU
# expert benchmarks, then the whole test suite. Needs python/krasis/_core.abi3.so built beforehand (carried
# with the call). Logs go to $OUT (or ./bench-out); the summary tables are printed last.
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(s\)" > "$out/cpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_core_*.py > "$out/core_tests.log" 2>&1
echo "core tests rc=$? $(tail -1 "$out/core_tests.log")" >> "$out/summary.txt"
timeout 200 python3 benchmarks/cache_build.py --layers 8 > "$out/cache_build.log" 2>&1
timeout 400 python3 benchmarks/cpu_experts.py > "$out/cpu_experts_avx512.log" 2>&1
KRASIS_SIMD=avx2 timeout 300 python3 benchmarks/cpu_experts.py --no-torch > "$out/cpu_experts_avx2.log" 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider -x tests > "$out/all_tests.log" 2>&1
echo "all tests rc=$? $(tail -1 "$out/all_tests.log")" >> "$out/summary.txt"
cat "$out/cpu.txt" "$out/summary.txt"
for f in cache_build cpu_experts_avx512 cpu_experts_avx2; do echo "== $f"; tail -22 "$out/$f.log"; done
