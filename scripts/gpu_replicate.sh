#!/usr/bin/env bash
# GPU: the rank study again with more power (5 seeds x 300 steps, 200 held-out examples per set, --pack auto:
# 32 trials in one pack, the last 3 refilled into it), to check docs/results.md's rank findings.
set -uo pipefail
OUT=${OUT:-/tmp/out}; WS=/tmp/ws; rm -rf $WS; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
quiet() { grep -v -i -E "warn|de-quantiz|Loading weights|Writing model|^\s*$"; }
/usr/bin/time -f "rank study, 5 seeds x 300 steps, eval.size=200, --pack auto: wall %e s" python3 -m lora_ablate study \
  --space rank --seeds 5 --study-name rank-gpu-s5 --pack auto --workspace $WS --quiet train.steps=300 eval.size=200 \
  2>&1 | quiet | tail -8 | tee $OUT/study.log
tar -C $WS --exclude=adapter -czf $OUT/ws.tgz . && ls -la $OUT/ws.tgz
