#!/usr/bin/env bash
# GPU: the two study commands of docs/results.md timed through the real CLI on a fresh machine: the README's
# default (pack 1, the peft reference loop; its first load also writes the dequantized-model cache), then
# the rank study at a research budget, packed (--pack auto: torch.compile + CUDA graphs).
set -uo pipefail
OUT=${OUT:-/tmp/out}; WS=/tmp/ws; rm -rf $WS; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
quiet() { grep -v -i -E "warn|de-quantiz|Loading weights|Writing model|^\s*$"; }
/usr/bin/time -f "default rank study: wall %e s" python3 -m lora_ablate study --space rank --workspace $WS --quiet 2>&1 | quiet | tail -4 | tee $OUT/study.log
/usr/bin/time -f "rank study, 3 seeds x 300 steps, --pack auto: wall %e s" python3 -m lora_ablate study --space rank \
  --seeds 3 --study-name rank-gpu-s3 --pack auto --workspace $WS --quiet train.steps=300 eval.size=64 2>&1 | quiet | tail -6 | tee -a $OUT/study.log
tar -C $WS --exclude=adapter -czf $OUT/ws.tgz . && ls -la $OUT/ws.tgz
