#!/usr/bin/env bash
# GPU evidence for the single trial (docs/results.md): the default experiment on the embedded model,
# base vs trained adapter on the held-out sets, plus gradient checkpointing and --merge checks.
set -uo pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/runs; rm -rf $R; mkdir -p $R $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/card.txt
run() { local name=$1; shift; /usr/bin/time -f "$name wall %e s" python3 -m lora_ablate train --quiet --out $R/$name "$@" \
          2>&1 | grep -v -i -E "warn|de-quantiz|Loading weights" | tee -a $OUT/log.txt; cp $R/$name/metrics.json $OUT/$name.metrics.json 2>/dev/null; }
run default eval.size=200
run gc train.gradient_checkpointing=true train.steps=30 eval.size=32 eval.base=false
run merge --merge train.steps=10 eval.size=8 eval.base=false
python3 - <<'PY' 2>&1 | tee -a $OUT/log.txt
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from lora_ablate.config import ModelConfig
from lora_ablate.models import load_base
b = load_base(ModelConfig())
x = torch.randint(0, 1000, (2, 32), device=b.device)
merged = AutoModelForCausalLM.from_pretrained("/tmp/runs/merge/merged", dtype=b.dtype).to(b.device)
peft_m = PeftModel.from_pretrained(b.model, "/tmp/runs/merge/adapter")
with torch.no_grad():
    d = (merged(x).logits.float() - peft_m(x).logits.float()).abs().max().item()
print(f"merged vs adapter max |logit diff| (bf16): {d:.4f}")
PY
