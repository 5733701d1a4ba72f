#!/usr/bin/env bash
# GPU checks of the single trial: 8-bit and 4-bit (nf4) bases with gradient checkpointing, and --merge
# (merged logits vs the adapter's). Needs bitsandbytes on the host.
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
python3 -m lora_ablate train --out $R/merge --merge model.dtype=float32 train.steps=10 eval.size=8 eval.base=false --quiet 2>&1 | tail -2
python3 - <<'PY' 2>&1 | grep -v -i -E "warn|Convert|Loading" | tee -a $OUT/quant.txt
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from lora_ablate.config import ModelConfig
from lora_ablate.models import load_base
b = load_base(ModelConfig(dtype="float32"))
x = torch.randint(0, 1000, (2, 32), device=b.device)
merged = AutoModelForCausalLM.from_pretrained("/tmp/qruns/merge/merged", dtype=torch.float32).to(b.device)
with torch.no_grad():
    lm = merged(x).logits
    la = PeftModel.from_pretrained(b.model, "/tmp/qruns/merge/adapter")(x).logits
print(f"merge check (fp32): max |merged - adapter| logits = {(lm - la).abs().max().item():.2e}")
PY
