#!/usr/bin/env bash
# On the GPU machine: decode of every decode mode on the bench model at one routing skew (issue 11's table).
# 1. make the bench model with --routing-skew $SKEW in $MODEL (a model of another skew there is replaced, and the
#    weight caches in $KRASIS_HOME are dropped: two 31 GB models and their caches do not fit the 64 GB disk),
# 2. benchmarks/decode_modes.py. Logs and JSON go to $OUT (or ./bench-out).
#
#   SKEW=0 bash benchmarks/device_decode.sh
#   SKEW=1 PROMPTS="1000 16000" MODES="cpu gpu hybrid auto" bash benchmarks/device_decode.sh
#   EXTRA="--probe-cpu-store 4" SKEW=0 bash benchmarks/device_decode.sh   # more decode_modes.py options
#   EXTRA="--prefetch 0 2 3" MODES="cpu auto" SKEW=0 bash benchmarks/device_decode.sh   # with expert prefetch
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
MODEL=${MODEL:-/tmp/dsv2}
SKEW=${SKEW:-0}
PY=${PY:-python3}
export KRASIS_HOME=${KRASIS_HOME:-/tmp/krasis-bench-home}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
have=$($PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('routing_skew', 0))" \
  "$MODEL/bench_model.json" 2>/dev/null || echo none)
if [ "$have" != "$SKEW" ] && [ "$have" != "$SKEW.0" ]; then
  rm -rf "$MODEL" "$KRASIS_HOME"
  timeout "${MAKE_TIMEOUT:-300}" $PY benchmarks/make_bench_model.py "$MODEL" --force --routing-skew "$SKEW" 2>&1 \
    | grep -v -E "it/s\]|s/it\]" | tail -25 | tee "$out/make_model_s$SKEW.log"
  sync  # the model's 31 GB of dirty pages would otherwise be written back while decode is timed
fi
read -r -a prompts <<< "${PROMPTS:-1000 16000}"
read -r -a modes <<< "${MODES:-cpu gpu hybrid auto}"
timeout "${DECODE_TIMEOUT:-420}" $PY benchmarks/decode_modes.py "$MODEL" --vram-budget-mb "${BUDGET:-6144}" \
  --prompt-tokens "${prompts[@]}" --modes "${modes[@]}" --prompts "${PROMPTS_PER_LENGTH:-3}" \
  --tokens "${DECODE_TOKENS:-64}" ${EXTRA:-} --label "routing skew $SKEW" --json "$out/decode_modes_s$SKEW.json" 2>&1 \
  | grep -v -E "it/s\]|s/it\]" | tee "$out/decode_modes_s$SKEW.log"
