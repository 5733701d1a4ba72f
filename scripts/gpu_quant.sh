#!/usr/bin/env bash
# GPU checks of the single trial: 8-bit and 4-bit (nf4) bases, with and without gradient checkpointing.
# Needs bitsandbytes on the host (.whl-bnb). The --merge check is in gpu_study.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/qruns; rm -rf $R; mkdir -p $R $OUT
common="train.steps=40 eval.size=32 eval.base=false --quiet"
for q in 8bit 4bit; do
  for gc in false true; do
    /usr/bin/time -f "$q gc=$gc wall %e s" python3 -m lora_ablate train --out $R/$q-$gc model.quantization=$q \
      train.gradient_checkpointing=$gc $common 2>&1 | grep -E "final|wall|error|Error" | tee -a $OUT/quant.txt
    python3 -c "import json,sys; t=json.load(open('$R/$q-$gc/metrics.json'))['trial']; print('$q gc=$gc', 'peak MiB %.0f' % t['peak_mem_mb'], 'tok/s %.0f' % t['tokens_per_s'], 'loss %.3f' % t['final_train_loss'])" 2>&1 | tee -a $OUT/quant.txt
  done
done
