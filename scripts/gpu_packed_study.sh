#!/usr/bin/env bash
# GPU evidence for the packed engine through the real CLI (Optuna, MLflow, evaluation between steps, refill):
# the rank study at a research budget (3 seeds x 300 steps, --pack auto: torch.compile + CUDA graphs by
# default), then 16 trials of the joint space in packs of 8 (mixed ranks, alpha rules, lr and targets).
set -uo pipefail
OUT=${OUT:-/tmp/out}; WS=/tmp/ws; rm -rf $WS; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
quiet() { grep -v -i -E "warn|de-quantiz|Loading weights|^\s*$"; }
/usr/bin/time -f "rank study, 3 seeds x 300 steps, --pack auto: wall %e s" python3 -m lora_ablate study --space rank \
  --seeds 3 --study-name rank-gpu-s3 --pack auto --workspace $WS --quiet train.steps=300 eval.size=64 2>&1 | quiet | tee $OUT/study.log
/usr/bin/time -f "full space, 16 trials x 100 steps, --pack 8: wall %e s" python3 -m lora_ablate study --space full \
  --n-trials 16 --study-name full-gpu --pack 8 --workspace $WS --quiet train.steps=100 2>&1 | quiet | tee -a $OUT/study.log
python3 -m lora_ablate status --workspace $WS 2>&1 | quiet | tee -a $OUT/study.log
tar -C $WS --exclude=adapter -czf $OUT/ws.tgz . && ls -la $OUT/ws.tgz
