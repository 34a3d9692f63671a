#!/usr/bin/env bash
# On the GPU machine: decode of two versions of the code on the bench model, alternated in one call, each run from
# its own tree (a benchmark script imports the krasis package beside it, so pointing PYTHONPATH at another tree
# compares nothing).
#
# Prepare the old tree here, before the call (it travels with the working tree when carried):
#   bash benchmarks/device_decode_ab.sh --prepare OLD_REV .devrun/old     # git archive + the built extension
# Then, on the GPU machine (carry .devrun and the extension):
#   OLD=.devrun/old MODES="cpu auto" PROMPTS="1000 16000" ROUNDS=2 bash benchmarks/device_decode_ab.sh
# Each round runs both trees, the first round new then old, the next old then new, ...; logs and JSON go to $OUT.
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
  rev=${2:?"--prepare REV DIR"}; dir=${3:?"--prepare REV DIR"}
  rm -rf "$dir" && mkdir -p "$dir" && git archive "$rev" python | tar -x -C "$dir" || exit
  cp -r benchmarks "$dir/benchmarks" && rm -rf "$dir/benchmarks/__pycache__"  # today's scripts, the old package
  # the extension built here serves the old tree only where the Rust sources are the same in both
  git diff --quiet "$rev" HEAD -- src Cargo.toml Cargo.lock || { echo "the Rust sources differ since $rev: build \
that revision's extension (pip wheel --no-deps in a worktree of it) into $dir/python/krasis/"; exit 1; }
  cp python/krasis/_core*.so "$dir/python/krasis/" || { echo "build the extension first (maturin develop)"; exit 1; }
  echo "old tree of $rev in $dir"
  exit 0
fi
out=${OUT:-bench-out}; mkdir -p "$out"
OLD=${OLD:?"OLD=path of the tree made by --prepare"}
MODEL=${MODEL:-/tmp/dsv2}
export KRASIS_HOME=${KRASIS_HOME:-/tmp/krasis-bench-home} PYTHONUNBUFFERED=1
[ -f "$MODEL/bench_model.json" ] || { timeout 300 python3 benchmarks/make_bench_model.py "$MODEL" --force \
  --routing-skew "${SKEW:-0}" 2>&1 | grep -v -E "it/s\]|s/it\]" | tail -1; sync; }
read -r -a prompts <<< "${PROMPTS:-1000 16000}"
read -r -a modes <<< "${MODES:-cpu auto}"
for r in $(seq 1 "${ROUNDS:-2}"); do
  if [ $((r % 2)) = 1 ]; then order="new old"; else order="old new"; fi
  for v in $order; do
    if [ "$v" = old ]; then tree=$OLD; else tree=.; fi
    echo "== round $r, $v"
    timeout "${DECODE_TIMEOUT:-200}" python3 "$tree/benchmarks/decode_modes.py" "$MODEL" --vram-budget-mb \
      "${BUDGET:-6144}" --prompt-tokens "${prompts[@]}" --modes "${modes[@]}" --prompts "${PROMPTS_PER_LENGTH:-2}" \
      --tokens "${DECODE_TOKENS:-64}" --label "$v, round $r" --json "$out/ab_${v}_$r.json" > "$out/ab_${v}_$r.log" 2>&1
    grep -E "^\| [0-9]|measured|hot cache" "$out/ab_${v}_$r.log"
  done
done
