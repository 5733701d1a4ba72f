"""A trial of the pack written as a stock peft adapter directory."""

from __future__ import annotations

from pathlib import Path

from lora_ablate.packed.pack import Pack
from lora_ablate.packed.slot import Slot
from lora_ablate.trial import peft_config


def export_adapter(pack: Pack, slot: Slot, dest: Path) -> None:
    """Write the slot's adapter as peft's ``save_pretrained`` would: adapter_config.json and
    adapter_model.safetensors with ``base_model.model.<module>.lora_A.weight`` keys, fp32, unpadded."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    cfg = peft_config(slot.spec.lora, slot.plan.target_modules)
    cfg.base_model_name_or_path = pack.base.name_or_path
    cfg.inference_mode = True
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(dest))
    state = {}
    for name, (a, b) in pack.slot_weights(slot).items():
        state[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(state, str(dest / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    pack.base.record_identity(dest)
