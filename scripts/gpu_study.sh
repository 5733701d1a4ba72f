#!/usr/bin/env bash
# GPU evidence for the study (docs/results.md): the README's main command as is, then the rank study at a
# research budget (3 seeds x 300 steps, packed), the workspace (without adapters) tarred for export;
# last, the --merge check of the single trial.
set -uo pipefail
OUT=${OUT:-/tmp/out}; WS=/tmp/ws; rm -rf $WS; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
quiet() { grep -v -i -E "warn|de-quantiz|Loading weights|^\s*$"; }
/usr/bin/time -f "default rank study: wall %e s" python3 -m lora_ablate study --space rank --workspace $WS --quiet 2>&1 | quiet | tee $OUT/study.log
/usr/bin/time -f "rank study, 3 seeds x 300 steps, --pack auto: wall %e s" python3 -m lora_ablate study --space rank \
  --seeds 3 --study-name rank-gpu-s3 --pack auto --workspace $WS --quiet train.steps=300 eval.size=64 2>&1 | quiet | tee -a $OUT/study.log
tar -C $WS --exclude=adapter -czf $OUT/ws.tgz . && ls -la $OUT/ws.tgz
R=/tmp/mruns; rm -rf $R
python3 -m lora_ablate train --out $R/merge --merge model.dtype=float32 train.steps=10 eval.size=8 eval.base=false --quiet 2>&1 | tail -1
python3 - <<'PY' 2>&1 | quiet | tee -a $OUT/study.log
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from lora_ablate.config import ModelConfig
from lora_ablate.models import load_base
b = load_base(ModelConfig(dtype="float32"))
x = torch.randint(0, 1000, (2, 32), device=b.device)
merged = AutoModelForCausalLM.from_pretrained("/tmp/mruns/merge/merged", dtype=torch.float32).to(b.device)
with torch.no_grad():
    lm = merged(x).logits
    la = PeftModel.from_pretrained(b.model, "/tmp/mruns/merge/adapter")(x).logits
print(f"merge check (fp32): max |merged - adapter| logits = {(lm - la).abs().max().item():.2e}")
PY
